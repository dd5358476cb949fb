"""GGUF quantization with llama.cpp's own quantizer (`llama_model_quantize`), always from a float
(F32/F16) GGUF: re-quantizing a quantized file compounds the error, so it is refused."""

from __future__ import annotations

import os
from pathlib import Path

from edgelora._io import atomic_file
from edgelora._native import quiet_native
from edgelora.errors import EdgeloraError, UnsupportedFormatError

# edgelora's name -> llama.cpp's llama_ftype (llama.h)
FTYPES = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
FLOAT_TYPES = {"F32", "F16"}


class QuantizeError(EdgeloraError):
    exit_code = 1


def quantize(src: str | os.PathLike, dst: str | os.PathLike, quant: str | int, threads: int | None = None) -> Path:
    """`quant` is one of FTYPES or a raw llama_ftype number."""
    import llama_cpp

    from . import gguf_model

    if not isinstance(quant, int) and quant not in FTYPES:
        raise UnsupportedFormatError(f"GGUF quantization must be one of {', '.join(FTYPES)}, got {quant!r}")
    src, dst = Path(src), Path(dst)
    reader = gguf_model.open_reader(src)
    kinds = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    if not kinds <= FLOAT_TYPES:
        raise UnsupportedFormatError(
            f"{src} is already quantized ({', '.join(sorted(kinds - FLOAT_TYPES))}); quantize from an F32/F16 GGUF")
    del reader
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = quant if isinstance(quant, int) else FTYPES[quant]
    params.nthread = threads or os.cpu_count() or 1
    with atomic_file(dst) as tmp:
        with quiet_native():
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), params)
        if rc != 0:
            raise QuantizeError(f"llama.cpp could not quantize {src} to {quant} (code {rc})")
    return dst
