"""What an active adapter adds to one ONNX decode step, inside ONNX Runtime: the x86-64 bundle's int4
graph (MatMulQ41) as exported, with its adapter pack (one bound input), against the same graph with
its LoRA slots as inputs of their own (`onnx_fused.unpack_slots`: 2 to 4 bound tensors per node);
each with no adapter and with a rank-8 adapter.

    python bench/adapter_step.py [--size 135m|1b] [--threads 2] [--precision q8_0|f16|f32] [--rounds 40]

A step is `run_with_iobinding` at a fixed position after a short chat (no sampling, no Python loop),
timed in blocks of 10 steps, the cases of one graph interleaved; the two graphs run in turn with a
pause between them (an ONNX Runtime pool's threads spin a while after its last run and would slow
the other session). Prints microseconds per step and writes bench/results/adapter_step*.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

NAMES = {"q8_0": "adapters-x86-q8", "f16": "adapters-x86-f16", "f32": "adapters-x86"}


def unpacked_copy(b, work: Path) -> Path:
    """The bundle with its ONNX graph's slots unpacked (the graph's other files linked)."""
    import shutil

    import onnx

    from edgelora.converters import onnx_fused

    src = b.path(b.artifact("onnx").main)
    shutil.copytree(b.root, work, symlinks=True)
    dst = work / src.relative_to(b.root)
    for f in list(dst.parent.iterdir()):
        if f.name.startswith(src.name):
            f.unlink()
    onnx.save(onnx_fused.unpack_slots(onnx.load(str(src))), str(dst), save_as_external_data=True, location=dst.name + ".data")
    return work


def cases(root: Path, threads: int) -> tuple[object, dict]:
    """An engine on the bundle at `root` and its IO bindings for one decode step, base and adapter
    (with the number of adapter tensors each binds)."""
    import edgelora
    from edgelora.adapters import random_adapter

    bundle = edgelora.open_bundle(root, verify=False)
    if "a" not in bundle.store.names():
        bundle.store.install(random_adapter(bundle.config, rank=8, alpha=16, seed=1, scale=0.02,
                                            fingerprint=bundle.fingerprint, name="a"), "a")
    e = bundle.engine("onnx", threads=threads, n_ctx=1024)
    e.generate(common.PROMPT, max_tokens=16)
    e.set_adapters({"a": 1.0})
    out = {}
    for label, params in (("base", {}), ("adapter", dict(e._bound_params))):
        e._bound_params = params
        io = e._binding(True)
        io.bind_input("attention_mask", "cpu", 0, np.int64, [1, e.n_past + 1], e._ones.ctypes.data)
        out[label] = (io, len(params))
    return e, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=common.SIZES, default="135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", choices=tuple(NAMES), default="q8_0", help="the bundle's adapter precision")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    b = common.bundle("x86-64", "both", None, name=NAMES[args.precision], size=args.size,
                      adapter_precision=args.precision)
    with tempfile.TemporaryDirectory(prefix="edgelora-step-") as tmp:
        graphs = {"pack": cases(b.root, args.threads), "slots": cases(unpacked_copy(b, Path(tmp) / "b"), args.threads)}
        times = {(g, k): [] for g, (_, c) in graphs.items() for k in c}
        for _ in range(args.rounds):
            for g, (e, c) in graphs.items():
                time.sleep(0.1)  # the other session's pool stops spinning
                for io, _ in c.values():
                    e.session.run_with_iobinding(io)
                for k, (io, _) in c.items():
                    t = time.perf_counter()
                    for _ in range(10):
                        e.session.run_with_iobinding(io)
                    times[(g, k)].append((time.perf_counter() - t) / 10)
        med = {key: statistics.median(v) for key, v in times.items()}
        rows, out = [], {"size": args.size, "threads": args.threads, "precision": args.precision, "machine": common.machine(),
                         "us_per_step": {}}
        for (g, k), t in med.items():
            base = med[(g, "base")]
            rows.append((g, k, graphs[g][1][k][1], f"{1e6 * t:.0f}", f"{base / t:.3f}x", f"{1e6 * (t - base):+.0f}"))
            out["us_per_step"][f"{g} {k}"] = 1e6 * t
        for e, _ in graphs.values():
            e.close()
    print(common.table(("graph", "case", "bound adapter tensors", "us/step", "of its base", "us over its base"), rows))
    print(f"\n{common.NAMES[args.size]}, x86-64 bundle, adapter in {args.precision}, rank 8 on all 7 targets; {args.threads} "
          f"threads; median of {args.rounds} blocks of 10 steps. slots: the same graph with unpack_slots.")
    print(f"wrote {common.write_json(common.named('adapter_step', args.size, args.threads), out)}")


if __name__ == "__main__":
    main()
