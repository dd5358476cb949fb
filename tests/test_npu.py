"""The mobile-NPU bundle: static QDQ graphs that run wholly on the QNN HTP backend (simulated on this
CPU by onnxruntime-qnn) with CPU fallback disabled."""

import numpy as np
import pytest

import edgelora
from edgelora.runtime.engine import EngineError
from edgelora.runtime.npu import qnn_htp_session
from tests.peft_util import base_logits

pytest.importorskip("onnxruntime_qnn")


pytestmark = pytest.mark.usefixtures("isolated_cache")


@pytest.fixture(scope="module")
def npu_bundle(tiny_llama, tmp_path_factory, isolated_cache):
    return edgelora.export(tiny_llama, "snapdragon-8-gen-3", tmp_path_factory.mktemp("npu") / "b", eval_tokens=1024,
                           progress=False)


def test_npu_bundle_runs_wholly_on_htp_and_matches_float(npu_bundle, tiny_llama):
    (art,) = npu_bundle.artifacts
    assert art.quant == "qdq" and {"onnx/qdq/prefill.onnx", "onnx/qdq/decode.onnx"} <= set(art.files)
    assert art.quality["within_budget"] and art.quality["top1_agreement"] > 0.9
    htp = npu_bundle.engine()
    assert htp.provider == "htp"
    assert htp.runner.sess["decode"].get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    tok = npu_bundle.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "The quick brown fox"}]), add_special_tokens=False)
    on_npu = htp.generate(ids, max_tokens=12).tokens
    on_cpu = npu_bundle.engine(provider="cpu").generate(ids, max_tokens=12).tokens
    assert on_npu == on_cpu  # the HTP computes what the QDQ graph says
    # against the float model (transformers), teacher-forced on the same context
    ref = base_logits(tiny_llama, ids)[1:]
    got = htp.logits(ids)
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


def test_graph_with_ops_the_npu_lacks_fails_to_load(tiny_llama, tmp_path):
    """With CPU fallback disabled, a graph the HTP cannot run entirely is refused at load."""
    from edgelora.converters import onnx_fused

    path = onnx_fused.export(edgelora.load_base(tiny_llama), tmp_path / "fused", "f32", max_len=64)
    with pytest.raises(EngineError, match="does not run wholly on the QNN HTP backend"):
        qnn_htp_session(path)


def test_npu_refuses_adapters(npu_bundle):
    from edgelora.adapters import AdapterError, random_adapter

    engine = npu_bundle.engine(provider="cpu")
    with pytest.raises(AdapterError, match="not supported on the NPU"):
        engine.load_adapter("x", "/dev/null", random_adapter(npu_bundle.config, fingerprint=npu_bundle.fingerprint))


@pytest.mark.slow
def test_default_model_on_htp(default_model_dir, tmp_path):
    """The default model for a few greedy tokens on the HTP simulation, against the float model."""
    import time

    b = edgelora.export("smollm2-135m", "snapdragon-8-gen-3", tmp_path / "b", eval_tokens=1024, force=True, progress=False)
    q = b.artifacts[0].quality
    engine = b.engine()
    tok = b.tokenizer()
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
                     add_special_tokens=False)
    t = time.perf_counter()
    got = engine.generate(ids, max_tokens=4).tokens
    seconds = time.perf_counter() - t
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(default_model_dir).generate(
            torch.tensor([ids]), max_new_tokens=4, do_sample=False)[0, len(ids):].tolist()
    agree = float(np.mean([a == b for a, b in zip(got, ref)]))
    print(f"HTP greedy {got} vs float {ref}: agreement {agree:.2f} in {seconds:.0f}s; "
          f"QDQ on CPU: perplexity {q['perplexity_change']:+.2%}, top-1 {q['top1_agreement']:.1%}")
    assert len(got) == 4 and got[0] == ref[0]
