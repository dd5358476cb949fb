"""What the CPU at hand can run, and the llama.cpp build that uses all of it.

Standard library only: `scripts/env.sh` runs this file with the system Python before any
dependency is installed (`python3 edgelora/cpu.py` prints the CMAKE_ARGS for llama-cpp-python).

x86-64 features come from /proc/cpuinfo's `flags`, arm64 ones from its `Features`. AMX is left
out unless asked for (EDGELORA_LLAMA_AMX=1), and then taken only when the kernel grants this
process the tile state (Linux asks for it with arch_prctl): a CPU can list `amx_tile` in a VM that
forbids it, and on a Sapphire Rapids VM whose kernel grants it, llama.cpp 0.3.36's AMX matmul
still dies with SIGILL (`tilezero` in ggml_backend_amx_mul_mat) on the first Q8_0 model it runs
(2026-12-03). AMX would speed up prefill only: one-token decode is bound by memory, not by the
multiply.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

# llama.cpp's x86 options, each with the cpuinfo flags its compiler switches need
# (GGML_AVX512 compiles with -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw)
X86_OPTIONS = {
    "SSE42": ("sse4_2",),
    "AVX": ("avx",),
    "AVX2": ("avx2",),
    "BMI2": ("bmi2",),
    "FMA": ("fma",),
    "F16C": ("f16c",),
    "AVX_VNNI": ("avx_vnni",),
    "AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "AVX512_VBMI": ("avx512vbmi",),
    "AVX512_VNNI": ("avx512_vnni",),
    "AVX512_BF16": ("avx512_bf16",),
}
AMX_OPTIONS = {"AMX_TILE": "amx_tile", "AMX_INT8": "amx_int8", "AMX_BF16": "amx_bf16"}
# arm64 -march extensions, each with the cpuinfo feature that shows it
ARM_EXTENSIONS = {"dotprod": "asimddp", "fp16": "asimdhp", "i8mm": "i8mm"}

_ARCH_REQ_XCOMP_PERM = 0x1023
_XFEATURE_XTILEDATA = 18
_SYS_ARCH_PRCTL = 158  # x86-64


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def features(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature names as /proc/cpuinfo spells them (empty where it cannot be read)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def amx_granted() -> bool:
    """Whether Linux lets this process use AMX tiles (asking is harmless where it does not)."""
    if machine() != "x86_64" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def llama_cpp_cmake_args(arch: str | None = None, flags: frozenset[str] | None = None,
                         amx: bool | None = None) -> str:
    """CMAKE_ARGS building llama.cpp's CPU backend for exactly these features: every SIMD
    extension the CPU has, none it lacks, AMX only when asked for and granted. Defaults: this machine."""
    arch = arch or machine()
    flags = features() if flags is None else flags
    args = ["-DLLAVA_BUILD=OFF", "-DGGML_NATIVE=OFF"]
    if arch == "x86_64":
        args += [f"-DGGML_{opt}={'ON' if all(f in flags for f in need) else 'OFF'}"
                 for opt, need in X86_OPTIONS.items()]
        if amx is None:
            amx = (os.environ.get("EDGELORA_LLAMA_AMX") == "1" and any(f in flags for f in AMX_OPTIONS.values())
                   and amx_granted())
        args += [f"-DGGML_{opt}={'ON' if amx and f in flags else 'OFF'}" for opt, f in AMX_OPTIONS.items()]
    elif arch == "aarch64":
        ext = [e for e, f in ARM_EXTENSIONS.items() if f in flags]
        args.append(f"-DGGML_CPU_ARM_ARCH={'armv8.2-a' if ext else 'armv8-a'}{''.join('+' + e for e in ext)}")
    else:  # another architecture: the build's own choice for it
        args = ["-DLLAVA_BUILD=OFF"]
    return " ".join(args)


if __name__ == "__main__":
    print(llama_cpp_cmake_args())
