"""The README's benchmark table and plot, from the last runs' JSON in bench/results/:

    python bench/report.py            # after bench/export.py, bench/adapters.py, bench/train.py (each --size 135m and 1b)
                                      # (and bench/decode_profile.py, bench/head_precision.py)

Rewrites the block between the README's `bench:begin` and `bench:end` markers with one table
(edgelora against the reference runtimes, the ratio, the share of the machine's read bandwidth,
the issue's target) and writes docs/benchmarks.png. The runs' JSON is committed, so a partial rerun
replaces only its own rows; a run whose JSON is missing keeps the rows the table already had for it
(said below the table), or is named as not run yet.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

README = common.ROOT / "README.md"
PLOT = common.ROOT / "docs" / "benchmarks.png"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def load(stem: str) -> dict | None:
    path = common.OUT / f"{stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def first(stem: str, size: str) -> dict | None:
    """The run of `stem` at `size` with the most threads (what the table's single rows show)."""
    return next((d for t in (2, 1) if (d := load(common.named(stem, size, t)))), None)


def ratio_cell(ratio: float, ci, of: str = "base") -> str:
    """A ratio's cell, with its 95% interval where the run had one."""
    return f"{ratio:.3f}x {of}" + (f" ({ci[0]:.3f}-{ci[1]:.3f})" if ci else "")


def adapter_ratio(decode: dict) -> tuple[float, str]:
    """One adapter's speed over its base from a bench/adapters.py run, and the cell showing it: the
    paired ratio with its 95% interval (runs before it had one: the ratio of the medians)."""
    one = decode["one"]
    ratio = one["tok_s"] / decode["base"]["tok_s"] if one.get("ratio") is None else one["ratio"]
    return ratio, ratio_cell(ratio, one.get("ratio_ci"))


def anchor_cell(a: dict) -> str:
    return ratio_cell(a["ratio"], a.get("ratio_ci"), "its base")


def adapter_label(kind: str, engine: str) -> str:
    """An adapter row's engine, with what its bundle kind (bench/adapters.py --bundles) adds."""
    if not kind.startswith("x86"):
        return f"edgelora {engine}"
    width = {"x86": "adapter in f32", "x86-f16": "adapter in f16", "x86-q8": "adapter in 8 bits, the profile's default"}[kind]
    what = ["x86-64 bundle"] + ["MatMulQ41"] * (engine == "onnx int4") + [width]
    return f"edgelora {engine} ({', '.join(what)})"


def rows_for(size: str) -> tuple[list[tuple], list[str], dict]:
    """(table rows, missing runs, plot data) at one size."""
    rows, missing, plot = [], [], {}
    name = common.NAMES[size]
    export = first("export", size)
    for run in (d for t in (2, 1) if (d := load(common.named("export", size, t)))):  # head to head at each thread count
        by = {r["name"]: r for r in run["rows"]}
        h2h = run.get("head_to_head") or {}
        genai = by.get("onnxruntime-genai int4")
        if "edgelora" in h2h:  # runs before MatMulQ41: one int4 engine
            h2h = {"genai": h2h["genai"], "edgelora onnx int4": {"tok_s": h2h["edgelora"], "ratio": h2h["ratio"]}}
        for engine, v in h2h.items():
            ours = by.get(engine)
            if engine == "genai" or not ours:
                continue
            ppl = f", perplexity {ours['change']:+.2%} vs {genai['change']:+.2%}" if size == "135m" and genai else ""
            rows.append((name, f"decode, {engine.removeprefix('edgelora ').replace('onnx', 'ONNX')}{ppl}", f"{v['tok_s']:.1f} tok/s",
                         f"genai int4 {h2h['genai']:.1f}", f"{v['ratio']:.2f}x", f"{ours['bandwidth_fraction']:.0%}",
                         ">= 1.00x (issue 18)", run["threads"]))
    if export:
        by = {r["name"]: r for r in export["rows"]}
        thr = export["threads"]
        q41 = next((r for k, r in by.items() if k.startswith("llama.cpp Q4_1")), None)
        gguf = by.get("edgelora gguf q4_0")
        if q41 and gguf:
            rows.append((name, "decode, GGUF Q4_0 (llama.cpp runs it)", f"{gguf['tok_s']:.1f} tok/s",
                         f"llama.cpp Q4_1 {q41['tok_s']:.1f}", f"{gguf['tok_s'] / q41['tok_s']:.2f}x",
                         f"{gguf['bandwidth_fraction']:.0%}", "", thr))
        plot["decode"] = [(r["name"], r["tok_s"]) for r in export["rows"]]
        if size == "135m":  # today's profiles against the measured formats (quality means nothing at 1b)
            from export import profile_verdicts

            for v in profile_verdicts(export["rows"]):
                fastest = v["default_fastest"]
                rows.append((name, f"profile {v['profile']}: default {v['default']} within its budget ({v['budget']})?",
                             {True: "yes", False: "NO", None: "not measured"}[v["default_within"]],
                             f"fastest within budget: {v['fastest']}" if v["fastest"] else v["why"],
                             "" if fastest is None else "default is fastest" if fastest else "default is NOT fastest",
                             "", "within budget, fastest", thr))
    else:
        missing.append(f"bench/export.py --size {size}")
    runs = [d for t in (1, 2) if (d := load(common.named("adapters", size, t)))]
    for adapters in runs:
        thr = adapters["threads"]
        bundles = adapters["bundles"]
        prof = bundles.get("profile") or bundles.get("x86") or next(iter(bundles.values()))
        for engine, e in prof["engines"].items():
            ratio, cell = adapter_ratio(e["decode"])
            kind = next(k for k, v in bundles.items() if v is prof)
            q41 = kind.startswith("x86") and engine == "onnx int4"
            label = adapter_label(kind, engine)
            rows.append((name, f"rank-{adapters['rank']} adapter active, {label}", cell,
                         "", "", f"{e['bandwidth_fraction']:.0%}", ">= 0.97x (issue 18)" if q41 else ">= 0.95x (issue 12)", thr))
            plot.setdefault("adapter", []).append((f"{label.replace('x86-64 bundle, ', '')}, {thr} thr", ratio))
        for kind in ("x86", "x86-f16", "x86-q8"):
            other = bundles.get(kind)
            if other is None or other is prof:
                continue
            for engine, e in other["engines"].items():  # x86: MatMulQ41 with the adapter inside the same node
                if kind == "x86" and engine != "onnx int4":
                    continue
                ratio, cell = adapter_ratio(e["decode"])
                label = adapter_label(kind, engine)
                rows.append((name, f"rank-{adapters['rank']} adapter active, {label}", cell, "", "",
                             f"{e['bandwidth_fraction']:.0%}",
                             ">= 0.97x (issue 18)" if engine == "onnx int4" else ">= 0.95x (issue 12)", thr))
                plot.setdefault("adapter", []).append((f"{label.replace('x86-64 bundle, ', '')}, {thr} thr", ratio))
        anchor = prof.get("llama_cpp_lora_path")
        if anchor:
            rows.append((name, f"rank-{adapters['rank']} adapter, llama.cpp's own --lora", anchor_cell(anchor),
                         "", "", "", "", thr))
            plot["adapter"].append((f"llama.cpp --lora, {thr} thr", anchor["ratio"]))
        g = prof.get("genai_adapter_path")
        if g:
            rows.append((name, f"rank-{adapters['rank']} adapter, onnxruntime-genai's int4 with it built in",
                         anchor_cell(g),
                         "", "", "", "", thr))
            plot["adapter"].append((f"genai adapter_path, {thr} thr", g["ratio"]))
    if not runs:
        missing.append(f"bench/adapters.py --size {size}")
    train = load(common.named("train", size))
    if train:
        plot["train"] = []
        for trio in train["results"]:
            t = trio["torch"]
            for side, label in (("numpy", "as the profile's budget plans"), ("numpy-compact", "--expanded-layers 2")):
                n = trio[side]
                rows.append((name, f"training tok/s and peak memory (Q8_0 bundle, {label}: {n['expanded_layers']} layers expanded)",
                             f"{n['tokens_per_s']:.0f} tok/s, {n['peak_rss_mb']:.0f} MB",
                             f"PEFT+torch {t['tokens_per_s']:.0f} tok/s, {t['peak_rss_mb']:.0f} MB",
                             f"{n['tokens_per_s'] / t['tokens_per_s']:.2f}x speed, {n['peak_rss_mb'] / t['peak_rss_mb']:.2f}x memory",
                             "", ">= 1.0x speed, <= 0.5x memory", n["threads"]))
                plot["train"].append((f"{n['threads']} thr, {n['expanded_layers']} layers", n["tokens_per_s"] / t["tokens_per_s"],
                                      n["peak_rss_mb"] / t["peak_rss_mb"]))
    else:
        missing.append(f"bench/train.py --size {size}")
    return rows, missing, plot


def draw(plots: dict[str, dict]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for i, (size, p) in enumerate(plots.items()):
        names, rates = zip(*p["decode"]) if p.get("decode") else ((), ())
        ax = axes[0]
        y = [j + 0.4 * i for j in range(len(names))]
        ax.barh(y, rates, height=0.4, label=common.NAMES[size])
        for yy, n in zip(y, names):
            ax.annotate(n, (0, yy), fontsize=6, xytext=(2, -2), textcoords="offset points")
        if p.get("adapter"):
            names, ratios = zip(*p["adapter"])
            axes[1].barh([f"{size}: {n}" for n in names], ratios)
        if p.get("train"):
            for what, speed, mem in p["train"]:
                axes[2].scatter(mem, speed, s=40)
                axes[2].annotate(f"{size}, {what}", (mem, speed), fontsize=7, xytext=(4, 3), textcoords="offset points")
    axes[0].set_xlabel("decode tokens/s")
    axes[0].set_yticks([])
    axes[0].set_title("decode speed by format")
    axes[0].legend(fontsize=7)
    axes[1].axvline(0.95, color="tab:red", linestyle="--", label="target 0.95x")
    axes[1].set_xlabel("decode with a rank-8 adapter / base")
    axes[1].set_xlim(0.6, 1.1)
    axes[1].tick_params(axis="y", labelsize=6)
    axes[1].legend(fontsize=7)
    axes[1].set_title("cost of an active adapter")
    axes[2].axhline(1.0, color="tab:orange", linestyle="--")
    axes[2].axvline(0.5, color="tab:orange", linestyle="--")
    axes[2].set_xlabel("peak memory / PEFT+torch")
    axes[2].set_ylabel("tokens/s / PEFT+torch")
    axes[2].set_title("on-device training (target: upper left)")
    fig.tight_layout()
    PLOT.parent.mkdir(exist_ok=True)
    fig.savefig(PLOT, dpi=110)
    return True


def decode_profile_lines() -> list[str]:
    """bench/decode_profile.py's parts table and bench/head_precision.py's line, when they ran."""
    lines = []
    for size in common.SIZES:
        prof = load(common.named("decode-profile", size))
        for run in (prof or {}).get("runs", []):
            if not lines:
                lines += ["Where a decode step's time goes (`bench/decode_profile.py`: ONNX Runtime's per-node profile, "
                          "kernel microseconds per step, each model in its own runtime; the unprofiled speeds measured "
                          "beside it, interleaved):", "",
                          "| model | threads | part | edgelora int4 (MatMulQ41) | genai int4 | difference | "
                          "weights edgelora | weights genai |", "|" + "---|" * 8]
            sp = run["speed"]
            for r in run["rows"]:
                if r["ours_us"] or r["genai_us"]:
                    lines.append(f"| {common.NAMES[size]} | {run['threads']} | {r['part']} | {r['ours_us']:.0f} us | "
                                 f"{r['genai_us']:.0f} us | {r['ours_us'] - r['genai_us']:+.0f} us | {r['ours_mb']:.1f} MB | "
                                 f"{r['genai_mb']:.1f} MB |")
            lines.append(f"| {common.NAMES[size]} | {run['threads']} | unprofiled decode | {sp['ours']:.1f} tok/s | "
                         f"{sp['genai']:.1f} tok/s | {sp['ours'] / sp['genai']:.2f}x | | |")
            if "adapter" in sp:
                added = sum(r.get("adapter_us", r["ours_us"]) - r["ours_us"] for r in run["rows"])
                lines.append(f"| {common.NAMES[size]} | {run['threads']} | rank-8 adapter active (edgelora) | "
                             f"{sp['adapter']:.1f} tok/s, {sp['adapter'] / sp['ours']:.3f}x base | | {added:+.0f} us of kernels | | |")
    head = load("head-precision")
    if head:
        lines += ["", "What the LM head's precision costs (`bench/head_precision.py`: the float model with only its head "
                  "rounded, perplexity against the float head; bytes per token at 135M): " + ", ".join(
                      f"{r['format']} {r['change']:+.2%} ({r['head_mb']:.1f} MB)" for r in head["rows"]) + "."]
    return lines


def run_of(row: tuple) -> tuple[str, str, str]:
    """(model, bench, threads) of a table row: which run it came from."""
    what = row[1]
    bench = "train" if what.startswith("training") else "adapters" if "adapter" in what else "export"
    return row[0], bench, str(row[-1])


def table_rows(text: str) -> list[tuple]:
    """The rows of the README's current benchmark table."""
    if BEGIN not in text:
        return []
    block = text.split(BEGIN, 1)[1].split(END, 1)[0]
    table = block.strip().split("\n\n", 1)[0]  # the first table (the decode profile's comes after the notes)
    rows = [tuple(c.strip() for c in line.strip().strip("|").split("|")) for line in table.splitlines() if line.startswith("| ")]
    return [r for r in rows[1:] if len(r) == 8]  # (the first is the header)


def main() -> None:
    rows, missing, plots = [], [], {}
    for size in common.SIZES:
        r, m, p = rows_for(size)
        rows += r
        missing += m
        plots[size] = p
    text = README.read_text()
    measured = {run_of(r) for r in rows}
    kept = [r for r in table_rows(text) if run_of(r) not in measured]
    if kept:  # runs whose JSON is not here (an earlier machine's): their rows stay as the table had them
        order = [common.NAMES[s] for s in common.SIZES]
        rows = sorted(rows + kept, key=lambda r: order.index(r[0]) if r[0] in order else len(order))
        earlier = sorted({run_of(r) for r in kept})
        carried = {f"bench/{b}.py --size {s}" for n, b, _ in earlier for s in common.SIZES if common.NAMES[s] == n}
        missing = [m for m in missing if m not in carried]
    header = ("model", "what", "edgelora", "reference", "ratio", "of bandwidth", "target", "threads")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    notes = ["Of bandwidth: the weight bytes a token reads times tokens/s, over this machine's read rate measured "
             "by numpy with the same thread count. Decode figures are medians of "
             "interleaved runs at the same thread count on both sides; the 1B model has random weights "
             "(speed does not depend on them). An adapter's ratio to its base is paired: each block of 8 tokens "
             "(each generation, for llama.cpp's and genai's) against the base's on either side, the median "
             "with its 95% interval in brackets; repeated runs on this shared host move by more than the interval."]
    if kept:
        notes.append("Carried from an earlier run (its JSON is not in bench/results; not plotted): " +
                     "; ".join(f"{n}, `bench/{b}.py`, {t} thread{'s' * (t != '1')}" for n, b, t in earlier) + ".")
    if missing:
        notes.append("Not run yet: " + "; ".join(f"`{m}`" for m in missing) + ".")
    plotted = draw(plots) if any(plots.values()) else PLOT.exists()  # nothing measured here: keep the plot
    profile = decode_profile_lines()
    block = "\n".join([BEGIN, *lines, "", "\n\n".join(notes), *(["", *profile] if profile else []),
                       *(["", "![benchmarks](docs/benchmarks.png)"] if plotted else []), END])
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{README} has no {BEGIN} ... {END} block to rewrite")
    head, rest = text.split(BEGIN, 1)
    README.write_text(head + block + rest.split(END, 1)[1])
    print("\n".join(lines + [""] + notes))
    print(f"rewrote the benchmark block of {README}" + (f" and wrote {PLOT}" if plotted else ""))


if __name__ == "__main__":
    main()
