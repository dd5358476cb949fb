"""edgelora's ONNX Runtime operator library (native/edgelora_ort.cc: MatMulQ41, exact Q4_1 with the
LoRA slot inside, or a 6-bit weight for an LM head), built by scripts/env.sh into the environment (``<prefix>/lib/edgelora/``).

`library()` finds it, checked once by loading it into a session's options; a graph that needs it
and cannot have it falls back to ONNX Runtime's own nodes (converters/onnx_fused.without_q41)
after one warning line. ``EDGELORA_ORT_OPS`` names another library file, or turns it off with 0.
``EDGELORA_Q41_KERNEL=portable`` (or ``avx2``) holds the operator's kernel back to that one.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
import warnings
from pathlib import Path

from .errors import EdgeloraWarning

LIBRARY = "libedgelora_ort.so"
HOLDS = ("", "portable", "avx2")  # what EDGELORA_Q41_KERNEL may say (native/edgelora_ort.cc: held_to)


def default_path() -> Path:
    return Path(sys.prefix) / "lib" / "edgelora" / LIBRARY


@functools.lru_cache(maxsize=None)
def _check(path: str) -> str | None:
    """None when onnxruntime can register the library at `path`, else why not (one line)."""
    import onnxruntime as ort

    if not os.path.isfile(path):
        return f"{path} does not exist"
    try:
        ort.SessionOptions().register_custom_ops_library(path)
    except Exception as e:  # onnxruntime's Fail
        return str(e).splitlines()[0]
    return None


def library(warn: bool = True) -> Path | None:
    """The operator library this process can load, or None (with one warning line saying why and
    what to do, unless it was turned off with EDGELORA_ORT_OPS=0)."""
    chosen = os.environ.get("EDGELORA_ORT_OPS", "")
    if chosen == "0":
        return None
    held = os.environ.get("EDGELORA_Q41_KERNEL", "")
    if held not in HOLDS and warn:
        warnings.warn(f"EDGELORA_Q41_KERNEL={held} is not a kernel MatMulQ41 can be held to ({' or '.join(HOLDS[1:])}); "
                      "it runs the best kernel this CPU has", EdgeloraWarning, stacklevel=2)
    path = Path(chosen) if chosen else default_path()
    why = _check(str(path))
    if why is None:
        return path
    if warn:  # Python shows a warning once per place and message
        warnings.warn(f"edgelora's Q4_1 operator library is unavailable ({why}); using ONNX Runtime's MatMulNBits "
                   "instead (run scripts/env.sh with a C++ compiler to build it)", EdgeloraWarning, stacklevel=2)
    return None


def kernel(path: Path | str) -> str:
    """Which MatMulQ41 kernel the library runs on this CPU: "avx512vnni", "avx2", "neon-dotprod" or
    "portable" ("avx512vnni-emulated" in the tests' build of scripts/native.sh)."""
    fn = ctypes.CDLL(str(path)).edgelora_q41_kernel
    fn.restype = ctypes.c_char_p
    return fn().decode()
