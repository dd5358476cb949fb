// Spike: exact-Q4_1 matmuls as an ONNX Runtime custom op library, built against Debian's 1.21
// headers, loaded into the pip wheel's onnxruntime. y[M,N] = x[M,K] . W^T with
// W[n,k] = d[n,b] * code + m[n,b] in blocks of 32 along K; each block's 16 bytes hold codes k..k+15
// in the low nibbles and k+16..k+31 in the high ones (llama.cpp's layout).
//   MatMulQ41:   float activations (exact to the dequantized weights)
//   MatMulQ41I8: activations quantized to int8 per block of 32 (scale max|x|/127), the block sums
//                applied with m inside the dot product, as llama.cpp's q4_1 x q8_1; AVX2 when the
//                CPU has it (chosen at run time), else portable C++. One output column per pass.
//   MatMulQ41I8x4: the same, four output columns per pass over an activation block.
//   MatMulQ41I8H:  the same with d and m in fp16, interleaved per block (input `dm`, uint16).
//   MatMulQ41I8P8 / MatMulQ41I8P4: the int8 path on weights prepacked by the exporter (check.py's
//                  pack_tiles) into one linear stream of 192-byte tiles per group of 8 (or 4) output
//                  columns; attribute N (the real width; the stream is padded to whole groups).
//   MatMulQ41I8P8H / MatMulQ41I8P4H: the same with d and m in fp16 (160-byte tiles).
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"
#include <immintrin.h>
#include <cmath>
#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

namespace {

struct Job {
  const float* x; const uint8_t* codes; const float* d; const float* m; float* y;
  int64_t M, K, N, blocks;
  const int8_t* qx; const float* sx; const float* sumx;  // int8 path: per row and block
};

inline int code(const uint8_t* blk, int i) { return i < 16 ? (blk[i] & 15) : (blk[i - 16] >> 4); }

void col_float(void* p, size_t n) {
  const Job& j = *static_cast<const Job*>(p);
  for (int64_t r = 0; r < j.M; ++r) {
    const float* xr = j.x + r * j.K;
    float acc = 0.f;
    for (int64_t b = 0; b < j.blocks; ++b) {
      const uint8_t* blk = j.codes + (n * j.blocks + b) * 16;
      float dot = 0.f, sum = 0.f;
      for (int i = 0; i < 32; ++i) { dot += xr[b * 32 + i] * float(code(blk, i)); sum += xr[b * 32 + i]; }
      acc += j.d[n * j.blocks + b] * dot + j.m[n * j.blocks + b] * sum;
    }
    j.y[r * j.N + n] = acc;
  }
}

void col_i8_portable(void* p, size_t n) {
  const Job& j = *static_cast<const Job*>(p);
  for (int64_t r = 0; r < j.M; ++r) {
    float acc = 0.f;
    for (int64_t b = 0; b < j.blocks; ++b) {
      const uint8_t* blk = j.codes + (n * j.blocks + b) * 16;
      const int8_t* q = j.qx + r * j.K + b * 32;
      int32_t dot = 0;
      for (int i = 0; i < 32; ++i) dot += code(blk, i) * int32_t(q[i]);
      acc += j.d[n * j.blocks + b] * j.sx[r * j.blocks + b] * float(dot) + j.m[n * j.blocks + b] * j.sumx[r * j.blocks + b];
    }
    j.y[r * j.N + n] = acc;
  }
}

__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

// One block: 32 4-bit codes x 32 int8 activations, as 8 float partial sums.
__attribute__((target("avx2,fma"))) inline __m256 block_dot(const uint8_t* blk, __m256i qx) {
  const __m128i low = _mm_set1_epi8(0x0F);
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
  __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(codes, qx), _mm256_set1_epi16(1)));
}

__attribute__((target("avx2,fma"))) void col_i8_avx2(void* p, size_t n) {
  const Job& j = *static_cast<const Job*>(p);
  for (int64_t r = 0; r < j.M; ++r) {
    __m256 acc = _mm256_setzero_ps();
    float acc_m = 0.f;
    const float* d = j.d + n * j.blocks;
    const float* m = j.m + n * j.blocks;
    const float* sx = j.sx + r * j.blocks;
    const float* sumx = j.sumx + r * j.blocks;
    const uint8_t* blk = j.codes + n * j.blocks * 16;
    const int8_t* q = j.qx + r * j.K;
    for (int64_t b = 0; b < j.blocks; ++b, blk += 16, q += 32) {
      __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * sx[b]), block_dot(blk, qx), acc);
      acc_m += m[b] * sumx[b];
    }
    j.y[r * j.N + n] = hsum(acc) + acc_m;
  }
}

