"""GGUF base models (llama.cpp's format): a reader that dequantizes any quant type the `gguf`
package knows, and a writer of F32/F16 files with llama.cpp's tensor names and metadata.

Metadata keys come from `gguf.Keys` (gguf-py constants.py); tensor names from `edgelora.naming`.
Linear weights for q and k are stored in GGUF row order (see `naming.rope_permute`).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgelora import naming
from edgelora._io import atomic_file
from edgelora.arch import FAMILIES, ModelConfig
from edgelora.base import BaseModel, Weights
from edgelora.errors import CorruptFileError, UnsupportedArchitectureError, UnsupportedFormatError

from . import gguf_tokenizer, keys

MAGIC = b"GGUF"
# file types we write (llama.cpp LlamaFileType)
FILE_TYPES = {"F32": 0, "F16": 1}
# llama.cpp's RoPE tensors (gguf-py MODEL_TENSOR.ROPE_FREQS / ROPE_FACTORS_LONG / ROPE_FACTORS_SHORT)
ROPE_FREQS, ROPE_LONG, ROPE_SHORT = "rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_LONG, ROPE_SHORT)
ARCHES = {f.gguf_arch: f for f in FAMILIES.values()}


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


def config_from_fields(fields: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    """A config from GGUF metadata as llama.cpp's converter writes it for each architecture
    (keys from gguf-py constants.py `Keys`; per-arch defaults from llama.cpp src/models/*.cpp), and
    from its tensors (name -> reader tensor: the embedding's rows, RoPE factor tensors)."""
    import gguf

    a = fields["general.architecture"]
    fam = ARCHES[a]
    K = gguf.Keys
    d = int(fields[K.LLM.EMBEDDING_LENGTH.format(arch=a)])
    heads = int(fields[K.Attention.HEAD_COUNT.format(arch=a)])
    # the embedding's rows are the vocabulary (llama.cpp's Gemma 3 converter drops the padding rows past
    # the tokenizer, leaving the metadata's vocab_size as it was)
    embed = tensors.get("token_embd.weight")
    vocab = (int(embed.shape[-1]) if embed is not None else
             fields.get(K.LLM.VOCAB_SIZE.format(arch=a)) or len(fields.get("tokenizer.ggml.tokens", [])))
    head_dim = int(fields.get(K.Attention.KEY_LENGTH.format(arch=a)) or d // heads)
    rot = fields.get(K.Rope.DIMENSION_COUNT.format(arch=a))
    n_layers = int(fields[K.LLM.BLOCK_COUNT.format(arch=a)])
    ctx = int(fields.get(K.LLM.CONTEXT_LENGTH.format(arch=a), 2048))
    hf = {
        "model_type": fam.hf_model_types[0], "vocab_size": int(vocab), "hidden_size": d,
        "intermediate_size": int(fields[K.LLM.FEED_FORWARD_LENGTH.format(arch=a)]), "num_hidden_layers": n_layers,
        "num_attention_heads": heads, "num_key_value_heads": int(fields.get(K.Attention.HEAD_COUNT_KV.format(arch=a), heads)),
        "head_dim": head_dim, "rope_theta": float(fields.get(K.Rope.FREQ_BASE.format(arch=a), 10000.0)),
        "rms_norm_eps": float(fields.get(K.Attention.LAYERNORM_RMS_EPS.format(arch=a), 1e-5)),
        "tie_word_embeddings": "output.weight" not in tensors, "max_position_embeddings": ctx,
    }
    if fam.name == "gemma3":
        hf["hidden_activation"] = "gelu_pytorch_tanh"
        hf["query_pre_attn_scalar"] = head_dim  # what llama.cpp's gemma3 assumes (below 27B)
        window = fields.get(K.Attention.SLIDING_WINDOW.format(arch=a))
        pattern = fields.get(K.Attention.SLIDING_WINDOW_PATTERN.format(arch=a), 6)
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern]
        else:  # llama.cpp's set_swa_pattern: every n-th layer is global
            swa = [int(pattern) == 0 or i % int(pattern) < int(pattern) - 1 for i in range(n_layers)]
        hf["sliding_window"] = int(window) if window else None
        hf["layer_types"] = ["sliding_attention" if s and window else "full_attention" for s in swa]
        hf["rope_local_base_freq"] = float(fields.get(K.Rope.FREQ_BASE_SWA.format(arch=a), 10000.0))
    if fam.name == "phi3":
        window = fields.get(K.Attention.SLIDING_WINDOW.format(arch=a))
        hf["sliding_window"] = int(window) if window else None
        if rot:
            hf["partial_rotary_factor"] = int(rot) / head_dim
    elif rot and int(rot) != head_dim:
        raise UnsupportedArchitectureError(f"unsupported {a} GGUF with partial rotary ({rot} of {head_dim} dims)")
    hf["rope_scaling"] = _rope_from_gguf(fields, tensors, a, head_dim, hf["rope_theta"])
    if hf["rope_scaling"] and hf["rope_scaling"].get("rope_type") == "longrope":
        hf["original_max_position_embeddings"] = int(fields[K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a)])
    return ModelConfig.from_hf(hf)


def _tensor_values(t: Any) -> list[float]:
    return [float(x) for x in np.asarray(t.data, np.float32).reshape(-1)]


def _rope_from_gguf(fields: dict[str, Any], tensors: dict[str, Any], a: str, head_dim: int, theta: float) -> dict | None:
    """transformers' rope dict from a GGUF: edgelora's own key when present, else what llama.cpp's
    converter leaves (a linear factor key, Llama 3's rope_freqs, LongRoPE's factor tensors)."""
    import gguf

    if keys.ROPE_SCALING in fields:
        return json.loads(fields[keys.ROPE_SCALING]) or None
    if ROPE_LONG in tensors:
        return {"rope_type": "longrope", "long_factor": _tensor_values(tensors[ROPE_LONG]),
                "short_factor": _tensor_values(tensors[ROPE_SHORT])}
    if ROPE_FREQS in tensors:
        return llama3_from_factors(np.asarray(tensors[ROPE_FREQS].data, np.float32).reshape(-1), head_dim, theta)
    kind = fields.get(gguf.Keys.Rope.SCALING_TYPE.format(arch=a))
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(fields[gguf.Keys.Rope.SCALING_FACTOR.format(arch=a)])}
    raise UnsupportedArchitectureError(f"unsupported {a} GGUF with rope scaling {kind!r}")


_LLAMA3_DEFAULTS = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama3_factors(rope: dict, head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama 3 rope scaling: per frequency, the divisor of its angle
    (conversion/llama.py generate_extra_tensors, computed the same way in float32)."""
    p = {**_LLAMA3_DEFAULTS, **rope}
    freqs = 1.0 / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)))
    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for f in freqs.astype(np.float32):
        wavelen = np.float32(2 * math.pi) / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return np.asarray(out, np.float32)


def llama3_from_factors(factors: np.ndarray, head_dim: int, theta: float) -> dict:
    """Llama 3's rope parameters from llama.cpp's `rope_freqs` (only the factors are stored): the
    factor is the largest; the low/high frequency factors of every Llama 3 release (1, 4) and the
    original context among powers of two are tried, and must reproduce every factor (to float32
    rounding: the converter's torch pow and numpy's may differ in the last bit)."""
    factor = float(factors.max())
    for orig in (8192, *(2 ** k for k in range(4, 21))):
        rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": orig}
        if np.allclose(llama3_factors(rope, head_dim, theta), factors, rtol=1e-5, atol=0):
            return rope
    raise UnsupportedArchitectureError(
        "unsupported llama GGUF: its rope_freqs do not match Llama 3 rope scaling with the usual parameters; "
        "load the model from its Hugging Face directory instead")


def _loader(t: Any, members: tuple[str, ...], member: str, config: ModelConfig) -> Callable[[], np.ndarray]:
    import gguf

    shapes = config.shapes()

    def load() -> np.ndarray:
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        w = w.reshape(tuple(int(s) for s in reversed(t.shape)))  # GGUF lists dims innermost first
        if len(members) > 1:
            w = np.ascontiguousarray(naming.split_rows(w, members, shapes)[member])
        heads = naming.gguf_permutes(config, member)
        return naming.rope_unpermute(w, heads) if heads else w

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
    if arch not in ARCHES:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {arch!r} in {path.name}: edgelora reads the GGUF architectures "
            f"{', '.join(ARCHES)}")
    tensors = {t.name: t for t in reader.tensors}
    try:
        config = config_from_fields(fields, tensors)
    except KeyError as e:
        raise CorruptFileError(f"{path}: GGUF metadata lacks {e.args[0]}: re-export the model") from e
    expected = config.shapes()
    files = naming.layout(config, "gguf")
    loaders = {}
    types: Counter[str] = Counter()
    unknown = []
    for name, t in tensors.items():
        members = files.get(name)
        if members is None:
            if name not in ROPE_TENSORS:
                unknown.append(name)
            continue
        shape = tuple(int(s) for s in reversed(t.shape))
        want = (sum(expected[m][0] for m in members), *expected[members[0]][1:])
        if shape != want:
            raise CorruptFileError(f"{path}: tensor {name} has shape {list(shape)}, the metadata implies {list(want)}")
        for m in members:
            loaders[m] = _loader(t, members, m, config)
        if len(shape) == 2:
            types[t.tensor_type.name] += 1
    if unknown:
        raise UnsupportedArchitectureError(
            f"{path}: tensors a {config.family} model does not have: {', '.join(unknown[:5])}")
    missing = [n for n in expected if n not in loaders]
    if missing:
        raise CorruptFileError(f"{path}: missing tensors {', '.join(naming.to_gguf(n, config.family) for n in missing[:5])}: "
                               "the file is incomplete")
    tokenizer = gguf_tokenizer.from_gguf(fields)
    return BaseModel(
        config=config, weights=Weights({n: loaders[n] for n in expected}, expected), tokenizer=tokenizer,
        source=str(path), source_format="gguf", source_dtype=types.most_common(1)[0][0] if types else "F32",
        name=fields.get("general.name") or path.stem,
    )


def check_writable(config: ModelConfig) -> None:
    """Refuses what llama.cpp would run differently from the model (it never says so itself)."""
    fam = config.spec
    if config.sliding_window and fam.name != "gemma3" and config.sliding_window < config.max_position_embeddings:
        raise UnsupportedArchitectureError(
            f"{config.family} ({config.model_type}) with a {config.sliding_window}-token sliding window: llama.cpp "
            "ignores the window for this architecture, so its answers past the window would be wrong; export ONNX instead")
    if fam.name == "gemma3" and config.query_pre_attn_scalar not in (None, config.head_dim):
        raise UnsupportedArchitectureError(
            f"gemma3 with query_pre_attn_scalar {config.query_pre_attn_scalar:g} (head dim {config.head_dim}): "
            "llama.cpp scales attention by the head dim; export ONNX instead")


def _write_metadata(w: Any, base: BaseModel) -> list[tuple[str, np.ndarray]]:
    """The architecture's keys; returns the extra RoPE tensors llama.cpp wants for its scaling."""
    import gguf

    c, a = base.config, base.config.spec.gguf_arch
    K = gguf.Keys
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.rot_dim)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    rope, extra = c.rope, []
    if rope:
        w.add_string(keys.ROPE_SCALING, json.dumps(rope, sort_keys=True))
    if c.rope_type == "linear":
        w.add_string(K.Rope.SCALING_TYPE.format(arch=a), "linear")
        w.add_float32(K.Rope.SCALING_FACTOR.format(arch=a), float(rope["factor"]))
    elif c.rope_type == "llama3":
        extra.append((ROPE_FREQS, llama3_factors(rope, c.head_dim, c.rope_theta)))
    elif c.rope_type == "longrope":
        orig = c.original_max_position_embeddings or c.max_position_embeddings
        scale = c.max_position_embeddings / orig
        attn = rope.get("attention_factor") or (math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0)
        w.add_uint32(K.Rope.SCALING_ORIG_CTX_LEN.format(arch=a), orig)
        w.add_float32(K.Rope.SCALING_ATTN_FACTOR.format(arch=a), float(attn))
        extra += [(ROPE_LONG, np.asarray(rope["long_factor"], np.float32)),
                  (ROPE_SHORT, np.asarray(rope["short_factor"], np.float32))]
    if c.spec.name == "gemma3" and c.sliding_window:
        w.add_uint32(K.Attention.SLIDING_WINDOW.format(arch=a), c.sliding_window)
        w.add_array(K.Attention.SLIDING_WINDOW_PATTERN.format(arch=a), [c.is_sliding(i) for i in range(c.num_layers)])
        w.add_float32(K.Rope.FREQ_BASE_SWA.format(arch=a), float(c.rope_local_theta or 10000.0))
    if c.spec.name == "phi3":
        w.add_uint32(K.Attention.SLIDING_WINDOW.format(arch=a), c.sliding_window or 0)
    return extra


# llama.cpp's vocabulary loader sets attributes on these tokens of any model whose name contains
# "phi3" or "phi-3", and fails to load one whose vocabulary lacks them (src/llama-vocab.cpp).
_PHI3_NAMED_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _gguf_name(base: BaseModel) -> str:
    name = base.name or "model"
    if any(s in name.lower() for s in ("phi3", "phi-3")) and any(
            base.tokenizer.token_id(t) is None for t in _PHI3_NAMED_TOKENS):
        return "model"
    return name


def write(base: BaseModel, out: str | os.PathLike, dtype: str = "F32",
          progress: Callable[[int, int], None] | None = None) -> Path:
    """Writes `base` as an F32 or F16 GGUF file that llama.cpp loads (1-D tensors stay F32), with
    the architecture's names and keys as llama.cpp's own converter writes them."""
    import gguf

    if dtype not in FILE_TYPES:
        raise UnsupportedFormatError(f"GGUF float type must be one of {', '.join(FILE_TYPES)}, got {dtype!r}")
    out = Path(out)
    c = base.config
    check_writable(c)
    np_dtype = np.float32 if dtype == "F32" else np.float16
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(tmp, c.spec.gguf_arch)
        w.add_type("model")
        w.add_name(_gguf_name(base))
        extra = _write_metadata(w, base)
        w.add_file_type(FILE_TYPES[dtype])
        w.add_string(keys.FINGERPRINT, base.fingerprint)
        gguf_tokenizer.to_gguf(w, base.tokenizer, c.vocab_size)

        shapes = c.shapes()
        plan = []
        for name, t in extra:
            w.add_tensor_info(name, t.shape, np.dtype(np.float32), t.nbytes)
        for name, members in naming.layout(c, "gguf").items():
            shape = (sum(shapes[m][0] for m in members), *shapes[members[0]][1:])
            t_dtype = np_dtype if len(shape) == 2 else np.float32
            nbytes = int(np.prod(shape)) * np.dtype(t_dtype).itemsize
            w.add_tensor_info(name, shape, np.dtype(t_dtype), nbytes)
            plan.append((members, t_dtype))
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, t in extra:
            w.write_tensor_data(np.ascontiguousarray(t, np.float32))
        for i, (members, t_dtype) in enumerate(plan):
            parts = []
            for m in members:
                t = base.weights[m]
                heads = naming.gguf_permutes(c, m)
                parts.append(naming.rope_permute(t, heads) if heads else t)
            w.write_tensor_data(np.ascontiguousarray(parts[0] if len(parts) == 1 else np.concatenate(parts, 0), dtype=t_dtype))
            if progress:
                progress(i + 1, len(plan))
        w.close()
    return out
