"""Adapters: swap latency, decode speed with none / one / two mixed / merged, per engine, with
llama.cpp's own `lora_path` route as the anchor; the ONNX decode loop's cost over the graph's own
time; adapter file size against the raw tensor bytes.

    python bench/adapters.py [--size 135m|1b] [--threads 2] [--rank 8] [--bundles f32,profile,x86,x86-f16,x86-q8]

`f32` is an x86-64 bundle with float weights in both engines; `profile` is the Raspberry Pi 5
bundle as the profile chooses it (GGUF Q8_0, ONNX int4 on MatMulNBits), where the base is fastest
and an adapter's share of the time largest; `x86` the x86-64 profile's bundle with adapters
computed in float32 (`--adapter-precision f32`), whose ONNX int4 graph runs edgelora's MatMulQ41
operator with the adapter inside it (when its library is built); `x86-f16` the same with installed
adapters computed in float16 in both engines (half their bytes per token), `x86-q8` in 8 bits (GGUF
Q8_0 in llama.cpp, MatMulQ41's 8-bit slots in ONNX, about a quarter of the bytes: the x86-64
profile's default). An engine's decode speeds are measured
with the settings taking turns every 8 tokens inside the same generations (base, one, two, base, ...,
the KV cache kept across a switch, the step after it untimed); each ratio to the base is the median
over blocks of a block's speed against the base blocks on either side (paired, so the machine's drift
cancels), with its 95% interval. The anchors (separate models) take turns by whole generations,
paired the same way. Both sides use the same thread count.
Prints one table per bundle and writes bench/results/adapters.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from edgelora.runtime.engine import RATE_BLOCK, decode_rates, paired_ratio  # noqa: E402


def interleaved(engine, settings: dict[str, dict], tokens: int, rounds: int) -> dict[str, dict]:
    """Decode tok/s (and, for ONNX, the loop's overhead over onnxruntime's own time) per adapter
    setting, the settings taking turns every few tokens inside the same answers (`decode_rates`)."""
    rates = decode_rates(engine, settings, tokens=tokens, rounds=rounds, prompt=common.PROMPT)
    return {k: {"tok_s": r.tokens_per_second, "loop_overhead": r.loop_overhead, "ratio": r.of_first,
                "ratio_ci": r.of_first_ci} for k, r in rates.items()}


def turns_ratio(rates: dict[str, list[float]]) -> dict:
    """The anchors' figures: whole generations in turn (base, adapter, base, ...), each adapter
    generation paired with the base generations on either side (`paired_ratio`)."""
    turns = [(k, 1 / rates[k][i], 0) for i in range(len(rates["base"])) for k in ("base", "adapter")]
    ratio, lo, hi = paired_ratio(turns, "adapter", "base")
    base, one = statistics.median(rates["base"]), statistics.median(rates["adapter"])
    return {"base": base, "with_adapter": one, "ratio": ratio, "ratio_ci": (lo, hi)}


def shown(tok_s: float, d: dict) -> str:
    """A setting's cell: tok/s, then its paired ratio to the base with the ratio's 95% interval."""
    lo, hi = d["ratio_ci"]
    return f"{tok_s:.1f} ({d['ratio']:.3f}x, {lo:.3f}-{hi:.3f})"


def bench_bundle(b, args) -> tuple[list[tuple], dict]:
    from llama_cpp import Llama

    from edgelora._native import quiet_native
    from edgelora.adapters import random_adapter

    store = b.store
    for name, seed in (("a", 1), ("b", 2)):
        if name not in store.names():
            store.install(random_adapter(b.config, rank=args.rank, alpha=2 * args.rank, seed=seed, scale=0.02,
                                         fingerprint=b.fingerprint, name=name), name)
    raw_bytes = random_adapter(b.config, rank=args.rank).nbytes()
    rows, results = [], {"engines": {}}
    settings = {"base": {}, "one": {"a": 1.0}, "two": {"a": 0.5, "b": 0.5}}
    for art in b.artifacts:
        backend = art.backend
        e = b.engine(backend, threads=args.threads)
        path_a = store.path("a", backend)
        load_ms = 1e3 * common.median_seconds(lambda: e.load_adapter("a", path_a), repeat=5)
        swap_ms = 1e3 * common.median_seconds(lambda: (e.set_adapters({"a": 1.0}), e.set_adapters({"b": 1.0})), 20) / 2
        m = interleaved(e, settings, args.tokens, args.rounds)
        e.clear_adapters()
        merge_s = merged = None
        try:
            t = time.perf_counter()
            e.merge("a")
            merge_s = time.perf_counter() - t
            merged = interleaved(e, {"merged": {}}, args.tokens, args.rounds)["merged"]["tok_s"]
            e.unmerge()
        except Exception as err:  # quantized ONNX bases cannot merge: say so in the table
            merge_s = f"n/a ({type(err).__name__})"
        e.close()
        size = path_a.stat().st_size
        base, one, two = (m[k]["tok_s"] for k in ("base", "one", "two"))
        model_bytes = common.read_bytes(b, art)
        results["engines"][f"{backend} {art.quant}"] = dict(load_ms=load_ms, swap_ms=swap_ms, merge_s=merge_s, decode=m,
                                                           merged=merged, file_bytes=size, raw_bytes=raw_bytes,
                                                           model_bytes=model_bytes,
                                                           bandwidth_fraction=model_bytes * base / args.bandwidth)
        loop = m["base"]["loop_overhead"]
        fused = ""
        if backend == "gguf":
            from edgelora.runtime.gguf import lora_route

            route = lora_route()
            results["engines"][f"{backend} {art.quant}"]["fused_lora"] = route != "own"
            results["engines"][f"{backend} {art.quant}"]["lora_route"] = route
            fused = {"matmul": ", LoRA in the matmul", "node": ", LoRA node"}.get(route, ", llama.cpp's LoRA nodes")
        rows.append((f"edgelora {backend} {art.quant}{fused}", f"{load_ms:.2f}", f"{swap_ms:.3f}",
                     f"{base:.1f} ({model_bytes * base / args.bandwidth:.0%})",
                     shown(one, m["one"]), shown(two, m["two"]),
                     f"{merged:.1f} ({merged / base:.2f}x)" if merged else "n/a",
                     f"{merge_s:.1f}" if isinstance(merge_s, float) else "n/a",
                     "" if loop is None else f"{100 * loop:.1f}% / {100 * m['one']['loop_overhead']:.1f}%",
                     f"{size / 1e6:.2f} MB ({size / raw_bytes:.3f}x raw)"))

    # the anchor: llama.cpp's own route, a model loaded with lora_path (no swapping possible), with
    # its own four nodes per projection (edgelora's fused-LoRA patch off while it runs)
    if "gguf" in b.backends:
        base_path = b.path(b.artifact("gguf").main)
        prompt = b.tokenizer().apply_chat_template(common.PROMPT)

        def load(lora: str | None):
            with quiet_native():
                return Llama(str(base_path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                             lora_path=lora, verbose=False)

        def rate(llm) -> float:
            return common.llama_cpp_decode_rate(llm, prompt, args.tokens)

        t = time.perf_counter()
        with_lora = load(str(store.path("a", "gguf")))
        reload_s = time.perf_counter() - t
        plain = load(None)  # the same base without the adapter, measured the same way, interleaved
        got = {"base": [], "adapter": []}
        for _ in range(args.rounds):
            got["base"].append(rate(plain))
            got["adapter"].append(rate(with_lora))
        plain.close()
        with_lora.close()
        r = turns_ratio(got)
        results["llama_cpp_lora_path"] = dict(load_s=reload_s, base=r["base"], decode_with_adapter=r["with_adapter"],
                                              ratio=r["ratio"], ratio_ci=r["ratio_ci"])
        rows.append(("llama.cpp lora_path", f"{reload_s * 1e3:.0f} (reload)", "n/a (reload)", f"{r['base']:.1f}",
                     shown(r["with_adapter"], r), "", "", "", "", ""))
    return rows, results


def genai_anchor(b, args) -> dict | None:
    """onnxruntime-genai's own route to the same adapter: its builder's int4 export of the same float
    weights, once plain and once with adapter `a` (as PEFT) built in, each run by its own generator,
    interleaved. (A genai build made this way cannot swap: the adapter is part of the graph.)"""
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError:
        print("onnxruntime-genai is not installed: no genai anchor (pip install onnxruntime-genai)", file=sys.stderr)
        return None
    import edgelora
    from edgelora.converters import peft

    cache = edgelora.models.cache_dir() / "bench"
    peft_dir = cache / common.named(f"peft-a-r{args.rank}", args.size)
    if not (peft_dir / "adapter_config.json").exists():  # the store's own adapter `a` (bench_bundle installed it)
        peft.write(b.store.open("a", "gguf")[1], peft_dir, b.config)
    try:
        py = common.genai_python(args.genai_python)
        hf = common.hf_dir(args.size)
        plain = common.genai_build(hf, cache / common.named("genai-int4", args.size), py)
        lora = common.genai_build(hf, cache / common.named(f"genai-int4-lora-r{args.rank}", args.size), py, peft_dir)
    except (RuntimeError, OSError) as e:
        print(f"no genai anchor: {e}", file=sys.stderr)
        return None
    models = {"base": common.genai_model(plain, args.threads), "adapter": common.genai_model(lora, args.threads)}
    rates = {k: [] for k in models}
    for _ in range(args.rounds):
        for k, m in models.items():
            rates[k].append(common.genai_rate(m, args.tokens))
    return turns_ratio(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=common.SIZES, default="135m", help="the default model, or a Llama-3.2-1B-shaped one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of --tokens tokens per setting (edgelora's engines: "
                    f"timed in blocks of {RATE_BLOCK}, settings in turn; the anchors: whole generations in turn)")
    ap.add_argument("--no-genai", action="store_true", help="leave out onnxruntime-genai's anchor")
    ap.add_argument("--genai-python", default=None, help="a Python whose onnxruntime-genai builder runs (default: a "
                    "venv made once in the cache)")
    ap.add_argument("--bundles", default=None, help="any of f32, profile, x86, x86-f16, x86-q8 (adapters in f32, f16, "
                    "8 bits); default: f32,profile,x86,x86-f16,x86-q8 at 135m, without f32 at 1b")
    args = ap.parse_args()
    args.bundles = args.bundles or ("f32,profile,x86,x86-f16,x86-q8" if args.size == "135m" else "profile,x86,x86-f16,x86-q8")
    args.bandwidth = common.read_bandwidth(args.threads)
    out = {"size": args.size, "read_bandwidth": args.bandwidth, "threads": args.threads, "rank": args.rank, "machine": common.machine(), "bundles": {}}
    layers = None
    for which in args.bundles.split(","):
        b = {"f32": lambda: common.bundle("x86-64", "both", "f32", name="adapters-f32", size=args.size),
             "profile": lambda: common.bundle("raspberry-pi-5", "both", None, name="adapters-pi5", size=args.size),
             "x86": lambda: common.bundle("x86-64", "both", None, name="adapters-x86", size=args.size),
             "x86-f16": lambda: common.bundle("x86-64", "both", None, name="adapters-x86-f16", size=args.size,
                                              adapter_precision="f16"),
             "x86-q8": lambda: common.bundle("x86-64", "both", None, name="adapters-x86-q8", size=args.size,
                                             adapter_precision="q8_0")}[which]()
        layers = b.config.num_layers
        rows, res = bench_bundle(b, args)
        if which != "f32" and not args.no_genai:
            g = genai_anchor(b, args)
            if g:
                res["genai_adapter_path"] = g
                rows.append(("onnxruntime-genai int4, adapter_path", "n/a (build)", "n/a (build)", f"{g['base']:.1f}",
                             shown(g["with_adapter"], g), "", "", "", "", ""))
        out["bundles"][which] = res
        print(f"\n{which}: {b.root.name}")
        print(common.table(("engine", "load adapter ms", "swap ms", "base tok/s (of bandwidth)", "1 adapter", "2 mixed", "merged",
                            "merge s", "ONNX loop overhead (base / 1)", "adapter file"), rows))
    print(f"\n{common.NAMES[args.size]}; {args.threads} threads, rank {args.rank} on all 7 targets x {layers} layers; decode = greedy tokens after a chat "
          f"prompt; edgelora's engines: {args.tokens * args.rounds} timed tokens per setting, the settings taking turns every {RATE_BLOCK} tokens "
          f"in the same generations, median over blocks; the anchors: {args.rounds} whole generations of {args.tokens} tokens in turn, "
          "median; the ratios: each block (generation) against the base's on either side, interpolated to its place, the median "
          "over blocks with its 95% interval (order statistics); llama.cpp's anchor (its own model "
          f"loaded with and without lora_path, interleaved, its own four nodes per adapted projection) is timed by its own perf counters. Bandwidth: the weight bytes a token reads times "
          f"tok/s, over the machine's {args.bandwidth / 1e9:.1f} GB/s (numpy, {args.threads} threads). Targets: 1 adapter >= 0.95x base "
          "(issue 12; 0.97x with the custom kernel, issue 18), ONNX loop overhead <= 5%.")
    print(f"wrote {common.write_json(common.named('adapters', args.size, args.threads), out)}")


if __name__ == "__main__":
    main()
