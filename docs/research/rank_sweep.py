"""Decode cost of one adapter against its rank, in both engines of a bundle: the settings (base and
one adapter of each rank) take turns every 8 tokens in the same generations (`decode_rates`), so the
intercept (what an adapter costs whatever its size: nodes, waits, calls) and the slope (its bytes and
arithmetic) come from one run (issue 12; adapter-cost.md).

    python docs/research/rank_sweep.py ~/.cache/edgelora/bench/adapters-x86-q8 2 5
"""

import sys
from pathlib import Path

import edgelora
from edgelora.adapters import random_adapter
from edgelora.runtime.engine import decode_rates

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402

bundle, threads, rounds = edgelora.open_bundle(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ranks = (1, 4, 8, 16, 32)
for r in ranks:
    name = f"rank{r}"
    if name not in bundle.store.names():
        bundle.store.install(random_adapter(bundle.config, rank=r, alpha=2 * r, seed=r, scale=0.02,
                                            fingerprint=bundle.fingerprint, name=name), name)
settings = {"base": {}, **{f"rank{r}": {f"rank{r}": 1.0} for r in ranks}}
for backend in bundle.backends:
    e = bundle.engine(backend, threads=threads)
    rates = decode_rates(e, settings, tokens=64, rounds=rounds, prompt=common.PROMPT)
    base_ms = 1e3 / rates["base"].tokens_per_second
    print(f"{backend}, {threads} threads: base {base_ms:.2f} ms/token; " + ", ".join(
        f"rank {r} +{1e3 / rates[f'rank{r}'].tokens_per_second - base_ms:.3f} ms "
        f"({rates[f'rank{r}'].tokens_per_second * base_ms / 1e3:.3f}x)" for r in ranks))
    e.close()
