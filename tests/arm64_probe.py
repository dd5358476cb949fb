"""What the arm64 check runs on each side: one bundle's engines with and without adapters, a swap, a
mix, a few trainer steps and greedy tokens, written to an .npz. It imports only edgelora and numpy,
so the same file runs on x86 and under qemu-aarch64 and the two outputs compare key by key.

    python arm64_probe.py BUNDLE OUT.npz --ids 5,17,3 --adapters a,b [--train DATA --steps 3]

An engine that fails records its error (key `error/<backend>-<quant>`) instead of stopping the probe,
so the caller can report it.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np


def probe_engine(bundle, backend: str, key: str, ids: list[int], adapters: list[str], out: dict, meta: dict,
                 **kw) -> None:
    engine = bundle.engine(backend, threads=1, n_ctx=max(64, len(ids) + 16), **kw)
    t0 = time.perf_counter()
    out[f"{key}/base"] = engine.logits(ids)
    meta[f"{key}/seconds_logits"] = time.perf_counter() - t0
    if adapters:
        first, second = adapters[0], adapters[-1]
        engine.set_adapters([first])
        out[f"{key}/adapter"] = engine.logits(ids)
        out[f"{key}/tokens"] = np.array(engine.generate(ids, max_tokens=6).tokens, dtype=np.int64)
        t0 = time.perf_counter()
        engine.set_adapters([second])  # a swap: no reload of the base
        meta[f"{key}/seconds_swap"] = time.perf_counter() - t0
        out[f"{key}/swapped"] = engine.logits(ids)
        engine.set_adapters({first: 0.7, second: 0.5})
        out[f"{key}/mix"] = engine.logits(ids)
        engine.clear_adapters()
        out[f"{key}/cleared"] = engine.logits(ids)
    engine.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle")
    ap.add_argument("out")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--adapters", default="")
    ap.add_argument("--backends", default="")
    ap.add_argument("--train")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)

    import edgelora

    t0 = time.perf_counter()
    bundle = edgelora.open_bundle(args.bundle)
    ids = [int(t) for t in args.ids.split(",")]
    adapters = [a for a in args.adapters.split(",") if a]
    out: dict[str, np.ndarray] = {}
    meta: dict = {"machine": platform.machine(), "numpy": np.__version__, "seconds_open": time.perf_counter() - t0}
    runs = []
    for backend in [b for b in args.backends.split(",") if b] or bundle.backends:
        key = f"{backend}-{bundle.artifact(backend).quant}"
        if key == "gguf-f32":  # exact with an f32 KV cache; the default f16 cache rounds differently per CPU
            runs += [(backend, key, {"kv_type": "f32"}), (backend, f"{key}-kvf16", {})]
        else:
            runs.append((backend, key, {}))
    for backend, key, kw in runs:
        try:
            probe_engine(bundle, backend, key, ids, adapters, out, meta, **kw)
        except Exception as e:  # reported by the caller, never skipped silently
            meta[f"error/{key}"] = f"{type(e).__name__}: {e}"
    if args.train:
        from edgelora.train import train_adapter

        t0 = time.perf_counter()
        result = train_adapter(bundle, args.train, name="probe", install=False, steps=args.steps, warmup=1,
                               seq_len=96, val_fraction=0, rank=4, threads=1, seed=3)
        meta["seconds_train"] = time.perf_counter() - t0
        out["train/losses"] = np.array(result.losses, dtype=np.float64)
        for target in result.adapter.targets:
            t = result.adapter.tensors[target]
            out[f"train/{target}.A"], out[f"train/{target}.B"] = t.A, t.B
    out["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(args.out, **out)


if __name__ == "__main__":
    main()
