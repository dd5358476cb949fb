"""Shared fixtures: tiny random Llama checkpoints built in the test session, and the default model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = (
    "The quick brown fox jumps over the lazy dog. Edge devices run small language models. "
    "A Raspberry Pi has four cores and a phone has an NPU. LoRA adapters are small deltas: "
    "A is r by in, B is out by r. 0123456789 numbers, punctuation!? and (brackets) [too]. "
) * 20


def build_tokenizer(out: Path, vocab_size: int = 384) -> None:
    """A byte-level BPE tokenizer (GPT-2 style pre-tokenizer) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([CORPUS], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>", "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "chat_template": CHATML,
    }))


def build_tiny_llama(out: Path, *, tied: bool = False, seed: int = 0, dtype: str = "float32",
                     model_type: str = "llama", as_q4_1: bool = False, **overrides) -> Path:
    """A 2-layer random Llama saved by transformers as safetensors, with its tokenizer. With
    `as_q4_1`, its linear weights are exactly dequantized Q4_1 and its embedding exactly Q8_0
    (gguf's own quantizers), like the default model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size()
    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied,
              bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    torch.manual_seed(seed)
    if model_type == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **kw))
    else:
        model = LlamaForCausalLM(LlamaConfig(**kw))
    with torch.no_grad():  # make norms non-trivial so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif as_q4_1 and p.ndim == 2:
                p.copy_(torch.from_numpy(_gguf_roundtrip(p.numpy(), "Q8_0" if "embed" in name else "Q4_1")))
    model.to(getattr(torch, dtype)).save_pretrained(out, safe_serialization=True)
    return out


def _gguf_roundtrip(w, kind: str):
    import gguf

    t = getattr(gguf.GGMLQuantizationType, kind)
    return gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-tied", tied=True, seed=1)


@pytest.fixture(scope="session")
def tiny_llama_q41(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama-q41", tied=True, seed=2, as_q4_1=True)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model's float checkpoint, pulled into the user cache on first use."""
    import edgelora

    return edgelora.models.ensure_model(edgelora.DEFAULT_MODEL, progress=False)


def train_killed_at(bundle_root: Path, data: Path, name: str, checkpoint_dir: Path, step: int, **kw):
    """Runs train_adapter on the bundle in a subprocess that SIGKILLs itself once step `step` is done
    (what a crash or a phone's OOM killer does); returns the CompletedProcess."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import os, edgelora
        from edgelora.train import train_adapter
        b = edgelora.open_bundle({str(bundle_root)!r})
        def progress(p):
            if p["step"] == {step}:
                os.kill(os.getpid(), 9)
        train_adapter(b, {str(data)!r}, {name!r}, install=False, checkpoint_dir={str(checkpoint_dir)!r},
                      progress=progress, **{kw!r})
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env=os.environ.copy())


def _run_cli(*args: str, env: dict | None = None, timeout: float = 900):
    """Runs the real `edgelora` command in a subprocess; returns CompletedProcess."""
    import subprocess
    import sys

    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgelora", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture
def run_cli():
    return _run_cli


@pytest.fixture(scope="module")
def run_cli_module(isolated_cache):
    """`run_cli` for module-scoped fixtures (with the module's isolated cache)."""
    return _run_cli


@pytest.fixture(scope="module")
def isolated_cache(tmp_path_factory):
    """EDGELORA_CACHE pointed at this session's temporary directory for one test module, and restored
    after it (module-scoped bundle fixtures depend on it, so they never write the user's cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELORA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
        yield
