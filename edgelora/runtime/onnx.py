"""The ONNX engine: an onnxruntime session over a decoder with KV-cache inputs and outputs."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from edgelora.errors import EdgeloraError

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


class OnnxEngineError(EdgeloraError):
    exit_code = 1


class OnnxEngine:
    backend = "onnx"

    def __init__(self, path: str | os.PathLike, *, threads: int = 2, providers: Sequence[str] = ("CPUExecutionProvider",),
                 n_ctx: int = 2048):
        import onnxruntime as ort

        self.path = Path(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(self.path), so, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph types
            raise OnnxEngineError(f"onnxruntime cannot load {self.path}: {e}".splitlines()[0]) from e
        self.n_ctx = n_ctx
        self.past_names: list[str] = []
        kv_shape = None
        for inp in self.session.get_inputs():
            if _PAST.match(inp.name):
                self.past_names.append(inp.name)
                kv_shape = inp.shape
        if kv_shape is None:
            raise OnnxEngineError(f"{self.path} has no past_key_values inputs: not a decoder with a KV cache")
        self.kv_heads, self.head_dim = int(kv_shape[1]), int(kv_shape[3])
        self.input_names = {i.name for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    def _empty_past(self) -> dict[str, np.ndarray]:
        empty = np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return {name: empty for name in self.past_names}

    def _feed(self, ids: Sequence[int], past: dict[str, np.ndarray], past_len: int) -> dict[str, np.ndarray]:
        n = len(ids)
        feed = {"input_ids": np.asarray([ids], np.int64), **past}
        if "attention_mask" in self.input_names:
            feed["attention_mask"] = np.ones((1, past_len + n), np.int64)
        if "position_ids" in self.input_names:
            feed["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        return feed

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (len(token_ids) x vocab) of one sequence, from an empty cache."""
        ids = list(token_ids)
        out = self.session.run(["logits"], self._feed(ids, self._empty_past(), 0))
        return out[0][0]

    def close(self) -> None:
        self.session = None
