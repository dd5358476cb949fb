"""Pool the per-run lines of several bench.py / vs_nbits.py logs into one table of ranges (ratios of
medians to MatMulNBits without zero points; with --best, ratios of the fastest runs).

    python tables.py [--best] LOG...
"""
import re
import sys
from collections import defaultdict

best = "--best" in sys.argv
logs = [a for a in sys.argv[1:] if a != "--best"]
ratio, ms = defaultdict(list), defaultdict(list)
for f in logs:
    for line in open(f):
        m = re.match(r"(\d) thr (\d+x\d+)\s+(.+?)\s+([\d.]+) ms .* ([\d.]+)x MatMulNBits  best ([\d.]+)x", line)
        if m:
            k = (m[3].split(" (")[0], m[2], int(m[1]))
            ratio[k].append(float(m[6] if best else m[5]))
            ms[k].append(float(m[4]))
shapes = list(dict.fromkeys(k[1] for k in ratio))
for t in sorted({k[2] for k in ratio}):
    n = len(ratio[("MatMulNBits int4, no zero point", shapes[0], t)])
    print(f"\n| op, {t} thread(s), x MatMulNBits without zero points ({n} runs) | " + " | ".join(shapes) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for op in dict.fromkeys(k[0] for k in ratio):
        if op == "MatMulNBits int4, no zero point":
            continue
        print(f"| {op} | " + " | ".join(f"{min(ratio[(op, s, t)]):.2f}–{max(ratio[(op, s, t)]):.2f}x" for s in shapes) + " |")
    base = [ms[("MatMulNBits int4, no zero point", s, t)] for s in shapes]
    print("| MatMulNBits int4, no zero point (ms) | " + " | ".join(f"{min(v):.3f}–{max(v):.3f}" for v in base) + " |")
