"""The GGUF engine: llama-cpp-python with the base loaded once (memory-mapped) and LoRA adapters
attached and detached on the loaded model through llama.cpp's adapter API. Every adapter file is
validated in Python first: llama.cpp checks only shapes and crashes on a bad file."""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgelora._native import quiet_native
from edgelora.adapters import AdapterError, LoraAdapter
from edgelora.converters import keys
from edgelora.tokenizer import Tokenizer

from .engine import Engine, EngineError

KV_TYPES = {"f32": 0, "f16": 1}  # ggml type ids (ggml.h)


LORA_ROUTES = ("own", "node", "matmul")  # edgelora_lora_route()'s values, in order


def fused_lora() -> bool:
    """Whether the installed llama.cpp runs each active F32, F16 or Q8_0 LoRA adapter without
    llama.cpp's own four graph nodes per projection (scripts/patches/llama-cpp-fused-lora.patch, applied
    by the install; EDGELORA_LORA_UNFUSED=1 in the environment turns it off)."""
    return lora_route() != "own"


def lora_route() -> str:
    """The route llama.cpp's graphs give an active adapter: "matmul" (the patch's default: in a decode
    step the first adapter runs inside each projection's own mul_mat, others and prompts in one node a
    projection), "node" (one node a projection always; EDGELORA_LORA_NODE=1) or "own" (llama.cpp's four
    nodes; EDGELORA_LORA_UNFUSED=1, or a llama.cpp without the patch)."""
    from llama_cpp import llama_cpp as lib

    probe = getattr(lib._lib, "edgelora_lora_route", None)
    if probe is None:
        return "own"
    probe.restype = ctypes.c_int
    return LORA_ROUTES[probe()]


def set_lora_route(route: str) -> None:
    """One of LORA_ROUTES for graphs llama.cpp builds from now on (to measure the routes in one process);
    a no-op on a llama.cpp without the patch."""
    from llama_cpp import llama_cpp as lib

    if route not in LORA_ROUTES:
        raise EngineError(f"unknown LoRA route {route!r}: use one of {', '.join(LORA_ROUTES)}")
    setter = getattr(lib._lib, "edgelora_set_lora_route", None)
    if setter is not None:
        setter(LORA_ROUTES.index(route))


def lora_in_matmul() -> int:
    """How many adapted projections the graphs built so far in this process computed inside their
    mul_mat (the "matmul" route; 0 without the patch)."""
    from llama_cpp import llama_cpp as lib

    probe = getattr(lib._lib, "edgelora_lora_in_matmul", None)
    if probe is None:
        return 0
    probe.restype = ctypes.c_long
    return int(probe())


@contextlib.contextmanager
def llama_cpp_own_lora() -> Iterator[None]:
    """llama.cpp's own four LoRA nodes per projection for graphs built inside the block, and the
    setting there was before after it."""
    was = lora_route()
    set_lora_route("own")
    try:
        yield
    finally:
        set_lora_route(was)


