"""ONNX Runtime as the reference for edgelora's ONNX graphs in tests."""

import numpy as np


def onnxruntime_logits(model_path, ids, cfg, tmp_path):
    """The bundle's own ONNX graph in ONNX Runtime, with MatMulNBits (and MatMulQ41) told to compute in float
    (accuracy_level 0) so only the weights' encoding is compared, not int8 activations."""
    import onnx
    import onnxruntime as ort

    from edgelora.converters import onnx_fused

    m = onnx.load(str(model_path), load_external_data=True)
    for node in m.graph.node:
        for a in node.attribute:
            if a.name == "accuracy_level":
                a.i = 0
    onnx.save_model(m, str(tmp_path / "float_acc.onnx"), save_as_external_data=True, location="w.data")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if onnx_fused.uses_q41(m):  # edgelora's MatMulQ41: accuracy_level 0 is float too
        from edgelora import native

        so.register_custom_ops_library(str(native.library()))
    s = ort.InferenceSession(str(tmp_path / "float_acc.onnx"), so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64)}
    for i in range(cfg.num_layers):
        for k in ("key", "value"):
            feed[f"past_key_values.{i}.{k}"] = np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32)
    return s.run(["logits"], feed)[0][0]
