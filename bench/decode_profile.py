"""Where a decode step's time goes: edgelora's ONNX int4 bundle (MatMulQ41) next to onnxruntime-genai's
int4 build of the same weights, each run by its own runtime with ONNX Runtime's per-node profile on,
summed by part of the model (linears, LM head, attention, norms, the MLP's activation, the rest),
beside the weight bytes each part reads per token in each model.

    python bench/decode_profile.py [--size 135m|1b] [--threads 1,2] [--tokens 64]

edgelora's bundle is also profiled with a rank-8 adapter active on every projection (the one
bench/adapters.py installs as "a"), so the adapter's cost per part is in the same table.

The profiler records an event per node, which slows a step down (more for many small nodes); the
kernel times it reports are the nodes' own, so read the shares and the per-part differences, and the
unprofiled speeds measured beside them (interleaved, as bench/export.py's head to head). Bytes are the
initializers each part's nodes take (an embedding shared with the LM head counts once, as the head;
one only looked up, one row).

Prints one table per thread count; writes bench/results/decode-profile[-1b].json.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PARTS = ("linears", "LM head", "attention", "norms", "MLP activation", "embedding", "other")


def part_of(node_name: str, op: str) -> str:
    if "lm_head" in node_name:
        return "LM head"
    if "/embed/" in node_name or op in ("Gather", "GatherBlockQuantized"):
        return "embedding"
    if op in ("MatMulQ41", "MatMulNBits", "MatMul"):
        return "linears"
    if op in ("GroupQueryAttention", "RotaryEmbedding", "MultiHeadAttention"):
        return "attention"
    if op.endswith("LayerNormalization"):
        return "norms"
    if op in ("QuickGelu", "Sigmoid", "Mul", "Split", "SiLU", "FastGelu", "Gelu"):
        return "MLP activation"
    return "other"


def weight_bytes(model_path: Path) -> dict[str, int]:
    """Initializer bytes a token reads per part, each initializer counted once, for the first part
    that takes it (the LM head before the embedding's lookup, which reads one row of its table)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    sizes = {i.name: common.initializer_bytes(i) for i in model.graph.initializer}
    rows = {i.name: int(i.dims[0]) if i.dims else 1 for i in model.graph.initializer}
    nodes = sorted(model.graph.node, key=lambda n: "lm_head" not in n.name)
    out, seen = collections.Counter(), set()
    for n in nodes:
        for name in n.input:
            if name in sizes and name not in seen:
                seen.add(name)
                part = part_of(n.name, n.op_type)
                out[part] += sizes[name] // rows[name] if part == "embedding" else sizes[name]
    return dict(out)


def profile_parts(path: Path) -> tuple[dict[str, float], int]:
    """Kernel microseconds per decode step by part (the first run, the prompt's, left out), and the
    number of decode steps."""
    events = json.loads(path.read_text())
    runs = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"), key=lambda e: e["ts"])
    if len(runs) < 2:
        raise RuntimeError(f"{path}: fewer than two runs profiled")
    start = runs[1]["ts"]  # after the prompt
    parts = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            parts[part_of(e["name"], e["args"].get("op_name", ""))] += e["dur"]
    steps = len(runs) - 1
    return {k: v / steps for k, v in parts.items()}, steps


def ours(bundle_dir: Path, threads: int, tokens: int, prefix: str, adapter: str | None = None) -> dict:
    import edgelora

    engine = edgelora.open_bundle(bundle_dir, verify=False).engine("onnx", threads=threads, n_ctx=1024, profile=prefix)
    if adapter:
        engine.set_adapters({adapter: 1.0})
    common.decode_rate(engine, tokens)
    path = engine.end_profiling()
    engine.close()
    return dict(zip(("us", "steps"), profile_parts(path)))


def theirs(genai_dir: Path, threads: int, tokens: int, prefix: str, work: Path) -> dict:
    """genai's generator on a copy of its build whose config turns ONNX Runtime's profiler on."""
    copy = work / "genai"
    shutil.copytree(genai_dir, copy)
    cfg_path = copy / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["decoder"].setdefault("session_options", {})["enable_profiling"] = prefix
    cfg_path.write_text(json.dumps(cfg, indent=2))
    model = common.genai_model(copy, threads)
    common.genai_rate(model, tokens)
    del model  # the profile is written when the session ends
    import gc

    gc.collect()
    path = max(Path(prefix).parent.glob(Path(prefix).name + "*.json"), key=lambda p: p.stat().st_mtime)
    return dict(zip(("us", "steps"), profile_parts(path)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=common.SIZES, default="135m")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the unprofiled speeds")
    args = ap.parse_args()

    import edgelora
    from edgelora import models

    b = common.bundle("x86-64", "both", None, name="adapters-x86", size=args.size)  # the x86-64 profile's, as bench/adapters.py's
    if "a" not in b.store.names():
        from edgelora.adapters import random_adapter

        b.store.install(random_adapter(b.config, rank=8, alpha=16, seed=1, scale=0.02, fingerprint=b.fingerprint, name="a"), "a")
    model_path = b.path(b.artifact("onnx").main)
    genai_dir = common.genai_build(common.hf_dir(args.size), models.cache_dir() / "bench" / common.named("genai-int4", args.size),
                                   common.genai_python())
    bytes_ours, bytes_theirs = weight_bytes(model_path), weight_bytes(genai_dir / "model.onnx")
    results = []
    for threads in [int(t) for t in args.threads.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            p_ours = ours(b.root, threads, args.tokens, str(work / "ours"))
            p_adapter = ours(b.root, threads, args.tokens, str(work / "ours-a"), adapter="a")
            p_theirs = theirs(genai_dir, threads, args.tokens, str(work / "genai-prof"), work)
        engine = edgelora.open_bundle(b.root, verify=False).engine("onnx", threads=threads, n_ctx=1024)
        model = common.genai_model(genai_dir, threads)
        rates = {"ours": [], "genai": [], "adapter": []}
        for _ in range(args.rounds):
            rates["ours"].append(common.decode_rate(engine, args.tokens))
            rates["genai"].append(common.genai_rate(model, args.tokens))
            engine.set_adapters({"a": 1.0})
            rates["adapter"].append(common.decode_rate(engine, args.tokens))
            engine.set_adapters({})
        engine.close()
        del model
        speed = {k: statistics.median(v) for k, v in rates.items()}
        rows = []
        for part in PARTS:
            a, t = p_ours["us"].get(part, 0.0), p_theirs["us"].get(part, 0.0)
            rows.append(dict(part=part, ours_us=a, genai_us=t, adapter_us=p_adapter["us"].get(part, 0.0),
                             ours_mb=bytes_ours.get(part, 0) / 1e6, genai_mb=bytes_theirs.get(part, 0) / 1e6))
        tot = {k: sum(r[f"{k}_us"] for r in rows) for k in ("ours", "genai", "adapter")}
        print(f"\n{common.NAMES[args.size]}, {threads} thread(s): unprofiled decode, interleaved medians: edgelora int4 "
              f"(MatMulQ41) {speed['ours']:.1f} tok/s, onnxruntime-genai int4 {speed['genai']:.1f} tok/s "
              f"({speed['ours'] / speed['genai']:.2f}x); with adapter a {speed['adapter']:.1f} tok/s ({speed['adapter'] / speed['ours']:.3f}x "
              f"its base)")
        print(common.table(
            ("part", "edgelora us/step", "share", "genai us/step", "share", "edgelora - genai", "with adapter a",
             "weights edgelora", "weights genai"),
            [(r["part"], f"{r['ours_us']:.0f}", f"{r['ours_us'] / tot['ours']:.0%}", f"{r['genai_us']:.0f}",
              f"{r['genai_us'] / tot['genai']:.0%}", f"{r['ours_us'] - r['genai_us']:+.0f} us",
              f"{r['adapter_us'] - r['ours_us']:+.0f} us", f"{r['ours_mb']:.1f} MB", f"{r['genai_mb']:.1f} MB") for r in rows]
            + [("all kernels", f"{tot['ours']:.0f}", "", f"{tot['genai']:.0f}", "", f"{tot['ours'] - tot['genai']:+.0f} us",
                f"{tot['adapter'] - tot['ours']:+.0f} us", f"{sum(r['ours_mb'] for r in rows):.1f} MB",
                f"{sum(r['genai_mb'] for r in rows):.1f} MB")]))
        print(f"(profiled steps: {p_ours['steps']} and {p_theirs['steps']}; unprofiled step {1e6 / speed['ours']:.0f} us "
              f"and {1e6 / speed['genai']:.0f} us: the rest of a step is the runtime between nodes and the profiler)")
        results.append(dict(threads=threads, speed=speed, rows=rows, steps={"ours": p_ours["steps"], "genai": p_theirs["steps"]}))
    path = common.write_json(common.named("decode-profile", args.size),
                             {"size": args.size, "machine": common.machine(), "runs": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
