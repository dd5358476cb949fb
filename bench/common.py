"""Shared by the benchmarks: the default model's bundles, timing, tables and JSON output."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from edgelora.runtime.engine import SPEED_PROMPT

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
PROMPT = SPEED_PROMPT  # a chat prompt whose answer runs long: what decode speeds are measured on


def bundle(device: str, backend: str, quant: str, *, name: str | None = None):
    """A bundle of the default model, exported once and kept in the cache."""
    import edgelora

    path = edgelora.models.cache_dir() / "bench" / (name or f"{device}-{backend}-{quant}")
    if (path / "bundle.json").exists():
        return edgelora.open_bundle(path, verify=False)
    return edgelora.export(edgelora.DEFAULT_MODEL, device, path, backend=backend, quant=quant, force=True, replace=True)


def best_of(fn: Callable[[], float], repeat: int = 3) -> float:
    """The best (lowest-noise) of `repeat` measurements of a rate returned by `fn`."""
    return max(fn() for _ in range(repeat))


def median_seconds(fn: Callable[[], object], repeat: int = 20) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_rate(engine, max_tokens: int = 64) -> float:
    g = engine.generate(PROMPT, max_tokens=max_tokens)
    return g.decode_tokens_per_second


def table(header: tuple[str, ...], rows: list[tuple]) -> str:
    cells = [tuple(str(c) for c in header)] + [tuple(str(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(name: str, data: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str))
    return path


def machine() -> dict:
    import platform

    return {"python": sys.version.split()[0], "machine": platform.machine(), "cpus": os.cpu_count(),
            "load_average": os.getloadavg()}