// 4 output columns per pass: the block of quantized activations is loaded once for the four; the
// m x block-sum term is one SIMD dot per column after the loop.
__attribute__((target("avx2,fma"))) void col4_i8_avx2(void* p, size_t g) {
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * 4, nc = std::min<int64_t>(4, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    const float* sx = j.sx + r * j.blocks;
    const float* sumx = j.sumx + r * j.blocks;
    const int8_t* q = j.qx + r * j.K;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t b = 0; b < j.blocks; ++b) {
      __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * 32));
      for (int c = 0; c < 4; ++c) {
        if (c >= nc) break;
        const int64_t n = n0 + c;
        acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(j.d[n * j.blocks + b] * sx[b]), block_dot(j.codes + (n * j.blocks + b) * 16, qx),
                                 acc[c]);
      }
    }
    for (int c = 0; c < nc; ++c) {
      const float* m = j.m + (n0 + c) * j.blocks;
      __m256 am = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= j.blocks; b += 8) am = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(sumx + b), am);
      __m256 t = _mm256_add_ps(acc[c], am);
      float tail = 0.f;
      for (; b < j.blocks; ++b) tail += m[b] * sumx[b];
      j.y[r * j.N + n0 + c] = hsum(t) + tail;
    }
  }
}

struct Q8 {  // activations quantized per block of 32: codes, scale, and scale x sum of codes
  std::vector<int8_t> q;
  std::vector<float> s, sum;
};

Q8 quantize_blocks(const float* x, int64_t M, int64_t blocks) {
  Q8 a{std::vector<int8_t>(M * blocks * 32), std::vector<float>(M * blocks), std::vector<float>(M * blocks)};
  for (int64_t i = 0; i < M * blocks; ++i) {
    const float* v = x + i * 32;
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::fmax(amax, std::fabs(v[k]));
    const float s = amax / 127.f, inv = s > 0 ? 1.f / s : 0.f;
    int32_t total = 0;
    for (int k = 0; k < 32; ++k) { a.q[i * 32 + k] = int8_t(std::nearbyint(v[k] * inv)); total += a.q[i * 32 + k]; }
    a.s[i] = s; a.sum[i] = s * float(total);
  }
  return a;
}

bool has_avx2() {
#ifdef Q41_FORCE_PORTABLE  // -DQ41_FORCE_PORTABLE: check the portable loops on an AVX2 machine
  static const bool yes = false;
#else
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return yes;
}

void check_shapes(const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<float>& d, int64_t& M, int64_t& K,
                  int64_t& N, int64_t& blocks) {
  auto xs = x.Shape(), ds = d.Shape();
  K = xs.back(); M = x.NumberOfElement() / K; N = ds[0]; blocks = ds[1];
  if (blocks * 32 != K) ORT_CXX_API_THROW("MatMulQ41: the input width must be the blocks x 32", ORT_INVALID_ARGUMENT);
}

float* out(const Ort::Custom::Tensor<float>& x, int64_t N, Ort::Custom::Tensor<float>& y) {
  auto xs = x.Shape();
  std::vector<int64_t> ys(xs.begin(), xs.end());
  ys.back() = N;
  return y.Allocate(ys);
}

void MatMulQ41(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& codes,
               const Ort::Custom::Tensor<float>& d, const Ort::Custom::Tensor<float>& m, Ort::Custom::Tensor<float>& y) {
  int64_t M, K, N, blocks;
  check_shapes(x, d, M, K, N, blocks);
  Job j{x.Data(), codes.Data(), d.Data(), m.Data(), out(x, N, y), M, K, N, blocks, nullptr, nullptr, nullptr};
  Ort::KernelContext(context).ParallelFor(col_float, size_t(N), 0, &j);
}

