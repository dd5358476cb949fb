"""Every family's logits in each engine against transformers, on the tiny random models the tests
build (tests/families.py): the table behind the README's supported-architectures section.

    .venv/bin/python bench/families.py [--families llama3,qwen2,...]

Prints, per family and engine, the largest |logit - transformers| (float engines, with the logits'
own scale beside it) or the KL divergence from transformers (quantized ones), and writes
bench/results/families.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgelora.quality import mean_kl  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. Edge devices run small language models."


def measure(family: str, tmp: Path) -> dict[str, dict[str, float]]:
    import edgelora
    from edgelora.converters import gguf_model, onnx_fused, onnx_model
    from edgelora.runtime.gguf import GGUFEngine
    from edgelora.runtime.onnx import OnnxEngine
    from edgelora.train.model import forward_logits
    from tests.families import build_family
    from tests.peft_util import base_logits

    path = build_family(family, tmp / family)
    base = edgelora.load_base(path)
    ids = base.tokenizer.encode(TEXT)
    ref = base_logits(path, ids)
    out: dict[str, np.ndarray] = {}
    with GGUFEngine(gguf_model.write(base, tmp / f"{family}.gguf", "F32"), n_ctx=128, threads=1, kv_type="f32") as e:
        out["llama.cpp f32"] = e.logits(ids)
    for quant in ("f32", "int8", "int4"):
        graph = onnx_fused.export(base, tmp / f"{family}-fused-{quant}", quant, max_len=256)
        with OnnxEngine(graph, base.config, threads=1, n_ctx=128) as e:
            out[f"onnx fused {quant}"] = e.logits(ids)
    with OnnxEngine(onnx_model.export(path, tmp / f"{family}-optimum", base.config, "f32"), base.config, threads=1,
                    n_ctx=128) as e:
        out["onnx optimum f32"] = e.logits(ids)
    out["numpy trainer"] = forward_logits({n: base.weights[n] for n in base.weights}, None, np.array([ids]),
                                          base.config)[0]
    scale = float(np.abs(ref).max())
    return {k: {"max_abs_err": float(np.abs(v - ref).max()), "scale": scale, "kl": mean_kl(ref, v),
                "top1": float((v.argmax(-1) == ref.argmax(-1)).mean())} for k, v in out.items()}


def main() -> None:
    from tests.families import FAMILY_NAMES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILY_NAMES))
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            results[family] = measure(family, Path(tmp))
    engines = list(next(iter(results.values())))
    print(f"{'family':8} " + " ".join(f"{e:>18}" for e in engines))
    for family, row in results.items():
        cells = [f"{r['max_abs_err']:.1e}" if "int" not in e else f"KL {r['kl']:.1e}" for e, r in row.items()]
        print(f"{family:8} " + " ".join(f"{c:>18}" for c in cells))
    print("float engines: max |logit - transformers| (logits' scale ~0.6-0.9); int8/int4: KL(transformers || engine)")
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    (out / "families.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
