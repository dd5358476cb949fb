"""Repeat vs_nbits.py over shapes and thread counts, rounds outermost (so every shape and thread count
is spread over the whole run), and print each op's range of ratios to MatMulNBits without zero points.

    Q41_LIB=libq41.so python bench.py ROUNDS [OPS [THREADS]]   (OPS as for vs_nbits.py; THREADS e.g. 1,2)
"""
import os
import re
import subprocess
import sys
from collections import defaultdict

rounds = int(sys.argv[1])
ops = sys.argv[2] if len(sys.argv) > 2 else "i8,p8,p4,p8h,p4h,zp"
thread_counts = [int(t) for t in sys.argv[3].split(",")] if len(sys.argv) > 3 else [1, 2]
shapes = [(576, 1536, 200), (1536, 576, 200), (576, 49152, 40), (2048, 8192, 40)]
here = os.path.dirname(os.path.abspath(__file__))
ratios, best, base_ms = defaultdict(list), defaultdict(list), defaultdict(list)
for r in range(rounds):
    for K, N, it in shapes:
        for threads in thread_counts:
            out = subprocess.run([sys.executable, os.path.join(here, "vs_nbits.py"), str(threads), str(K), str(N), str(it), ops],
                                 check=True, capture_output=True, text=True).stdout
            print(f"round {r}\n{out}", end="", flush=True)
            for line in out.splitlines():
                m = re.match(r"(\d) thr (\d+x\d+)\s+(.+?)\s+([\d.]+) ms .* ([\d.]+)x MatMulNBits  best ([\d.]+)x", line)
                ratios[(m[3], m[2], threads)].append(float(m[5]))
                best[(m[3], m[2], threads)].append(float(m[6]))
                if "no zero point" in m[3]:
                    base_ms[(m[2], threads)].append(float(m[4]))
cols = [(f"{K}x{N}", t) for K, N, _ in shapes for t in thread_counts]
for what, table in (("medians", ratios), ("fastest runs", best)):
    print(f"\n| op, x MatMulNBits without zero points ({what}, range of {rounds} runs) | " + " | ".join(f"{s} {t} thr" for s, t in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in dict.fromkeys(k[0] for k in table):
        if "no zero point" in name:
            continue
        cells = [table[(name, s, t)] for s, t in cols]
        print(f"| {name} | " + " | ".join(f"{min(v):.2f}–{max(v):.2f}x" for v in cells) + " |")
print("| MatMulNBits int4, no zero point | " + " | ".join(f"{min(base_ms[c]):.3f}–{max(base_ms[c]):.3f} ms" for c in cols) + " |")
