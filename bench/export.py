"""Export formats of the default model side by side: file size, export time, perplexity and its
change against float, top-1 agreement, and decode tokens/s at the same thread count, for
edgelora's GGUF and ONNX outputs next to llama.cpp's own Q4_1 file (the one the model ships as)
and onnxruntime-genai's int4 build of the same weights.

    python bench/export.py [--size 135m|1b] [--threads 2] [--eval-tokens N] [--formats gguf:q8_0,onnx:int4,...]

At --size 1b the model is Llama-3.2-1B-shaped with random weights (bench/common.py): speeds are real,
quality figures mean nothing and are shown as n/a, and llama.cpp's row is its Q4_1 quantization of
the same weights. Every speed is also given as the share of the machine's read bandwidth it uses
(the weight bytes a token reads x tokens/s over numpy's read rate at the same thread count).

Prints one table; writes bench/results/export[-1b]-<threads>t.json and .png (decode speed against
perplexity change, with the Pareto front).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

FORMATS = {"135m": ["gguf:f16", "gguf:q8_0", "gguf:q4_0", "gguf:q4_k_m", "onnx:f32", "onnx:int8", "onnx:int4@nbits",
                    "onnx:int4"],
           "1b": ["gguf:q8_0", "gguf:q4_0", "gguf:q4_k_m", "onnx:int4@nbits", "onnx:int4"]}
# onnx:int4 is the fused graph with edgelora's exact Q4_1 operator (native/edgelora_ort.cc) when its
# library is built; onnx:int4@nbits the same graph with ONNX Runtime's MatMulNBits, as before it.
LLAMA_FTYPE_Q4_1 = 3  # llama.h's LLAMA_FTYPE_MOSTLY_Q4_1: the shipped model's format


def measure_engine(engine, tokens: int) -> float:
    return common.best_of(lambda: common.decode_rate(engine, tokens))


def genai_int4(hf_dir: Path, out: Path, threads: int, tokens: int, eval_ids: list[int], reference,
               builder_python: str) -> dict | None:
    """onnxruntime-genai's own int4 CPU build of the same float weights, run by its own generator."""
    try:
        import onnxruntime_genai as og
    except ImportError:
        print("onnxruntime-genai is not installed: skipping its row (pip install onnxruntime-genai)", file=sys.stderr)
        return None
    import numpy as np

    from edgelora import quality

    t, cached = time.perf_counter(), (out / "genai_config.json").exists()
    try:
        out = common.genai_build(hf_dir, out, common.genai_python(builder_python))
    except (RuntimeError, OSError) as e:
        print(f"{e}: skipping onnxruntime-genai's row", file=sys.stderr)
        return None
    export_s = float("nan") if cached else time.perf_counter() - t
    model = common.genai_model(out, threads)

    def logits(ids):
        params = og.GeneratorParams(model)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(ids, np.int32)[None])
        return gen.get_output("logits")[0]

    scores = quality.score(logits, eval_ids, quality_window())
    report = quality.compare(scores, reference, quality_window())

    def rate() -> float:
        return common.genai_rate(model, tokens)

    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    return dict(name="onnxruntime-genai int4", size=size, export_s=export_s, ppl=report.perplexity,
                change=report.perplexity_change, top1=report.top1_agreement, tok_s=common.best_of(rate),
                rate=rate)


def head_to_head(engines: dict, genai_rate, tokens: int, rounds: int = 6) -> dict:
    """edgelora's ONNX engines and onnxruntime-genai decoding in turn, `rounds` times: the median
    rates and each engine's ratio to genai (robust to a machine whose load changes during the run)."""
    import statistics

    ours, theirs = {name: [] for name in engines}, []
    for _ in range(rounds):
        for name, engine in engines.items():
            ours[name].append(common.decode_rate(engine, tokens))
        theirs.append(genai_rate())
    genai = statistics.median(theirs)
    return {"genai": genai, **{name: {"tok_s": statistics.median(r), "ratio": statistics.median(r) / genai}
                               for name, r in ours.items()}}


def kernel_name(bundle, art) -> str:
    """Which int4 linears the bundle's fused graph holds."""
    import onnx

    from edgelora.converters import onnx_fused

    model = onnx.load(str(bundle.root / art.files[0]), load_external_data=False)
    head6 = any(n.output[0] == "logits" and any(a.name == "bits" and a.i == 6 for a in n.attribute) for n in model.graph.node)
    return ("MatMulQ41" if onnx_fused.uses_q41(model) else "MatMulNBits") + (", 6-bit head" if head6 else "")


