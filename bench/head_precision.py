"""What the LM head's precision costs: the default model in float (transformers) with only its LM head
(the tied embedding) rounded to each block format, perplexity on the held-out text against the float
head, beside the head's bytes per token. The head is the part of an int4 decode step where
edgelora's graph (8 bits, the model's own Q8_0 values) reads most over onnxruntime-genai's (int4):
bench/decode_profile.py.

    python bench/head_precision.py [--threads 2]

Formats, per block of 32 along the hidden size, round to nearest: symmetric with one fp16 scale
(llama.cpp's Q8_0, max |w| at 127; a Q6_0 like its Q5_0 and Q4_0: codes -2^(b-1)..2^(b-1)-1, the
block's signed extreme at -2^(b-1)), and asymmetric with an fp16 scale and minimum (Q5_1, Q4_1). Writes
bench/results/head-precision.json.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BLOCK = 32


def symmetric(w: np.ndarray, bits: int) -> np.ndarray:
    b = w.reshape(w.shape[0], -1, BLOCK).astype(np.float32)
    if bits == 8:  # llama.cpp's Q8_0: max |w| at 127
        d = (np.abs(b).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
    else:  # its Q4_0 and Q5_0: the signed extreme at -2^(b-1)
        top = np.take_along_axis(b, np.abs(b).argmax(-1)[..., None], -1)
        d = (top / -(2 ** (bits - 1))).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q * d).reshape(w.shape)


def asymmetric(w: np.ndarray, bits: int) -> np.ndarray:
    b = w.reshape(w.shape[0], -1, BLOCK).astype(np.float32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = ((hi - lo) / (2 ** bits - 1)).astype(np.float16).astype(np.float32)
    m = lo.astype(np.float16).astype(np.float32)
    q = np.clip(np.rint((b - m) / np.where(d == 0, 1, d)), 0, 2 ** bits - 1)
    return (q * d + m).reshape(w.shape)


FORMATS = {  # name: (bits per weight with the block's fp16 scale [and minimum], rounding)
    "Q8_0": (8.5, lambda w: symmetric(w, 8)),
    "Q6_0": (6.5, lambda w: symmetric(w, 6)),
    "Q5_1": (6.0, lambda w: asymmetric(w, 5)),
    "Q5_0": (5.5, lambda w: symmetric(w, 5)),
    "Q4_1": (5.0, lambda w: asymmetric(w, 4)),
    "Q4_0": (4.5, lambda w: symmetric(w, 4)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgelora import quality
    from edgelora.bundle import EVAL_WINDOW

    torch.set_num_threads(args.threads)
    path = common.hf_dir("135m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(quality.heldout_text())["input_ids"]
    windows = quality.windows(ids, EVAL_WINDOW)
    head = model.get_output_embeddings().weight.detach().numpy().copy()
    with torch.no_grad():  # the last hidden states are the same for every head: computed once
        hidden = [model.model(torch.tensor([w]))[0][0, :-1] for w in windows]

    def perplexity(w: np.ndarray) -> float:
        wt, nll = torch.from_numpy(np.ascontiguousarray(w)), []
        with torch.no_grad():
            for h, win in zip(hidden, windows):
                logp = torch.log_softmax(h @ wt.T, -1)
                nll.append(-logp[torch.arange(len(win) - 1), torch.tensor(win[1:])].numpy())
        return math.exp(float(np.concatenate(nll).mean()))

    base = perplexity(head)
    rows = []
    for name, (bits, rounding) in FORMATS.items():
        ppl = perplexity(rounding(head))
        rows.append(dict(format=name, bits=bits, head_mb=head.size * bits / 8 / 1e6, ppl=ppl, change=ppl / base - 1))
        print(f"{name}: {rows[-1]['change']:+.2%}", file=sys.stderr)
    print(common.table(("LM head", "bits/weight", "head bytes/token", "perplexity", "vs float head"),
                       [(r["format"], f"{r['bits']:.1f}", f"{r['head_mb']:.1f} MB", f"{r['ppl']:.3f}", f"{r['change']:+.2%}")
                        for r in rows]))
    print(f"{common.NAMES['135m']}, float head perplexity {base:.3f} on {len(windows)} windows of {EVAL_WINDOW} tokens; "
          f"the rest of the model in float")
    path = common.write_json("head-precision", {"float_perplexity": base, "rows": rows, "machine": common.machine()})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
