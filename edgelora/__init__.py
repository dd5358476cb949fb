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
# the errors a program may want to catch (all are EdgeloraError)
from .adapters import AdapterBaseMismatchError, AdapterError, AdapterMismatchError
from .bundle import MemoryBudgetError, QualityBudgetError
from .cloud.client import AuthError, CloudError, ServiceUnreachableError, TamperedError
from .cloud.signing import SignatureError
from .profiles import ProfileError
from .runtime.engine import EngineError
from .store import StoreError
from .train.data import DataError
from .train.model import TrainerError

__version__ = "0.1.0"

__all__ = [
    "BaseModel", "CorruptFileError", "DEFAULT_MODEL", "EdgeloraError", "ModelConfig", "ModelFetchError",
    "REGISTRY", "SourceNotFoundError", "Tokenizer", "UnsupportedArchitectureError", "UnsupportedFormatError",
    "Bundle", "CloudClient", "bundle", "export", "load_adapter", "load_base", "open_bundle", "pull", "save_adapter",
    "AdapterBaseMismatchError", "AdapterError", "AdapterMismatchError", "AuthError", "CloudError", "DataError",
    "EngineError", "MemoryBudgetError", "ProfileError", "QualityBudgetError", "ServiceUnreachableError",
    "SignatureError", "StoreError", "TamperedError", "TrainerError",
]
