"""Device profiles and bundles on a tiny model: every format, the manifest, budgets, atomicity."""

import json
from pathlib import Path

import numpy as np
import pytest

import edgelora
from edgelora import bundle as bundle_mod
from edgelora import profiles
from edgelora.errors import CorruptFileError, SourceNotFoundError, UnsupportedFormatError

ROOT = Path(__file__).resolve().parent.parent

SHIPPED = ["android-arm64", "raspberry-pi-4", "raspberry-pi-5", "snapdragon-8-gen-3", "x86-64"]
EVAL = 1024  # held-out tokens per export in these tests (the default model uses all 22k)


pytestmark = pytest.mark.usefixtures("isolated_cache")


def test_shipped_profiles():
    listed = profiles.list_profiles()
    assert [p.name for p in listed] == SHIPPED
    for p in listed:
        assert p.memory_budget_mb <= p.ram_mb and p.backends.order
    npu = profiles.get_profile("snapdragon-8-gen-3")
    assert npu.kind == "npu" and npu.shapes.static and npu.backends.onnx_quant == "qdq"
    assert npu.backends.execution_providers == ("QNNExecutionProvider",)
    # every arm64 profile names its core and -march; llama.cpp's build flags follow from it
    marches = {p.name: p.build.march for p in listed if p.arch == "arm64"}
    assert marches == {"android-arm64": "armv8.2-a+dotprod+i8mm", "raspberry-pi-4": "armv8-a",
                       "snapdragon-8-gen-3": "armv8.2-a+dotprod+i8mm",
                       "raspberry-pi-5": "armv8.2-a+dotprod"}
    pi5 = profiles.get_profile("raspberry-pi-5")
    assert pi5.build.cpu == "cortex-a76"
    assert pi5.to_dict()["build"]["llama_cpp_cmake_args"] == "-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod"


def test_profile_errors(tmp_path):
    with pytest.raises(SourceNotFoundError, match="unknown device profile 'toaster'"):
        profiles.get_profile("toaster")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n')
    with pytest.raises(profiles.ProfileError, match="not a device profile"):
        profiles.get_profile(bad)
    head = tmp_path / "head.toml"
    head.write_text((ROOT / "devices" / "x86-64.toml").read_text().replace("onnx_head_bits = 6", "onnx_head_bits = 5"))
    with pytest.raises(profiles.ProfileError, match="backends.onnx_head_bits must be 6 or 8, got 5"):
        profiles.get_profile(head)
    assert profiles.get_profile("x86-64").backends.onnx_head_bits == 6
    width = tmp_path / "width.toml"
    width.write_text((ROOT / "devices" / "x86-64.toml").read_text().replace('adapter_precision = "q8_0"', 'adapter_precision = "q4"'))
    with pytest.raises(profiles.ProfileError, match="backends.adapter_precision must be one of f32, f16, q8_0, got 'q4'"):
        profiles.get_profile(width)
    with pytest.raises(UnsupportedFormatError, match="the LM head is kept in 6 or 8 bits, got 7"):
        edgelora.export(tmp_path / "no-model", "x86-64", tmp_path / "b", head_bits=7)


@pytest.mark.parametrize("backend,quant,expected", [
    (None, None, [("gguf", "q8_0"), ("onnx", "int4")]),
    ("gguf", None, [("gguf", "q8_0")]),
    ("both", "f32", [("gguf", "f32"), ("onnx", "f32")]),
    (None, "q4_k_m", [("gguf", "q4_k_m")]),
    (None, "int8", [("onnx", "int8")]),
])
def test_plan(backend, quant, expected):
    assert bundle_mod.resolve_plan(profiles.get_profile("raspberry-pi-5"), backend, quant) == expected


def test_plan_refuses_a_quant_the_backend_lacks():
    with pytest.raises(UnsupportedFormatError, match="'q8_0' is not available for the onnx backend"):
        bundle_mod.resolve_plan(profiles.get_profile("raspberry-pi-5"), "onnx", "q8_0")


@pytest.mark.parametrize("backend,quant,graph", [
    ("gguf", "f32", None), ("gguf", "f16", None), ("gguf", "q8_0", None), ("gguf", "q4_0", None), ("gguf", "q4_k_m", None),
    ("onnx", "f32", "optimum"), ("onnx", "int8", "optimum"), ("onnx", "int4", "optimum"),
    ("onnx", "f32", "fused"), ("onnx", "int8", "fused"), ("onnx", "int4", "fused")])
