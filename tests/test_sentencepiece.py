"""SentencePiece tokenizers in GGUF: llama.cpp tokenizes what `to_gguf` writes as `tokenizers` does, and
`from_gguf` tokenizes a GGUF as llama.cpp does (Llama 2 / TinyLlama / Mistral style with the prefix space,
Gemma style without; real SentencePiece models; llama.cpp's own vocabulary files and test vectors)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora.converters import gguf_tokenizer
from edgelora.errors import UnsupportedFormatError

SPACE = "\u2581"


@pytest.fixture(scope="session")
def llama_cpp_dir(tmp_path_factory) -> Path:
    """llama.cpp's source of the version the project loads: its converter and vocabulary test files."""
    from tests.llamacpp_util import converter

    return converter(tmp_path_factory.getbasetemp() / "llama.cpp-src")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small language models, and a phone has an NPU.",
    "LoRA adapters are small deltas: A is r by in, B is out by r.",
    "Numbers like 0123456789 and 3.14159 appear in text; so do dates such as 2024-06-01.",
    "Café, naïve, résumé and Ærøskøbing have accents.",
    "  Indented lines\tand tabs\nand newlines matter for code.",
    "def main():\n    return 42  # the answer",
    "Hello there! How are you today? I am fine, thank you.",
] * 30

TEXTS = [
    "", "The quick brown fox jumps over the lazy dog.", "Hello world", " Hello world", "Hello world ",
    "  two leading", "trailing two  ", "multiple     spaces   between words", " ", "   ", "          x",
    "line one\nline two\n\nline four\n", "\ttab\tseparated\t\t", "\n", "\n\n\n",
    "café naïve résumé Ærøskøbing Ωmega", "日本語のテキスト", "emoji 🦙🚀 end", "mixed 中文 and English",
    "1234567890 3.14159 2024-06-01", "x=42; y = x*2  // ok", "def f():\n    return {'a': [1, 2]}\n",
    "The the THE tHe", "unbelievable supercalifragilistic", "▁literal▁escape", "<0x41> not a byte",
]


# -- building SentencePiece-style tokenizers with `tokenizers` ------------------------------------------


def train_bpe(prefix: bool = True, size: int = 260) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """BPE trained like SentencePiece: "▁" for spaces, words start at "▁" (split_by_whitespace). Returns
    the merged pieces in merge order, the single characters and the trained merges."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    norms = [normalizers.Prepend(SPACE)] if prefix else []
    tok.normalizer = normalizers.Sequence(norms + [normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=size, show_progress=False))
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m) for m in model["merges"]]
    merged = list(dict.fromkeys(left + right for left, right in merges))
    return merged, [t for t in model["vocab"] if len(t) == 1], merges


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """transformers' convert_slow_tokenizer.generate_merges: what a tokenizer.json converted from a
    SentencePiece model lists (every cut of every piece into two pieces, best-scoring piece first)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def sp_style(kind: str, complete: bool = True) -> dict:
    """tokenizer.json (as a dict) shaped as transformers writes Llama 2 / TinyLlama ("llama") or Gemma 3
    ("gemma") tokenizers: specials, the 256 byte tokens, merged pieces, whitespace runs (tied, like Llama's
    "▁▁" pieces), single characters."""
    gemma = kind == "gemma"
    merged, chars, trained = train_bpe(prefix=not gemma)
    specials = ["<pad>", "<eos>", "<bos>", "<unk>"] if gemma else ["<unk>", "<s>", "</s>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + merged
    runs = [SPACE * n for n in (2, 3, 4, 8) if SPACE * n not in merged]
    pieces += runs + [c for c in chars if c not in pieces]
    vocab = {p: i for i, p in enumerate(pieces)}
    scores = {p: (0.0 if i < len(specials) + 256 else -float(i)) for i, p in enumerate(pieces)}
    scores.update({r: -1e9 for r in runs})
    # complete: as transformers converts a SentencePiece model; else only the merges `tokenizers` trained
    merges = generate_merges(vocab, scores) if complete else trained
    added = [{"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i, s in enumerate(specials)]
    bos = "<bos>" if gemma else "<s>"
    if gemma:
        for extra, special in (("<start_of_turn>", True), ("<end_of_turn>", True), ("<tool>", False)):
            added.append({"id": len(vocab), "content": extra, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": special})
            vocab[extra] = len(vocab)
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE}
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": replace if gemma else {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": SPACE}, replace]},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False} if gemma else None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}}},
        "decoder": {"type": "Sequence", "decoders": decoders + ([] if gemma else [{"type": "Strip", "content": " ", "start": 1, "stop": 0}])},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": {p: i for p, i in vocab.items() if p not in ("<start_of_turn>", "<end_of_turn>", "<tool>")},
                  "merges": [list(m) for m in merges]},
    }


