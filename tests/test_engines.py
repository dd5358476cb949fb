"""Both engines, with adapters swapped in and out, against transformers + PEFT."""

import numpy as np
import pytest

import edgelora
from edgelora.adapters import AdapterBaseMismatchError, random_adapter
from edgelora.converters import load_adapter, save_adapter
from edgelora.converters import gguf_model, onnx_fused, onnx_model
from edgelora.runtime.gguf import GGUFEngine
from edgelora.runtime.onnx import OnnxEngine
from tests.peft_util import base_logits, make_peft_adapter, peft_logits

TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models."
EXT = {"gguf": ".gguf", "onnx": ".onnx_adapter"}


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engines")
    base = edgelora.load_base(tiny_llama)
    files = {"gguf": gguf_model.write(base, tmp / "base.gguf", "F32"),
             "onnx": onnx_model.export(tiny_llama, tmp / "onnx", base.config, "f32"),
             "onnx-fused": onnx_fused.export(base, tmp / "fused", "f32", max_len=256)}
    peft = {n: make_peft_adapter(tiny_llama, tmp / f"peft-{n}", r=r, alpha=a, seed=s,
                                 targets=t) for n, r, a, s, t in [
        ("a", 8, 16, 1, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")),
        ("b", 4, 4, 2, ("q_proj", "v_proj", "down_proj"))]}
    converted = {}
    for name, path in peft.items():
        adapter = load_adapter(path)
        adapter.base_fingerprint = base.fingerprint
        for fmt in ("gguf", "onnx"):
            converted[fmt, name] = save_adapter(adapter, tmp / f"{name}{EXT[fmt]}", fmt, base.config)
    ids = base.tokenizer.encode(TEXT)
    return base, files, peft, converted, ids


def make_engine(kind, base, files):
    if kind == "gguf":  # F32 KV cache: the float model, exactly
        return GGUFEngine(files["gguf"], n_ctx=128, threads=1, kv_type="f32", fingerprint=base.fingerprint)
    return OnnxEngine(files[kind], base.config, threads=1, n_ctx=128, tokenizer=base.tokenizer,
                      fingerprint=base.fingerprint)


@pytest.fixture(params=["gguf", "onnx", "onnx-fused"])
def engine(request, setup):
    base, files, *_ = setup
    e = make_engine(request.param, base, files)
    e.kind = request.param
    yield e
    e.close()


ATOL = 2e-5


def test_adapters_match_peft(engine, setup, tiny_llama):
    base, files, peft, converted, ids = setup
    np.testing.assert_allclose(engine.logits(ids), base_logits(tiny_llama, ids), rtol=0, atol=ATOL)
    for name in ("a", "b"):
        engine.load_adapter(name, converted[engine.backend, name])
    engine.set_adapters({"a": 1.0})
    np.testing.assert_allclose(engine.logits(ids), peft_logits(tiny_llama, {"a": peft["a"]}, ids), rtol=0, atol=ATOL)
    engine.set_adapters(["b"])
    np.testing.assert_allclose(engine.logits(ids), peft_logits(tiny_llama, {"b": peft["b"]}, ids), rtol=0, atol=ATOL)
    engine.clear_adapters()
    np.testing.assert_allclose(engine.logits(ids), base_logits(tiny_llama, ids), rtol=0, atol=ATOL)


def _in_precision(setup, tmp, precision: str, adapters: dict | None = None):
    """The setup's adapters (or `adapters`: name -> LoraAdapter) as GGUF files in `precision` (f16, or
    q8_0: A in Q8_0, B in F16 where its rows, rank long, are not whole blocks of 32) and PEFT dirs of
    the values those files hold, read back (the reference for a file read as it is, on float32
    activations)."""
    base, files, peft, converted, ids = setup
    adapters = adapters or {name: load_adapter(path) for name, path in peft.items()}
    ggufs, pefts = {}, {}
    for name, a in adapters.items():
        a.base_fingerprint = base.fingerprint
        ggufs[name] = save_adapter(a, tmp / f"{name}-{precision}.gguf", "gguf", base.config, precision=precision)
        held = load_adapter(ggufs[name])
        pefts[name] = save_adapter(held, tmp / f"peft-{name}-{precision}", "peft", base.config)
    return ggufs, pefts


@pytest.mark.parametrize("precision", ["f32", "f16", "q8_0"])
@pytest.mark.parametrize("threads,n_batch", [(1, 512), (2, 512), (2, 1)])
def test_llama_cpp_runs_adapters_fused_and_matches_peft(setup, tiny_llama, tmp_path, threads, n_batch, precision):
    """The patched llama.cpp (scripts/patches/llama-cpp-fused-lora.patch) takes one node per adapted
    projection over a prompt (split by tokens), and for one token at a time (n_batch 1) the first
    adapter inside each projection's mul_mat, the second in a node split by output rows; a weighted mix of a rank-8 and a rank-4 adapter is PEFT's either way, with F16 and
    Q8_0 files read as they are (float32 activations: llama.cpp's own route rounds them to F16 or Q8_0)."""
    from edgelora.runtime.gguf import fused_lora

    assert fused_lora(), "the installed llama.cpp lacks edgelora's fused-LoRA patch: run scripts/env.sh"
    base, files, peft, converted, ids = setup
    files_of, refs = ({n: converted["gguf", n] for n in peft}, peft) if precision == "f32" else _in_precision(setup, tmp_path, precision)
    e = GGUFEngine(files["gguf"], n_ctx=128, threads=threads, kv_type="f32", fingerprint=base.fingerprint,
                   n_batch=n_batch)
    for name, path in files_of.items():
        e.load_adapter(name, path)
    weights = {"a": 0.6, "b": 1.5}
    e.set_adapters(weights)
    np.testing.assert_allclose(e.logits(ids), peft_logits(tiny_llama, refs, ids, weights=weights), rtol=0, atol=ATOL)
    e.close()


@pytest.mark.parametrize("precision", ["f32", "f16", "q8_0", "f32-rank4", "f16-rank12"])
def test_llama_cpp_lora_routes_agree(setup, tiny_llama, tmp_path, precision):
    """llama.cpp's own four nodes (EDGELORA_LORA_UNFUSED=1), the fused node's portable loops
    (EDGELORA_LORA_PORTABLE=1, what CPUs without AVX2 and arm64 run) and its AVX2 route held to it on an
    AVX-512 CPU (EDGELORA_LORA_AVX2=1; B's rows of a rank that is a multiple of 8 otherwise take
    AVX-512) give the fused route's logits.
    In F16 (B's rank-8 rows, 8 at a time) and Q8_0 (a rank-32 adapter, so B's rows are whole blocks and
    Q8_0 too) both fused routes give PEFT's logits on the file's values; llama.cpp's own route rounds
    the activations to F16 or Q8_0 as well, so it agrees to that rounding only. Ranks 4 and 12 take
    the AVX2 route's masked tail (B's rows not whole vectors of 8)."""
    import os
    import subprocess
    import sys

    import gguf

    base, files, peft, converted, ids = setup
    if precision == "f32":
        path, ref = converted["gguf", "a"], None
    elif "-rank" in precision:
        precision, rank = precision.split("-rank")
        odd = random_adapter(base.config, rank=int(rank), alpha=int(rank), seed=6, scale=0.1, name="c")
        ggufs, pefts = _in_precision(setup, tmp_path, precision, {"c": odd})
        path, ref = ggufs["c"], peft_logits(tiny_llama, pefts, ids)
    elif precision == "f16":
        ggufs, pefts = _in_precision(setup, tmp_path, precision, {"a": load_adapter(peft["a"])})
        path, ref = ggufs["a"], peft_logits(tiny_llama, pefts, ids)
    else:
        big = random_adapter(base.config, rank=32, alpha=32, seed=5, scale=0.1, name="c")
        ggufs, pefts = _in_precision(setup, tmp_path, precision, {"c": big})
        path, ref = ggufs["c"], peft_logits(tiny_llama, pefts, ids)
        assert {t.tensor_type.name for t in gguf.GGUFReader(path).tensors} == {"Q8_0"}
    script = f"""
import sys
import numpy as np
from edgelora.runtime.gguf import GGUFEngine, fused_lora
e = GGUFEngine({str(files["gguf"])!r}, n_ctx=128, threads=2, kv_type="f32", fingerprint={base.fingerprint!r})
e.load_adapter("a", {str(path)!r})
e.set_adapters({{"a": 1.0}})
assert fused_lora() == (sys.argv[2] != "own"), fused_lora()
np.save(sys.argv[1], e.logits({ids!r}))
"""
    got = {}
    for route, env in (("own", {"EDGELORA_LORA_UNFUSED": "1"}), ("portable", {"EDGELORA_LORA_PORTABLE": "1"}),
                       ("avx2", {"EDGELORA_LORA_AVX2": "1"}), ("fused", {})):
        out = tmp_path / f"{route}.npy"
        r = subprocess.run([sys.executable, "-c", script, str(out), route], capture_output=True, text=True,
                           env={**{k: v for k, v in os.environ.items() if not k.startswith("EDGELORA_LORA_")}, **env})
        assert r.returncode == 0, r.stderr
        got[route] = np.load(out)
    np.testing.assert_allclose(got["portable"], got["fused"], rtol=0, atol=ATOL)
    np.testing.assert_allclose(got["avx2"], got["fused"], rtol=0, atol=ATOL)
    if ref is not None:
        np.testing.assert_allclose(got["fused"], ref, rtol=0, atol=ATOL)
    if precision == "f32":  # llama.cpp's own route keeps F32 activations for F32 tensors
        np.testing.assert_allclose(got["own"], got["fused"], rtol=0, atol=ATOL)
    else:
        base_gap = np.abs(base_logits(tiny_llama, ids) - ref).max()  # what the adapter moves
        own_gap = np.abs(got["own"] - ref).max()
        assert ATOL < own_gap < 0.05 * base_gap, (own_gap, base_gap)  # (so "fused" was not llama.cpp's route)


@pytest.mark.parametrize("precision", ["f32", "q8_0"])
def test_llama_cpp_runs_a_decode_steps_adapter_inside_the_matmul(setup, tiny_llama, tmp_path, precision):
    """In a decode step the patch computes the first active adapter inside each projection's own
    mul_mat ("matmul": xa split between the threads before the mul_mat's barrier, B's rows after each
    chunk of output rows), on a float base and on a Q8_0 one (whose activations the mul_mat converts
    first: xa sits after them in its work buffer). One token at a time on 2 threads, a weighted mix
    (adapter a inside the mul_mat, b in a node of its own) gives the "node" route's logits, and those of
    the prompt route on the float base (PEFT's); llama.cpp's own route only to its activations'
    rounding. The counter shows which route ran."""
    from edgelora.converters import gguf_quant
    from edgelora.runtime.gguf import lora_in_matmul, lora_route, set_lora_route

    base, files, peft, converted, ids = setup
    path = files["gguf"] if precision == "f32" else gguf_quant.quantize(files["gguf"], tmp_path / "q8.gguf", "q8_0", threads=1)
    adapters = {n: converted["gguf", n] for n in peft} if precision == "f32" else _in_precision(setup, tmp_path, precision)[0]
    weights = {"a": 0.6, "b": 1.5}
    got, counts = {}, {}
    was = lora_route()
    try:
        for route in ("matmul", "node", "own"):
            set_lora_route(route)
            e = GGUFEngine(path, n_ctx=128, threads=2, kv_type="f32", fingerprint=base.fingerprint, n_batch=1)
            for name, file in adapters.items():
                e.load_adapter(name, file)
            e.set_adapters(weights)
            before = lora_in_matmul()
            got[route] = e.logits(ids)
            counts[route] = lora_in_matmul() - before
            e.close()
    finally:
        set_lora_route(was)
    layers = base.config.num_layers
    assert counts["matmul"] >= 7 * layers and counts["node"] == counts["own"] == 0, counts  # a's 7 projections
    np.testing.assert_allclose(got["matmul"], got["node"], rtol=0, atol=ATOL)
    if precision == "f32":
        np.testing.assert_allclose(got["matmul"], peft_logits(tiny_llama, peft, ids, weights=weights), rtol=0, atol=ATOL)
    else:  # Q8_0: llama.cpp's own route rounds xa's input to Q8_0 too
        own_gap = np.abs(got["own"] - got["node"]).max()
        assert ATOL < own_gap < 0.05 * np.abs(got["node"]).max(), own_gap


def test_weighted_mix_matches_peft(engine, setup, tiny_llama):
    base, files, peft, converted, ids = setup
    for name in ("a", "b"):
        engine.load_adapter(name, converted[engine.backend, name])
    weights = {"a": 0.6, "b": 1.5}
    engine.set_adapters(weights)
    ref = peft_logits(tiny_llama, peft, ids, weights=weights)
    np.testing.assert_allclose(engine.logits(ids), ref, rtol=0, atol=ATOL)


def test_swap_resets_the_cache_and_keeps_the_base(engine, setup):
    base, files, peft, converted, ids = setup
    engine.load_adapter("a", converted[engine.backend, "a"])
    session = getattr(engine, "llm", None) or engine.session
    plain = engine.generate(ids, max_tokens=8).tokens
    engine.set_adapters({"a": 1.0})
    adapted = engine.generate(ids, max_tokens=8).tokens
    # a fresh engine with the adapter gives the same tokens: nothing computed under the base leaked in
    fresh = make_engine(engine.kind, base, files)
    fresh.load_adapter("a", converted[engine.backend, "a"])
    fresh.set_adapters(["a"])
    assert fresh.generate(ids, max_tokens=8).tokens == adapted != plain
    fresh.close()
    engine.clear_adapters()
    assert engine.generate(ids, max_tokens=8).tokens == plain
    assert (getattr(engine, "llm", None) or engine.session) is session  # the base was never reloaded


def test_a_switch_that_keeps_the_cache_takes_effect_at_the_next_step(engine, setup):
    """What decode_rates relies on: a setting switched mid-answer (cache kept) is the one the next
    step computes with, also where a reused decode binding holds the adapter's values."""
    base, files, peft, converted, ids = setup
    engine.load_adapter("a", converted[engine.backend, "a"])

    def step_after(switch_to: dict | None) -> np.ndarray:
        engine.set_adapters({})
        engine._feed(ids)
        engine._feed([ids[0]])  # a one-token step: the decode binding is built
        if switch_to is not None:
            engine._set_adapters(switch_to, reset=False)
        out = engine._feed([ids[1]])
        assert engine.n_past == len(ids) + 2  # the cache was kept
        return out

    stay, switched = step_after(None), step_after({"a": 1.0})
    assert np.abs(stay - switched).max() > 1e-3
    # switching back gives the base's step exactly: nothing of the adapter stays bound
    engine.set_adapters({})
    engine._feed(ids)
    engine._feed([ids[0]])
    engine._set_adapters({"a": 1.0}, reset=False)
    engine._set_adapters({}, reset=False)
    np.testing.assert_allclose(engine._feed([ids[1]]), stay, rtol=0, atol=1e-6)


def test_decode_rates_measures_each_setting_and_leaves_the_engine_clean(engine, setup):
    from edgelora.runtime.engine import decode_rates

    base, files, peft, converted, ids = setup
    engine.load_adapter("a", converted[engine.backend, "a"])
    plain = engine.generate(ids, max_tokens=8).tokens
    rates = decode_rates(engine, {"base": {}, "a": {"a": 1.0}}, tokens=8, rounds=2, block=4, prompt=ids)
    assert set(rates) == {"base", "a"} and all(r.tokens_per_second > 0 for r in rates.values())
    assert (rates["a"].loop_overhead is not None) == (engine.kind == "onnx-fused")
    lo, hi = rates["a"].of_first_ci  # paired with the base's blocks (tests/test_rates.py checks the pairing)
    assert rates["base"].of_first is None and 0 < lo <= rates["a"].of_first <= hi
    assert engine.active_adapters == {} and engine.generate(ids, max_tokens=8).tokens == plain


def test_wrong_base_and_wrong_shape_are_refused_before_the_runtime(engine, setup, tmp_path):
    base, *_ = setup
    fmt = engine.backend
    other = random_adapter(base.config, fingerprint="sha256:" + "1" * 64, name="other")
    path = save_adapter(other, tmp_path / f"other{EXT[fmt]}", fmt, base.config)
    with pytest.raises(AdapterBaseMismatchError, match="made for base sha256:1+"):
        engine.load_adapter("other", path)
    assert engine.loaded_adapters == []


def test_truncated_gguf_adapter_never_reaches_llama_cpp(setup, tmp_path):
    from edgelora.errors import CorruptFileError

    base, files, peft, converted, ids = setup
    data = converted["gguf", "a"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    engine = make_engine("gguf", base, files)
    with pytest.raises(CorruptFileError, match="truncated GGUF"):
        engine.load_adapter("cut", cut)
    assert engine.logits(ids).shape[0] == len(ids)  # still alive
    engine.close()


def test_generate_stops_and_samples(engine, setup):
    base, *_ = setup
    g = engine.generate([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    again = engine.generate([{"role": "user", "content": "hi"}], max_tokens=5, temperature=0.8, top_k=20, top_p=0.9, seed=3)
    assert g.tokens == again.tokens and len(g.tokens) <= 5 and g.prompt_tokens > 5


def test_merge_then_unmerge(engine, setup, tiny_llama):
    base, files, peft, converted, ids = setup
    engine.load_adapter("a", converted[engine.backend, "a"])
    before = engine.logits(ids)
    engine.merge("a")
    merged = engine.logits(ids)
    np.testing.assert_allclose(merged, peft_logits(tiny_llama, {"a": peft["a"]}, ids), rtol=0, atol=ATOL)
    with pytest.raises(Exception, match="unmerge"):
        engine.set_adapters(["a"])
    engine.unmerge()
    np.testing.assert_array_equal(engine.logits(ids), before)  # the base, exactly


def test_merge_into_a_quantized_gguf_requantizes(setup, tmp_path, tiny_llama):
    from edgelora.converters import gguf_quant

    base, files, peft, converted, ids = setup
    q8 = gguf_quant.quantize(files["gguf"], tmp_path / "q8.gguf", "q8_0", threads=1)
    engine = GGUFEngine(q8, n_ctx=128, threads=1, fingerprint=base.fingerprint)
    engine.load_adapter("a", converted["gguf", "a"])
    engine.set_adapters(["a"])
    active = engine.logits(ids)
    engine.merge("a")
    merged = engine.logits(ids)
    ref = peft_logits(tiny_llama, {"a": peft["a"]}, ids)
    for got in (active, merged):  # Q8_0 weights and activations: close to PEFT's float logits, not equal
        assert np.abs(got - ref).max() < 0.05 and (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9
    engine.close()


def test_the_onnx_engine_writes_onnx_runtimes_profile(setup, tmp_path):
    """`profile`: ONNX Runtime's per-node profile of every run, as bench/decode_profile.py reads it."""
    import json

    base, files, *_ = setup
    e = OnnxEngine(files["onnx-fused"], base.config, threads=1, n_ctx=128, tokenizer=base.tokenizer,
                   fingerprint=base.fingerprint, profile=str(tmp_path / "prof"))
    e.generate(TEXT, max_tokens=4)
    path = e.end_profiling()
    e.close()
    events = json.loads(path.read_text())
    assert path.parent == tmp_path and path.name.startswith("prof")
    assert sum(ev.get("name") == "model_run" for ev in events) >= 4  # the prompt, then each decode step
    assert {"GroupQueryAttention", "MatMul"} <= {ev["args"].get("op_name") for ev in events if ev.get("cat") == "Node"}