// int8 activations; `Columns` output columns per pass over an activation block (1 or 4; AVX2 only,
// the portable loop otherwise).
template <int Columns>
void MatMulQ41I8(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& codes,
                 const Ort::Custom::Tensor<float>& d, const Ort::Custom::Tensor<float>& m, Ort::Custom::Tensor<float>& y) {
  int64_t M, K, N, blocks;
  check_shapes(x, d, M, K, N, blocks);
  const Q8 a = quantize_blocks(x.Data(), M, blocks);
  Job j{x.Data(), codes.Data(), d.Data(), m.Data(), out(x, N, y), M, K, N, blocks, a.q.data(), a.s.data(), a.sum.data()};
  Ort::KernelContext ctx(context);
  if (!has_avx2())
    ctx.ParallelFor(col_i8_portable, size_t(N), 0, &j);
  else if (Columns == 4)
    ctx.ParallelFor(col4_i8_avx2, size_t((N + 3) / 4), 0, &j);
  else
    ctx.ParallelFor(col_i8_avx2, size_t(N), 0, &j);
}

struct JobH {
  const uint8_t* codes; const uint16_t* dm; float* y;  // dm: (d, m) pairs in fp16 per block
  int64_t M, K, N, blocks; const int8_t* qx; const float* sx; const float* sumx;
};

__attribute__((target("avx2,fma,f16c"))) void col_i8h_avx2(void* p, size_t n) {
  const JobH& j = *static_cast<const JobH*>(p);
  for (int64_t r = 0; r < j.M; ++r) {
    __m256 acc = _mm256_setzero_ps();
    float acc_m = 0.f;
    const uint16_t* dm = j.dm + n * j.blocks * 2;
    const float* sx = j.sx + r * j.blocks;
    const float* sumx = j.sumx + r * j.blocks;
    const uint8_t* blk = j.codes + n * j.blocks * 16;
    const int8_t* q = j.qx + r * j.K;
    for (int64_t b = 0; b < j.blocks; ++b, blk += 16, q += 32) {
      __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(dm[2 * b]) * sx[b]), block_dot(blk, qx), acc);
      acc_m += _cvtsh_ss(dm[2 * b + 1]) * sumx[b];
    }
    j.y[r * j.N + n] = hsum(acc) + acc_m;
  }
}

void MatMulQ41I8H(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& codes,
                  const Ort::Custom::Tensor<uint16_t>& dm, Ort::Custom::Tensor<float>& y) {
  auto xs = x.Shape(), ds = dm.Shape();
  int64_t K = xs.back(), M = x.NumberOfElement() / K, N = ds[0], blocks = ds[1];
  std::vector<int64_t> ys(xs.begin(), xs.end());
  ys.back() = N;
  const Q8 a = quantize_blocks(x.Data(), M, blocks);
  JobH j{codes.Data(), dm.Data(), y.Allocate(ys), M, K, N, blocks, a.q.data(), a.s.data(), a.sum.data()};
  Ort::KernelContext(context).ParallelFor(col_i8h_avx2, size_t(N), 0, &j);
}

// ---- Prepacked tiles (MatMulQ41I8P8, MatMulQ41I8P4, and ...H with fp16 d, m) -------------------
// The weights are one uint8 tensor [groups, tiles, 192 (H: 160)], written by the exporter (check.py's
// pack_tiles); a group is G = 8 (or 4) output columns, padded with zero columns, and
// its tiles are read front to back, one linear stream. A tile is 4 x 32 bytes of codes, then 8 f32 d,
// then 8 f32 m. Each 32-byte "pair" holds the 16 code bytes (llama.cpp's nibble order) of two
// columns for one block, [X | Y], so one 256-bit load covers two columns; after maddubs,
// madd(hadd16(hadd16(v0, v1), hadd16(v2, v3)), 1) leaves the 8 block dots of the tile in 8 int32
// lanes, and one FMA applies d x s to all of them (8 columns x 1 block, or 4 columns x 2 blocks).
//   G = 8, tile = block b:    pair i = [col i | col i+4]                   lanes = cols 0..7
//   G = 4, tile = blocks 2t, 2t+1: pair 2j+i = [col i | col i+2] of block 2t+j
//                              lane h*4 + j*2 + i = col h*2+i of block 2t+j
// The per-lane activation scales s and s x sum(q) are expanded to the same lane order once per call.
// With fp16 d and m (MatMulQ41I8P8H / P4H: GGUF's own Q4_1 scale type, so still exact) the tile is
// 128 + 16 + 16 = 160 bytes, 20 per block and column as MatMulNBits without zero points.
#ifndef Q41_PREFETCH
#define Q41_PREFETCH 2560  // 16 tiles of 160 bytes: best of 640..10240 on this machine (DRAM-resident weights)
#endif
#ifndef Q41_NUM_BATCH
#define Q41_NUM_BATCH 0
#endif
template <bool H> constexpr int tile_bytes() { return H ? 160 : 192; }

