"""The tokenizer in GGUF metadata (``tokenizer.ggml.*``) <-> a `tokenizers` tokenizer.

Supported, each written so that llama.cpp (src/llama-vocab.cpp) tokenizes as the `tokenizers` tokenizer does:

- byte-level BPE (GGUF model ``gpt2``) with the pre-tokenizers listed in `PRE_TOKENIZERS`. Each row is the
  `tokenizers` pre-tokenizer that llama.cpp's pre-tokenizer of the same name reproduces (LLAMA_VOCAB_PRE_TYPE_*);
- SentencePiece BPE with byte fallback (GGUF model ``llama``, llama.cpp's SPM tokenizer): Llama 2, TinyLlama,
  Mistral, Phi-3, Gemma 3. llama.cpp merges the adjacent pair whose concatenation is the best-scoring token,
  so BPE merge ranks become token scores (`spm_scores`); `SPACE_PREFIXES` lists the space handling it has;
- SentencePiece Unigram without byte fallback (GGUF model ``t5``, llama.cpp's UGM tokenizer: Viterbi over the
  token scores, as `tokenizers`' Unigram).
"""

from __future__ import annotations

import json
import re
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
# the ones llama.cpp cuts out of the text before tokenizing it (llama-vocab.cpp cache_special_tokens)
_PARTITIONED = (UNKNOWN, CONTROL, USER_DEFINED)
# special token ids llama.cpp assumes when a GGUF has no tokenizer.ggml.<key>_token_id (llama_vocab::impl::load)
_DEFAULT_IDS = {"llama": {"bos": 1, "eos": 2, "unknown": 0}, "t5": {"eos": 1, "unknown": 2, "padding": 0}}