CHAT = {
    "llama": ("{% for m in messages %}{{ bos_token + '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "gemma": ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' + m['content'] + '<end_of_turn>\n' }}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
}
SPECIALS = {"llama": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None},
            "gemma": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}}


def save_tokenizer(spec: dict, kind: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False,
        "chat_template": CHAT[kind], **SPECIALS[kind]}))
    return out


def load_tokenizer(directory: Path) -> edgelora.Tokenizer:
    return edgelora.Tokenizer.from_hf_files((directory / "tokenizer.json").read_text(),
                                            json.loads((directory / "tokenizer_config.json").read_text()), None)


def write_vocab_gguf(tok: edgelora.Tokenizer, path: Path, name: str = "tiny") -> Path:
    """A vocabulary-only llama GGUF (llama.cpp still reads the architecture's keys) with edgelora's writer."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_block_count(1)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_layer_norm_rms_eps(1e-5)
    gguf_tokenizer.to_gguf(w, tok)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def gguf_fields(path: Path) -> dict:
    import gguf

    from edgelora.converters import gguf_model

    return gguf_model.fields_of(gguf.GGUFReader(str(path)))


def llama_cpp(path: Path):
    from llama_cpp import Llama

    return Llama(str(path), vocab_only=True, verbose=False)


def chats(kind: str, tok: edgelora.Tokenizer) -> list[str]:
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hello there! How are you?"},
                                        {"role": "assistant", "content": " Fine,  thanks.\n"},
                                        {"role": "user", "content": "café 日本 🦙"}])
    b, e = tok.bos_token, tok.eos_token
    return [rendered, f"{b}{b}text", f"text{e}", f"{e} leading space after a special", f"{b}\n{e}{e} x",
            "<tool>call <tool> twice<tool>", "<unk> and <pad>", "<s<s>>", f"{e}{b}"]


def assert_same(hf: edgelora.Tokenizer, llm, texts: list[str], special: bool) -> None:
    for add in (False, True):
        for text in texts:
            want = hf.backend.encode(text, add_special_tokens=add).ids
            got = llm.tokenize(text.encode(), add_bos=add, special=special)
            assert got == want, (add, text, [hf.backend.id_to_token(i) for i in want], [hf.backend.id_to_token(i) for i in got])


# -- to_gguf: llama.cpp tokenizes as `tokenizers` ---------------------------------------------------


@pytest.fixture(scope="module", params=["llama", "gemma"])
def sp_dir(request, tmp_path_factory):
    return save_tokenizer(sp_style(request.param), request.param, tmp_path_factory.mktemp(request.param))


def test_writes_llama_tokenizer_metadata(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    fields = gguf_fields(write_vocab_gguf(tok, tmp_path / "v.gguf"))
    gemma = "gemma" in sp_dir.name
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is (not gemma)
    assert fields["tokenizer.ggml.add_bos_token"] is True and fields["tokenizer.ggml.add_eos_token"] is False
    tokens, types, scores = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "token_type", "scores"))
    assert len(tokens) == len(types) == len(scores) == tok.vocab_size
    kinds = dict(zip(tokens, types))
    assert kinds["<unk>"] == gguf_tokenizer.UNKNOWN and kinds["<0x41>"] == gguf_tokenizer.BYTE and kinds[SPACE + "the"] == gguf_tokenizer.NORMAL
    assert kinds[tok.bos_token] == kinds[tok.eos_token] == gguf_tokenizer.CONTROL
    if gemma:
        assert kinds["<tool>"] == gguf_tokenizer.USER_DEFINED and kinds["<start_of_turn>"] == gguf_tokenizer.CONTROL
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.unknown_token_id"] == tok.token_id("<unk>")
    # merged pieces score by merge rank; runs of spaces tie (their merges interleave), like Llama's
    assert scores[tokens.index(SPACE * 3)] == scores[tokens.index(SPACE * 4)]
    merged = [s for s, ty in zip(scores, types) if ty == gguf_tokenizer.NORMAL and s != 0]
    assert len(merged) > 150


def test_llama_cpp_tokenizes_as_hf(sp_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = load_tokenizer(sp_dir)
    llm = llama_cpp(write_vocab_gguf(tok, tmp_path / "v.gguf"))
    assert_same(tok, llm, TEXTS + CORPUS[:8], special=False)
    texts = TEXTS + chats("gemma" if "gemma" in sp_dir.name else "llama", tok)
    assert_same(tok, llm, texts, special=True)
    fast = PreTrainedTokenizerFast(tokenizer_file=str(sp_dir / "tokenizer.json"))
    for text in texts:
        assert fast(text, add_special_tokens=True).input_ids == llm.tokenize(text.encode(), add_bos=True, special=True)


def test_eos_added_by_post_processor(tmp_path):
    spec = sp_style("llama")
    spec["post_processor"]["single"].append({"SpecialToken": {"id": "</s>", "type_id": 0}})
    spec["post_processor"]["special_tokens"]["</s>"] = {"id": "</s>", "ids": [2], "tokens": ["</s>"]}
    tok = load_tokenizer(save_tokenizer(spec, "llama", tmp_path / "t"))
    path = write_vocab_gguf(tok, tmp_path / "v.gguf")
    assert gguf_fields(path)["tokenizer.ggml.add_eos_token"] is True
    assert_same(tok, llama_cpp(path), TEXTS[:6], special=True)
    again = gguf_tokenizer.from_gguf(gguf_fields(path))
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)


def test_byte_fallback_is_exercised(sp_dir):
    tok = load_tokenizer(sp_dir)
    ids = tok.encode("日本 🦙", add_special_tokens=False)
    assert sum(tok.backend.id_to_token(i).startswith("<0x") for i in ids) >= 7


def test_random_text_matches(sp_dir, tmp_path):
    import random

    tok = load_tokenizer(sp_dir)
    llm = llama_cpp(write_vocab_gguf(tok, tmp_path / "v.gguf"))
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz TheQuick   \n\t0123456789.,!?'()-_éøÆ日本🦙") + [
        "the ", "  ", tok.bos_token, tok.eos_token, "<unk>", "▁"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(400)]
    assert_same(tok, llm, texts, special=True)


def test_from_gguf_round_trip(sp_dir, tmp_path):
    tok = load_tokenizer(sp_dir)
    again = gguf_tokenizer.from_gguf(gguf_fields(write_vocab_gguf(tok, tmp_path / "v.gguf")))
    for text in TEXTS + chats("gemma" if "gemma" in sp_dir.name else "llama", tok):
        for add in (False, True):
            assert again.encode(text, add) == tok.encode(text, add), (text, add)
    assert (again.bos_token, again.eos_token, again.unk_token) == (tok.bos_token, tok.eos_token, tok.unk_token)
    assert again.chat_template == tok.chat_template and again.add_bos_token
    assert again.decode(tok.encode("Hello  world\n日本", False)) == "Hello  world\n日本"


def test_through_gguf_model_write(sp_dir, tmp_path):
    """A Llama with a SentencePiece tokenizer (TinyLlama, Llama 2, Mistral) through the whole model writer:
    llama.cpp loads it, tokenizes as `tokenizers` and computes transformers' logits; edgelora reads it back."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edgelora.converters import gguf_model

    model_dir = tmp_path / "model"
    save_tokenizer(json.loads((sp_dir / "tokenizer.json").read_text()), "gemma" if "gemma" in sp_dir.name else "llama", model_dir)
    (model_dir / "tokenizer_config.json").write_text((sp_dir / "tokenizer_config.json").read_text())
    tok = load_tokenizer(model_dir)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
                     ).save_pretrained(model_dir, safe_serialization=True)
    base = edgelora.load_base(model_dir)
    path = gguf_model.write(base, tmp_path / "m.gguf", "F32")
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=64, verbose=False)
    assert_same(tok, llm, TEXTS[:12], special=True)
    again = edgelora.load_base(path)
    assert again.fingerprint == base.fingerprint
    assert all(again.tokenizer.encode(t) == tok.encode(t) for t in TEXTS)
    from edgelora.runtime.gguf import GGUFEngine
    from tests.peft_util import base_logits

    ids = tok.encode(TEXTS[1])
    with GGUFEngine(path, n_ctx=64, threads=1, kv_type="f32") as engine:
        np.testing.assert_allclose(engine.logits(ids), base_logits(model_dir, ids), rtol=0, atol=2e-5)


