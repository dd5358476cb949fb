"""`BaseModel`: one view of a base model of any supported family, whatever file it came from
(`edgelora.load_base` reads one).

Weights are loaded lazily, one tensor at a time, as float32 in canonical naming and Hugging Face
orientation; the fingerprint hashes the architecture and those float weights in canonical order,
so the same model read from a Hugging Face directory or from an F32 GGUF of it hashes the same.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .arch import ModelConfig
from .errors import CorruptFileError, UnsupportedFormatError
from .tokenizer import Tokenizer

Loader = Callable[[], np.ndarray]


class Weights(Mapping):
    """Canonical name -> float32 array, each loaded (and dequantized) when asked for."""

    def __init__(self, loaders: dict[str, Loader], shapes: dict[str, tuple[int, ...]]):
        self._loaders = loaders
        self._shapes = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        return self._loaders[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._loaders)

    def __len__(self) -> int:
        return len(self._loaders)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]


@dataclass
class BaseModel:
    config: ModelConfig
    weights: Weights
    tokenizer: Tokenizer
    source: str
    source_format: str  # "hf" or "gguf"
    source_dtype: str  # how the source stores its weights: "F32", "BF16", "Q4_1", ... (the commonest)
    name: str = ""
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def fingerprint(self) -> str:
        """"sha256:<hex>" over the architecture and the float32 weights in canonical order."""
        if self._fingerprint is None:
            self._fingerprint = compute_fingerprint(self.config, self.weights, where=self.source)
        return self._fingerprint

    @property
    def num_parameters(self) -> int:
        return self.config.num_parameters()

    def summary(self) -> dict[str, object]:
        return {
            "name": self.name or Path(self.source).name,
            "source": self.source,
            "format": self.source_format,
            "stored as": self.source_dtype,
            "parameters": self.num_parameters,
            "architecture": self.config.summary(),
            "context length": self.config.max_position_embeddings,
            "chat template": "yes" if self.tokenizer.chat_template else "no",
            "fingerprint": self.fingerprint,
        }


def compute_fingerprint(config: ModelConfig, weights: Mapping[str, np.ndarray], where: str = "the model") -> str:
    """The fingerprint; on the way every tensor is checked to be finite (a NaN or Inf weight is a corrupt
    checkpoint: refused here, at intake, naming the tensor, rather than deep in a quantizer)."""
    h = hashlib.sha256()
    h.update(b"edgelora-fingerprint-v1\n")
    h.update(json.dumps(config.identity(), sort_keys=True).encode())
    for name, shape in config.shapes().items():
        w = np.ascontiguousarray(weights[name], dtype="<f4")
        if w.shape != shape:
            raise UnsupportedFormatError(f"tensor {name} has shape {w.shape}, the config says {shape}")
        if not np.isfinite(w).all():
            bad = int(w.size - np.isfinite(w).sum())
            raise CorruptFileError(f"{where}: tensor {name} holds {bad} NaN or Inf values; the checkpoint is corrupt "
                                   "(re-download or re-save it)")
        h.update(f"\n{name}:{','.join(map(str, shape))}\n".encode())
        h.update(memoryview(w).cast("B"))
    return "sha256:" + h.hexdigest()