SPACE = "\u2581"  # "▁", SentencePiece's escaped space (llama_escape_whitespace)
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_REPLACE_SPACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
_PREPEND_SPACE = {"type": "Prepend", "prepend": SPACE}
_SPLIT_SPACE = {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}
# (normalizer, pre-tokenizer) -> tokenizer.ggml.add_space_prefix. llama.cpp escapes every space and, with
# add_space_prefix, puts one more space before every text fragment (at the start and after each special token).
# Metaspace(prepend_scheme "first"/"always") prepends only at the start / only to text not starting with a space:
# llama.cpp has neither, so those are refused (`space_prefix`).
SPACE_PREFIXES: list[tuple[Any, Any, bool]] = [
    ({"type": "Sequence", "normalizers": [_PREPEND_SPACE, _REPLACE_SPACE]}, None, True),  # Llama 2, Mistral
    (_REPLACE_SPACE, None, False),
    (_REPLACE_SPACE, _SPLIT_SPACE, False),  # Gemma: the split finds no space left after the normalizer
    ({"type": "Sequence", "normalizers": [_REPLACE_SPACE]}, None, False),
    (None, {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never", "split": False}, False),
]


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


def _is_sentencepiece(spec: dict[str, Any]) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
    return bool(spec.get("model", {}).get("byte_fallback")) or SPACE in text


def space_prefix(spec: dict[str, Any], vocab: dict[str, int]) -> bool:
    """llama.cpp's add_space_prefix for a SentencePiece-style tokenizer's normalizer and pre-tokenizer."""
    norm, pre = spec.get("normalizer"), spec.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "Metaspace":
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        if scheme != "never":
            where = "at the start of the text only" if scheme == "first" else "unless the text starts with one"
            raise UnsupportedFormatError(
                f"the tokenizer's Metaspace pre-tokenizer (prepend_scheme {scheme!r}) puts a space {where}; llama.cpp puts "
                "one before every text fragment, so it would tokenize differently; this model cannot be written as GGUF yet")
        if pre.get("split", True):
            _check_no_inner_space(vocab)
        pre = {**pre, "prepend_scheme": "never", "split": False}
        pre.pop("add_prefix_space", None)
        pre.pop("str_rep", None)
    for known_norm, known_pre, prefix in SPACE_PREFIXES:
        if _shape(known_norm) == _shape(norm) and _shape(known_pre) == _shape(pre):
            return prefix
    kinds = f"normalizer {(norm or {}).get('type')}, pre-tokenizer {(pre or {}).get('type')}"
    raise UnsupportedFormatError(
        f"the SentencePiece-style tokenizer's {kinds} has no llama.cpp equivalent edgelora knows; "
        "this model cannot be written as GGUF yet")


def _check_no_inner_space(vocab: dict[str, int]) -> None:
    """Metaspace's split cuts the text before each "▁": the same as no split unless a token spans a cut."""
    inner = next((t for t in vocab if SPACE in t[1:]), None)
    if inner is not None:
        raise UnsupportedFormatError(
            f"the tokenizer splits words at spaces but has a token across one ({inner!r}) that llama.cpp "
            "would use; this model cannot be written as GGUF yet")


# -- GGUF -> tokenizers ------------------------------------------------------------------------


def from_gguf(fields: dict[str, Any]) -> Tokenizer:
    """Builds a tokenizer from GGUF metadata (`fields`: key -> decoded value) that tokenizes as llama.cpp does."""
    model = fields.get("tokenizer.ggml.model")
    readers = {"gpt2": _byte_level_from_gguf, "llama": _spm_from_gguf, "t5": _ugm_from_gguf}
    if model not in readers:
        raise UnsupportedFormatError(
            f"GGUF tokenizer model {model!r} is not supported yet (known: {', '.join(readers)}); "
            "load the model from its Hugging Face directory instead")
    return readers[model](fields)


def _byte_level_from_gguf(fields: dict[str, Any]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, models

    pre = fields.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedFormatError(
            f"GGUF pre-tokenizer {pre!r} is not supported yet (known: {', '.join(PRE_TOKENIZERS)}); "
            "load the model from its Hugging Face directory instead")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    merges: list[str] = fields.get("tokenizer.ggml.merges", [])
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False)
    spec = json.loads(HFTokenizer(bpe).to_str())
    spec["pre_tokenizer"] = PRE_TOKENIZERS[pre]
    spec["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    return _finish(HFTokenizer.from_str(json.dumps(spec)), fields, add_bos_default=False, add_eos_default=False)


def _spm_from_gguf(fields: dict[str, Any]) -> Tokenizer:
    """llama.cpp's SPM tokenizer as a byte-fallback BPE: a merge for every way of cutting a token in two,
    ranked by the token's score as transformers' `generate_merges` ranks a SentencePiece model's."""
    from tokenizers import Tokenizer as HFTokenizer, models

    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    scores: list[float] = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    _check_scores(scores, types)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk = _special_id(fields, "unknown", tokens)
    bpe = models.BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=tokens[unk] if unk is not None else None,
                     fuse_unk=True, byte_fallback=True)
    tok = HFTokenizer(bpe)
    _set_spm_pipeline(tok, bool(fields.get("tokenizer.ggml.add_space_prefix", True)))
    return _finish(tok, fields, add_bos_default=True, add_eos_default=False)


def _ugm_from_gguf(fields: dict[str, Any]) -> Tokenizer:
    from tokenizers import Tokenizer as HFTokenizer, models

    if fields.get("tokenizer.ggml.precompiled_charsmap") or fields.get("tokenizer.ggml.remove_extra_whitespaces"):
        raise UnsupportedFormatError(
            "GGUF Unigram tokenizer with a precompiled normalizer or whitespace merging is not supported yet; "
            "load the model from its Hugging Face directory instead")
    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    scores: list[float] = fields.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    unk = _special_id(fields, "unknown", tokens)
    # llama.cpp's Viterbi takes the unknown token's score from the lowest NORMAL one; only NORMAL and UNUSED
    # tokens keep their scores (user-defined ones score 0)
    vocab = [(t, float(s) if ty in (NORMAL, UNUSED) else 0.0) for t, s, ty in zip(tokens, scores, types)]
    tok = HFTokenizer(models.Unigram(vocab, unk_id=unk, byte_fallback=False))
    _set_spm_pipeline(tok, bool(fields.get("tokenizer.ggml.add_space_prefix", True)), byte_fallback=False)
    return _finish(tok, fields, add_bos_default=False, add_eos_default=True)


def _set_spm_pipeline(tok: Any, prefix: bool, byte_fallback: bool = True) -> None:
    from tokenizers import decoders, normalizers

    replace = normalizers.Replace(" ", SPACE)
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace] if prefix else [replace])
    steps = [decoders.Replace(SPACE, " ")] + ([decoders.ByteFallback()] if byte_fallback else []) + [decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))


