"""GGUF decode rates of base / one adapter / two mixed on a bundle, block-interleaved (`decode_rates`),
for A/B tests of libllama builds (issue 12; see adapter-cost.md, "One node per projection").

    LLAMA_CPP_LIB_PATH=<build>/bin [EDGELORA_MM_UNFUSED=1] [EDGELORA_AX_FLOAT=1] \
        python docs/research/mm_lora_ab.py ~/.cache/edgelora/bench/adapters-x86-q8 2 5 LABEL

The bundle needs adapters `a` and `b` installed (bench/adapters.py installs them).
"""

import sys
from pathlib import Path

import edgelora
from edgelora.runtime.engine import decode_rates

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import common  # noqa: E402

bundle, threads, rounds, label = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), " ".join(sys.argv[4:])
e = edgelora.open_bundle(bundle).engine("gguf", threads=threads)
r = decode_rates(e, {"base": {}, "one": {"a": 1.0}, "two": {"a": 0.5, "b": 0.5}}, tokens=64, rounds=rounds,
                 prompt=common.PROMPT)
base = r["base"].tokens_per_second
print(f"{label}: base {base:.1f} tok/s, one {r['one'].tokens_per_second / base:.3f}x, "
      f"two {r['two'].tokens_per_second / base:.3f}x")
e.close()
