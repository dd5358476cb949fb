"""Bad input gets its own clear one-line error, from the library and from the CLI."""

import json
import shutil

import numpy as np
import pytest

import edgelora
from edgelora.converters import gguf_model
from edgelora.errors import (CorruptFileError, EdgeloraError, SourceNotFoundError, UnsupportedArchitectureError,
                             UnsupportedFormatError)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    return gguf_model.write(edgelora.load_base(tiny_llama), tmp_path_factory.mktemp("g") / "tiny.gguf")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _variant(src, dst, edit):
    """A copy of checkpoint dir `src` at `dst`, changed by `edit(path)`."""
    edit(_copy(src, dst))
    return dst


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _write_gguf(path, arch="gpt2", kind=None):
    import gguf

    w = gguf.GGUFWriter(path, arch)
    if kind:
        w.add_type(kind)
    w.add_tensor("token_embd.weight", np.zeros((4, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _write(path, data):
    path.write_bytes(data)
    return path


def _truncate(src, dst, keep):
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:keep])
    return dst


CASES = {
    "missing path": (lambda d, t, g: t / "nope", SourceNotFoundError, "no such model"),
    "pickle weights": (
        lambda d, t, g: _variant(d, t / "pk", lambda p: (p / "model.safetensors").rename(p / "pytorch_model.bin")),
        UnsupportedFormatError, "pickle files (pytorch_model.bin)"),
    "pickle file": (lambda d, t, g: _write(t / "model.bin", b"\x80\x04"),
                    UnsupportedFormatError, "pickle checkpoints can run code"),
    "no config": (lambda d, t, g: _variant(d, t / "nc", lambda p: (p / "config.json").unlink()),
                  UnsupportedFormatError, "no config.json"),
    "truncated safetensors": (
        lambda d, t, g: _variant(d, t / "ts", lambda p: _truncate(d / "model.safetensors", p / "model.safetensors", 0.5)),
        CorruptFileError, "truncated safetensors file"),
    "garbage safetensors": (
        lambda d, t, g: _variant(d, t / "gs", lambda p: _write(p / "model.safetensors", b"\x10" + bytes(7) + b"not json at all!")),
        CorruptFileError, "header is not JSON"),
    "gemma2": (lambda d, t, g: _edit_config(_copy(d, t / "g"), model_type="gemma2", architectures=["Gemma2ForCausalLM"]),
               UnsupportedArchitectureError,
               "unsupported architecture 'gemma2' (Gemma2ForCausalLM): attention and final-logit soft-capping"),
    "moe": (lambda d, t, g: _edit_config(_copy(d, t / "m"), model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
            UnsupportedArchitectureError, "unsupported architecture 'qwen2_moe' (Qwen2MoeForCausalLM): mixture-of-experts models are not supported"),
    "qwen2 without its biases": (
        lambda d, t, g: _edit_config(_copy(d, t / "q"), model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
        CorruptFileError, "missing tensors model.layers.0.self_attn.q_proj.bias"),
    "gpt2 config": (lambda d, t, g: _edit_config(_copy(d, t / "g2"), model_type="gpt2"),
                    UnsupportedArchitectureError, "unsupported architecture 'gpt2'"),
    "attention bias": (lambda d, t, g: _edit_config(_copy(d, t / "ab"), attention_bias=True),
                       UnsupportedArchitectureError, "with linear biases"),
    "truncated gguf": (lambda d, t, g: _truncate(g, t / "cut.gguf", 0.6), CorruptFileError, "truncated GGUF file"),
    "not gguf": (lambda d, t, g: _write(t / "x.gguf", b"GGML" + bytes(100)),
                 CorruptFileError, "not a GGUF file (bad magic)"),
    "gguf of another arch": (lambda d, t, g: _write_gguf(t / "gpt2.gguf"), UnsupportedArchitectureError,
                             "unsupported architecture 'gpt2' in gpt2.gguf"),
    "gguf adapter": (lambda d, t, g: _write_gguf(t / "a.gguf", "llama", "adapter"), UnsupportedFormatError,
                     "this GGUF is a 'adapter', not a base model"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_its_own_error(case, tiny_llama, tiny_gguf, tmp_path):
    make, error, text = CASES[case]
    path = make(tiny_llama, tmp_path, tiny_gguf)
    with pytest.raises(error) as info:
        edgelora.load_base(path).fingerprint
    message = str(info.value)
    assert text in message
    assert "\n" not in message


@pytest.mark.parametrize("case", ["missing path", "gemma2", "truncated gguf"])
def test_cli_prints_one_line_and_exits_2(case, tiny_llama, tiny_gguf, tmp_path, run_cli):
    make, _, text = CASES[case]
    result = run_cli("inspect", str(make(tiny_llama, tmp_path, tiny_gguf)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("edgelora: error: ") and text in lines[0], result.stderr


def test_every_truncation_of_a_gguf_is_refused(tiny_gguf, tmp_path):
    """A fuzz over cut points: a truncated file never reaches llama.cpp and never crashes the reader."""
    size = tiny_gguf.stat().st_size
    for i, keep in enumerate(np.linspace(0, size - 1, 40).astype(int)):
        cut = _truncate(tiny_gguf, tmp_path / f"cut{i}.gguf", int(keep))
        with pytest.raises(EdgeloraError):
            gguf_model.read(cut).fingerprint


def test_every_truncation_of_safetensors_is_refused(tiny_llama, tmp_path):
    from edgelora.converters import safetensors_io

    src = tiny_llama / "model.safetensors"
    size = src.stat().st_size
    for i, keep in enumerate(np.linspace(0, size - 1, 40).astype(int)):
        cut = _truncate(src, tmp_path / f"cut{i}.safetensors", int(keep))
        with pytest.raises(CorruptFileError):
            safetensors_io.read_index(cut)


def test_bias_tensors_are_refused_even_without_the_flag(tiny_llama, tmp_path):
    from safetensors.numpy import load_file, save_file

    path = _copy(tiny_llama, tmp_path / "bias")
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(UnsupportedArchitectureError, match="with biases"):
        edgelora.load_base(path)