def _check_scores(scores: list[float], types: list[int]) -> None:
    normal = {s for s, ty in zip(scores, types) if ty == NORMAL}
    if len(normal) == 1 and types.count(NORMAL) > 1:
        raise UnsupportedFormatError(
            f"this GGUF's SentencePiece tokenizer has no scores (every token scores {normal.pop():g}), so llama.cpp "
            "merges its text left to right, which edgelora cannot reproduce; load the model from its Hugging Face "
            "directory instead")


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """The BPE merges that reproduce llama.cpp's SPM merging: every cut of a token into two tokens, best
    score first (ties: longer left piece, then longer right piece, as transformers' `generate_merges`)."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for i, text in enumerate(tokens):
        cuts = [(text[:k], text[k:]) for k in range(1, len(text))]
        if not (types[i] in _PARTITIONED and SPACE not in text):
            _check_no_stray_char(text, cuts, vocab)
        local = sorted(((l, r) for l, r in cuts if l in vocab and r in vocab), key=lambda c: (vocab[c[0]], vocab[c[1]]))
        merges += [(scores[i], l, r) for l, r in local]
    merges.sort(key=lambda m: (m[0], len(m[1]), len(m[2])), reverse=True)
    return [(l, r) for _, l, r in merges]


def _check_no_stray_char(text: str, cuts: list[tuple[str, str]], vocab: dict[str, int]) -> None:
    """llama.cpp starts from single characters, tokens or not; BPE merges tokens only."""
    for cut in cuts:
        if all(p in vocab or len(p) == 1 for p in cut) and not all(p in vocab for p in cut):
            raise UnsupportedFormatError(
                f"token {text!r} is made of {cut[0]!r} + {cut[1]!r}, not both tokens: llama.cpp makes it, a BPE "
                "tokenizer cannot; load the model from its Hugging Face directory instead")


def _special_id(fields: dict[str, Any], key: str, tokens: list[str]) -> int | None:
    default = _DEFAULT_IDS.get(fields.get("tokenizer.ggml.model"), {}).get(key)
    i = fields.get(f"tokenizer.ggml.{key}_token_id", default)
    return i if i is not None and 0 <= i < len(tokens) else None


def _strips(fields: dict[str, Any], tokens: list[str], types: list[int]) -> set[int]:
    """The tokens llama.cpp strips the spaces after: for models named phi-3, every special token but three
    (llama-vocab.cpp, "set attributes by model/tokenizer/architecture name")."""
    name = str(fields.get("general.name", "")).lower()
    if "phi-3" not in name and "phi3" not in name:
        return set()
    keep = {"<unk>", "<s>", "<|endoftext|>"}
    return {i for i, (t, ty) in enumerate(zip(tokens, types)) if (ty in _PARTITIONED or t == "</s>") and t not in keep}


def _finish(tok: Any, fields: dict[str, Any], add_bos_default: bool, add_eos_default: bool) -> Tokenizer:
    """Added tokens, BOS/EOS and the special-token names, common to every GGUF tokenizer model."""
    from tokenizers import AddedToken, processors

    tokens: list[str] = fields["tokenizer.ggml.tokens"]
    types: list[int] = fields.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    strip = _strips(fields, tokens, types)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False, rstrip=i in strip)
                            for i, (t, ty) in enumerate(zip(tokens, types)) if ty in (CONTROL, UNKNOWN)])
    tok.add_tokens([AddedToken(t, special=False, normalized=False, rstrip=i in strip)
                    for i, (t, ty) in enumerate(zip(tokens, types)) if ty == USER_DEFINED])

    def name(key: str) -> str | None:
        i = _special_id(fields, key, tokens)
        return tokens[i] if i is not None else None

    bos, eos = name("bos"), name("eos")
    add_bos = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(fields.get("tokenizer.ggml.add_eos_token", add_eos_default)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([bos] if add_bos else []) + ["$A"] + ([eos] if add_eos else []))
        pair = single + " " + single.replace("$A", "$B")
        used = {t for t, on in ((bos, add_bos), (eos, add_eos)) if on}
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=[(t, tok.token_to_id(t)) for t in used])
    return Tokenizer(
        backend=tok, chat_template=fields.get("tokenizer.chat_template"),
        bos_token=bos, eos_token=eos, pad_token=name("padding"), unk_token=name("unknown"),
        add_bos_token=add_bos,
    )


# -- tokenizers -> GGUF ------------------------------------------------------------------------


def to_gguf(writer: Any, tokenizer: Tokenizer, vocab_size: int | None = None) -> None:
    """Adds the tokenizer's ``tokenizer.ggml.*`` metadata to a `gguf.GGUFWriter`. `vocab_size`, the
    model's embedding rows: llama.cpp wants one token per row, so a model whose embedding is padded
    past its tokenizer (Qwen2.5, Gemma 3) gets unused ``[PADn]`` tokens, as llama.cpp's converter writes."""
    spec = json.loads(tokenizer.to_json())
    kind = spec.get("model", {}).get("type")
    if kind == "BPE" and not _is_sentencepiece(spec):
        types = _byte_level_to_gguf(writer, spec, vocab_size)
    elif kind == "BPE":
        types = _spm_to_gguf(writer, spec, tokenizer, vocab_size)
    elif kind == "Unigram":
        types = _ugm_to_gguf(writer, spec, tokenizer, vocab_size)
    else:
        raise UnsupportedFormatError(
            f"writing GGUF supports BPE and SentencePiece tokenizers; this one is {kind}")
    _write_specials(writer, tokenizer, spec, types)