def quality_window() -> int:
    from edgelora.bundle import EVAL_WINDOW

    return EVAL_WINDOW


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=common.SIZES, default="135m", help="the default model, or a Llama-3.2-1B-shaped one")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per speed measurement")
    ap.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens for perplexity (default: all)")
    ap.add_argument("--formats", default=None, help="default: " + "; ".join(f"{k}: {','.join(v)}" for k, v in FORMATS.items()))
    ap.add_argument("--no-genai", action="store_true")
    ap.add_argument("--genai-python", default=None,
                    help="a Python whose onnxruntime_genai.models.builder runs (it needs transformers 5; default: a "
                    "venv made once in the cache)")
    args = ap.parse_args()
    args.formats = args.formats or ",".join(FORMATS[args.size])
    if args.size != "135m" and args.eval_tokens is None:
        args.eval_tokens = 256  # random weights: the quality figures are not shown, keep their cost small

    import edgelora
    from edgelora import bundle as B, models, quality
    from edgelora.runtime.gguf import GGUFEngine

    bandwidth = common.read_bandwidth(args.threads)
    base = edgelora.load_base(common.model(args.size))
    eval_ids = B._eval_tokens(base, args.eval_tokens)
    rows, h2h, int4_bundles = [], None, {}
    with tempfile.TemporaryDirectory() as tmp:
        ws = B._ExportContext(base, Path(tmp), progress=True)
        reference = B.float_scores(ws, eval_ids, args.threads, progress=True)
        for spec in args.formats.split(","):
            backend, quant = spec.split(":")
            quant, _, kernel = quant.partition("@")
            t = time.perf_counter()
            out = Path(tmp) / spec.replace(":", "-")
            with common.env(EDGELORA_ORT_OPS="0" if kernel == "nbits" else None):
                b = edgelora.export(base, "x86-64", out, backend=backend, quant=quant, force=True,
                                    eval_tokens=args.eval_tokens, threads=args.threads,
                                    head_bits={"head6": 6, "head8": 8}.get(kernel))
            export_s = time.perf_counter() - t
            art = b.artifacts[0]
            engine = b.engine(backend, threads=args.threads, n_ctx=1024)
            rows.append(dict(name=f"edgelora {backend} {quant}" + (f" ({kernel_name(b, art)})" if quant == "int4" else ""), size=common.artifact_bytes(b, art), read=common.read_bytes(b, art),
                             export_s=export_s, ppl=art.quality["perplexity"], change=art.quality["perplexity_change"],
                             top1=art.quality["top1_agreement"], tok_s=measure_engine(engine, args.tokens)))
            engine.close()
            if backend == "onnx" and quant == "int4":
                int4_bundles[rows[-1]["name"]] = out
        # llama.cpp's own quantization of the model: the Q4_1 file it ships as (at 1b: made by llama.cpp from float)
        if args.size == "135m":
            src, label = models.gguf_path(edgelora.DEFAULT_MODEL), "llama.cpp Q4_1 (shipped)"
        else:
            from edgelora.converters import gguf_quant

            src, label = gguf_quant.quantize(ws.f32_gguf(), Path(tmp) / "q4_1.gguf", LLAMA_FTYPE_Q4_1), "llama.cpp Q4_1"
        engine = GGUFEngine(src, n_ctx=1024, threads=args.threads)
        scores = quality.score(lambda ids: engine.logits(ids), eval_ids, quality_window())
        rep = quality.compare(scores, reference, quality_window())
        rows.append(dict(name=label, size=src.stat().st_size, export_s=float("nan"),
                         ppl=rep.perplexity, change=rep.perplexity_change, top1=rep.top1_agreement,
                         tok_s=measure_engine(engine, args.tokens)))
        engine.close()
        if not args.no_genai:
            g = genai_int4(Path(common.hf_dir(args.size)), models.cache_dir() / "bench" / common.named("genai-int4", args.size),
                           args.threads, args.tokens, eval_ids, reference,
                           args.genai_python)
            if g:
                rate = g.pop("rate")
                rows.append(g)
                engines = {name: edgelora.open_bundle(path, verify=False).engine("onnx", threads=args.threads, n_ctx=1024)
                           for name, path in int4_bundles.items()}
                if engines:
                    h2h = head_to_head(engines, rate, args.tokens)
                    for engine in engines.values():
                        engine.close()
    real = args.size == "135m"  # quality of random weights means nothing
    for r in rows:
        r["bandwidth_fraction"] = r.get("read", r["size"]) * r["tok_s"] / bandwidth
    table = [(r["name"], f"{r['size'] / 1e6:.0f} MB", (f"{r['export_s']:.0f}s" if r['export_s'] == r['export_s'] else "n/a"),
              *((f"{r['ppl']:.3f}", f"{r['change']:+.2%}", f"{r['top1']:.1%}") if real else ("n/a",) * 3),
              f"{r['tok_s']:.1f}", f"{r['bandwidth_fraction']:.0%}") for r in rows]
    print(common.table(("format", "file", "export", "perplexity", "vs float", "top-1", f"decode tok/s ({args.threads} thr)",
                        "of bandwidth"), table))
    print(f"{common.NAMES[args.size]}; bandwidth: the bytes a token reads (the files, less an embedding table only looked up) x tok/s over the machine's {bandwidth / 1e9:.1f} GB/s "
          f"(numpy, {args.threads} threads)")
    if real:
        print(f"float perplexity {reference.perplexity:.3f} on {len(eval_ids)} held-out tokens (windows of {quality_window()})")
    if h2h:
        print(f"head to head, interleaved, onnxruntime-genai int4 {h2h['genai']:.1f} tok/s: " + "; ".join(
            f"{name} {v['tok_s']:.1f} tok/s, {v['ratio']:.2f}x" for name, v in h2h.items() if name != "genai")
            + " (target >= 1.00x at perplexity change <= +1.3%)")
    verdicts = profile_verdicts(rows) if real else []
    if verdicts:
        print(common.table(("profile", "quality budget", "default", "within budget", "fastest within budget here", "default is fastest"),
                           [(v["profile"], v["budget"], v["default"], {True: "yes", False: "NO", None: "not measured"}[v["default_within"]],
                             v["fastest"] or "n/a", {True: "yes", False: "NO", None: v["why"]}[v["default_fastest"]]) for v in verdicts]))
    stem = common.named("export", args.size, args.threads)
    path = common.write_json(stem, {"size": args.size, "threads": args.threads, "read_bandwidth": bandwidth,
                                    "float_perplexity": reference.perplexity if real else None,
                                    "machine": common.machine(), "rows": rows, "head_to_head": h2h, "profiles": verdicts})
    plot(rows, common.OUT / f"{stem}.png", args.threads, args.size)
    print(f"wrote {path} and {common.OUT / f'{stem}.png'}")