struct TileJob {
  const uint8_t* w; float* y;
  int64_t M, N, tiles, qstride;     // qstride: int8 activations per row (padded blocks x 32)
  const int8_t* qx; const float* s8; const float* sum8;  // s8, sum8: [M, tiles, 8] in lane order
};

// One block of 32 activations -> int8 codes, scale s = max|x| / 127, and the sum of the codes.
inline int32_t quantize_block(const float* v, int8_t* qb, float& s) {
  float amax = 0.f;
  for (int k = 0; k < 32; ++k) amax = std::fmax(amax, std::fabs(v[k]));
  s = amax / 127.f;
  const float inv = s > 0 ? 1.f / s : 0.f;
  int32_t total = 0;
  for (int k = 0; k < 32; ++k) { qb[k] = int8_t(std::nearbyint(v[k] * inv)); total += qb[k]; }
  return total;
}

// The same, bit for bit (round half to even, as nearbyint in the default rounding mode).
__attribute__((target("avx2,fma"))) inline int32_t quantize_block_avx2(const float* v, int8_t* qb, float& s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 x[4], amax = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) { x[i] = _mm256_loadu_ps(v + 8 * i); amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, x[i])); }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  s = _mm_cvtss_f32(m) / 127.f;
  const __m256 inv = _mm256_set1_ps(s > 0 ? 1.f / s : 0.f);
  __m256i qi[4];
  for (int i = 0; i < 4; ++i)
    qi[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(x[i], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
  // pack to int8 (values are within -127..127): packs works per 128-bit lane, so fix the order after
  const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), b);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

template <int G>
struct TileAct {  // int8 activations, padded to whole tiles, with s and s x sum expanded per lane
  std::vector<int8_t> q; std::vector<float> s8, sum8; int64_t tiles, qstride;
  TileAct(const float* x, int64_t M, int64_t K) {
    const int64_t blocks = K / 32, bpt = G == 4 ? 2 : 1;
    tiles = (blocks + bpt - 1) / bpt; qstride = tiles * bpt * 32;
    q.assign(M * qstride, 0); s8.assign(M * tiles * 8, 0.f); sum8.assign(M * tiles * 8, 0.f);
    for (int64_t r = 0; r < M; ++r)
      for (int64_t b = 0; b < blocks; ++b) {
        const float* v = x + r * K + b * 32;
        int8_t* qb = q.data() + r * qstride + b * 32;
        float s;
        const int32_t total = has_avx2() ? quantize_block_avx2(v, qb, s) : quantize_block(v, qb, s);
        const int64_t t = b / bpt, j = b % bpt;
        for (int lane = 0; lane < 8; ++lane)
          if (G == 8 || ((lane >> 1) & 1) == j) {
            s8[(r * tiles + t) * 8 + lane] = s;
            sum8[(r * tiles + t) * 8 + lane] = s * float(total);
          }
      }
  }
};

// lane -> (column in group, block within tile)
template <int G> inline int lane_col(int lane) { return G == 8 ? lane : (lane >> 2) * 2 + (lane & 1); }
template <int G> inline int lane_blk(int lane) { return G == 8 ? 0 : (lane >> 1) & 1; }
// pair p, half h -> (column in group, block within tile)
template <int G> inline int pair_col(int p, int h) { return G == 8 ? p + 4 * h : (p & 1) + 2 * h; }
template <int G> inline int pair_blk(int p) { return G == 8 ? 0 : p >> 1; }

inline float half_to_float(uint16_t h) {  // exact (fp16 -> fp32)
  const uint32_t sign = uint32_t(h >> 15) << 31, e = (h >> 10) & 31, f = h & 1023;
  float v = e == 0 ? std::ldexp(float(f), -24) : e == 31 ? (f ? NAN : INFINITY) : std::ldexp(float(f | 1024), int(e) - 25);
  uint32_t bits; std::memcpy(&bits, &v, 4); bits |= sign; std::memcpy(&v, &bits, 4);
  return v;
}