def _byte_level_to_gguf(writer: Any, spec: dict[str, Any], vocab_size: int | None) -> list[int]:
    pre = pre_name(spec.get("pre_tokenizer"))
    tokens, types = _token_table(spec, dict(spec["model"]["vocab"]), size=vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(_merge_pairs(spec["model"], joined=True))
    return types


def _spm_to_gguf(writer: Any, spec: dict[str, Any], tokenizer: Tokenizer, vocab_size: int | None) -> list[int]:
    model = spec["model"]
    _check_spm_bpe(model)
    vocab = dict(model["vocab"])
    prefix = space_prefix(spec, vocab)
    tokens, types = _token_table(spec, vocab, unk=model.get("unk_token") or tokenizer.unk_token, spm=True,
                                 size=vocab_size)
    _check_added(spec, tokens, types, prefix, writer)
    scores = spm_scores(tokens, types, _merge_pairs(model))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)
    return types


def _ugm_to_gguf(writer: Any, spec: dict[str, Any], tokenizer: Tokenizer, vocab_size: int | None) -> list[int]:
    model = spec["model"]
    if model.get("byte_fallback"):
        raise UnsupportedFormatError(
            "Unigram tokenizer with byte fallback: llama.cpp's Unigram tokenizer has none (it writes <unk>); "
            "this model cannot be written as GGUF yet")
    pieces = [p for p, _ in model["vocab"]]
    vocab = {p: i for i, p in enumerate(pieces)}
    prefix = space_prefix(spec, vocab)
    unk = pieces[model["unk_id"]] if model.get("unk_id") is not None else tokenizer.unk_token
    tokens, types = _token_table(spec, vocab, unk=unk, spm=True, size=vocab_size)
    _check_added(spec, tokens, types, prefix, writer)
    scores = [0.0] * len(tokens)
    for i, (_, score) in enumerate(model["vocab"]):
        scores[i] = float(score)
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(prefix)
    writer.add_remove_extra_whitespaces(False)
    return types