def profile_verdicts(rows: list[dict]) -> list[dict]:
    """Per CPU profile: is its default format (first backend, at its quant) within its quality budget,
    and the fastest of the measured edgelora formats that are? Quality holds on any CPU; speed is
    this machine's, so the second answer is given only for profiles of this architecture (an
    emulator's speed says nothing about a device)."""
    import platform

    from edgelora.bundle import _q41_library
    from edgelora.profiles import list_profiles

    here = {"amd64": "x86_64", "aarch64": "arm64"}.get(platform.machine().lower(), platform.machine().lower())
    measured = {r["name"]: r for r in rows if r["name"].startswith("edgelora ")}
    out = []
    for prof in list_profiles():
        if prof.kind != "cpu":
            continue
        q, bk = prof.quality, prof.backends
        within = {n: r["change"] <= q.max_perplexity_increase and r["top1"] >= q.min_top1_agreement
                  for n, r in measured.items() if n.split()[1] in bk.order}
        default = f"edgelora {bk.order[0]} {bk.gguf_quant if bk.order[0] == 'gguf' else bk.onnx_quant}"
        if default == "edgelora onnx int4":  # named, as measured, by the kernel the profile's bundle takes
            default += (" (MatMulQ41, 6-bit head)" if bk.onnx_head_bits == 6 else " (MatMulQ41)") if _q41_library(prof) else " (MatMulNBits)"
        fastest = max((n for n, ok in within.items() if ok), key=lambda n: measured[n]["tok_s"], default=None)
        same_arch = prof.arch == here
        out.append(dict(profile=prof.name, budget=f"ppl +{q.max_perplexity_increase:.0%}, top-1 >= {q.min_top1_agreement:.0%}",
                        default=default.removeprefix("edgelora "), default_within=within.get(default),
                        fastest=fastest.removeprefix("edgelora ") if fastest and same_arch else None,
                        default_fastest=(default == fastest) if same_arch and default in measured else None,
                        why=f"{prof.arch}: not measured on {here}" if not same_arch else "default not measured"))
    return out


def plot(rows: list[dict], path: Path, threads: int, size: str) -> None:
    """135m: decode speed against perplexity change, with the Pareto front; 1b (random weights, no
    quality): decode speed against file size."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    real = size == "135m"
    pts = [(100 * r["change"] if real else r["size"] / 1e6, r["tok_s"], r["name"]) for r in rows]
    for x, y, name in pts:
        ax.scatter(x, y, color="tab:blue" if name.startswith("edgelora") else "tab:gray")
        ax.annotate(name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    front, best = [], -1.0
    for x, y, _ in sorted(pts):
        if y > best:
            front.append((x, y))
            best = y
    if real:
        ax.plot(*zip(*front), color="tab:orange", linestyle="--", label="Pareto front")
        ax.legend()
    ax.set_xlabel("perplexity change vs float (%)" if real else "weight bytes per token (MB)")
    ax.set_ylabel(f"decode tokens/s ({threads} threads)")
    ax.set_title(f"{common.NAMES[size]}: speed against {'quality' if real else 'bytes'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
