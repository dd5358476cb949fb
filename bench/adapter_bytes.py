"""What an active adapter costs llama.cpp per token: bytes or nodes? Decode speed of the default
model's GGUF (the Pi 5 bundle's Q8_0, or the shipped Q4_1) through llama.cpp's own `lora_path`, with
a random adapter varied one way at a time: rank 8 on all 7 projections in f32, f16 and q8_0 (fewer
bytes, the same nodes), rank 64 (8x the bytes, the same nodes), and rank 8 on q and v only (2/7 of
the nodes). Interleaved rounds, medians, decode only (one token per eval after the prompt).

    python bench/adapter_bytes.py [--threads 1,2] [--base q8_0|q4_1] [--rounds 7]

Prints each setting's tok/s, its ratio to the base, and the bytes it reads per token as a fraction of
the base's. Writes bench/results/adapter_bytes.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--base", choices=("q8_0", "q4_1"), default="q8_0")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()

    import edgelora
    from edgelora._native import quiet_native
    from edgelora.adapters import random_adapter
    from edgelora.converters import save_adapter
    from llama_cpp import Llama

    b = common.bundle("raspberry-pi-5", "gguf", "q8_0")
    model = (b.root / next(a.main for a in b.artifacts if a.backend == "gguf") if args.base == "q8_0"
             else edgelora.models.gguf_path(edgelora.DEFAULT_MODEL))
    base_bytes = model.stat().st_size
    variants = {"r8 all f32": ({"rank": 8}, "f32"), "r8 all f16": ({"rank": 8}, "f16"),
                "r8 all q8_0": ({"rank": 8}, "q8_0"), "r64 all f32": ({"rank": 64}, "f32"),
                "r8 q,v f32": ({"rank": 8, "targets": ("q", "v")}, "f32")}
    tmp = Path(tempfile.mkdtemp(prefix="edgelora-bench-bytes-"))
    files = {}
    for label, (kw, precision) in variants.items():
        a = random_adapter(b.config, alpha=16, seed=1, scale=0.02, fingerprint=b.fingerprint, **kw)
        files[label] = save_adapter(a, tmp / f"{label.replace(' ', '_').replace(',', '')}.gguf", "gguf", b.config,
                                    precision=precision)
    out, rows = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        with quiet_native():
            llms = {"base": Llama(str(model), n_threads=threads, n_ctx=512, verbose=False)}
            llms.update({k: Llama(str(model), n_threads=threads, n_ctx=512, lora_path=str(f), verbose=False)
                         for k, f in files.items()})
        prompt = llms["base"].tokenize(common.PROMPT[0]["content"].encode())
        rates = {k: [] for k in llms}
        for _ in range(args.rounds):
            for k, llm in llms.items():
                llm.reset()
                llm.eval(prompt)
                t = time.perf_counter()
                for i in range(args.tokens):
                    llm.eval([1000 + i])
                rates[k].append(args.tokens / (time.perf_counter() - t))
        for llm in llms.values():
            llm.close()
        med = {k: statistics.median(v) for k, v in rates.items()}
        for k in llms:
            extra = files[k].stat().st_size if k in files else 0
            rows.append((threads, k, f"{med[k]:.1f}", f"{med[k] / med['base']:.3f}x", f"{extra / 1e6:.1f}",
                         f"{extra / base_bytes:.1%}", f"{med[k] * (base_bytes + extra) / 1e9:.1f}"))
            out.append({"threads": threads, "setting": k, "tok_s": med[k], "ratio": med[k] / med["base"],
                        "adapter_bytes": extra, "base_bytes": base_bytes})
    print(common.table(("threads", "adapter", "tok/s", "x base", "adapter MB", "bytes vs base", "GB/s read"), rows))
    print(f"llama.cpp lora_path on {model.name} ({base_bytes / 1e6:.0f} MB per token), {args.tokens} decode tokens, "
          f"median of {args.rounds} interleaved rounds")
    print(f"wrote {common.write_json('adapter_bytes', {'machine': common.machine(), 'args': vars(args), 'rows': out})}")


if __name__ == "__main__":
    main()