# -- refusals: what llama.cpp would tokenize differently ------------------------------------------------


def test_refuses_bpe_merges_llama_cpp_would_not_follow(tmp_path):
    """A BPE trained by `tokenizers` lists one merge per token; llama.cpp merges any two pieces that make a
    token, so it would tokenize differently: to_gguf refuses, and here is such a difference."""
    spec = sp_style("llama", complete=False)
    directory = save_tokenizer(spec, "llama", tmp_path / "t")
    tok = load_tokenizer(directory)
    with pytest.raises(UnsupportedFormatError, match="never merges"):
        write_vocab_gguf(tok, tmp_path / "refused.gguf")


def test_unchecked_incomplete_merges_do_differ(tmp_path, monkeypatch):
    """Written anyway, llama.cpp makes "▁▁" (a token) from two spaces, which the BPE never merges."""
    spec = sp_style("llama", complete=False)
    tok = load_tokenizer(save_tokenizer(spec, "llama", tmp_path / "t"))
    monkeypatch.setattr(gguf_tokenizer, "_check_merges_complete", lambda *a: None)
    llm = llama_cpp(write_vocab_gguf(tok, tmp_path / "v.gguf"))
    text = "two  spaces"
    hf, cpp = tok.encode(text, False), llm.tokenize(text.encode(), add_bos=False, special=False)
    assert tok.backend.token_to_id(SPACE * 2) in cpp and hf != cpp