def test_export_each_format(backend, quant, graph, tiny_llama, tmp_path):
    b = edgelora.bundle.export(tiny_llama, "x86-64", tmp_path / "b", backend=backend, quant=quant, force=True,
                               eval_tokens=EVAL, progress=False, onnx_graph=graph)
    m = b.manifest
    base = edgelora.load_base(tiny_llama)
    assert m["base"]["fingerprint"] == base.fingerprint
    (art,) = b.artifacts
    assert (art.backend, art.quant) == (backend, quant)
    # installed adapters: the profile's 8 bits on a quantized base, float32 (PEFT's exactly) on a float one
    assert b.adapter_precision == ("f32" if quant in ("f32", "f16") else "q8_0")
    q = art.quality
    assert q["tokens"] > 900 and q["float_perplexity"] > 1
    if quant == "f32":  # the float export is the float model
        assert abs(q["perplexity_change"]) < 1e-4 and q["top1_agreement"] > 0.999
    assert art.memory["total"] > art.memory["weights"] > 0
    assert set(m["files"]) >= set(art.files) | {"tokenizer/tokenizer.json"}
    assert (b.root / "adapters").is_dir()
    # it loads and computes in its runtime
    engine = b.engine()
    ids = base.tokenizer.encode("The quick brown fox")
    logits = engine.logits(ids)
    assert logits.shape == (len(ids), base.config.vocab_size) and np.isfinite(logits).all()


def test_open_bundle_checks_hashes(tiny_llama, tmp_path):
    b = edgelora.bundle.export(tiny_llama, "x86-64", tmp_path / "b", backend="gguf", quant="f16",
                               eval_tokens=EVAL, progress=False)
    f = b.root / b.artifacts[0].main
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="wrong sha256"):
        edgelora.open_bundle(b.root)
    f.unlink()
    with pytest.raises(CorruptFileError, match="is missing"):
        edgelora.open_bundle(b.root)


def test_quality_budget_refuses_and_writes_nothing(tiny_llama, tmp_path):
    # a random tiny model loses a lot at 4 bits: over x86-64's +5% budget
    with pytest.raises(bundle_mod.QualityBudgetError, match="perplexity .* budget"):
        edgelora.bundle.export(tiny_llama, "x86-64", tmp_path / "b", backend="gguf", quant="q4_0",
                               eval_tokens=EVAL, progress=False)
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.")]  # no temporary left behind


def test_memory_budget_refuses_with_the_numbers(tiny_llama, tmp_path):
    toml = (profiles.get_profile("x86-64").path)
    text = open(toml).read().replace("memory_budget_mb = 4096", "memory_budget_mb = 1").replace("ram_mb = 8192", "ram_mb = 2")
    small = tmp_path / "small.toml"
    small.write_text(text)
    with pytest.raises(bundle_mod.MemoryBudgetError, match=r"needs ~\d+ MB .* over its budget of 1 MB"):
        edgelora.bundle.export(tiny_llama, small, tmp_path / "b", backend="gguf", quant="f16", eval_tokens=EVAL, progress=False)
    assert not (tmp_path / "b").exists()


def test_cli_export_and_devices(tiny_llama, tmp_path, run_cli):
    env = {"EDGELORA_CACHE": str(tmp_path / "cache")}
    listed = run_cli("devices", "list", env=env)
    assert all(name in listed.stdout for name in SHIPPED)
    shown = run_cli("devices", "show", "raspberry-pi-4", env=env)
    assert json.loads(shown.stdout)["ram_mb"] == 4096
    out = tmp_path / "bundle"
    r = run_cli("export", "--model", str(tiny_llama), "--device", "raspberry-pi-5", "--out", str(out),
                "--backend", "gguf", "--quant", "q8_0", "--eval-tokens", str(EVAL), env=env)
    assert r.returncode == 0, r.stderr
    assert "q8_0" in r.stdout and "perplexity" in r.stdout
    again = run_cli("export", "--model", str(tiny_llama), "--device", "raspberry-pi-5", "--out", str(out), env=env)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_int4_graph_keeps_q4_1_weights(tiny_llama_q41, tmp_path, monkeypatch):
    """Weights that are exactly Q4_1 (like the default model's) keep their codes and scales in the
    fused int4 graph, with the block offsets folded into the same MatMulNBits: against
    transformers on the float weights, the error (MatMulNBits computing in float) is a small
    fraction of what requantizing to an int4 grid costs."""
    import onnx

    from edgelora.converters import onnx_fused
    from tests.ort_util import onnxruntime_logits
    from tests.peft_util import base_logits

    base = edgelora.load_base(tiny_llama_q41)
    ids = base.tokenizer.encode("The quick brown fox jumps over the lazy dog. A Raspberry Pi has four cores.")
    ref = base_logits(tiny_llama_q41, ids)
    folded = onnx_fused.export(base, tmp_path / "folded", "int4", max_len=64)
    meta = {p.key: p.value for p in onnx.load(str(folded), load_external_data=False).metadata_props}
    assert meta["edgelora.encodings"] == "{'q4_1 folded': 8}"  # qkv, o, gate_up, down in 2 layers
    err_folded = np.abs(onnxruntime_logits(folded, ids, base.config, tmp_path) - ref).max()
    monkeypatch.setattr(onnx_fused, "q41_decompose", lambda w: None)  # requantize instead
    rtn = onnx_fused.export(base, tmp_path / "rtn", "int4", max_len=64)
    err_rtn = np.abs(onnxruntime_logits(rtn, ids, base.config, tmp_path) - ref).max()
    assert err_folded < err_rtn / 10, (err_folded, err_rtn)
