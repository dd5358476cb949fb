"""On-device training: edgelora's numpy trainer against PEFT + torch on the default model, same
sequence length, rank, targets, data and thread count, each side in its own process (so peak
resident memory is its own). Prints tokens/s and peak memory as ratios, and both loss curves.

edgelora trains as a device does, against the Raspberry Pi 5 bundle's own Q8_0 weights held in
their blocks: once with the layers kept expanded that the profile's memory budget allows (the
default) and once with only two (the smallest footprint); PEFT trains the float checkpoint.

    python bench/train.py [--steps 12] [--seq 256] [--rank 8] [--threads 1,2]
    python bench/train.py --load 1,2 --threads 2     # under contention: N busy processes beside it

With --load, N other processes spin on the cores while each side trains (a phone or a Pi runs other
apps too): edgelora with a fixed thread count, edgelora with its CoreGovernor (the default: fewer
threads while cores are busy), and PEFT+torch, each against itself unloaded.

Writes bench/results/train.json (train-load.json) and bench/results/train.png (the loss curves).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

WORKER = r"""
import json, os, resource, sys, time
side, threads, steps, seq, rank, bundle_dir, hf_dir = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6], sys.argv[7]
import numpy as np
import edgelora
from edgelora.train.data import load
from importlib import resources
data = resources.files("edgelora.data").joinpath("persona_train.jsonl")
bundle = edgelora.open_bundle(bundle_dir, verify=False)
ex = load(data, bundle.tokenizer(), 4096)  # the bundle's tokenizer: no side reads the weights twice
# the same token stream for both sides: chats concatenated and cut into sequences of `seq`
stream = np.concatenate([e.tokens for e in ex])
batches = [stream[i * seq:(i + 1) * seq] for i in range(steps)]
losses, times = [], []
if side.startswith("numpy"):
    from threadpoolctl import threadpool_limits
    threadpool_limits(threads)
    from edgelora.train import TrainConfig, base_weights
    from edgelora.train.model import AdamW, LoraParams, LoraSpec, Workspace, loss_and_grads
    config, w, _ = base_weights(bundle, TrainConfig(seq_len=seq, expanded_layers=2 if side == "numpy-compact" else None))
    base = type("B", (), {"config": config})
    lora = LoraParams(base.config, LoraSpec(rank, 2.0 * rank)).init_random(np.random.default_rng(0))
    opt, ws = AdamW(lr=1e-3), Workspace()
    governor = None
    if side == "numpy-adaptive":
        from edgelora.train import CoreGovernor
        governor = CoreGovernor(threads, every_s=1.0)
    for b in batches:
        t = time.perf_counter()
        if governor is not None:
            governor.tick()
        loss, g = loss_and_grads(w, lora, b[None], np.ones((1, seq), bool), base.config, workspace=ws)
        opt.step(lora.flat, g)
        times.append(time.perf_counter() - t); losses.append(loss)
else:
    import torch
    torch.set_num_threads(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    m = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32),
                       LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                  "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for b in batches:
        t = time.perf_counter()
        x = torch.from_numpy(b[None].astype(np.int64))
        loss = m(input_ids=x, labels=x).loss
        loss.backward(); opt.step(); opt.zero_grad()
        times.append(time.perf_counter() - t); losses.append(float(loss))
try:  # this process's own peak: ru_maxrss would carry the parent's from before the exec (an export there)
    rss = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) / 1024
except OSError:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
print(json.dumps({"side": side, "threads": threads, "tokens_per_s": seq / steady, "peak_rss_mb": rss, "losses": losses,
                  "expanded_layers": getattr(w, "keep_layers", None) if side.startswith("numpy") else None}))