@pytest.mark.parametrize("scheme", ["first", "always"])
def test_refuses_metaspace_prefix_llama_cpp_lacks(scheme, tmp_path):
    spec = sp_style("llama")
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": scheme, "split": False}
    tok = load_tokenizer(save_tokenizer(spec, "llama", tmp_path / "t"))
    with pytest.raises(UnsupportedFormatError, match="Metaspace"):
        write_vocab_gguf(tok, tmp_path / "v.gguf")


def test_metaspace_without_prefix_is_gemma_like(tmp_path):
    spec = sp_style("gemma")
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": SPACE, "prepend_scheme": "never", "split": False}
    tok = load_tokenizer(save_tokenizer(spec, "gemma", tmp_path / "t"))
    llm = llama_cpp(write_vocab_gguf(tok, tmp_path / "v.gguf"))
    assert_same(tok, llm, TEXTS + chats("gemma", tok), special=True)


@pytest.mark.parametrize("change, match", [
    (lambda s: s["model"].update(byte_fallback=False), "without byte fallback"),
    (lambda s: s["model"]["vocab"].pop("<0x7F>"), "byte tokens"),
    (lambda s: s["added_tokens"][1].update(lstrip=True), "lstrip"),
    (lambda s: s["added_tokens"][1].update(rstrip=True), "rstrip"),  # llama.cpp strips for phi-3 names only
    (lambda s: s["added_tokens"][1].update(normalized=True), "normalized text"),
    (lambda s: s.update(normalizer={"type": "NFKC"}), "no llama.cpp equivalent"),
])
def test_refusals(change, match, tmp_path):
    spec = sp_style("llama")
    change(spec)
    tok = load_tokenizer(save_tokenizer(spec, "llama", tmp_path / "t"))
    with pytest.raises(UnsupportedFormatError, match=match):
        write_vocab_gguf(tok, tmp_path / "v.gguf")