class GGUFEngine(Engine):
    backend = "gguf"

    def __init__(self, path: str | os.PathLike, *, n_ctx: int = 2048, threads: int = 2, kv_type: str = "f16",
                 tokenizer: Tokenizer | None = None, fingerprint: str | None = None, n_batch: int = 512):
        import llama_cpp
        from llama_cpp import Llama

        from edgelora.converters import gguf_model, gguf_tokenizer

        self.path = Path(path)
        reader = gguf_model.open_reader(self.path)  # validate in Python first: llama.cpp crashes on bad files
        fields = gguf_model.fields_of(reader)
        config = gguf_model.config_from_fields(fields, {t.name: t for t in reader.tensors})
        if tokenizer is None:
            tokenizer = gguf_tokenizer.from_gguf(fields)
        fingerprint = fingerprint or keys.fingerprint_of(fields)
        del reader
        super().__init__(config, tokenizer, fingerprint, n_ctx)
        self._lib = llama_cpp
        try:
            with quiet_native():
                self.llm = Llama(str(self.path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                 n_batch=min(n_ctx, n_batch), n_ubatch=min(n_ctx, n_batch), logits_all=False,
                                 verbose=False, type_k=KV_TYPES[kv_type], type_v=KV_TYPES[kv_type])
        except ValueError as e:  # llama.cpp refused the file (its log says why; run with verbose llama.cpp to see it)
            raise EngineError(f"llama.cpp cannot load {self.path}: {e}; check the file with `edgelora inspect`") from e
        self.n_batch = min(n_ctx, n_batch)
        self.vocab = self.llm.n_vocab()
        self.n_past = 0
        self._handles: dict[str, object] = {}
        self._base_llm = self.llm
        self._llm_args = dict(n_ctx=n_ctx, threads=threads, kv_type=kv_type, n_batch=self.n_batch)
        self._merge_dir = None

    # -- forward -----------------------------------------------------------------------------

    def _reset(self) -> None:
        self.n_past = 0
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def _decode(self, ids: Sequence[int], all_logits: bool) -> np.ndarray:
        if self.n_past + len(ids) > self.n_ctx:
            raise EngineError(f"{self.n_past + len(ids)} tokens do not fit the context of {self.n_ctx}")
        rows = []
        for i in range(0, len(ids), self.n_batch):
            chunk = list(ids[i:i + self.n_batch])
            self.llm._batch.set_batch(batch=chunk, n_past=self.n_past, logits_all=all_logits)
            try:
                self.llm._ctx.decode(self.llm._batch)
            except RuntimeError as e:  # llama-cpp-python's report of a non-zero llama_decode
                raise EngineError(f"llama.cpp could not evaluate the tokens ({e})") from None
            self.n_past += len(chunk)
            if all_logits:
                ptr = self._lib.llama_get_logits(self.llm.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(len(chunk), self.vocab)).copy())
        if all_logits:
            return np.concatenate(rows)
        ptr = self._lib.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.vocab,)).copy()

    def _feed(self, token_ids: Sequence[int]) -> np.ndarray:
        return self._decode(token_ids, all_logits=False)

    def _logits(self, token_ids: Sequence[int]) -> np.ndarray:
        self._reset()
        out = self._decode(token_ids, all_logits=True)
        self._reset()
        return out

    # -- adapters ----------------------------------------------------------------------------

    def _read_adapter(self, path: Path) -> LoraAdapter:
        from edgelora.converters import gguf_lora

        return gguf_lora.read(path, self.config)  # full validation before llama.cpp sees the file

    def _load_adapter(self, name: str, path: Path, adapter: LoraAdapter) -> None:
        if name in self._handles:
            self._free(name)
        with quiet_native():
            handle = self._lib.llama_adapter_lora_init(self.llm.model, str(path).encode())
        if not handle:
            raise AdapterError(f"llama.cpp could not load adapter {name} from {path}")
        self._handles[name] = handle

    def _activate(self, weights: dict[str, float]) -> None:
        n = len(weights)
        if n == 0:
            rc = self._lib.llama_set_adapters_lora(self.llm.ctx, None, 0, None)
        else:
            arr = (self._lib.llama_adapter_lora_p_ctypes * n)(*[self._handles[k] for k in weights])
            scales = (ctypes.c_float * n)(*weights.values())
            rc = self._lib.llama_set_adapters_lora(self.llm.ctx, arr, n, scales)
        if rc != 0:
            raise EngineError(f"llama.cpp refused the adapter set {list(weights)} (code {rc})")

    # -- merge ------------------------------------------------------------------------------

    def _merge(self, adapter: LoraAdapter, weight: float) -> None:
        import tempfile

        from llama_cpp import Llama

        from edgelora.converters import gguf_model, gguf_quant

        self._merge_dir = tempfile.TemporaryDirectory(prefix="edgelora-merge-")
        tmp = Path(self._merge_dir.name)
        base = gguf_model.read(self.path)
        merged = merge_weights(base, adapter, weight)
        ftype = int(gguf_model.fields_of(gguf_model.open_reader(self.path)).get("general.file_type", 0))
        if ftype in (0, 1):
            path = gguf_model.write(merged, tmp / "merged.gguf", "F32" if ftype == 0 else "F16")
        else:  # a quantized base: re-quantize the merged float weights to the same type
            f32 = gguf_model.write(merged, tmp / "merged-f32.gguf", "F32")
            path = gguf_quant.quantize(f32, tmp / "merged.gguf", ftype)
            f32.unlink()
        a = self._llm_args
        with quiet_native():
            self.llm = Llama(str(path), n_ctx=a["n_ctx"], n_threads=a["threads"], n_threads_batch=a["threads"],
                             n_batch=a["n_batch"], n_ubatch=a["n_batch"], logits_all=False, verbose=False,
                             type_k=KV_TYPES[a["kv_type"]], type_v=KV_TYPES[a["kv_type"]])

    def _unmerge(self) -> None:
        if self.llm is not self._base_llm:
            self.llm.close()
            self.llm = self._base_llm
        if self._merge_dir is not None:
            self._merge_dir.cleanup()
            self._merge_dir = None

    def _free(self, name: str) -> None:
        handle = self._handles.pop(name, None)
        if handle is not None:
            self._lib.llama_adapter_lora_free(handle)

    def _close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self._unmerge()
            self._activate({})
            for name in list(self._handles):
                self._free(name)
            self.llm.close()
            self.llm = None


def merge_weights(base, adapter: LoraAdapter, weight: float):
    """A BaseModel whose target weights are W + weight * scale * B @ A (float32, checked finite)."""
    from edgelora.base import BaseModel, Weights

    def loader(name):
        def load():
            w = base.weights[name]
            if name in adapter.tensors:
                w = w + np.float32(weight) * adapter.delta(name).astype(np.float32)
                if not np.isfinite(w).all():
                    raise AdapterError(f"merging {adapter.name} makes {name} non-finite; refusing the merge")
            return w
        return load

    weights = Weights({n: loader(n) for n in base.weights}, {n: base.weights.shape(n) for n in base.weights})
    return BaseModel(base.config, weights, base.tokenizer, base.source, base.source_format, base.source_dtype,
                     name=f"{base.name}+{adapter.name}")