"""


def run(side: str, threads: int, steps: int, seq: int, rank: int, bundle_dir: str, hf_dir: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, "-c", WORKER, side, str(threads), str(steps), str(seq), str(rank), bundle_dir, hf_dir],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def under_load(args, bundle_dir: str, hf_dir: str) -> None:
    """Each side unloaded and beside N spinning processes; tokens/s and the loaded/unloaded ratio."""
    results, rows = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        for load in [0, *[int(n) for n in args.load.split(",")]]:
            spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
            try:
                got = {side: run(side, threads, args.steps, args.seq, args.rank, bundle_dir, hf_dir)
                       for side in ("numpy", "numpy-adaptive", "torch")}
            finally:
                for sp in spinners:
                    sp.kill()
                    sp.wait()
            results.append({"threads": threads, "load": load, **got})
    for r in results:
        base = next(x for x in results if x["threads"] == r["threads"] and x["load"] == 0)
        rows.append((r["threads"], r["load"], *[f"{r[s]['tokens_per_s']:.0f} ({r[s]['tokens_per_s'] / base[s]['tokens_per_s']:.2f}x)"
                                                for s in ("numpy", "numpy-adaptive", "torch")],
                     f"{r['numpy-adaptive']['tokens_per_s'] / r['torch']['tokens_per_s']:.2f}x"))
    print(common.table(("threads (max)", "busy processes", "edgelora fixed tok/s", "edgelora adaptive tok/s",
                        "PEFT+torch tok/s", "adaptive / torch"), rows))
    print(f"{common.NAMES[args.size]}, LoRA r={args.rank}, sequence {args.seq}, {args.steps} steps, median step time; in brackets "
          f"each against itself with no load; {os.cpu_count()} cores.")
    print(f"wrote {common.write_json(common.named('train-load', args.size), {'args': vars(args), 'machine': common.machine(), 'results': results})}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=common.SIZES, default="135m", help="the default model, or a Llama-3.2-1B-shaped one")
    ap.add_argument("--steps", type=int, default=None, help="default: 12 at 135m, 4 at 1b")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--load", default="", help="busy processes beside the training, e.g. 1,2")
    args = ap.parse_args()
    args.steps = args.steps or (12 if args.size == "135m" else 4)
    bundle_dir = str(common.bundle("raspberry-pi-5", "gguf", "q8_0", size=args.size).root)
    hf_dir = common.hf_dir(args.size)
    if args.load:
        return under_load(args, bundle_dir, hf_dir)
    results, rows = [], []
    for threads in [int(t) for t in args.threads.split(",")]:
        trio = {side: run(side, threads, args.steps, args.seq, args.rank, bundle_dir, hf_dir)
                for side in ("numpy", "numpy-compact", "torch")}
        results.append(trio)
        t = trio["torch"]
        for side, label in (("numpy", "edgelora (profile budget)"), ("numpy-compact", "edgelora (2 layers expanded)")):
            n = trio[side]
            rows.append((threads, label, n["expanded_layers"], f"{n['tokens_per_s']:.0f}", f"{t['tokens_per_s']:.0f}",
                         f"{n['tokens_per_s'] / t['tokens_per_s']:.2f}x", f"{n['peak_rss_mb']:.0f}", f"{t['peak_rss_mb']:.0f}",
                         f"{n['peak_rss_mb'] / t['peak_rss_mb']:.2f}x", f"{n['losses'][-1]:.3f} / {t['losses'][-1]:.3f}"))
    print(common.table(("threads", "edgelora", "expanded layers", "edgelora tok/s", "PEFT+torch tok/s", "speed",
                        "edgelora MB", "PEFT MB", "memory", "final loss (ours Q8_0 / PEFT float)"), rows))
    print(f"{common.NAMES[args.size]}, LoRA r={args.rank} on all 7 targets, sequence {args.seq}, {args.steps} steps, "
          "median step time; peak = VmHWM of each process. Targets: speed >= 1.00x, memory <= 0.50x.")
    print(f"wrote {common.write_json(common.named('train', args.size), {'args': vars(args), 'machine': common.machine(), 'results': results})}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for trio in results:
            for side, style in (("numpy", "-"), ("torch", "--")):
                ax.plot(trio[side]["losses"], style, label=f"{'edgelora (Q8_0 bundle)' if side == 'numpy' else 'PEFT+torch (float)'}, {trio[side]['threads']} thr")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(common.OUT / f"{common.named('train', args.size)}.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
