"""The GGUF engine: llama-cpp-python, the base loaded once (memory-mapped)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edgelora._native import quiet_native
from edgelora.errors import EdgeloraError

# ggml type ids for the KV cache (ggml.h)
KV_TYPES = {"f32": 0, "f16": 1}


class EngineError(EdgeloraError):
    exit_code = 1


class GGUFEngine:
    backend = "gguf"

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, threads: int = 2, kv_type: str = "f16"):
        from llama_cpp import Llama

        from edgelora.converters import gguf_model

        self.path = Path(path)
        gguf_model.open_reader(self.path)  # validate in Python first: llama.cpp crashes on bad files
        with quiet_native():
            self.llm = Llama(str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                             n_batch=min(n_ctx, 512), logits_all=True, verbose=False,
                             type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
        if self.llm is None:  # pragma: no cover
            raise EngineError(f"llama.cpp could not load {self.path}")
        self.n_ctx = n_ctx

    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits (len(token_ids) x vocab) of one sequence, from an empty cache."""
        ids = list(token_ids)
        if len(ids) > self.n_ctx:
            raise EngineError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
