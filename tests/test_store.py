"""The adapter store and the adapter CLI, on a tiny model's bundle with both backends."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import edgelora
from edgelora.adapters import AdapterBaseMismatchError, random_adapter
from edgelora.converters import load_adapter
from edgelora.errors import SourceNotFoundError
from edgelora.store import StoreError, StoreLimits
from tests.peft_util import make_peft_adapter, peft_logits


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def bundle_dir(tiny_llama, tmp_path_factory, isolated_cache):
    out = tmp_path_factory.mktemp("store") / "bundle"
    edgelora.export(tiny_llama, "x86-64", out, backend="both", quant="f32", eval_tokens=512, progress=False)
    return out


@pytest.fixture
def bundle(bundle_dir):
    b = edgelora.open_bundle(bundle_dir)
    for name in b.store.names():
        b.store.remove(name)
    return b


def test_install_list_info_remove(bundle, tiny_llama, tmp_path):
    peft = make_peft_adapter(tiny_llama, tmp_path / "p")
    m = bundle.store.install(peft, "style")
    assert m["bound_at_install"] and m["base_fingerprint"] == bundle.fingerprint
    assert set(m["files"]) == {"adapter.gguf", "adapter.onnx_adapter", "adapter.onnx_adapter.json",
                               "adapter.genai.onnx_adapter"}  # the fused graph's slot layout, for genai apps
    assert m["genai"] == "adapter.genai.onnx_adapter"
    assert bundle.store.names() == ["style"]
    assert bundle.store.verify("style")["rank"] == 8
    bundle.store.remove("style")
    assert bundle.store.names() == []
    with pytest.raises(SourceNotFoundError, match="no adapter named 'style'"):
        bundle.store.manifest("style")


def test_installed_adapter_is_usable_at_once_in_both_engines(bundle, tiny_llama, tmp_path):
    peft = make_peft_adapter(tiny_llama, tmp_path / "p", seed=4)
    ids = bundle.tokenizer().encode("The quick brown fox")
    engines = [bundle.engine("gguf"), bundle.engine("onnx")]
    bundle.store.install(peft, "late")  # after the engines were made
    ref = peft_logits(tiny_llama, {"late": peft}, ids)
    for e in engines:
        e.set_adapters({"late": 1.0})
        # the gguf artifact's KV cache is F16 on the device profile: close, not exact
        np.testing.assert_allclose(e.logits(ids), ref, rtol=0, atol=2e-3 if e.backend == "gguf" else 2e-5)
        e.close()


def test_refusals_install_nothing(bundle, tiny_llama, tmp_path):
    wrong = random_adapter(bundle.config, fingerprint="sha256:" + "2" * 64)
    with pytest.raises(AdapterBaseMismatchError):
        bundle.store.install(wrong, "wrong")
    with pytest.raises(StoreError, match="not allowed"):
        bundle.store.install(random_adapter(bundle.config), "../evil")
    big = bundle.store.__class__(bundle.store.root, fingerprint=bundle.fingerprint, config=bundle.config,
                                 backends=bundle.backends, limits=StoreLimits(max_adapter_mb=0.01))
    with pytest.raises(StoreError, match="over the limit of 0.01 MB per adapter"):
        big.install(random_adapter(bundle.config), "big")
    bundle.store.install(random_adapter(bundle.config), "one")
    with pytest.raises(StoreError, match="already installed"):
        bundle.store.install(random_adapter(bundle.config), "one")
    assert bundle.store.names() == ["one"]
    assert not [p for p in bundle.store.root.iterdir() if p.name.startswith(".") and p.name != ".lock"]


def test_a_killed_install_leaves_nothing_listed(bundle, tmp_path):
    """kill -9 in the middle of an install: the adapter is not listed, the store still works."""
    script = textwrap.dedent(f"""
        import os, edgelora, edgelora.store as st
        from edgelora.adapters import random_adapter
        b = edgelora.open_bundle({str(bundle.root)!r})
        real = st.sha256_file
        def dying(p):  # die after the files are written, before the rename commits the install
            os.kill(os.getpid(), 9)
        st.sha256_file = dying
        b.store.install(random_adapter(b.config), "half")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    root = bundle.root / "adapters"
    assert [p.name for p in root.iterdir() if p.name.startswith(".half.")]  # the debris, hidden from listings
    assert bundle.store.names() == []
    assert not [p.name for p in root.iterdir() if p.name.startswith(".half.")]  # and gone once a store opens
    bundle.store.install(random_adapter(bundle.config), "half")
    assert bundle.store.names() == ["half"]


