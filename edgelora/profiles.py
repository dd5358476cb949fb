"""Device profiles: what a target device runs best (backends, quantization, threads, memory,
context length, shape constraints, quality budget). Shipped in ``devices/*.toml``; a user's own
profile is any TOML file of the same shape."""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import EdgeloraError, SourceNotFoundError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("gguf", "onnx")
GGUF_QUANTS = ("f32", "f16", "q8_0", "q4_0", "q4_k_m")
ONNX_QUANTS = ("f32", "int8", "int4", "qdq")
QUANTS = tuple(dict.fromkeys(GGUF_QUANTS + ONNX_QUANTS))
FLOAT_QUANTS = ("f32", "f16")
ADAPTER_PRECISIONS = ("f32", "f16", "q8_0")  # what engines compute installed adapters in (converters/gguf_lora.py writes each)


class ProfileError(EdgeloraError):
    """A device profile that is malformed or names something edgelora does not have."""


@dataclass(frozen=True)
class Backends:
    order: tuple[str, ...]
    gguf_quant: str = "q8_0"
    onnx_quant: str = "int4"
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    qnn_backend: str | None = None
    disable_cpu_fallback: bool = False
    onnx_graph: str = "fused"  # "fused" (edgelora's graph with ORT's fused kernels) or "optimum"
    onnx_head_bits: int = 8  # the int4 fused graph's LM head: 8 bits, or 6 (MatMulQ41's, when its library loads)
    # what the engines compute installed adapters in on a bundle whose bases are all quantized: f32, f16
    # or q8_0 (a bundle with a float artifact keeps f32, where the engines match PEFT exactly)
    adapter_precision: str = "f32"

    def __post_init__(self) -> None:
        bad = [b for b in self.order if b not in BACKENDS]
        if bad or not self.order:
            raise ProfileError(f"backends.order must list some of {', '.join(BACKENDS)}, got {list(self.order)}")
        if self.gguf_quant not in GGUF_QUANTS:
            raise ProfileError(f"backends.gguf_quant must be one of {', '.join(GGUF_QUANTS)}, got {self.gguf_quant!r}")
        if self.onnx_quant not in ONNX_QUANTS:
            raise ProfileError(f"backends.onnx_quant must be one of {', '.join(ONNX_QUANTS)}, got {self.onnx_quant!r}")
        if self.onnx_head_bits not in (6, 8):
            raise ProfileError(f"backends.onnx_head_bits must be 6 or 8, got {self.onnx_head_bits!r}")
        if self.adapter_precision not in ADAPTER_PRECISIONS:
            raise ProfileError(f"backends.adapter_precision must be one of {', '.join(ADAPTER_PRECISIONS)}, "
                               f"got {self.adapter_precision!r}")


@dataclass(frozen=True)
class Shapes:
    static: bool = False
    batch: int = 1
    prefill_length: int | None = None
    lora_rank: int = 0  # static graphs: the rank of their LoRA slots (0: none)


@dataclass(frozen=True)
class Quality:
    max_perplexity_increase: float = 0.05  # relative: 0.05 = +5% over the float model
    min_top1_agreement: float = 0.85


@dataclass(frozen=True)
class Build:
    """How native code is built for the device: the CPU's core (also what the arm64 emulator
    impersonates) and its -march for llama.cpp's CPU backend."""
    cpu: str = ""
    march: str = ""

    @property
    def llama_cpp_cmake_args(self) -> str:
        """CMAKE_ARGS for building llama-cpp-python on (or for) the device; empty: the build's own choice."""
        return f"-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH={self.march}" if self.march else ""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    kind: str  # "cpu" or "npu"
    arch: str
    ram_mb: int
    memory_budget_mb: int
    threads: int
    context_length: int
    backends: Backends
    shapes: Shapes = field(default_factory=Shapes)
    quality: Quality = field(default_factory=Quality)
    build: Build = field(default_factory=Build)
    path: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "npu"):
            raise ProfileError(f"profile {self.name}: kind must be 'cpu' or 'npu', got {self.kind!r}")
        if not 0 < self.memory_budget_mb <= self.ram_mb:
            raise ProfileError(f"profile {self.name}: memory_budget_mb must be in (0, ram_mb={self.ram_mb}]")
        if self.threads < 1 or self.context_length < 16:
            raise ProfileError(f"profile {self.name}: threads must be >= 1 and context_length >= 16")
        if self.shapes.static and not self.shapes.prefill_length:
            raise ProfileError(f"profile {self.name}: static shapes need shapes.prefill_length")

    @classmethod
    def from_toml(cls, path: Path, text: str) -> "DeviceProfile":
        try:
            raw: dict[str, Any] = tomllib.loads(text)
            backends = raw.pop("backends")
            backends["order"] = tuple(backends["order"])
            backends["execution_providers"] = tuple(backends.get("execution_providers", ("CPUExecutionProvider",)))
            return cls(backends=Backends(**backends), shapes=Shapes(**raw.pop("shapes", {})),
                       quality=Quality(**raw.pop("quality", {})), build=Build(**raw.pop("build", {})),
                       path=str(path), **raw)
        except tomllib.TOMLDecodeError as e:
            raise ProfileError(f"{path}: not valid TOML ({e})") from e
        except (KeyError, TypeError) as e:
            raise ProfileError(f"{path}: not a device profile ({e}); see devices/*.toml for the shape") from e

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("path")
        d["build"]["llama_cpp_cmake_args"] = self.build.llama_cpp_cmake_args
        return d


def _shipped() -> dict[str, tuple[Path, str]]:
    out = {}
    for entry in resources.files("edgelora.devices").iterdir():
        if entry.name.endswith(".toml"):
            out[entry.name[:-5]] = (Path(str(entry)), entry.read_text(encoding="utf-8"))
    return dict(sorted(out.items()))


def list_profiles() -> list[DeviceProfile]:
    return [DeviceProfile.from_toml(p, text) for p, text in _shipped().values()]


def get_profile(name_or_path: str | Path) -> DeviceProfile:
    """A shipped profile by name, or a profile TOML file by path."""
    shipped = _shipped()
    key = str(name_or_path)
    if key in shipped:
        return DeviceProfile.from_toml(*shipped[key])
    path = Path(key).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return DeviceProfile.from_toml(path, path.read_text(encoding="utf-8"))
    raise SourceNotFoundError(f"unknown device profile {key!r}: known profiles are {', '.join(shipped)} (or pass a .toml file)")
