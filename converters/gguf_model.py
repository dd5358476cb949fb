"""GGUF base models (llama.cpp's format): a reader that dequantizes any quant type the `gguf`
package knows, and a writer of F32/F16 files with llama.cpp's tensor names and metadata.

Metadata keys come from `gguf.Keys` (gguf-py constants.py); tensor names from `edgelora.naming`.
Linear weights for q and k are stored in GGUF row order (see `naming.rope_permute`).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelora import naming
from edgelora._io import atomic_file
from edgelora.arch import LlamaConfig
from edgelora.base import BaseModel, Weights
from edgelora.errors import CorruptFileError, UnsupportedArchitectureError, UnsupportedFormatError

from . import gguf_tokenizer

MAGIC = b"GGUF"
ARCH = "llama"
FINGERPRINT_KEY = "edgelora.base_fingerprint"
# file types we write (llama.cpp LlamaFileType)
FILE_TYPES = {"F32": 0, "F16": 1}


def looks_like_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def open_reader(path: str | os.PathLike) -> Any:
    """A `gguf.GGUFReader` over a validated file; any structural fault is a `CorruptFileError`."""
    import gguf

    path = Path(path)
    size = path.stat().st_size
    if not looks_like_gguf(path):
        raise CorruptFileError(f"{path}: not a GGUF file (bad magic): check the path or re-download it")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # the reader raises ValueError, struct.error, IndexError... on bad bytes
        raise CorruptFileError(f"{path}: corrupt or truncated GGUF file ({type(e).__name__}: {e}): re-download or re-export it") from e
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size:
            raise CorruptFileError(
                f"{path}: truncated GGUF file ({size} bytes, tensor {t.name} ends at {end}): re-download or re-export it")
    return reader


def fields_of(reader: Any) -> dict[str, Any]:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            out[key] = field.contents()
        except Exception as e:
            raise CorruptFileError(f"{reader.data.filename}: metadata {key} cannot be decoded ({e})") from e
    return out


def config_from_fields(fields: dict[str, Any], tensor_names: set[str]) -> LlamaConfig:
    a = ARCH
    d = int(fields[f"{a}.embedding_length"])
    heads = int(fields[f"{a}.attention.head_count"])
    vocab = fields.get(f"{a}.vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    head_dim = fields.get(f"{a}.attention.key_length") or fields.get(f"{a}.rope.dimension_count") or d // heads
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=d,
        intermediate_size=int(fields[f"{a}.feed_forward_length"]),
        num_layers=int(fields[f"{a}.block_count"]),
        num_heads=heads,
        num_kv_heads=int(fields.get(f"{a}.attention.head_count_kv", heads)),
        head_dim=int(head_dim),
        rope_theta=float(fields.get(f"{a}.rope.freq_base", 10000.0)),
        rms_norm_eps=float(fields.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in tensor_names,
        max_position_embeddings=int(fields.get(f"{a}.context_length", 2048)),
    )


def _loader(t: Any, canon: str, config: LlamaConfig) -> Callable[[], np.ndarray]:
    import gguf

    def load() -> np.ndarray:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims innermost first
        suffix = canon.rsplit(".", 1)[-1]
        if suffix == "q":
            w = naming.rope_unpermute(w, config.num_heads)
        elif suffix == "k":
            w = naming.rope_unpermute(w, config.num_kv_heads)
        return w

    return load


def read(path: str | os.PathLike, *, reader: Any = None) -> BaseModel:
    """A base model from a GGUF file (`reader`: one already opened on it by `open_reader`)."""
    path = Path(path)
    reader = open_reader(path) if reader is None else reader
    fields = fields_of(reader)
    kind = fields.get("general.type", "model")
    if kind != "model":
        raise UnsupportedFormatError(f"{path}: this GGUF is a {kind!r}, not a base model; pass the base model's file")
    arch = fields.get("general.architecture")
    if arch != ARCH:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r} in {path.name}: edgelora supports the Llama family (GGUF architecture 'llama')")
    tensors = {t.name: t for t in reader.tensors}
    bias = [n for n in tensors if n.endswith(".bias")]
    if bias:
        raise UnsupportedArchitectureError(
            f"unsupported architecture 'llama' with biases ({bias[0]}): edgelora supports the Llama family without linear biases")
    try:
        config = config_from_fields(fields, set(tensors))
    except KeyError as e:
        raise CorruptFileError(f"{path}: GGUF metadata lacks {e.args[0]}: re-export the model") from e
    expected = config.shapes()
    loaders = {}
    types: Counter[str] = Counter()
    unknown = []
    for name, t in tensors.items():
        canon = naming.from_gguf(name)
        if canon is None:
            if name != "rope_freqs.weight":
                unknown.append(name)
            continue
        shape = tuple(int(s) for s in reversed(t.shape))
        if shape != expected.get(canon):
            raise CorruptFileError(f"{path}: tensor {name} has shape {list(shape)}, the metadata implies {list(expected.get(canon, ()))}")
        loaders[canon] = _loader(t, canon, config)
        if len(shape) == 2:
            types[t.tensor_type.name] += 1
    if unknown:
        raise UnsupportedArchitectureError(f"{path}: tensors a Llama-family model does not have: {', '.join(unknown[:5])}")
    missing = [n for n in expected if n not in loaders]
    if missing:
        raise CorruptFileError(f"{path}: missing tensors {', '.join(naming.to_gguf(n) for n in missing[:5])}: the file is incomplete")
    tokenizer = gguf_tokenizer.from_gguf(fields)
    return BaseModel(
        config=config, weights=Weights({n: loaders[n] for n in expected}, expected), tokenizer=tokenizer,
        source=str(path), source_format="gguf", source_dtype=types.most_common(1)[0][0] if types else "F32",
        name=fields.get("general.name") or path.stem,
    )


def write(base: BaseModel, out: str | os.PathLike, dtype: str = "F32",
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Writes `base` as an F32 or F16 GGUF file that llama.cpp loads (1-D tensors stay F32)."""
    import gguf

    if dtype not in FILE_TYPES:
        raise UnsupportedFormatError(f"GGUF float type must be one of {', '.join(FILE_TYPES)}, got {dtype!r}")
    out = Path(out)
    c = base.config
    np_dtype = np.float32 if dtype == "F32" else np.float16
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, ARCH)
        w.add_type("model")
        w.add_name(base.name or "model")
        w.add_block_count(c.num_layers)
        w.add_context_length(c.max_position_embeddings)
        w.add_embedding_length(c.hidden_size)
        w.add_feed_forward_length(c.intermediate_size)
        w.add_head_count(c.num_heads)
        w.add_head_count_kv(c.num_kv_heads)
        w.add_rope_freq_base(c.rope_theta)
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
        w.add_vocab_size(c.vocab_size)
        w.add_rope_dimension_count(c.head_dim)
        if c.head_dim != c.hidden_size // c.num_heads:
            w.add_key_length(c.head_dim)
            w.add_value_length(c.head_dim)
        w.add_file_type(FILE_TYPES[dtype])
        w.add_string(FINGERPRINT_KEY, base.fingerprint)
        gguf_tokenizer.to_gguf(w, base.tokenizer)

        shapes = c.shapes()
        plan = []
        for name, shape in shapes.items():
            t_dtype = np_dtype if len(shape) == 2 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(t_dtype).itemsize
            w.add_tensor_info(naming.to_gguf(name), shape, np.dtype(t_dtype), nbytes)
            plan.append((name, t_dtype))
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, (name, t_dtype) in enumerate(plan):
            t = base.weights[name]
            suffix = name.rsplit(".", 1)[-1]
            if suffix == "q":
                t = naming.rope_permute(t, c.num_heads)
            elif suffix == "k":
                t = naming.rope_permute(t, c.num_kv_heads)
            w.write_tensor_data(np.ascontiguousarray(t, dtype=t_dtype))
            if progress:
                progress(i + 1, len(plan))
        w.close()
    return out
