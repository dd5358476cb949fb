"""Adapters on the NPU bundle: swap time, per-token cost with and without an adapter, and accuracy, on the
QNN HTP backend (onnxruntime-qnn's simulator here: its times say nothing of a phone's, only how they
compare) and on the QDQ graph on CPU.

    .venv/bin/python bench/npu.py [--bundle DIR] [--htp-tokens 4]

The bundle is the default model's snapdragon-8-gen-3 export (made once into the cache; ~11 minutes);
the adapter is the quickstart's persona adapter recipe (80 steps on the shipped persona chats),
trained against the float base if the store lacks `maren`. Writes bench/results/npu.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import PROMPT, bundle, median_seconds, table, write_json  # noqa: E402
from edgelora.quality import mean_kl  # noqa: E402



def ensure_adapter(b, name: str = "maren"):
    import edgelora
    from edgelora.train import train_adapter

    if name not in b.store.names():
        data = Path(edgelora.__file__).parent / "data" / "persona_train.jsonl"
        r = train_adapter(edgelora.load_base(edgelora.DEFAULT_MODEL), data, name, install=False, steps=80, lr=3e-3,
                          rank=8, seq_len=256, threads=2)
        r.adapter.base_fingerprint = b.fingerprint
        b.store.install(r.adapter, name)
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--htp-tokens", type=int, default=4)
    ap.add_argument("--cpu-tokens", type=int, default=32)
    args = ap.parse_args()
    import edgelora
    import onnx

    b = edgelora.open_bundle(args.bundle, verify=False) if args.bundle else bundle("snapdragon-8-gen-3", "onnx", "qdq")
    name = ensure_adapter(b)
    root = b.path(b.artifact().main).parent
    nodes = len(onnx.load(str(root / "decode.onnx"), load_external_data=False).graph.node)
    rows, out = [], {"decode_graph_nodes": nodes, "providers": {}}
    for provider, n in (("cpu", args.cpu_tokens), ("htp", args.htp_tokens)):
        engine = b.engine(provider=provider)
        swap = median_seconds(lambda: (engine.set_adapters({name: 1.0}), engine.set_adapters({})), repeat=5) / 2
        res = {"swap_s": swap}
        for label, weights in (("no adapter", {}), (name, {name: 1.0})):
            engine.set_adapters(weights)
            t = time.perf_counter()
            g = engine.generate(PROMPT, max_tokens=n)
            res[label] = {"prefill_s": g.seconds_prefill, "ms_per_token": 1000 * g.seconds_decode / max(len(g.tokens) - 1, 1),
                          "tokens": len(g.tokens), "wall_s": time.perf_counter() - t}
        ratio = res[name]["ms_per_token"] / res["no adapter"]["ms_per_token"]
        rows.append((provider, f"{swap * 1000:.0f} ms", f"{res['no adapter']['ms_per_token']:.0f} ms",
                     f"{res[name]['ms_per_token']:.0f} ms", f"{ratio:.2f}x"))
        out["providers"][provider] = res
        engine.close()
    # accuracy on the CPU graph: the adapter's effect against float + adapter (llama.cpp F32, F32 KV cache)
    from edgelora.converters import gguf_model, save_adapter
    from edgelora.quality import heldout_text
    from edgelora.runtime.gguf import GGUFEngine

    base = edgelora.load_base(edgelora.DEFAULT_MODEL)
    work = edgelora.models.cache_dir() / "bench" / "npu-float"
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "base-f32.gguf"
    if not f32.exists():
        gguf_model.write(base, f32, "F32")
    ids = b.tokenizer().encode(heldout_text(), add_special_tokens=False)[:200]
    prefix = [b.tokenizer().bos_token_id]
    ref = GGUFEngine(f32, n_ctx=256, threads=2, kv_type="f32", fingerprint=base.fingerprint)
    _, adapter = b.store.open(name, "onnx")
    ref.load_adapter(name, save_adapter(adapter, work / f"{name}.gguf", "gguf", base.config))
    cpu = b.engine(provider="cpu")
    acc = {}
    for label, weights in (("no adapter", {}), (name, {name: 1.0})):
        ref.set_adapters(weights)
        cpu.set_adapters(weights)
        want = ref.logits(prefix + ids)[1:]
        got = cpu.logits(prefix + ids)
        acc[label] = {"kl": mean_kl(want, got), "top1": float((want.argmax(-1) == got.argmax(-1)).mean())}
    ref.set_adapters({})
    acc["adapter effect (float)"] = {"kl": mean_kl(ref.logits(prefix + ids)[1:], want), "top1": float("nan")}
    out["accuracy"] = acc
    print(f"{b.root}: decode graph {nodes} nodes, LoRA rank {json_rank(root)}")
    print(table(("provider", "swap", "per token, no adapter", f"per token, {name}", "ratio"), rows))
    print(table(("QDQ on CPU vs float", "KL", "top-1"),
                [(k, f"{v['kl']:.4f}", f"{v['top1']:.1%}") for k, v in acc.items()]))
    print(write_json("npu", out))


def json_rank(root: Path) -> int:
    import json

    return json.loads((root / "npu.json").read_text()).get("lora_rank", 0)


if __name__ == "__main__":
    main()