def test_adapter_cli(bundle, tiny_llama, tmp_path, run_cli):
    env = {"EDGELORA_CACHE": os.environ["EDGELORA_CACHE"]}
    peft = make_peft_adapter(tiny_llama, tmp_path / "p")
    out = tmp_path / "a.gguf"
    r = run_cli("adapter", "convert", str(peft), "--to", "gguf", "--out", str(out), "--base", str(bundle.root), env=env)
    assert r.returncode == 0, r.stderr
    assert load_adapter(out).base_fingerprint == bundle.fingerprint
    r = run_cli("adapter", "install", str(bundle.root), str(out), "--name", "cli", env=env)
    assert r.returncode == 0 and "installed cli" in r.stdout, r.stderr
    assert "cli" in run_cli("adapter", "list", str(bundle.root), env=env).stdout
    assert json.loads(run_cli("adapter", "info", str(bundle.root), "cli", env=env).stdout)["rank"] == 8
    for backend in ("gguf", "onnx"):
        r = run_cli("run", str(bundle.root), "The quick", "--backend", backend, "--adapter", "cli:0.5",
                    "--max-tokens", "4", "--raw", env=env)
        assert r.returncode == 0, r.stderr
    bad = run_cli("run", str(bundle.root), "hi", "--adapter", "nope", env=env)
    assert bad.returncode == 2 and "no adapter named 'nope'" in bad.stderr
    assert run_cli("adapter", "rm", str(bundle.root), "cli", env=env).returncode == 0
    chat = subprocess.run([sys.executable, "-m", "edgelora", "chat", str(bundle.root), "--max-tokens", "3"],
                          input="hello\n/adapter nope\n/adapters\n/exit\n", capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)
    assert chat.returncode == 0 and "no adapter named 'nope'" in chat.stderr


def test_an_adapter_changed_after_install_is_refused_when_an_engine_loads_it(bundle):
    """The store hands engines the file it checked against the sha256 recorded at install."""
    from edgelora.errors import CorruptFileError

    adapter = random_adapter(bundle.config, rank=2, fingerprint=bundle.fingerprint, name="mine")
    bundle.store.install(adapter, "x")
    assert adapter.name == "mine"  # install works on its own copy
    for backend in ("gguf", "onnx"):
        with bundle.engine(backend) as engine:
            engine.set_adapters({"x": 1.0})  # loads through the store: checked, fine
        path = bundle.store.path("x", backend)
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x01  # one bit of the tensor data: a file that still parses
        path.write_bytes(bytes(data))
        with bundle.engine(backend) as engine, pytest.raises(CorruptFileError, match="changed since it was installed"):
            engine.set_adapters({"x": 1.0})


def test_a_bundle_whose_gguf_adapters_run_in_f16_keeps_their_f32_value(tiny_llama, tmp_path, run_cli):
    """--adapter-precision f16: llama.cpp loads a half-size copy; the store keeps the f32 file (what
    export, the cloud and the ONNX engine read) and the engine's effect stays within 1% of PEFT's."""
    r = run_cli("export", "--model", str(tiny_llama), "--device", "x86-64", "--out", str(tmp_path / "b"),
                "--backend", "gguf", "--quant", "f32", "--eval-tokens", "256", "--adapter-precision", "f16", "-q")
    assert r.returncode == 0, r.stderr
    b = edgelora.open_bundle(tmp_path / "b")
    assert b.adapter_precision == "f16"
    peft = make_peft_adapter(tiny_llama, tmp_path / "p", seed=5)
    m = b.store.install(peft, "lean")
    assert m["gguf_precision"] == "f16" and set(m["files"]) == {"adapter.gguf", "adapter.f16.gguf"}
    assert m["files"]["adapter.f16.gguf"]["size"] < 0.6 * m["files"]["adapter.gguf"]["size"]
    assert b.store.path("lean", "gguf").name == "adapter.gguf"
    assert b.store.path("lean", "gguf", engine=True).name == "adapter.f16.gguf"
    value, want = load_adapter(b.store.path("lean", "gguf"), b.config), load_adapter(peft)
    for t in want.targets:
        np.testing.assert_allclose(value.delta(t), want.delta(t), rtol=1e-5, atol=1e-7)
    import torch
    from transformers import AutoModelForCausalLM

    ids = b.tokenizer().encode("The quick brown fox")
    with torch.no_grad():
        ref_plain = AutoModelForCausalLM.from_pretrained(tiny_llama)(torch.tensor([ids])).logits[0].numpy()
    ref = peft_logits(tiny_llama, {"lean": peft}, ids)
    e = b.engine("gguf")
    plain = e.logits(ids)
    e.set_adapters({"lean": 1.0})
    err = (e.logits(ids) - plain) - (ref - ref_plain)
    assert np.linalg.norm(err) / np.linalg.norm(ref - ref_plain) < 0.01
    e.close()
    with pytest.raises(edgelora.errors.UnsupportedFormatError, match="adapter precision must be one of"):
        edgelora.export(str(tiny_llama), "x86-64", tmp_path / "c", backend="gguf", quant="f32", adapter_precision="int4",
                        progress=False)
