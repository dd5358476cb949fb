"""llama.cpp built for the CPU at hand: the flags edgelora/cpu.py derives from /proc/cpuinfo, and the
installed llama.cpp's own report of what it was compiled with."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from edgelora import cpu

ROOT = Path(__file__).resolve().parent.parent

# trimmed /proc/cpuinfo lines of real machines
ZEN4 = ("flags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx avx2 bmi2 fma f16c avx512f avx512dq avx512cd avx512bw "
        "avx512vl avx512vbmi avx512_vnni avx512_bf16")
SAPPHIRE = ZEN4 + " avx_vnni amx_tile amx_int8 amx_bf16"
OLD_XEON = "flags : fpu sse sse2 ssse3 sse4_1 sse4_2 avx"  # Sandy Bridge: AVX without AVX2, FMA, F16C
PI4 = "Features : fp asimd evtstrm crc32 cpuid"
PI5 = "Features : fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp"
PHONE = PI5 + " sve i8mm bf16"


def options(args: str) -> dict[str, str]:
    return dict(a[2:].split("=", 1) for a in args.split() if a.startswith("-D"))


def test_x86_flags_follow_the_cpu_and_amx_needs_the_kernels_grant(monkeypatch):
    zen4 = options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(ZEN4), amx=False))
    assert zen4["GGML_NATIVE"] == "OFF"
    assert {k for k, v in zen4.items() if v == "ON"} == {
        "GGML_SSE42", "GGML_AVX", "GGML_AVX2", "GGML_BMI2", "GGML_FMA", "GGML_F16C", "GGML_AVX512",
        "GGML_AVX512_VBMI", "GGML_AVX512_VNNI", "GGML_AVX512_BF16"}
    # AMX only when asked for (llama.cpp's AMX matmul dies with SIGILL on a VM that grants it), and
    # then only where granted: a CPU that lists AMX in a VM that does not grant it gets none
    monkeypatch.delenv("EDGELORA_LLAMA_AMX", raising=False)
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE)))["GGML_AMX_TILE"] == "OFF"
    monkeypatch.setattr(cpu, "amx_granted", lambda: True)
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE)))["GGML_AMX_INT8"] == "OFF"
    monkeypatch.setenv("EDGELORA_LLAMA_AMX", "1")
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE)))["GGML_AMX_INT8"] == "ON"
    monkeypatch.setattr(cpu, "amx_granted", lambda: False)
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE)))["GGML_AMX_INT8"] == "OFF"
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE), amx=False))["GGML_AMX_INT8"] == "OFF"
    granted = options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(SAPPHIRE), amx=True))
    assert granted["GGML_AMX_TILE"] == granted["GGML_AMX_INT8"] == granted["GGML_AVX_VNNI"] == "ON"
    # never what the CPU lacks (today's fixed AVX2 build would die with SIGILL on this one)
    old = options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(OLD_XEON), amx=True))
    assert old["GGML_AVX"] == "ON" and old["GGML_AVX2"] == old["GGML_FMA"] == old["GGML_F16C"] == "OFF"
    assert old["GGML_AMX_TILE"] == "OFF"
    # AVX-512 needs all five of the extensions its build switches on
    assert options(cpu.llama_cpp_cmake_args("x86_64", cpu.features(ZEN4.replace(" avx512bw", ""))))["GGML_AVX512"] == "OFF"


def test_arm64_march_follows_the_features():
    assert options(cpu.llama_cpp_cmake_args("aarch64", cpu.features(PI4)))["GGML_CPU_ARM_ARCH"] == "armv8-a"
    assert options(cpu.llama_cpp_cmake_args("aarch64", cpu.features(PI5)))["GGML_CPU_ARM_ARCH"] == "armv8.2-a+dotprod+fp16"
    assert options(cpu.llama_cpp_cmake_args("aarch64", cpu.features(PHONE)))["GGML_CPU_ARM_ARCH"] == \
        "armv8.2-a+dotprod+fp16+i8mm"


def test_the_installed_llama_cpp_has_exactly_this_cpus_extensions():
    """What llama.cpp says it was compiled with is what edgelora/cpu.py chose for this machine, and
    all of it is in /proc/cpuinfo (scripts/env.sh builds with `python3 edgelora/cpu.py`)."""
    import llama_cpp

    printed = subprocess.run([sys.executable, str(ROOT / "edgelora" / "cpu.py")], capture_output=True, text=True,
                             check=True).stdout.strip()
    assert printed == cpu.llama_cpp_cmake_args()
    report = llama_cpp.llama_print_system_info().decode()
    compiled = {part.split("=")[0].strip() for part in report.replace("CPU :", "|").split("|")
                if part.strip().endswith("= 1")}
    if cpu.machine() != "x86_64":
        return
    chosen = options(printed)
    known = set(cpu.X86_OPTIONS) | set(cpu.AMX_OPTIONS)
    reported = compiled & known - {"SSE42"}  # llama.cpp does not list SSE4.2
    assert reported == {k for k in known - {"SSE42"} if chosen[f"GGML_{k}"] == "ON"}, report
    host = cpu.features()
    assert all(f in host for k in reported for f in cpu.X86_OPTIONS.get(k, (cpu.AMX_OPTIONS.get(k),))), report