template <int G, bool H>
void tiles_portable(void* p, size_t g) {
  constexpr int kTile = tile_bytes<H>();
  const TileJob& j = *static_cast<const TileJob*>(p);
  const int64_t n0 = int64_t(g) * G, nc = std::min<int64_t>(G, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    float acc[G] = {};
    for (int64_t t = 0; t < j.tiles; ++t) {
      const uint8_t* tile = j.w + (int64_t(g) * j.tiles + t) * kTile;
      int32_t dot[8] = {};
      for (int pr = 0; pr < 4; ++pr)
        for (int h = 0; h < 2; ++h) {
          const uint8_t* blk = tile + pr * 32 + h * 16;
          const int8_t* q = j.qx + r * j.qstride + (t * (G == 4 ? 2 : 1) + pair_blk<G>(pr)) * 32;
          int32_t s = 0;
          for (int i = 0; i < 32; ++i) s += code(blk, i) * int32_t(q[i]);
          for (int lane = 0; lane < 8; ++lane)
            if (lane_col<G>(lane) == pair_col<G>(pr, h) && lane_blk<G>(lane) == pair_blk<G>(pr)) dot[lane] = s;
        }
      float d[8], m[8];
      if (H) {
        uint16_t dh[8], mh[8];
        std::memcpy(dh, tile + 128, 16); std::memcpy(mh, tile + 144, 16);
        for (int lane = 0; lane < 8; ++lane) { d[lane] = half_to_float(dh[lane]); m[lane] = half_to_float(mh[lane]); }
      } else {
        std::memcpy(d, tile + 128, 32); std::memcpy(m, tile + 160, 32);
      }
      const float* s8 = j.s8 + (r * j.tiles + t) * 8;
      const float* sum8 = j.sum8 + (r * j.tiles + t) * 8;
      for (int lane = 0; lane < 8; ++lane) acc[lane_col<G>(lane)] += float(dot[lane]) * (d[lane] * s8[lane]) + m[lane] * sum8[lane];
    }
    for (int c = 0; c < nc; ++c) j.y[r * j.N + n0 + c] = acc[c];
  }
}

// 32 bytes of codes (two columns' blocks) x the two halves of their activation blocks -> 16 int16,
// each the sum of 4 products (|.| <= 4 x 15 x 127 = 7620): [X | Y], 8 partial dots per column.
__attribute__((target("avx2,fma"))) inline __m256i pair_dot(const uint8_t* p, __m256i qlo, __m256i qhi) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
  return _mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo), _mm256_maddubs_epi16(hi, qhi));
}

template <bool H> __attribute__((target("avx2,fma,f16c"))) inline __m256 tile_d(const uint8_t* tile) {
  return H ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 128)))
           : _mm256_loadu_ps(reinterpret_cast<const float*>(tile + 128));
}
template <bool H> __attribute__((target("avx2,fma,f16c"))) inline __m256 tile_m(const uint8_t* tile) {
  return H ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 144)))
           : _mm256_loadu_ps(reinterpret_cast<const float*>(tile + 160));
}

template <int G, bool H>
__attribute__((target("avx2,fma,f16c"))) void tiles_avx2(void* p, size_t g) {
  constexpr int kTile = tile_bytes<H>();
  const TileJob& j = *static_cast<const TileJob*>(p);
  const int64_t n0 = int64_t(g) * G, nc = std::min<int64_t>(G, j.N - n0);
  constexpr int64_t qstep = G == 4 ? 64 : 32, q2 = G == 4 ? 32 : 0;  // activations per tile; 2nd block
  for (int64_t r = 0; r < j.M; ++r) {
    const uint8_t* tile = j.w + int64_t(g) * j.tiles * kTile;
    const int8_t* q = j.qx + r * j.qstride;
    const float* s8 = j.s8 + r * j.tiles * 8;
    const float* sum8 = j.sum8 + r * j.tiles * 8;
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t t = 0; t < j.tiles; ++t, tile += kTile, q += qstep, s8 += 8, sum8 += 8) {
#if Q41_PREFETCH  // software prefetch Q41_PREFETCH bytes ahead in the stream (-DQ41_PREFETCH=0: off)
      _mm_prefetch(reinterpret_cast<const char*>(tile + Q41_PREFETCH), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(tile + Q41_PREFETCH + 64), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(tile + Q41_PREFETCH + 128), _MM_HINT_T0);
#endif
      const __m256i qlo0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m256i qhi0 = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      const __m256i qlo1 = G == 4 ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + q2))) : qlo0;
      const __m256i qhi1 = G == 4 ? _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + q2 + 16))) : qhi0;
      const __m256i v0 = pair_dot(tile, qlo0, qhi0), v1 = pair_dot(tile + 32, qlo0, qhi0);
      const __m256i v2 = pair_dot(tile + 64, qlo1, qhi1), v3 = pair_dot(tile + 96, qlo1, qhi1);
      // two rounds of int16 pair sums stay exact (|.| <= 4 x 7620 = 30480 < 32768), then one madd to int32
      const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(v0, v1), _mm256_hadd_epi16(v2, v3));
      const __m256 dots = _mm256_cvtepi32_ps(_mm256_madd_epi16(h, _mm256_set1_epi16(1)));
      const __m256 ds = _mm256_mul_ps(tile_d<H>(tile), _mm256_loadu_ps(s8));
      acc = _mm256_fmadd_ps(dots, ds, acc);
      accm = _mm256_fmadd_ps(tile_m<H>(tile), _mm256_loadu_ps(sum8), accm);
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_add_ps(acc, accm));
    float* y = j.y + r * j.N + n0;
    if (G == 8) {
      for (int c = 0; c < nc; ++c) y[c] = out[c];
    } else {
      const float yc[4] = {out[0] + out[2], out[1] + out[3], out[4] + out[6], out[5] + out[7]};
      for (int c = 0; c < nc; ++c) y[c] = yc[c];
    }
  }
}