def test_refuses_unigram_with_byte_fallback(tmp_path):
    directory = unigram_style(tmp_path / "u")
    spec = json.loads((directory / "tokenizer.json").read_text())
    spec["model"]["byte_fallback"] = True
    tok = load_tokenizer(save_tokenizer(spec, "llama", tmp_path / "t"))
    with pytest.raises(UnsupportedFormatError, match="byte fallback"):
        write_vocab_gguf(tok, tmp_path / "v.gguf")


def test_from_gguf_refuses_scoreless_vocab():
    fields = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": ["<unk>", "a", "b", "ab"],
              "tokenizer.ggml.scores": [-1000.0] * 4, "tokenizer.ggml.token_type": [2, 1, 1, 1]}
    with pytest.raises(UnsupportedFormatError, match="no scores"):
        gguf_tokenizer.from_gguf(fields)


# -- Unigram (GGUF model "t5", llama.cpp's UGM tokenizer) ---------------------------------------------


def unigram_style(tmp_path: Path) -> Path:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=True)
    tok.train_from_iterator(CORPUS, trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                            unk_token="<unk>", show_progress=False))
    tok.pre_tokenizer = None  # llama.cpp does not cut at spaces: check no piece spans one
    spec = json.loads(tok.to_str())
    assert not any(SPACE in p[1:] for p, _ in spec["model"]["vocab"])
    return save_tokenizer(spec, "llama", tmp_path)


