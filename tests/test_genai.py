"""ONNX bundles in onnxruntime-genai apps (issue 19): `og.Model(bundle/onnx/<quant>)` loads the bundle's
graph as it is, and the store's adapters load through `og.Adapters`; greedy tokens from
`og.Generator` equal edgelora's engine's, without an adapter, with one, and after switching to a
second. genai's Python API mirrors its mobile ones (Java/Kotlin, Objective-C/Swift, C#, C)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora import native
from edgelora.adapters import AdapterBaseMismatchError, random_adapter
from edgelora.converters import genai

og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)")

pytestmark = pytest.mark.usefixtures("isolated_cache")
MAX_NEW = 12


def og_tokens(model_dir: Path, ids: list[int], adapters: dict[str, Path] | None = None, active: str | None = None) -> list[int]:
    """Greedy tokens from onnxruntime-genai (the prompt's ids in, up to MAX_NEW new ones out, EOS dropped)."""
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + MAX_NEW, do_sample=False)
    gen = og.Generator(model, params)
    if active:
        loaded = og.Adapters(model)
        for name, path in (adapters or {}).items():
            loaded.load(str(path), name)
        gen.set_active_adapter(loaded, active)
    gen.append_tokens(np.array(ids, dtype=np.int32))
    out = []
    while not gen.is_done() and len(out) < MAX_NEW:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    eos = json.loads((Path(model_dir) / genai.CONFIG).read_text())["model"]["eos_token_id"]
    return out[:-1] if out and out[-1] == eos else out


def ours(bundle, ids: list[int], active: str | None = None) -> list[int]:
    with bundle.engine("onnx") as e:
        if active:
            e.set_adapters([active])
        return e.generate(ids, max_tokens=MAX_NEW).tokens


@pytest.fixture(scope="module", params=["f32", "int8", "int4", "int4@f16", "int4@q8_0"])
def bundle(request, tiny_llama, tmp_path_factory, isolated_cache):
    quant, _, precision = request.param.partition("@")  # f16, q8_0: MatMulQ41 reads adapters in half, a quarter the bytes
    b = edgelora.export(tiny_llama, "x86-64", tmp_path_factory.mktemp("genai") / request.param, backend="onnx",
                        quant=quant, eval_tokens=256, force=True, progress=False, adapter_precision=precision or "f32")
    for seed, name in ((1, "a"), (2, "b")):
        b.store.install(random_adapter(b.config, rank=4, seed=seed, scale=0.2, fingerprint=b.fingerprint), name)
    return b


def _prompt(bundle) -> list[int]:
    tok = bundle.tokenizer()
    return tok.encode("The quick brown fox jumps over", add_special_tokens=True)


def test_genai_loads_the_bundle_and_the_stores_adapters_as_they_are(bundle):
    model_dir = bundle.path(bundle.artifact("onnx").main).parent
    cfg = json.loads((model_dir / genai.CONFIG).read_text())
    assert cfg["model"]["type"] == "llama" and cfg["search"]["past_present_share_buffer"] is True
    if bundle.artifact("onnx").quant == "int4" and native.library(warn=False):  # edgelora's MatMulQ41, shipped beside
        assert cfg["model"]["decoder"]["session_options"]["custom_ops_library"] == native.LIBRARY
        assert (model_dir / native.LIBRARY).is_file()
        # its slots take one B per projection, in tiles, in the bundle's adapter precision: so do genai's files
        slots = bundle.store.genai_slots
        assert {t.dtype for t in slots.values()} == {{"f16": np.float16, "q8_0": np.uint8}.get(bundle.adapter_precision, np.float32)}
        assert slots["layers.0.k.lora_B"].tiled and slots["layers.0.o.lora_B"].tiled and "layers.0.qkv.lora_B" not in slots
    ids = _prompt(bundle)
    base = ours(bundle, ids)
    assert og_tokens(model_dir, ids) == base
    files = {n: bundle.store.root / n / bundle.store.manifest(n)["genai"] for n in ("a", "b")}
    with_a = og_tokens(model_dir, ids, files, "a")
    assert with_a == ours(bundle, ids, "a") and with_a != base  # the adapter changes the answer, the same way
    assert og_tokens(model_dir, ids, files, "b") == ours(bundle, ids, "b")  # switched (a new generator)


