"""edgelora: adapt small language models on the devices where they run.

    import edgelora
    base = edgelora.load_base("smollm2-135m")   # or a Hugging Face dir, or a .gguf file
    print(base.fingerprint)
"""

from .arch import ModelConfig
from .base import BaseModel
from .errors import (
    CorruptFileError,
    EdgeloraError,
    ModelFetchError,
    SourceNotFoundError,
    UnsupportedArchitectureError,
    UnsupportedFormatError,
)
from .models import DEFAULT_MODEL, REGISTRY, load_base, pull
from .converters import load_adapter, save_adapter
from . import bundle
from .bundle import Bundle, export, open_bundle
from .tokenizer import Tokenizer
from .cloud import CloudClient

__version__ = "0.1.0"

__all__ = [
    "BaseModel", "CorruptFileError", "DEFAULT_MODEL", "EdgeloraError", "ModelConfig", "ModelFetchError",
    "REGISTRY", "SourceNotFoundError", "Tokenizer", "UnsupportedArchitectureError", "UnsupportedFormatError",
    "Bundle", "CloudClient", "bundle", "export", "load_adapter", "load_base", "open_bundle", "pull", "save_adapter",
]