def test_unigram_llama_cpp_tokenizes_as_hf(tmp_path):
    directory = unigram_style(tmp_path / "u")
    cfg = json.loads((directory / "tokenizer_config.json").read_text())
    cfg["add_bos_token"] = False
    (directory / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(directory)
    path = write_vocab_gguf(tok, tmp_path / "u.gguf")
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "t5"
    llm = llama_cpp(path)
    texts = [t for t in TEXTS if t.strip(" ")] + CORPUS[:8] + ["</s>Hello<s> x", "a<s>b"]
    for text in texts:
        want = tok.backend.encode(text, add_special_tokens=False).ids
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == want, text
    again = gguf_tokenizer.from_gguf(fields)
    for text in texts:
        assert again.encode(text, False) == tok.encode(text, False), text


def test_unigram_all_space_text_differs(tmp_path):
    """Documented difference: llama.cpp's UGM normalizer puts its space prefix before the first non-space
    character, so text of spaces only gets none (llama-vocab.cpp llm_tokenizer_ugm_session::normalize)."""
    tok = load_tokenizer(unigram_style(tmp_path / "u"))
    llm = llama_cpp(write_vocab_gguf(tok, tmp_path / "u.gguf"))
    assert llm.tokenize(b"   ", add_bos=False, special=True) != tok.encode("   ", False)
    assert llm.tokenize(b"   x", add_bos=False, special=True) == tok.encode("   x", False)


# -- real SentencePiece models (the sentencepiece package trains them) -----------------------------




_TRAIN_SP = """
import json, sys
from pathlib import Path
import sentencepiece as spm
out, gemma = Path(sys.argv[1]), sys.argv[2] == "gemma"
specials = (dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>")
            if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
spm.SentencePieceTrainer.train(
    input=str(out / "corpus.txt"), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=420,
    byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", character_coverage=1.0,
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"] if gemma else [], minloglevel=2, **specials)
from transformers import GemmaTokenizerFast, LlamaTokenizerFast
cls = GemmaTokenizerFast if gemma else LlamaTokenizerFast
# add_prefix_space: else transformers 4.57 leaves Llama's Prepend("▁") out (LlamaConverter.normalizer)
extra = {} if gemma else {"add_prefix_space": True}
cls(vocab_file=str(out / "tokenizer.model"), from_slow=True, legacy=True, add_bos_token=True, **extra).save_pretrained(out)
"""


def train_sentencepiece(out: Path, gemma: bool) -> Path:
    """A SentencePiece BPE model with Llama's trainer options, converted to tokenizer.json by transformers
    (in a subprocess: transformers looks for sentencepiece once, at import)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "corpus.txt").write_text("\n".join(CORPUS))
    kind = "gemma" if gemma else "llama"
    res = subprocess.run([sys.executable, "-c", _TRAIN_SP, str(out), kind], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHAT[kind]
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_sentencepiece_model_to_gguf(gemma, tmp_path):
    """transformers' own conversion of a SentencePiece model: what TinyLlama / Gemma 3 ship."""
    directory = train_sentencepiece(tmp_path / "sp", gemma)
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    tok = load_tokenizer(directory)
    path = write_vocab_gguf(tok, tmp_path / "v.gguf")
    llm = llama_cpp(path)
    assert_same(tok, llm, TEXTS + CORPUS[:8], special=False)
    assert_same(tok, llm, chats("gemma" if gemma else "llama", tok), special=True)
    if not gemma:  # without special tokens, all three agree
        for text in TEXTS[1:]:
            assert sp.encode(text) == tok.encode(text, False), text


def _llama_cpp_convert(llama_cpp: Path, directory: Path, gemma: bool, out: Path) -> Path:
    """llama.cpp's own converter (convert_hf_to_gguf.py --vocab-only) on the directory."""
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["Gemma3ForCausalLM" if gemma else "LlamaForCausalLM"],
        "model_type": "gemma3_text" if gemma else "llama", "vocab_size": 420, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "sliding_window": 64,
        "rope_theta": 10000.0, "bos_token_id": 2 if gemma else 1, "eos_token_id": 1 if gemma else 2}))
    res = subprocess.run([sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(directory), "--vocab-only",
                          "--outfile", str(out)], capture_output=True, text=True, cwd=llama_cpp)
    if res.returncode != 0:
        pytest.fail(res.stderr[-3000:])
    return out


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_from_gguf_of_llama_cpp_converter(gemma, tmp_path, llama_cpp_dir):
    """A GGUF written by llama.cpp's converter (from tokenizer.model, as for TinyLlama and Gemma 3): from_gguf
    tokenizes as llama.cpp does, and as the Hugging Face tokenizer."""
    directory = train_sentencepiece(tmp_path / "sp", gemma)
    path = _llama_cpp_convert(llama_cpp_dir, directory, gemma, tmp_path / "cpp.gguf")
    fields = gguf_fields(path)
    assert fields["tokenizer.ggml.model"] == "llama"
    ours = gguf_tokenizer.from_gguf(fields)
    llm = llama_cpp(path)
    tok = load_tokenizer(directory)
    texts = TEXTS + chats("gemma" if gemma else "llama", tok)
    for text in texts:
        for add in (False, True):
            cpp = llm.tokenize(text.encode(), add_bos=add, special=True)
            assert ours.encode(text, add) == cpp, (text, add)
            assert tok.encode(text, add) == cpp, (text, add)


