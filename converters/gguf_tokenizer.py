"""The tokenizer in GGUF metadata (``tokenizer.ggml.*``) <-> a `tokenizers` tokenizer.

Supported: byte-level BPE tokenizers (GGUF model ``gpt2``) with the pre-tokenizers listed in
`PRE_TOKENIZERS`. Each row is the `tokenizers` pre-tokenizer that llama.cpp's pre-tokenizer of the
same name reproduces (llama.cpp src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_*).
"""

from __future__ import annotations

import json
from typing import Any

from edgelora.errors import UnsupportedFormatError
from edgelora.tokenizer import Tokenizer

_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
_LLAMA3_SPLIT = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
)
PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    "gpt-2": _BYTE_LEVEL,
    "smollm": {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False}]},
}
_IGNORED_KEYS = ("trim_offsets",)

# llama.cpp's token types (gguf-py constants.py TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _shape(pre: Any) -> Any:
    if isinstance(pre, dict):
        return {k: _shape(v) for k, v in pre.items() if k not in _IGNORED_KEYS}
    if isinstance(pre, list):
        return [_shape(v) for v in pre]
    return pre


def pre_name(pre_tokenizer: dict[str, Any] | None) -> str:
    """llama.cpp's pre-tokenizer name for a `tokenizers` pre-tokenizer (JSON form)."""
    for name, known in PRE_TOKENIZERS.items():
        if _shape(known) == _shape(pre_tokenizer):
            return name
    kind = (pre_tokenizer or {}).get("type")
    raise UnsupportedFormatError(
        f"the tokenizer's pre-tokenizer ({kind}) has no llama.cpp equivalent edgelora knows "
        f"(known: {', '.join(PRE_TOKENIZERS)}); this model cannot be written as GGUF yet")


def from_gguf(fields: dict[str, Any]) -> Tokenizer:
    """Builds a tokenizer from GGUF metadata (`fields`: key -> decoded value)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, models, processors

    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise UnsupportedFormatError(
            f"GGUF tokenizer model {model!r} is not supported yet (only byte-level BPE, 'gpt2'); "
            "load the model from its Hugging Face directory instead")
    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedFormatError(
            f"GGUF pre-tokenizer {pre!r} is not supported yet (known: {', '.join(PRE_TOKENIZERS)}); "
            "load the model from its Hugging Face directory instead")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges: list[str] = fields.get("tokenizer.ggml.merges", [])
    types: list[int] = fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    spec = json.loads(HFTokenizer(bpe).to_str())
    spec["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    tok = HFTokenizer.from_str(json.dumps(spec))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    def name(key: str) -> str | None:
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", False))
    bos = name("bos")
    if add_bos and bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    return Tokenizer(
        backend=tok, chat_template=fields.get("tokenizer.chat_template"),
        bos_token=bos, eos_token=name("eos"), pad_token=name("padding"), unk_token=name("unknown"),
        add_bos_token=add_bos,
    )


def to_gguf(writer: Any, tokenizer: Tokenizer) -> None:
    """Adds the tokenizer's ``tokenizer.ggml.*`` metadata to a `gguf.GGUFWriter`."""
    spec = json.loads(tokenizer.to_json())
    model = spec.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedFormatError(
            "writing GGUF supports byte-level BPE tokenizers only; this one is "
            f"{model.get('type')}{' with byte fallback (SentencePiece-style)' if model.get('byte_fallback') else ''}")
    pre = pre_name(spec.get("pre_tokenizer"))
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    vocab: dict[str, int] = dict(model["vocab"])
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = NORMAL
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", tokenizer.token_id(tokenizer.unk_token)), ("pad", tokenizer.token_id(tokenizer.pad_token))):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
