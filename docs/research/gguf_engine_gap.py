"""edgelora's GGUF engine against llama.cpp's own loop on the same file, at equal settings:
the base and an active rank-8 adapter (fused by edgelora's llama.cpp patch in the engine, llama.cpp's
own four nodes per projection in the reference), interleaved rounds, the engine timed by wall clock and by its
llama_decode calls, llama.cpp by its perf counters (issue 12). Uses the bench's cached 1B bundle
(`python bench/adapters.py --size 1b` makes it).

    python docs/research/gguf_engine_gap.py --threads 2 --rounds 5
"""

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import common  # noqa: E402
from llama_cpp import Llama  # noqa: E402

import edgelora  # noqa: E402
from edgelora._native import quiet_native  # noqa: E402
from edgelora.runtime.gguf import fused_lora, llama_cpp_own_lora  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bundle", default=str(Path.home() / ".cache/edgelora/bench/adapters-pi5-1b"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--precision", default="f32", choices=["f32", "f16", "q8_0"], help="the adapter file's")
    args = ap.parse_args()
    b = edgelora.open_bundle(args.bundle)
    gguf = next(b.root / f for a in b.artifacts if a.backend == "gguf" for f in a.files)
    lora = b.store.path("a", "gguf")
    if args.precision != "f32":
        import tempfile

        from edgelora.converters import save_adapter

        _, adapter = b.store.open("a", "gguf")
        lora = save_adapter(adapter, Path(tempfile.mkdtemp()) / f"a-{args.precision}.gguf", "gguf", b.config,
                            precision=args.precision)
    e = b.engine("gguf", threads=args.threads)
    e.load_adapter("a", lora)
    calls: list[float] = []
    decode = e.llm._ctx.decode

    def timed(batch):
        t = time.perf_counter()
        decode(batch)
        calls.append(time.perf_counter() - t)

    e.llm._ctx.decode = timed
    prompt = b.tokenizer().apply_chat_template(common.PROMPT)

    def engine_rate(weights, fused=True):
        with contextlib.nullcontext() if fused else llama_cpp_own_lora():
            e.set_adapters({})
            e.set_adapters(weights)  # the graph is built anew, with or without the fused node
            calls.clear()
            g = e.generate(common.PROMPT, max_tokens=args.tokens)
        label = "base" if not weights else "adapter" if fused else "adapter, own nodes"
        got[f"engine {label}, llama_decode only"].append((len(calls) - 1) / sum(calls[1:]))
        return g.decode_tokens_per_second

    def loaded(path):
        with quiet_native():
            return Llama(str(gguf), n_ctx=e.n_ctx, n_threads=args.threads, n_threads_batch=args.threads,
                         lora_path=path, verbose=False)

    def llama_rate(llm):
        return common.llama_cpp_decode_rate(llm, prompt, args.tokens)

    plain, with_lora = loaded(None), loaded(str(lora))
    got = {k: [] for k in ("engine base", "engine adapter", "engine adapter, own nodes", "engine base, llama_decode only",
                           "engine adapter, llama_decode only", "engine adapter, own nodes, llama_decode only",
                           "llama.cpp base", "llama.cpp lora_path")}
    for _ in range(args.rounds):
        got["engine base"].append(engine_rate({}))
        got["engine adapter"].append(engine_rate({"a": 1.0}))
        got["engine adapter, own nodes"].append(engine_rate({"a": 1.0}, fused=False))
        got["llama.cpp base"].append(llama_rate(plain))
        got["llama.cpp lora_path"].append(llama_rate(with_lora))
    med = {k: statistics.median(v) for k, v in got.items()}
    print(f"engine's LoRA fused: {fused_lora()}; {b.config.num_layers} layers, n_ctx {e.n_ctx}, {args.threads} threads, {args.rounds} rounds of {args.tokens} tokens, "
          f"adapter in {args.precision}")
    print("| route | tok/s (median) | range | adapter x base |")
    print("|---|---|---|---|")
    for k, v in med.items():
        ratio = v / med[k.replace("adapter, own nodes", "base").replace("adapter", "base").replace("lora_path", "base")]
        print(f"| {k} | {v:.2f} | {min(got[k]):.2f}-{max(got[k]):.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