# -- llama.cpp's own SentencePiece vocabularies (models/ggml-vocab-*.gguf and their test vectors) ----------


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_from_gguf_of_llama_cpp_vocab_files(name, llama_cpp_dir):
    path = llama_cpp_dir / "models" / f"ggml-vocab-{name}.gguf"
    ours = gguf_tokenizer.from_gguf(gguf_fields(path))
    inputs = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    outputs = path.with_suffix(".gguf.out").read_text(encoding="utf-8").split("\n")
    for text, want in zip(inputs, outputs):
        assert ours.encode(text, add_special_tokens=False) == [int(x) for x in want.split()], text
    llm = llama_cpp(path)
    for text in ["<s>hello</s> world", "<|user|>\nhi<|end|>\n<|assistant|>\n", "  many   spaces  ", "日本 🦙"]:
        for add in (False, True):
            assert ours.encode(text, add) == llm.tokenize(text.encode(), add_bos=add, special=True), (text, add)


@pytest.mark.parametrize("name", ["llama-spm", "phi-3"])
def test_to_gguf_of_real_vocab(name, tmp_path, llama_cpp_dir):
    """Llama's and Phi-3's real vocabularies as transformers would convert them (from_gguf builds exactly that
    tokenizer.json: every cut a merge, ranked by score), written back by to_gguf: llama.cpp tokenizes the new
    file as the original, on llama.cpp's test vectors and random text (Llama's 16 runs of spaces tie at -1e9)."""
    import random

    path = llama_cpp_dir / "models" / f"ggml-vocab-{name}.gguf"
    fields = gguf_fields(path)
    tok = gguf_tokenizer.from_gguf(fields)
    copy = write_vocab_gguf(tok, tmp_path / "copy.gguf", name=fields["general.name"])
    written = gguf_fields(copy)
    assert written["tokenizer.ggml.tokens"] == fields["tokenizer.ggml.tokens"]
    assert written["tokenizer.ggml.add_space_prefix"] is True
    original, again = llama_cpp(path), llama_cpp(copy)
    texts = path.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    rng = random.Random(0)
    alphabet = list("abcdefghijklmnopqrstuvwxyz ABCDEF       \n\t0123456789.,!?'()éüñß日本語한국🦙") + [
        "the ", "ing ", "<s>", "</s>", "<|end|>", "<|user|>"]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(1500)]
    for text in texts:
        want = original.tokenize(text.encode(), add_bos=False, special=True)
        assert again.tokenize(text.encode(), add_bos=False, special=True) == want, text
        assert tok.encode(text, add_special_tokens=False) == want, text


@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_to_gguf_agrees_with_llama_cpp_converter(gemma, tmp_path, llama_cpp_dir):
    """Same SentencePiece model: to_gguf (from tokenizer.json) and llama.cpp's converter (from tokenizer.model)
    write the same tokens, types (but <unk>: UNKNOWN, where the converter's tokenizer_config pass makes it
    CONTROL) and flags, and scores in the same order."""
    directory = train_sentencepiece(tmp_path / "sp", gemma)
    cpp = gguf_fields(_llama_cpp_convert(llama_cpp_dir, directory, gemma, tmp_path / "cpp.gguf"))
    ours = gguf_fields(write_vocab_gguf(load_tokenizer(directory), tmp_path / "ours.gguf"))
    tokens = cpp["tokenizer.ggml.tokens"]
    assert ours["tokenizer.ggml.tokens"] == tokens
    unk = tokens.index("<unk>")
    types = list(cpp["tokenizer.ggml.token_type"])
    types[unk] = gguf_tokenizer.UNKNOWN
    assert ours["tokenizer.ggml.token_type"] == types
    for key in ("add_space_prefix", "add_bos_token", "add_eos_token", "bos_token_id", "eos_token_id", "unknown_token_id"):
        assert ours.get(f"tokenizer.ggml.{key}") == cpp.get(f"tokenizer.ggml.{key}", ours.get(f"tokenizer.ggml.{key}")), key
    normal = [i for i, ty in enumerate(types) if ty == gguf_tokenizer.NORMAL and any(tokens[i][:k] in tokens for k in range(1, len(tokens[i])))]
    by_cpp = sorted(normal, key=lambda i: (-cpp["tokenizer.ggml.scores"][i], i))
    by_ours = sorted(normal, key=lambda i: (-ours["tokenizer.ggml.scores"][i], i))
    assert by_ours == by_cpp
