"""The AVX2 activation quantizer of the tile ops against the portable one, bit for bit: K=32 (one
block); column k has code 1 at position k (output s*q[k]), column 32 has d=0, m=1 (output s*sum q).

    python quant_exact.py /abs/libq41.so /abs/libq41_portable.so   (the second built with -DQ41_FORCE_PORTABLE)
"""
import numpy as np, os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check
from check import session_tiles, pack_tiles
rng = np.random.default_rng(1)
K, N = 32, 33
codes = np.zeros((N, K), np.uint8); codes[np.arange(32), np.arange(32)] = 1
d = np.ones((N, 1), np.float32); m = np.zeros((N, 1), np.float32); d[32] = 0; m[32] = 1
ties = rng.integers(-253, 254, (500, K)) / 2  # with max |x| = 127, s = 1: x / s is an exact tie at .5
ties[:, 0] = 127
x = np.concatenate([rng.standard_normal((500, K)), ties, np.zeros((1, K)), rng.standard_normal((100, K)) * 1e30,
                    rng.standard_normal((100, K)) * 1e-30]).astype(np.float32)
x[-1, :] = 0; x[-1, 3] = -1.0
outs = []
for lib in sys.argv[1:3]:
    check.LIB = lib
    outs.append(session_tiles("MatMulQ41I8P8H", K, N, pack_tiles(codes, d, m, 8, True), 1).run(None, {"x": x})[0])
print("bit-identical:", np.array_equal(outs[0], outs[1]), " rows:", len(x))
assert np.array_equal(outs[0], outs[1])
