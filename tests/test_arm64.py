"""Bundles exported here, run on arm64 under qemu-aarch64 (a Pi 5's Cortex-A76, and a Pi 4's A72 for the
armv8-a llama.cpp build), against the same bundles on x86: both engines' logits with and without
adapters, a swap, a mix, trainer steps, greedy tokens and `edgelora run`.

The emulator is set up by scripts/arm64.sh (cached after the first time); where it cannot be set up
(no Debian packages reachable, no cross compiler), these tests skip with the reason."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests import arm64_util as au

pytestmark = pytest.mark.arm64


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    try:
        emu = au.Emulator.setup()
    except au.Unavailable as e:
        pytest.skip(f"arm64 emulator unavailable: {e}")
    emu.install_edgelora(tmp_path_factory.mktemp("arm64-site"))
    return emu


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return au.tiny_bundles(tmp_path_factory.mktemp("arm64-tiny"))


def _assert_agrees(rows, problems):
    report = au.table(au.HEADER, [r.cells() for r in rows])
    assert rows and all(r.ok for r in rows) and not problems, f"arm64 differs from x86:\n{report}\n" + "\n".join(problems)


@pytest.mark.parametrize("kind", list(au.TINY_PLANS))
def test_tiny_bundle_on_arm64_equals_x86(kind, emulator, tiny, tmp_path):
    model, bundles = tiny
    rows, problems, x86, arm = au.check(bundles[kind], tmp_path, emulator, model)
    assert arm["machine"] == "aarch64" and x86["machine"] == "x86_64"
    _assert_agrees(rows, problems)
    cases = {r.case for r in rows}
    assert {"base", "adapter", "swapped", "mix", "cleared"} <= cases


@pytest.mark.parametrize("profile", ["raspberry-pi-4", "android-arm64"])
def test_other_arm64_builds_of_llama_cpp(profile, emulator, tiny, tmp_path):
    """The Pi 4's plain armv8-a library (no dot product) on a Cortex-A72, the phones' +i8mm one on
    a Cortex-A710: the march each profile's [build] names."""
    model, bundles = tiny
    rows, problems, _, arm = au.check(bundles["q4"], tmp_path, emulator, model, profile=profile, train=False)
    assert arm["machine"] == "aarch64"
    _assert_agrees(rows, problems)


def test_cli_run_with_an_adapter_answers_the_same_on_arm64(emulator, tiny, run_cli):
    args = ["run", str(tiny[1]["f32"]), "The quick brown fox", "--raw", "--adapter", "a", "--max-tokens", "8"]
    x86 = run_cli(*args)
    arm = emulator.run("-m", "edgelora", *args)
    assert x86.returncode == 0 and arm.returncode == 0, arm.stderr[-2000:]
    assert arm.stdout == x86.stdout and x86.stdout.strip()


@pytest.mark.parametrize("profile,kernel", [("raspberry-pi-5", "neon-dotprod"), ("raspberry-pi-4", "portable")])
def test_q41_operator_on_arm64(emulator, profile, kernel):
    """edgelora's MatMulQ41, cross-compiled for arm64, against the numpy emulation under qemu: the NEON
    dot-product kernel on the Pi 5's Cortex-A76, the portable loops on the Pi 4's A72 (no dot product)."""
    if not emulator.ort_ops:
        pytest.skip("the operator library was not cross-compiled (scripts/native.sh found no ONNX Runtime headers)")
    r = emulator.run(str(au.ROOT / "tests" / "q41_check.py"), emulator.ort_ops, profile=profile)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"kernel {kernel}:" in r.stdout, r.stdout


def test_compare_flags_a_difference():
    """The comparison is not a no-op: a perturbed float logit, a quantized artifact less accurate on arm64
    than on x86, an engine error and a drifted adapter all show."""
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((16, 50)).astype(np.float32) * 3
    quant = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    good = {"gguf-f32/base": ref, "gguf-q8_0/base": quant, "onnx-int4/base": quant,
            "train/layers.0.q.A": ref, "meta": {"machine": "x86_64"}}
    worse = quant + 0.5 * rng.standard_normal(ref.shape).astype(np.float32)
    bad = {**good, "gguf-f32/base": ref + 1e-2, "gguf-q8_0/base": worse, "train/layers.0.q.A": ref * 1.01,
           "meta": {"machine": "aarch64", "error/onnx-int4": "EngineError: no kernel"}}
    bad.pop("onnx-int4/base")
    rows, problems = au.compare(good, bad, {"base": ref})
    assert [(r.artifact, r.ok) for r in rows] == [("gguf-f32", False), ("gguf-q8_0", False)]
    assert any("onnx-int4 failed on arm64" in p for p in problems)
    assert any("trained weights differ" in p for p in problems)
    # as accurate on both sides (other noise of the same size) passes
    other = ref + 0.05 * rng.standard_normal(ref.shape).astype(np.float32)
    rows, problems = au.compare(good, {**good, "gguf-q8_0/base": other, "meta": {}}, {"base": ref})
    assert all(r.ok for r in rows) and not problems


@pytest.mark.slow
def test_default_model_pi5_bundle_on_arm64(emulator, default_model_dir, tmp_path):
    import edgelora

    bundle = au.export_with_adapters(edgelora.DEFAULT_MODEL, tmp_path / "bundle", None, None, eval_tokens=512)
    rows, problems, x86, arm = au.check(bundle, tmp_path, emulator, edgelora.DEFAULT_MODEL, train=False)
    print(au.table(au.HEADER, [r.cells() for r in rows]))
    print(json.dumps(arm, indent=1))
    _assert_agrees(rows, problems)
    assert {r.artifact for r in rows} == {"gguf-q8_0", "onnx-int4"}


def test_an_emulator_that_cannot_be_set_up_says_why_in_one_line(tmp_path, monkeypatch):
    """No Debian mirror reachable (a fresh cache, a closed port): Unavailable, with the reason."""
    monkeypatch.setenv("EDGELORA_CACHE", str(tmp_path))
    monkeypatch.setenv("EDGELORA_DEBIAN_MIRROR", "http://127.0.0.1:9/debian")
    with pytest.raises(au.Unavailable, match=r"^arm64: cannot set up the emulator: apt-get update failed .*reachable"):
        au.Emulator.setup(timeout=300)