def _check_spm_bpe(model: dict[str, Any]) -> None:
    if not model.get("byte_fallback"):
        raise UnsupportedFormatError(
            "SentencePiece-style BPE tokenizer without byte fallback: llama.cpp falls back to byte tokens where it "
            "writes <unk>; this model cannot be written as GGUF yet")
    odd = [k for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix", "ignore_merges") if model.get(k)]
    if odd:
        raise UnsupportedFormatError(
            f"SentencePiece-style BPE tokenizer with {', '.join(odd)}: llama.cpp's SentencePiece tokenizer has no "
            "such option; this model cannot be written as GGUF yet")
    missing = [f"<0x{b:02X}>" for b in range(256) if f"<0x{b:02X}>" not in model["vocab"]]
    if missing:
        raise UnsupportedFormatError(
            f"SentencePiece-style BPE tokenizer lacks {len(missing)} byte tokens ({missing[0]}...): llama.cpp needs "
            "all 256 for its byte fallback; this model cannot be written as GGUF yet")


def _check_added(spec: dict[str, Any], tokens: list[str], types: list[int], prefix: bool, writer: Any) -> None:
    """Added tokens llama.cpp cuts out of the raw text as `tokenizers` does (llama-vocab.cpp tokenizer_st_partition)."""
    expected = _strips({"general.name": _writer_name(writer)}, tokens, types)
    for t in spec.get("added_tokens", []):
        content = t["content"]
        flag = "single_word" if t.get("single_word") else "lstrip" if t.get("lstrip") else None
        if flag is None and bool(t.get("rstrip")) != (t["id"] in expected):
            flag = "rstrip" if t.get("rstrip") else "no rstrip"
        if flag:
            raise UnsupportedFormatError(
                f"added token {content!r} has {flag}, which llama.cpp does not reproduce (it strips the spaces after "
                "special tokens only of models named phi-3); this model cannot be written as GGUF yet")
        if t.get("normalized") and prefix:
            raise UnsupportedFormatError(
                f"added token {content!r} is matched in normalized text: llama.cpp matches it in the raw text and "
                "puts a space before the text after it; this model cannot be written as GGUF yet")


def _writer_name(writer: Any) -> str:
    """The ``general.name`` already added to `writer` (llama.cpp sets token attributes by model name)."""
    try:
        return str(writer.kv_data[0]["general.name"].value)
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""


def _token_table(spec: dict[str, Any], vocab: dict[str, int], unk: str | None = None,
                 spm: bool = False, size: int | None = None) -> tuple[list[str], list[int]]:
    """The token list and types: model vocab NORMAL, added tokens CONTROL (special) or USER_DEFINED, unused ids
    as [PADn]. SentencePiece (`spm`): <0xNN> are BYTE, `unk` UNKNOWN, and an added token matched in normalized
    text is written in raw text, as llama.cpp matches it (spaces, not "▁")."""
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    for t in added.values():
        vocab.setdefault(t["content"], t["id"])
    n = max(vocab.values()) + 1
    if size is not None and n > size:
        raise UnsupportedFormatError(f"the tokenizer has {n} tokens but the model embeds {size}: not this model's tokenizer?")
    n = max(n, size or 0)  # embedding rows past the tokenizer: unused tokens
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = BYTE if spm and _BYTE_TOKEN.fullmatch(text) else NORMAL
    for i, t in added.items():
        types[i] = CONTROL if t.get("special") else USER_DEFINED
        if spm and t.get("normalized"):
            tokens[i] = t["content"].replace(SPACE, " ")
    if spm and unk is not None and unk in vocab:
        types[vocab[unk]] = UNKNOWN
    return tokens, types


def _merge_pairs(model: dict[str, Any], joined: bool = False) -> list[Any]:
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return [" ".join(p) for p in pairs] if joined else pairs


def spm_scores(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> list[float]:
    """Token scores under which llama.cpp's SPM merging (best-scoring adjacent pair first, ties leftmost)
    makes the merges BPE makes (lowest rank first): a merged token scores minus its first merge's rank.
    Tokens whose merges interleave (SentencePiece ties, e.g. Llama's runs of spaces) share a score."""
    vocab = {t: i for i, t in enumerate(tokens)}
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for rank, (l, r) in enumerate(merges):
        i = vocab.get(l + r)
        if i is not None:
            first.setdefault(i, rank)
            last[i] = rank
    _check_merges_complete(tokens, types, vocab, set(merges))
    scores = [0.0] * len(tokens)
    group_start, group_end = -1, -1
    for i in sorted(first, key=first.get):
        if first[i] > group_end:
            group_start = first[i]
        group_end = max(group_end, last[i])
        scores[i] = -float(group_start + 1)
    return scores


def _check_merges_complete(tokens: list[str], types: list[int], vocab: dict[str, int],
                           merges: set[tuple[str, str]]) -> None:
    """llama.cpp merges any two adjacent pieces that make a token; BPE only its listed merges. The same
    when every cut of a token into two pieces (tokens or single characters) is a merge, as in tokenizers
    converted from SentencePiece (transformers' `generate_merges`)."""
    for text, ty in zip(tokens, types):
        if ty in _PARTITIONED and SPACE not in text:
            continue  # llama.cpp cuts these out before merging
        for k in range(1, len(text)):
            l, r = text[:k], text[k:]
            if (l in vocab or len(l) == 1) and (r in vocab or len(r) == 1) and (l, r) not in merges:
                raise UnsupportedFormatError(
                    f"the tokenizer never merges {l!r} + {r!r} although {text!r} is a token: llama.cpp would "
                    "(its SentencePiece tokenizer merges any pair that makes a token); this model cannot be "
                    "written as GGUF yet")


def _adds_eos(spec: dict[str, Any], eos: str | None) -> bool:
    post = spec.get("post_processor") or {}
    for p in post.get("processors", [post]):
        if p.get("type") == "TemplateProcessing" and p.get("single"):
            last = p["single"][-1].get("SpecialToken", {}).get("id")
            return eos is not None and last == eos
    return False


def _write_specials(writer: Any, tokenizer: Tokenizer, spec: dict[str, Any], types: list[int]) -> None:
    """Special token ids (the model's unknown token when the config names none: llama.cpp would assume one)."""
    unk = tokenizer.token_id(tokenizer.unk_token)
    if unk is None and UNKNOWN in types:
        unk = types.index(UNKNOWN)
    for key, tid in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                     ("unk", unk), ("pad", tokenizer.token_id(tokenizer.pad_token))):
        if tid is not None:
            getattr(writer, f"add_{key}_token_id")(tid)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(_adds_eos(spec, tokenizer.eos_token))
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
