"""Adapters: swap latency, decode speed with none / one / two mixed / merged, per engine, with
llama.cpp's own `lora_path` route as the anchor; adapter file size against the raw tensor bytes.

    python bench/adapters.py [--threads 2] [--rank 8]

Both sides run with the same thread count. Prints one table and writes bench/out/adapters.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64, help="decoded tokens per measurement")
    args = ap.parse_args()

    from llama_cpp import Llama

    from edgelora._native import quiet_native
    from edgelora.adapters import random_adapter, save_adapter

    b = common.bundle("x86-64", "both", "f32", name="adapters-f32")
    store = b.store
    for name, seed in (("a", 1), ("b", 2)):
        if name not in store.names():
            store.install(random_adapter(b.config, rank=args.rank, alpha=2 * args.rank, seed=seed, scale=0.02,
                                         fingerprint=b.fingerprint, name=name), name)
    raw_bytes = random_adapter(b.config, rank=args.rank).nbytes()
    rows, results = [], {"threads": args.threads, "rank": args.rank, "machine": common.machine(), "engines": {}}
    for backend in ("gguf", "onnx"):
        e = b.engine(backend, threads=args.threads)
        path_a = store.path("a", backend)
        load_ms = 1e3 * common.median_seconds(lambda: e.load_adapter("a", path_a), repeat=5)
        swap_ms = 1e3 * common.median_seconds(lambda: (e.set_adapters({"a": 1.0}), e.set_adapters({"b": 1.0})), 20) / 2
        e.clear_adapters()
        base = common.best_of(lambda: common.decode_rate(e, args.tokens))
        e.set_adapters({"a": 1.0})
        one = common.best_of(lambda: common.decode_rate(e, args.tokens))
        e.set_adapters({"a": 0.5, "b": 0.5})
        two = common.best_of(lambda: common.decode_rate(e, args.tokens))
        e.clear_adapters()
        t = time.perf_counter()
        e.merge("a")
        merge_s = time.perf_counter() - t
        merged = common.best_of(lambda: common.decode_rate(e, args.tokens))
        e.unmerge()
        e.close()
        size = path_a.stat().st_size
        results["engines"][backend] = dict(load_ms=load_ms, swap_ms=swap_ms, merge_s=merge_s, base=base, one=one, two=two,
                                           merged=merged, file_bytes=size, raw_bytes=raw_bytes)
        rows.append((f"edgelora {backend}", f"{load_ms:.2f}", f"{swap_ms:.3f}", f"{base:.1f}", f"{one:.1f} ({one / base:.2f}x)",
                     f"{two:.1f} ({two / base:.2f}x)", f"{merged:.1f} ({merged / base:.2f}x)", f"{merge_s:.1f}",
                     f"{size / 1e6:.2f} MB ({size / raw_bytes:.3f}x raw)"))

    # the anchor: llama.cpp's own route, a model loaded with lora_path (no swapping possible)
    base_path = b.path(b.artifact("gguf").main)
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        with quiet_native():
            llm = Llama(str(base_path), n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads,
                        lora_path=str(store.path("a", "gguf")), verbose=False)
        reload_s = time.perf_counter() - t

        def anchor_rate() -> float:
            """llama.cpp's own decode timing (its perf counters), prompt processing excluded."""
            import llama_cpp

            prompt = b.tokenizer().apply_chat_template(common.PROMPT)
            llm.reset()
            llama_cpp.llama_perf_context_reset(llm.ctx)
            llm.create_completion(prompt, max_tokens=args.tokens, temperature=0.0)
            perf = llama_cpp.llama_perf_context(llm.ctx)
            return perf.n_eval / (perf.t_eval_ms / 1e3)

        anchor = common.best_of(anchor_rate)
        llm.close()
    results["llama_cpp_lora_path"] = dict(load_s=reload_s, decode_with_adapter=anchor)
    rows.append(("llama.cpp lora_path", f"{reload_s * 1e3:.0f} (reload)", "n/a (reload)", "", f"{anchor:.1f}", "", "", "", ""))
    print(common.table(("engine", "load adapter ms", "swap ms", "base tok/s", "1 adapter", "2 mixed", "merged",
                        "merge s", "adapter file"), rows))
    print(f"\n{args.threads} threads, rank {args.rank} on all 7 targets x 30 layers; decode = {args.tokens} greedy tokens "
          "after a chat prompt, best of 3; llama.cpp's anchor is timed by its own perf counters.")
    print(f"wrote {common.write_json('adapters', results)}")


if __name__ == "__main__":
    main()