def test_export_app_writes_what_an_app_ships(bundle, tmp_path, run_cli):
    out = tmp_path / "app"
    r = run_cli("adapter", "export-app", str(bundle.root), "--out", str(out), "--adapter", "a", "--adapter", "b")
    assert r.returncode == 0, r.stderr
    assert {genai.CONFIG, "tokenizer.json", "tokenizer_config.json", "adapters"} <= {p.name for p in out.iterdir()}
    ids = _prompt(bundle)
    files = {n: out / "adapters" / f"{n}.onnx_adapter" for n in ("a", "b")}
    assert og_tokens(out, ids, files, "b") == ours(bundle, ids, "b")
    # what genai would not check: an adapter of another base never reaches the store or the app
    other = random_adapter(bundle.config, rank=4, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(AdapterBaseMismatchError):
        bundle.store.install(other, "other")
    r = run_cli("adapter", "export-app", str(bundle.root), "--out", str(tmp_path / "app2"), "--adapter", "other")
    assert r.returncode == 2 and "no adapter named 'other'" in r.stderr and not (tmp_path / "app2").exists()


def test_genai_reads_the_tokenizer_and_chat_template_beside_the_graph(bundle):
    model_dir = bundle.path(bundle.artifact("onnx").main).parent
    tok = og.Tokenizer(og.Model(str(model_dir)))
    text = "The quick brown fox jumps over"
    assert list(tok.encode(text)) == bundle.tokenizer().encode(text, add_special_tokens=False)


def test_genai_runs_the_optimum_graph_with_an_adapter(tiny_llama, tmp_path):
    """optimum's export (position_ids, its own attention: no shared KV buffer) with per-module slots."""
    b = edgelora.export(tiny_llama, "x86-64", tmp_path / "b", backend="onnx", quant="f32", onnx_graph="optimum",
                        eval_tokens=256, force=True, progress=False)
    b.store.install(random_adapter(b.config, rank=4, seed=1, scale=0.2, fingerprint=b.fingerprint), "a")
    model_dir = b.path(b.artifact("onnx").main).parent
    assert json.loads((model_dir / genai.CONFIG).read_text())["search"]["past_present_share_buffer"] is False
    ids = _prompt(b)
    assert og_tokens(model_dir, ids) == ours(b, ids)
    path = b.store.root / "a" / b.store.manifest("a")["genai"]
    assert og_tokens(model_dir, ids, {"a": path}, "a") == ours(b, ids, "a") != ours(b, ids)


@pytest.mark.slow
def test_default_model_int4_bundle_in_genai(default_model_dir, tmp_path):
    b = edgelora.export("smollm2-135m", "raspberry-pi-5", tmp_path / "pi5", backend="onnx", quant="int4",
                        eval_tokens=1024, progress=False)
    for seed, name in ((1, "a"), (2, "b")):
        b.store.install(random_adapter(b.config, rank=8, seed=seed, scale=0.02, fingerprint=b.fingerprint), name)
    tok = b.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}],
                                             add_generation_prompt=True), add_special_tokens=False)
    model_dir = b.path(b.artifact("onnx").main).parent
    files = {n: b.store.root / n / b.store.manifest(n)["genai"] for n in ("a", "b")}
    base = ours(b, ids)
    assert og_tokens(model_dir, ids) == base
    assert og_tokens(model_dir, ids, files, "a") == ours(b, ids, "a") != base
    assert og_tokens(model_dir, ids, files, "b") == ours(b, ids, "b")