template <int G, bool H>
struct MatMulQ41I8P {
  static constexpr int kTile = tile_bytes<H>();
  MatMulQ41I8P(const OrtApi*, const OrtKernelInfo* info) : N(Ort::ConstKernelInfo(info).GetAttribute<int64_t>("N")) {}
  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& w,
               Ort::Custom::Tensor<float>& y) {
    auto xs = x.Shape(), ws = w.Shape();
    const int64_t K = xs.back(), M = x.NumberOfElement() / K, groups = (N + G - 1) / G;
    const TileAct<G> a(x.Data(), M, K);
    if (K % 32 || ws.size() != 3 || ws[0] != groups || ws[1] != a.tiles || ws[2] != kTile)
      ORT_CXX_API_THROW("MatMulQ41I8P: weights must be [ceil(N/G), tiles, 192 (160 with fp16 d, m)] for input width K (a multiple of 32)",
                        ORT_INVALID_ARGUMENT);
    std::vector<int64_t> ys(xs.begin(), xs.end());
    ys.back() = N;
    TileJob j{w.Data(), y.Allocate(ys), M, N, a.tiles, a.qstride, a.q.data(), a.s8.data(), a.sum8.data()};
    // num_batch 0: ORT's SimpleParallelFor claims groups one at a time from per-thread shards;
    // -DQ41_NUM_BATCH=n: n contiguous ranges of groups instead (TryBatchParallelFor)
    Ort::KernelContext(context).ParallelFor(has_avx2() && __builtin_cpu_supports("f16c") ? tiles_avx2<G, H> : tiles_portable<G, H>,
                                            size_t(groups), std::min<size_t>(Q41_NUM_BATCH, size_t(groups)), &j);
  }
  int64_t N;
};

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  using Op = std::unique_ptr<Ort::Custom::OrtLiteCustomOp>;
  static Op f32{Ort::Custom::CreateLiteCustomOp("MatMulQ41", "CPUExecutionProvider", MatMulQ41)};
  static Op i8{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8", "CPUExecutionProvider", MatMulQ41I8<1>)};
  static Op i8x4{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8x4", "CPUExecutionProvider", MatMulQ41I8<4>)};
  static Op i8h{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8H", "CPUExecutionProvider", MatMulQ41I8H)};
  static Op p8{Ort::Custom::CreateLiteCustomOp<MatMulQ41I8P<8, false>>("MatMulQ41I8P8", "CPUExecutionProvider")};
  static Op p4{Ort::Custom::CreateLiteCustomOp<MatMulQ41I8P<4, false>>("MatMulQ41I8P4", "CPUExecutionProvider")};
  static Op p8h{Ort::Custom::CreateLiteCustomOp<MatMulQ41I8P<8, true>>("MatMulQ41I8P8H", "CPUExecutionProvider")};
  static Op p4h{Ort::Custom::CreateLiteCustomOp<MatMulQ41I8P<4, true>>("MatMulQ41I8P4H", "CPUExecutionProvider")};
  static Ort::CustomOpDomain domain{nullptr};
  static std::once_flag once;
  try {
    std::call_once(once, [] { domain = Ort::CustomOpDomain{"edgelora"}; domain.Add(f32.get()); domain.Add(i8.get()); domain.Add(i8x4.get());
                            domain.Add(i8h.get()); domain.Add(p8.get()); domain.Add(p4.get());
                            domain.Add(p8h.get()); domain.Add(p4h.get()); });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
