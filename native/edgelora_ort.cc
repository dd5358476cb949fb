// edgelora's ONNX Runtime operators (domain "edgelora"), loaded with
// SessionOptions.register_custom_ops_library. Built by scripts/env.sh against ONNX Runtime's C API
// headers (any version from 1.21: the library asks the runtime for the API version it was built with).
//
// MatMulQ41(x, w[, lora_a, lora_b][, bias][, lora_b1[, lora_b2]]) -> y (a bias of 0 values: none), attributes N and accuracy_level
// (as MatMulNBits': 4, the default, int8 activations; 0 float activations, a slow exact reference for tests),
// activation (below) and bits: 4, the default, for Q4_1; 6 for a 6-bit weight (the LM head's, 23 MB where
// 8 bits read 30: its tiles further down)
//   y[M, N] = x[M, K] . W^T (+ (x . lora_a) . lora_b) (+ bias), W exact Q4_1: W[n, k] = d * code + m
//   per block of 32 along K, with d and m in fp16 (GGUF's own Q4_1 types, so GGUF weights stay exact).
//   The activations are quantized to int8 per block of 32 (scale max|x| / 127) and the block sums
//   times m enter the dot product, as llama.cpp's q4_1 x q8_1 does.
//   The adapter is added in the same pass, so an active adapter costs no extra node: lora_a [K, r],
//   and either lora_b [r, N] or, for a node computing several projections side by side (q|k|v),
//   one B per projection: lora_b [r0, N0], lora_b1 [r1, N1], lora_b2 [r2, N2] with N0 + N1 + N2 = N
//   and r0 + r1 + r2 = r (projection i's columns take xa[r0 + .. + r(i-1) ...] . B_i), so no zeros of
//   a block-diagonal B are stored or read. A B may also come in tiles of 8 columns, [N_i / 8, r_i, 8]
//   (the rows of one group of output columns side by side, so the pass over a group reads one run of
//   memory instead of r_i strided ones: measurably faster). r = 0: no adapter. The adapter is
//   float32, float16 or 8-bit (its bytes are the active adapter's cost per token); x, y and the bias
//   are float32. An 8-bit adapter comes as uint8: lora_a [r, K/32, 34], per rank and block of 32
//   along K an fp16 scale then 32 int8 codes (GGUF's Q8_0 block), dotted with the activations' own
//   int8 blocks; each lora_b in tiles [N_i / 8, r_i + 2, 8]: r_i rows of the tile's 8 columns' int8
//   codes, then the 8 columns' fp16 scales (one per output column, over its r_i codes).
//   With attribute lora_slot, lora_a is instead the graph's adapter pack (uint8 [bytes], below
//   unpack_entry), every node's adapter tensors in one input, and lora_b is empty: the node reads
//   entry lora_slot, whose tensors are those above in any of the three types; an empty pack: none.
//
// w is written by the exporter (converters/q41.py: pack) as uint8 [ceil(N/8), K/32, 160]: one
// linear stream of 160-byte tiles per group of 8 output columns (the last group padded with zero
// columns). A tile is one block of the group's 8 columns: 4 "pairs" of 32 code bytes, then 8 fp16 d,
// then 8 fp16 m. Pair i holds the 16 code bytes of column i then those of column i + 4, each block in
// llama.cpp's nibble order (codes 0..15 in the low nibbles, 16..31 in the high). One 256-bit load
// covers two columns; after maddubs, madd(hadd16(hadd16(v0, v1), hadd16(v2, v3)), 1) leaves the 8
// block dots of the tile in 8 int32 lanes in column order, and one FMA applies d x s to all of them.
//
// bits = 6: W[n, k] = d * (code - 32), codes 0..63 (the block's signed extreme at code 0, as llama.cpp's
// Q4_0 and Q5_0 place theirs), in 208-byte tiles: the low nibbles exactly as above (128 bytes), then 4
// pairs of 16 bytes holding the two high bits of each code (pair i's byte e: column i's codes e and
// e + 16 at bits 0-1 and 4-5, column i + 4's at bits 2-3 and 6-7), then the 8 columns' fp16 d.
//
// Kernels, chosen at run time from the CPU's features: on x86-64 AVX-512 VNNI for the weight dots
// (q41_avx512.cc, built when scripts/native.sh has SIMDe's headers) with the AVX2 code for the rest,
// or AVX2+FMA+F16C; NEON with the dot product on arm64 (ARMv8.2+); portable C++ otherwise
// (EDGELORA_Q41_KERNEL=portable or avx2 holds the choice back, to test a kernel on a machine with a
// better one). Threads: ORT's intra-op pool, over groups of columns.
#define ORT_API_MANUAL_INIT
#include "onnxruntime_cxx_api.h"
#include "onnxruntime_lite_custom_op.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define EDGELORA_X86 1
#elif defined(__aarch64__)
#include <arm_neon.h>
#include <sys/auxv.h>
#define EDGELORA_ARM64 1
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)
#endif
#endif
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <unistd.h>

namespace {

constexpr int kBlock = 32, kGroup = 8, kTile = 160, kQ8 = 34;  // kQ8: an 8-bit lora_a block (fp16 scale, 32 codes)
constexpr int kTile6 = 208, kHigh6 = 128, kD6 = 192;  // a 6-bit tile: its high-bit planes and its scales' offsets
constexpr int kRanks = 8;  // ranks per xa task of a decode step (the SIMD loops take 8 at a time)
constexpr int64_t kNextLines = 1024;  // the next adapted node's lora_a lines a pass asks for, at most (64 KB)
constexpr int64_t kXaHere = 256;  // xa values a node keeps on its stack (a decode step's rows x ranks)
constexpr int kPrefetch = 2560;  // 16 tiles ahead: the best of 640..10240 bytes on a 2-core EPYC (DRAM-resident weights)

// EDGELORA_Q41_KERNEL=portable (or avx2) holds the kernel back to that one, to test it on a machine that
// has a better one; otherwise the best the CPU has.
bool held_to(const char* name) {
  const char* c = std::getenv("EDGELORA_Q41_KERNEL");
  return c && !std::strcmp(c, name);
}

bool use_simd() {  // AVX2 (the AVX-512 kernel needs it too) or NEON with the dot product
#if defined(EDGELORA_X86)
  static const bool yes = !held_to("portable") && __builtin_cpu_supports("avx2") &&
                          __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#elif defined(EDGELORA_ARM64)  // the dot product instructions (ARMv8.2 and later: Pi 5, phones; not the Pi 4)
  static const bool yes = !held_to("portable") && (getauxval(AT_HWCAP) & HWCAP_ASIMDDP);
#else
  static const bool yes = false;
#endif
  return yes;
}

#if defined(EDGELORA_X86) && defined(EDGELORA_AVX512)
extern "C" void edgelora_q41_dots_avx512(const uint8_t* tile, const int8_t* q, const float* s, const float* sum,
                                         int64_t blocks, float* out);
#endif

#if defined(EDGELORA_X86)
bool use_avx512() {  // AVX-512 with VNNI (Ice Lake and later, Zen 4 and later), in a build that has the kernel
#if defined(EDGELORA_AVX512_EMULATED)  // SIMDe's portable lanes: any AVX2 machine
  static const bool yes = use_simd() && !held_to("avx2");
#elif defined(EDGELORA_AVX512)
  static const bool yes = use_simd() && !held_to("avx2") && __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                          __builtin_cpu_supports("avx512vnni");
#else
  static const bool yes = false;
#endif
  return yes;
}
#endif

const char* simd_name() {
#if defined(EDGELORA_X86) && defined(EDGELORA_AVX512_EMULATED)
  if (use_avx512()) return "avx512vnni-emulated";
#endif
#if defined(EDGELORA_X86)
  return use_avx512() ? "avx512vnni" : use_simd() ? "avx2" : "portable";
#elif defined(EDGELORA_ARM64)
  return use_simd() ? "neon-dotprod" : "portable";
#else
  return "portable";
#endif
}

// Activations: int8 codes per block of 32, the block's scale s and s x (sum of its codes).
struct Act {
  std::vector<int8_t> q;
  std::vector<float> s, sum;
  int64_t blocks;
};

inline int32_t quantize_block(const float* v, int8_t* qb, float& s) {
  float amax = 0.f;
  for (int k = 0; k < kBlock; ++k) amax = std::fmax(amax, std::fabs(v[k]));
  s = amax / 127.f;
  const float inv = s > 0 ? 1.f / s : 0.f;
  int32_t total = 0;
  for (int k = 0; k < kBlock; ++k) { qb[k] = int8_t(std::nearbyint(v[k] * inv)); total += qb[k]; }
  return total;
}

#ifdef EDGELORA_X86
// The same, bit for bit (round half to even, as nearbyint in the default rounding mode).
__attribute__((target("avx2,fma"))) int32_t quantize_block_avx2(const float* v, int8_t* qb, float& s) {
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
  // packs works within 128-bit lanes: put the bytes back in order after
  const __m256i w01 = _mm256_packs_epi32(qi[0], qi[1]), w23 = _mm256_packs_epi32(qi[2], qi[3]);
  const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), b);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}
#endif

Act quantize(const float* x, int64_t M, int64_t K) {
  Act a{std::vector<int8_t>(M * K), std::vector<float>(M * K / kBlock), std::vector<float>(M * K / kBlock), K / kBlock};
  for (int64_t i = 0; i < M * a.blocks; ++i) {
    float s;
#ifdef EDGELORA_X86
    const int32_t total = use_simd() ? quantize_block_avx2(x + i * kBlock, a.q.data() + i * kBlock, s)
                                     : quantize_block(x + i * kBlock, a.q.data() + i * kBlock, s);
#else
    const int32_t total = quantize_block(x + i * kBlock, a.q.data() + i * kBlock, s);
#endif
    a.s[i] = s;
    a.sum[i] = s * float(total);
  }
  return a;
}

constexpr int kMaxSeg = 3;

// What the adapter's tensors hold.
enum class Lt { F32, F16, Q8 };

// A gated MLP's activation, applied to the gate half of the node's output and multiplied by the up half.
enum class Act_fn { None, Silu, GeluTanh };

inline float activate(Act_fn f, float g) {
  if (f == Act_fn::Silu) return g / (1.f + std::exp(-g));
  return 0.5f * g * (1.f + std::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)));  // GeluTanh
}

float half_to_float(uint16_t h);

inline float load1(const void* p, bool half, int64_t i) {
  return half ? half_to_float(static_cast<const uint16_t*>(p)[i]) : static_cast<const float*>(p)[i];
}

// Output columns [n0, n1) take xa[r0 : r0 + rank] . b, b [rank, n1 - n0] or, tiled, [(n1 - n0) / 8,
// rank, 8] (float or fp16), or 8-bit tiles [(n1 - n0) / 8, rank + 2, 8].
struct Seg {
  int64_t n0, n1, r0, rank; const void* b; bool tiled;
  int64_t at(int64_t i, int64_t c) const { return tiled ? ((c >> 3) * rank + i) * 8 + (c & 7) : i * (n1 - n0) + c; }
  const int8_t* q8_tile(int64_t c) const { return static_cast<const int8_t*>(b) + (c >> 3) * (rank + 2) * 8; }
  float value(int64_t i, int64_t c, Lt lt) const {  // element (i, c) of b
    if (lt != Lt::Q8) return load1(b, lt == Lt::F16, at(i, c));
    const int8_t* t = q8_tile(c);
    uint16_t d;
    std::memcpy(&d, t + rank * 8 + 2 * (c & 7), 2);
    return float(t[i * 8 + (c & 7)]) * half_to_float(d);
  }
};

struct Job {
  const uint8_t* w; float* y; int64_t M, N, K, blocks;
  int bits = 4; int64_t tile = kTile;  // the weight's tiles: Q4_1 (160 bytes) or 6-bit (208)
  const Act* a;
  const float* bias;
  const float* x;
  const void* lora_a; Lt lt; int64_t rank;  // lora_a [K, rank] float or fp16, or 8-bit [rank, K / 32, 34]
  float* xa;                                 // [M, rank] = x . lora_a
  Seg seg[kMaxSeg]; int nseg;
  // A decode step computes xa in the same parallel pass as the weights, in chunks of kRanks ranks
  // (xa_chunks of them) that the pass's first tasks claim; a group needs xa only to add the adapter,
  // after its own weight dots, and then claims what is left itself before it waits for the chunks
  // other threads are computing (so no order of the pool's tasks can leave it waiting on nothing).
  struct Chunks { std::atomic<int64_t> next{0}, done{0}; };
  int64_t xa_chunks = 0; Chunks* chunks = nullptr;
  // The next node's lora_a in the adapter pack, whose lines the pass's group tasks ask the cache for, a
  // few each (lines_per_task), so that node finds them at hand: read once a step in short rows that
  // the hardware's prefetchers barely start on, they cost a decode step more in waiting for memory (a
  // line at a time, the pass's other threads waiting on xa) than in bytes (issue 12: ~0.1 ms of a rank-8
  // adapter's ~0.35 ms a token at 135M, 2 threads). Asking for them all at the node's start stalls
  // that thread on the cache's few line fill buffers instead. Only where the node's weights fit in L2
  // (l2_bytes): a larger pass evicts the lines again before the next node runs.
  const char* next_a = nullptr; int64_t next_lines = 0, lines_per_task = 0;
  void (*group)(void*, size_t) = nullptr;  // the weight kernel of the pass's other tasks
  // A gated MLP's gate|up node (attribute activation): y is scratch [M, N], the node's output out
  // [M, N / 2] = act(gate) * up, each task taking group g of the gate and its partner of the up half.
  Act_fn act = Act_fn::None; float* out = nullptr;
  bool half() const { return lt == Lt::F16; }
};

void wait_xa(const Job& j);  // xa complete (a no-op outside a decode step's pass)

// The core's L2 in bytes (1 MB where the system does not say). A pass that streams more weights than
// this through it has evicted the next node's lora_a lines again by the time that node reads them:
// asking for them then costs a decode step more than it saves (issue 12, 1B shape: 0.945x with the
// lines asked for, 0.964x without, 2 threads; at 135M, whose nodes' weights fit, 0.956x against 0.942x).
int64_t l2_bytes() {
  static const int64_t n = [] {
    long v = 0;
#ifdef _SC_LEVEL2_CACHE_SIZE
    v = sysconf(_SC_LEVEL2_CACHE_SIZE);
#endif
    return v > 0 ? int64_t(v) : int64_t(1) << 20;
  }();
  return n;
}

// The adapter's and the bias's share of output column n for row r.
inline float extra(const Job& j, int64_t r, int64_t n) {
  wait_xa(j);
  float v = j.bias ? j.bias[n] : 0.f;
  for (int s = 0; s < j.nseg; ++s) {
    const Seg& g = j.seg[s];
    if (n < g.n0 || n >= g.n1) continue;
    const float* xa = j.xa + r * j.rank + g.r0;
    for (int64_t i = 0; i < g.rank; ++i) v += xa[i] * g.value(i, n - g.n0, j.lt);
  }
  return v;
}

// The segment holding all of columns [n, n + kGroup) (one tile, if tiled), or none.
inline const Seg* whole(const Job& j, int64_t n) {
  for (int s = 0; s < j.nseg; ++s) {
    const Seg& g = j.seg[s];
    if (g.n0 <= n && n + kGroup <= g.n1 && (!g.tiled || (n - g.n0) % kGroup == 0)) return &g;
  }
  return nullptr;
}

float half_to_float(uint16_t h) {  // exact
  const uint32_t sign = uint32_t(h >> 15) << 31, e = (h >> 10) & 31, f = h & 1023;
  float v = e == 0 ? std::ldexp(float(f), -24) : e == 31 ? (f ? NAN : INFINITY) : std::ldexp(float(f | 1024), int(e) - 25);
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

inline int code(const uint8_t* blk, int i) { return i < 16 ? (blk[i] & 15) : (blk[i - 16] >> 4); }

// Code i of column c's block in a tile of either kind: a 6-bit code is the Q4_1 layout's nibble plus
// two high bits from the pair's 16-byte plane (byte e: column c's codes e and e + 16, column c + 4's,
// at bits 0-1, 4-5 and 2-3, 6-7).
inline int code_at(const uint8_t* tile, int c, int i, int bits) {
  const int nibble = code(tile + (c & 3) * 32 + (c >> 2) * 16, i);
  if (bits == 4) return nibble;
  const int shift = 2 * (c >> 2) + (i < 16 ? 0 : 4);
  return nibble | (((tile[kHigh6 + (c & 3) * 16 + (i & 15)] >> shift) & 3) << 4);
}

// Column c's d and m in a tile (a 6-bit code is symmetric about 32: m = -32 d).
inline void scales_at(const uint8_t* tile, int c, int bits, float& d, float& m) {
  uint16_t h;
  std::memcpy(&h, tile + (bits == 4 ? 128 : kD6) + 2 * c, 2);
  d = half_to_float(h);
  if (bits == 4) std::memcpy(&h, tile + 144 + 2 * c, 2);
  m = bits == 4 ? half_to_float(h) : -32.f * d;
}

void group_portable(void* p, size_t g) {
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * kGroup, nc = std::min<int64_t>(kGroup, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    float acc[kGroup] = {};
    const uint8_t* tile = j.w + int64_t(g) * j.blocks * j.tile;
    for (int64_t b = 0; b < j.blocks; ++b, tile += j.tile) {
      const int8_t* q = j.a->q.data() + (r * j.blocks + b) * kBlock;
      const float s = j.a->s[r * j.blocks + b], sum = j.a->sum[r * j.blocks + b];
      for (int c = 0; c < kGroup; ++c) {
        int32_t dot = 0;
        for (int i = 0; i < kBlock; ++i) dot += code_at(tile, c, i, j.bits) * int32_t(q[i]);
        float d, m;
        scales_at(tile, c, j.bits, d, m);
        acc[c] += float(dot) * (d * s) + m * sum;
      }
    }
    for (int64_t c = 0; c < nc; ++c) j.y[r * j.N + n0 + c] = acc[c] + extra(j, r, n0 + c);
  }
}

#ifdef EDGELORA_X86
// 32 code bytes (two columns' blocks) x the two halves of the activation block -> 16 int16, each a
// sum of 4 products (|.| <= 4 x 15 x 127 = 7620).
__attribute__((target("avx2,fma"))) inline __m256i pair_dot(const uint8_t* p, __m256i qlo, __m256i qhi) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low);
  return _mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo), _mm256_maddubs_epi16(hi, qhi));
}

// 8 consecutive adapter values from element i, widened to float.
__attribute__((target("avx2,f16c"))) inline __m256 load8(const void* p, bool half, int64_t i) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)))
              : _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

// 8 int8 codes widened to float.
__attribute__((target("avx2"))) inline __m256 load8_q8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// Row r of the group of columns [n0, n0 + nc), from their weight dots: the bias and the adapter added, stored.
__attribute__((target("avx2,fma,f16c"))) void finish_avx2(const Job& j, int64_t r, int64_t n0, int64_t nc, __m256 acc) {
  wait_xa(j);
  float* y = j.y + r * j.N + n0;
  const Seg* sg = nc == kGroup ? whole(j, n0) : nullptr;
  if (nc == kGroup && (sg || j.rank == 0)) {
    if (j.bias) acc = _mm256_add_ps(acc, _mm256_loadu_ps(j.bias + n0));
    // the adapter: four independent chains of FMAs (one chain would wait on each FMA's latency)
    __m256 part[4] = {acc, _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    if (sg && sg->rank && j.lt == Lt::Q8) {  // the codes' sums, then times the columns' scales
      const float* xa = j.xa + r * j.rank + sg->r0;
      const int8_t* t = sg->q8_tile(n0 - sg->n0);
      __m256 lo[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t i = 0;
      for (; i + 4 <= sg->rank; i += 4)
        for (int u = 0; u < 4; ++u) lo[u] = _mm256_fmadd_ps(_mm256_broadcast_ss(xa + i + u), load8_q8(t + 8 * (i + u)), lo[u]);
      for (; i < sg->rank; ++i) lo[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(xa + i), load8_q8(t + 8 * i), lo[0]);
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t + sg->rank * 8)));
      part[0] = _mm256_fmadd_ps(_mm256_add_ps(_mm256_add_ps(lo[0], lo[1]), _mm256_add_ps(lo[2], lo[3])), d, part[0]);
    } else if (sg && j.lt != Lt::Q8) {
      const float* xa = j.xa + r * j.rank + sg->r0;
      const int64_t c0 = n0 - sg->n0, step = sg->at(1, c0) - sg->at(0, c0), at = sg->at(0, c0);
      int64_t i = 0;
      for (; i + 4 <= sg->rank; i += 4)
        for (int u = 0; u < 4; ++u)
          part[u] = _mm256_fmadd_ps(_mm256_broadcast_ss(xa + i + u), load8(sg->b, j.half(), at + (i + u) * step), part[u]);
      for (; i < sg->rank; ++i)
        part[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(xa + i), load8(sg->b, j.half(), at + i * step), part[0]);
    }
    _mm256_storeu_ps(y, _mm256_add_ps(_mm256_add_ps(part[0], part[1]), _mm256_add_ps(part[2], part[3])));
  } else {
    alignas(32) float out[kGroup];
    _mm256_store_ps(out, acc);
    for (int64_t c = 0; c < nc; ++c) y[c] = out[c] + extra(j, r, n0 + c);
  }
}

// Pair i of a 6-bit tile (column i's block, then column i + 4's) x the activation halves -> 8 int32,
// 4 partial dots per column. The high-bit plane's 16 bytes go to both 128-bit lanes; the second lane
// (column i + 4) is shifted right by 2, so in each lane bits 0-1 of a byte are the high bits of code
// e and bits 4-5 those of code e + 16.
__attribute__((target("avx2,fma"))) inline __m256i pair_dot6(const uint8_t* p, const uint8_t* high, __m256i qlo, __m256i qhi) {
  const __m256i low = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i h = _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(high))),
                                      _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2));
  const __m256i lo = _mm256_or_si256(_mm256_and_si256(bytes, low), _mm256_and_si256(_mm256_slli_epi16(h, 4), top));
  const __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bytes, 4), low), _mm256_and_si256(h, top));
  // codes <= 63: a maddubs pair <= 2 x 63 x 127 = 16002, the two halves' sum still fits int16
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo, qlo), _mm256_maddubs_epi16(hi, qhi)),
                           _mm256_set1_epi16(1));
}

// The 8 block dots of a tile (column order) as floats. Q4_1: two rounds of int16 pair sums stay exact
// (|.| <= 4 x 7620 = 30480 < 32768), then one madd to int32; 6 bits: each pair already in int32.
template <int Bits>
__attribute__((target("avx2,fma"))) inline __m256 tile_dots_avx2(const uint8_t* tile, __m256i qlo, __m256i qhi) {
  if constexpr (Bits == 4) {
    const __m256i v0 = pair_dot(tile, qlo, qhi), v1 = pair_dot(tile + 32, qlo, qhi);
    const __m256i v2 = pair_dot(tile + 64, qlo, qhi), v3 = pair_dot(tile + 96, qlo, qhi);
    const __m256i h = _mm256_hadd_epi16(_mm256_hadd_epi16(v0, v1), _mm256_hadd_epi16(v2, v3));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(h, _mm256_set1_epi16(1)));
  } else {
    const __m256i v0 = pair_dot6(tile, tile + kHigh6, qlo, qhi), v1 = pair_dot6(tile + 32, tile + kHigh6 + 16, qlo, qhi);
    const __m256i v2 = pair_dot6(tile + 64, tile + kHigh6 + 32, qlo, qhi), v3 = pair_dot6(tile + 96, tile + kHigh6 + 48, qlo, qhi);
    return _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(v0, v1), _mm256_hadd_epi32(v2, v3)));  // columns 0..3 | 4..7
  }
}

// Bits 4: Q4_1 tiles; 6: the 6-bit weight's (the LM head's), whose m = -32 d.
template <int Bits>
__attribute__((target("avx2,fma,f16c"))) void group_avx2(void* p, size_t g) {
  constexpr int tile_bytes = Bits == 4 ? kTile : kTile6, scales = Bits == 4 ? 128 : kD6;
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * kGroup, nc = std::min<int64_t>(kGroup, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    const uint8_t* tile = j.w + int64_t(g) * j.blocks * tile_bytes;
    const int8_t* q = j.a->q.data() + r * j.K;
    const float* s = j.a->s.data() + r * j.blocks;
    const float* sum = j.a->sum.data() + r * j.blocks;
    __m256 acc = _mm256_setzero_ps(), accm = _mm256_setzero_ps();
    for (int64_t b = 0; b < j.blocks; ++b, tile += tile_bytes, q += kBlock) {
      for (int o = 0; o < tile_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(tile + kPrefetch + o), _MM_HINT_T0);
      const __m256i qlo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
      const __m256i qhi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + scales)));
      acc = _mm256_fmadd_ps(tile_dots_avx2<Bits>(tile, qlo, qhi), _mm256_mul_ps(d, _mm256_broadcast_ss(s + b)), acc);
      const __m256 m = Bits == 4 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(tile + 144))) : d;
      accm = _mm256_fmadd_ps(m, _mm256_broadcast_ss(sum + b), accm);
    }
    finish_avx2(j, r, n0, nc, _mm256_fmadd_ps(accm, _mm256_set1_ps(Bits == 4 ? 1.f : -32.f), acc));
  }
}

#ifdef EDGELORA_AVX512
__attribute__((target("avx2,fma,f16c"))) void group_avx512(void* p, size_t g) {
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * kGroup, nc = std::min<int64_t>(kGroup, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    alignas(32) float dots[kGroup];
    edgelora_q41_dots_avx512(j.w + int64_t(g) * j.blocks * kTile, j.a->q.data() + r * j.K, j.a->s.data() + r * j.blocks,
                             j.a->sum.data() + r * j.blocks, j.blocks, dots);
    finish_avx2(j, r, n0, nc, _mm256_load_ps(dots));
  }
}
#endif
#endif

// accuracy_level 0: float activations against the exact Q4_1 weights (a reference, not a fast path).
void group_float(void* p, size_t g) {
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * kGroup, nc = std::min<int64_t>(kGroup, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    for (int64_t c = 0; c < nc; ++c) {
      double acc = 0.;
      const uint8_t* tile = j.w + int64_t(g) * j.blocks * j.tile;
      for (int64_t b = 0; b < j.blocks; ++b, tile += j.tile) {
        float d, m;
        scales_at(tile, int(c), j.bits, d, m);
        const float* x = j.x + r * j.K + b * kBlock;
        for (int i = 0; i < kBlock; ++i) acc += double(x[i]) * double(d * float(code_at(tile, int(c), i, j.bits)) + m);
      }
      j.y[r * j.N + n0 + c] = float(acc) + extra(j, r, n0 + c);
    }
  }
}

#ifdef EDGELORA_ARM64
// Column c's block of a pair (16 code bytes) x the 32 activations -> 4 int32 partial dots.
__attribute__((target("arch=armv8.2-a+dotprod"))) inline int32x4_t col_dot(uint8x16_t bytes, int8x16_t q0, int8x16_t q1) {
  const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(bytes, vdupq_n_u8(0x0F)));
  const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(bytes, 4));
  return vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, q0), hi, q1);
}

#endif

#ifdef EDGELORA_ARM64
// Column c's 6-bit block: its 16 nibble bytes and the pair's high-bit plane (c >= 4: shifted by 2).
__attribute__((target("arch=armv8.2-a+dotprod"))) inline int32x4_t col_dot6(uint8x16_t bytes, uint8x16_t high, int8x16_t q0,
                                                                           int8x16_t q1) {
  const uint8x16_t three = vdupq_n_u8(3);
  const int8x16_t lo = vreinterpretq_s8_u8(vorrq_u8(vandq_u8(bytes, vdupq_n_u8(0x0F)), vshlq_n_u8(vandq_u8(high, three), 4)));
  const int8x16_t hi = vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(bytes, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(high, 4), three), 4)));
  return vdotq_s32(vdotq_s32(vdupq_n_s32(0), lo, q0), hi, q1);
}

// Bits 4: Q4_1 tiles; 6: the 6-bit weight's, whose m = -32 d.
template <int Bits>
__attribute__((target("arch=armv8.2-a+dotprod"))) void group_neon(void* p, size_t g) {
  constexpr int tile_bytes = Bits == 4 ? kTile : kTile6, scales = Bits == 4 ? 128 : kD6;
  const Job& j = *static_cast<const Job*>(p);
  const int64_t n0 = int64_t(g) * kGroup, nc = std::min<int64_t>(kGroup, j.N - n0);
  for (int64_t r = 0; r < j.M; ++r) {
    const uint8_t* tile = j.w + int64_t(g) * j.blocks * tile_bytes;
    const int8_t* q = j.a->q.data() + r * j.K;
    const float* s = j.a->s.data() + r * j.blocks;
    const float* sum = j.a->sum.data() + r * j.blocks;
    float32x4_t acc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)}, accm[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
    for (int64_t b = 0; b < j.blocks; ++b, tile += tile_bytes, q += kBlock) {
      for (int o = 0; o < tile_bytes; o += 64) __builtin_prefetch(tile + kPrefetch + o);
      const int8x16_t q0 = vld1q_s8(q), q1 = vld1q_s8(q + 16);
      int32x4_t dot[kGroup];
      for (int i = 0; i < 4; ++i) {  // pair i: column i, then column i + 4
        if constexpr (Bits == 4) {
          dot[i] = col_dot(vld1q_u8(tile + 32 * i), q0, q1);
          dot[i + 4] = col_dot(vld1q_u8(tile + 32 * i + 16), q0, q1);
        } else {
          const uint8x16_t high = vld1q_u8(tile + kHigh6 + 16 * i);
          dot[i] = col_dot6(vld1q_u8(tile + 32 * i), high, q0, q1);
          dot[i + 4] = col_dot6(vld1q_u8(tile + 32 * i + 16), vshrq_n_u8(high, 2), q0, q1);
        }
      }
      const float32x4_t sv = vdupq_n_f32(s[b]), sumv = vdupq_n_f32(sum[b]);
      const float16x8_t d = vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(tile + scales)));
      const float16x8_t m = Bits == 4 ? vreinterpretq_f16_u16(vld1q_u16(reinterpret_cast<const uint16_t*>(tile + 144))) : d;
      const float32x4_t dl[2] = {vcvt_f32_f16(vget_low_f16(d)), vcvt_high_f32_f16(d)};
      const float32x4_t ml[2] = {vcvt_f32_f16(vget_low_f16(m)), vcvt_high_f32_f16(m)};
      for (int h = 0; h < 2; ++h) {  // columns 4h..4h+3: the 4 dots, each summed over its 4 lanes
        const int32x4_t four = vpaddq_s32(vpaddq_s32(dot[4 * h], dot[4 * h + 1]), vpaddq_s32(dot[4 * h + 2], dot[4 * h + 3]));
        acc[h] = vfmaq_f32(acc[h], vcvtq_f32_s32(four), vmulq_f32(dl[h], sv));
        accm[h] = vfmaq_f32(accm[h], ml[h], sumv);
      }
    }
    alignas(16) float out[kGroup];
    const float32x4_t ms = vdupq_n_f32(Bits == 4 ? 1.f : -32.f);
    vst1q_f32(out, vfmaq_f32(acc[0], accm[0], ms));
    vst1q_f32(out + 4, vfmaq_f32(acc[1], accm[1], ms));
    float* y = j.y + r * j.N + n0;
    for (int64_t c = 0; c < nc; ++c) y[c] = out[c] + extra(j, r, n0 + c);
  }
}
#endif

// xa[r, lo:hi] = x[r] . lora_a[:, lo:hi]: ranks [lo, hi) of row r (a decode step splits the ranks
// between tasks of the node's one parallel pass).
void lora_part_portable(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  float* xa = j.xa + r * j.rank;
  std::fill(xa + lo, xa + hi, 0.f);
  const float* x = j.x + r * j.K;
  for (int64_t k = 0; k < j.K; ++k)
    for (int64_t i = lo; i < hi; ++i) xa[i] += x[k] * load1(j.lora_a, j.half(), k * j.rank + i);
}

#ifdef EDGELORA_X86
// The same, 8 ranks at a time (the grouped slots' ranks are multiples of 8 for rank-8 adapters), the
// rest one by one. Up to 2 vectors of 8 ranks a pass over K, each in four chains (k mod 4): a rank-8
// adapter's x.A is one vector, and with fewer chains it waits on each FMA's latency while the pass's
// other threads wait on it (issue 12).
__attribute__((target("avx2,fma,f16c"))) void lora_part_avx2(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  constexpr int kChains = 4, kVecs = 2;
  float* xa = j.xa + r * j.rank;
  const float* x = j.x + r * j.K;
  const int64_t r8 = lo + (hi - lo) / 8 * 8;
  for (int64_t i0 = lo; i0 < r8; i0 += 8 * kVecs) {
    const int64_t n = std::min<int64_t>(kVecs, (r8 - i0) / 8);
    __m256 acc[kChains][kVecs];
    for (auto& c : acc)
      for (auto& v : c) v = _mm256_setzero_ps();
    int64_t k = 0, at = i0;  // at: element (k, i0) of lora_a
    for (; k + kChains <= j.K; k += kChains, at += kChains * j.rank)
      for (int c = 0; c < kChains; ++c) {
        const __m256 xk = _mm256_broadcast_ss(x + k + c);
        for (int64_t v = 0; v < n; ++v)
          acc[c][v] = _mm256_fmadd_ps(xk, load8(j.lora_a, j.half(), at + c * j.rank + 8 * v), acc[c][v]);
      }
    for (; k < j.K; ++k, at += j.rank)
      for (int64_t v = 0; v < n; ++v)
        acc[0][v] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + k), load8(j.lora_a, j.half(), at + 8 * v), acc[0][v]);
    for (int64_t v = 0; v < n; ++v)
      _mm256_storeu_ps(xa + i0 + 8 * v, _mm256_add_ps(_mm256_add_ps(acc[0][v], acc[1][v]), _mm256_add_ps(acc[2][v], acc[3][v])));
  }
  for (int64_t i = r8; i < hi; ++i) {
    float v = 0.f;
    for (int64_t k = 0; k < j.K; ++k) v += x[k] * load1(j.lora_a, j.half(), k * j.rank + i);
    xa[i] = v;
  }
}
#endif

// 8-bit lora_a: xa[r, i] = sum over blocks b of s_x[b] d_A[i, b] (q_x[b] . q_A[i, b]), an integer dot
// per block as llama.cpp's q8_0 x q8_0 (float activations when there are no int8 ones: accuracy_level 0).
inline float q8_scale(const uint8_t* blk) {
  uint16_t d;
  std::memcpy(&d, blk, 2);
  return half_to_float(d);
}

// xa[r, i] for one rank i, in plain loops.
void lora_rank_q8(const Job& j, int64_t r, int64_t i) {
  const uint8_t* A = static_cast<const uint8_t*>(j.lora_a);
  float v = 0.f;
  for (int64_t b = 0; b < j.blocks; ++b) {
    const uint8_t* blk = A + (i * j.blocks + b) * kQ8;
    const int8_t* c = reinterpret_cast<const int8_t*>(blk + 2);
    if (j.a->q.empty()) {
      const float* x = j.x + r * j.K + b * kBlock;
      float dot = 0.f;
      for (int k = 0; k < kBlock; ++k) dot += x[k] * float(c[k]);
      v += dot * q8_scale(blk);
    } else {
      const int8_t* q = j.a->q.data() + r * j.K + b * kBlock;
      int32_t dot = 0;
      for (int k = 0; k < kBlock; ++k) dot += int32_t(q[k]) * c[k];
      v = std::fma(float(dot), j.a->s[r * j.blocks + b] * q8_scale(blk), v);
    }
  }
  j.xa[r * j.rank + i] = v;
}

void lora_part_q8_portable(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) lora_rank_q8(j, r, i);
}

#ifdef EDGELORA_X86
// Eight ranks at a time (the last few with the missing ones' lanes zero): per block, eight integer dots
// (maddubs of |q_x| with q_A signed as q_x), summed across lanes in one hadd tree, then one FMA for the
// eight with their scales.
__attribute__((target("avx2,fma,f16c"))) void lora_part_q8_avx2(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  const uint8_t* A = static_cast<const uint8_t*>(j.lora_a);
  const int8_t* q = j.a->q.data() + r * j.K;
  const float* s = j.a->s.data() + r * j.blocks;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i0 = lo; i0 < hi; i0 += 8) {
    const int n = int(std::min<int64_t>(8, hi - i0));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < j.blocks; ++b) {
      const __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kBlock));
      const __m256i ax = _mm256_abs_epi8(qx);
      __m256i dot[8];
      uint16_t dh[8] = {};
      for (int u = 0; u < 8; ++u) {
        if (u >= n) { dot[u] = _mm256_setzero_si256(); continue; }
        const uint8_t* blk = A + ((i0 + u) * j.blocks + b) * kQ8;
        std::memcpy(dh + u, blk, 2);
        const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        dot[u] = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qa, qx)), ones);
      }
      const __m256i h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(dot[0], dot[1]), _mm256_hadd_epi32(dot[2], dot[3]));
      const __m256i h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(dot[4], dot[5]), _mm256_hadd_epi32(dot[6], dot[7]));
      const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(h0, h1, 0x20), _mm256_permute2x128_si256(h0, h1, 0x31));
      const __m128i d = _mm_setr_epi16(short(dh[0]), short(dh[1]), short(dh[2]), short(dh[3]), short(dh[4]), short(dh[5]),
                                       short(dh[6]), short(dh[7]));
      acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(_mm256_set1_ps(s[b]), _mm256_cvtph_ps(d)), acc);
    }
    alignas(32) float out[8];
    _mm256_store_ps(out, acc);
    std::copy(out, out + n, j.xa + r * j.rank + i0);
  }
}
#endif

#ifdef EDGELORA_ARM64
__attribute__((target("arch=armv8.2-a+dotprod"))) void lora_part_q8_neon(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  const uint8_t* A = static_cast<const uint8_t*>(j.lora_a);
  const int8_t* q = j.a->q.data() + r * j.K;
  const float* s = j.a->s.data() + r * j.blocks;
  for (int64_t i = lo; i < hi; ++i) {
    float v = 0.f;
    for (int64_t b = 0; b < j.blocks; ++b) {
      const uint8_t* blk = A + (i * j.blocks + b) * kQ8;
      const int8_t* c = reinterpret_cast<const int8_t*>(blk + 2);
      const int32x4_t d = vdotq_s32(vdotq_s32(vdupq_n_s32(0), vld1q_s8(q + b * kBlock), vld1q_s8(c)),
                                    vld1q_s8(q + b * kBlock + 16), vld1q_s8(c + 16));
      v = std::fma(float(vaddvq_s32(d)), s[b] * q8_scale(blk), v);
    }
    j.xa[r * j.rank + i] = v;
  }
}
#endif

void lora_part(const Job& j, int64_t r, int64_t lo, int64_t hi) {
  if (j.lt == Lt::Q8) {
#if defined(EDGELORA_X86)
    if (use_simd() && !j.a->q.empty()) return lora_part_q8_avx2(j, r, lo, hi);
#elif defined(EDGELORA_ARM64)
    if (use_simd() && !j.a->q.empty()) return lora_part_q8_neon(j, r, lo, hi);
#endif
    return lora_part_q8_portable(j, r, lo, hi);
  }
#ifdef EDGELORA_X86
  if (use_simd()) return lora_part_avx2(j, r, lo, hi);
#endif
  lora_part_portable(j, r, lo, hi);
}

void lora_rows(void* p, size_t r) {  // xa[r] = x[r] . lora_a, every rank
  const Job& j = *static_cast<const Job*>(p);
  lora_part(j, int64_t(r), 0, j.rank);
}

void claim_xa(const Job& j) {  // computes unclaimed chunks of xa until none is left
  while (j.chunks->next.load(std::memory_order_relaxed) < j.xa_chunks) {
    const int64_t c = j.chunks->next.fetch_add(1, std::memory_order_relaxed);
    if (c >= j.xa_chunks) break;
    for (int64_t r = 0; r < j.M; ++r) lora_part(j, r, c * kRanks, std::min<int64_t>(j.rank, (c + 1) * kRanks));
    j.chunks->done.fetch_add(1, std::memory_order_release);
  }
}

void wait_xa(const Job& j) {  // one shared load once xa is complete
  if (!j.chunks || j.chunks->done.load(std::memory_order_acquire) >= j.xa_chunks) return;
  claim_xa(j);
  while (j.chunks->done.load(std::memory_order_acquire) < j.xa_chunks) std::this_thread::yield();
}

#ifdef EDGELORA_X86
// exp of 8 floats: 2^n x e^r with |r| <= ln 2 / 2 and e^r to degree 6 (relative error ~1e-7; clamped
// to float's range).
__attribute__((target("avx2,fma"))) inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.f)), _mm256_set1_ps(-87.f));  // 2^127 and 2^-126 at most
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// out[0:8] = act(gate[0:8]) * up[0:8]
__attribute__((target("avx2,fma"))) void gated_avx2(Act_fn f, const float* gate, const float* up, float* out) {
  const __m256 g = _mm256_loadu_ps(gate), one = _mm256_set1_ps(1.f);
  __m256 a;
  if (f == Act_fn::Silu) {
    a = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
  } else {  // 0.5 g (1 + tanh(u)) = g - g / (exp(2u) + 1)
    const __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g), _mm256_mul_ps(g, g), g));
    a = _mm256_sub_ps(g, _mm256_div_ps(g, _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
  }
  _mm256_storeu_ps(out, _mm256_mul_ps(a, _mm256_loadu_ps(up)));
}
#endif

// A task of a node's parallel pass: in a decode step with an adapter the first xa_chunks claim xa's
// chunks, the rest are the groups of output columns (with an activation, a gate group and its up
// partner each).
void task(void* p, size_t i) {
  const Job& j = *static_cast<const Job*>(p);
  if (int64_t(i) < j.xa_chunks) return claim_xa(j);
  const size_t g = i - size_t(j.xa_chunks);
  const int64_t half = j.N / 2, n0 = int64_t(g) * kGroup;
  if (const int64_t l0 = int64_t(g) * j.lines_per_task; l0 < j.next_lines) {  // into L2
    asm volatile("");  // a side effect: GCC 12 deletes a loop of prefetches alone
    for (int64_t l = l0; l < std::min(l0 + j.lines_per_task, j.next_lines); ++l) __builtin_prefetch(j.next_a + 64 * l, 0, 2);
  }
  j.group(p, g);
  if (j.act == Act_fn::None) return;
  j.group(p, g + size_t(half / kGroup));  // then the up half's group, and the product
  for (int64_t r = 0; r < j.M; ++r) {
    const float *gate = j.y + r * j.N + n0, *up = gate + half;
#ifdef EDGELORA_X86
    if (use_simd()) {
      gated_avx2(j.act, gate, up, j.out + r * half + n0);
      continue;
    }
#endif
    for (int c = 0; c < kGroup; ++c) j.out[r * half + n0 + c] = activate(j.act, gate[c]) * up[c];
  }
}

template <typename T>
using Opt = std::optional<const Ort::Custom::Tensor<T>*>;

// An adapter tensor's dims, held in place: a decode step unpacks every adapted node's tensors, and a
// vector's allocations cost more than the unpacking (issue 12: ~0.3 us a node, 1.4% of a 135M token).
// An adapter tensor has at most 3 dims; more are counted (size() says so, the checks refuse it), not kept.
struct Dims {
  int64_t d[3] = {}; size_t n = 0;
  size_t size() const { return n; }
  int64_t operator[](size_t i) const { return d[i]; }
  void push_back(int64_t v) {
    if (n < 3) d[n] = v;
    ++n;
  }
};

// An adapter tensor, from its own input or from the adapter pack.
struct View {
  const void* data = nullptr; Dims shape; bool given = false;
};

template <typename T>
View view(const Opt<T>& t) {
  if (!t.has_value()) return {};
  View v{(*t)->NumberOfElement() ? (*t)->DataRaw() : nullptr, {}, true};
  for (int64_t d : (*t)->Shape()) v.shape.push_back(d);
  return v;
}

// The adapter pack (converters/onnx_fused.py: pack_parameters): every MatMulQ41 node's adapter in one
// input, so a step binds one tensor instead of 2 to 4 per node (each bound input costs ONNX Runtime
// about half a microsecond a step). Little-endian int64 words: the magic, the number of entries, then
// per entry (a node's lora_slot) kPackWords words: its type (0: no adapter, 1 float32, 2 float16, 3
// 8-bit) and for lora_a, lora_b, lora_b1, lora_b2 each (byte offset or -1: absent, ndim, 3 dims). The
// tensors follow, each at a multiple of 64 bytes.
constexpr int64_t kPackMagic = 0x314b4341504c45;  // "ELPACK1"
constexpr int kPackWords = 21;

// Word i of an adapter pack (little-endian int64).
int64_t pack_word(const uint8_t* p, int64_t i) {
  int64_t v;
  std::memcpy(&v, p + 8 * i, 8);
  return v;
}

Lt unpack_entry(const uint8_t* p, int64_t n, int64_t slot, View& a, View (&b)[3]) {
  auto word = [p](int64_t i) { return pack_word(p, i); };
  if (n < 16 || word(0) != kPackMagic || word(1) < 0 || (n - 16) / (8 * kPackWords) < word(1))
    ORT_CXX_API_THROW("MatMulQ41: lora_a is not an adapter pack (write it with edgelora's pack_parameters)", ORT_INVALID_ARGUMENT);
  if (slot >= word(1))
    ORT_CXX_API_THROW("MatMulQ41: the adapter pack has no entry for this node's lora_slot (a pack of another graph?)", ORT_INVALID_ARGUMENT);
  const int64_t e = 2 + slot * kPackWords, type = word(e);
  if (type < 0 || type > 3) ORT_CXX_API_THROW("MatMulQ41: an adapter pack entry's type must be 0 to 3", ORT_INVALID_ARGUMENT);
  if (type == 0) return Lt::F32;
  const int64_t size = type == 1 ? 4 : type == 2 ? 2 : 1;
  View* out[4] = {&a, &b[0], &b[1], &b[2]};
  for (int t = 0; t < 4; ++t) {
    const int64_t at = e + 1 + 5 * t, off = word(at), ndim = word(at + 1);
    if (off < 0) continue;
    int64_t bytes = size;
    View& v = *out[t];
    if (ndim < 1 || ndim > 3) ORT_CXX_API_THROW("MatMulQ41: an adapter pack tensor must have 1 to 3 dims", ORT_INVALID_ARGUMENT);
    for (int64_t d = 0; d < ndim; ++d) {
      const int64_t dim = word(at + 2 + d);
      if (dim < 0 || (dim && bytes > n / dim)) ORT_CXX_API_THROW("MatMulQ41: an adapter pack tensor's dims are out of range", ORT_INVALID_ARGUMENT);
      v.shape.push_back(dim);
      bytes *= dim;
    }
    if (off % 64 || off > n - bytes) ORT_CXX_API_THROW("MatMulQ41: an adapter pack tensor lies outside the pack", ORT_INVALID_ARGUMENT);
    v.data = bytes ? p + off : nullptr, v.given = true;
  }
  if (!a.given || !b[0].given) ORT_CXX_API_THROW("MatMulQ41: an adapter pack entry needs lora_a and lora_b", ORT_INVALID_ARGUMENT);
  return type == 1 ? Lt::F32 : type == 2 ? Lt::F16 : Lt::Q8;
}

// Entry slot + 1's lora_a in the pack (what the next adapted node reads first: the pack's entries are
// in the graph's order; after the last, the next step's first), as bytes; none if that entry is empty
// or out of the pack's bounds (unpack_entry has checked the header).
std::pair<const uint8_t*, int64_t> next_lora_a(const uint8_t* p, int64_t n, int64_t slot) {
  auto word = [p](int64_t i) { return pack_word(p, i); };
  if (word(1) < 1) return {nullptr, 0};
  const int64_t e = 2 + (slot + 1) % word(1) * kPackWords, type = word(e);
  if (type < 1 || type > 3) return {nullptr, 0};
  const int64_t off = word(e + 1), ndim = word(e + 2);
  int64_t bytes = type == 1 ? 4 : type == 2 ? 2 : 1;
  if (off < 0 || ndim < 1 || ndim > 3 || off > n) return {nullptr, 0};
  for (int64_t d = 0; d < ndim; ++d) {
    const int64_t dim = word(e + 3 + d);
    if (dim < 0 || (dim && bytes > n / dim)) return {nullptr, 0};
    bytes *= dim;
  }
  if (bytes > n - off) return {nullptr, 0};
  return {p + off, bytes};
}

// The job's adapter from its tensors, checked against the node's K and N.
void set_adapter(Job& j, const View& a, const View (&bs)[3], Lt lt, int64_t K, int64_t N) {
  const bool q8 = lt == Lt::Q8;
  const auto& as = a.shape;
  if (q8 ? as.size() != 3 || as[1] != K / kBlock || as[2] != kQ8 : as.size() != 2 || as[0] != K)
    ORT_CXX_API_THROW(q8 ? "MatMulQ41: an 8-bit lora_a must be uint8 [r, K/32, 34]" : "MatMulQ41: lora_a must be [K, r]",
                      ORT_INVALID_ARGUMENT);
  j.rank = q8 ? as[0] : as[1];
  int64_t n = 0, r = 0;
  for (const View& b : bs) {
    if (!b.given) break;
    const auto& s = b.shape;
    const bool tiled = s.size() == 3;
    if (q8 ? !tiled || s[1] < 2 || s[2] != kGroup : !(s.size() == 2 || (tiled && s[2] == kGroup)))
      ORT_CXX_API_THROW(q8 ? "MatMulQ41: each 8-bit lora_b must be uint8 [N_i / 8, r_i + 2, 8]"
                           : "MatMulQ41: each lora_b must be [r_i, N_i] or [N_i / 8, r_i, 8]", ORT_INVALID_ARGUMENT);
    const int64_t rank = tiled ? s[1] - (q8 ? 2 : 0) : s[0], width = tiled ? s[0] * kGroup : s[1];
    j.seg[j.nseg++] = Seg{n, n + width, r, rank, rank && width ? b.data : nullptr, tiled};
    n += width;
    r += rank;
  }
  if (n != N || r != j.rank)
    ORT_CXX_API_THROW("MatMulQ41: the lora_b's must cover the N outputs and the r ranks of lora_a", ORT_INVALID_ARGUMENT);
  j.lora_a = j.rank ? a.data : nullptr;
  j.lt = lt;
}

// T: the adapter's type (float, Ort::Float16_t, or uint8_t for 8-bit); one kernel per type, under one name.
template <typename T>
struct MatMulQ41 {
  MatMulQ41(const OrtApi*, const OrtKernelInfo* info) {
    Ort::ConstKernelInfo k(info);
    N = k.GetAttribute<int64_t>("N");
    try {
      exact = k.GetAttribute<int64_t>("accuracy_level") == 0;
    } catch (const Ort::Exception&) {  // not given: int8 activations
    }
    std::string a;
    try {
      a = k.GetAttribute<std::string>("activation");
    } catch (const Ort::Exception&) {  // not given: none
    }
    if (a == "silu") act = Act_fn::Silu;
    else if (a == "gelu_tanh") act = Act_fn::GeluTanh;
    else if (!a.empty()) ORT_CXX_API_THROW("MatMulQ41: activation must be silu or gelu_tanh (or none)", ORT_INVALID_ARGUMENT);
    try {
      bits = int(k.GetAttribute<int64_t>("bits"));
    } catch (const Ort::Exception&) {  // not given: Q4_1
    }
    try {
      slot = k.GetAttribute<int64_t>("lora_slot");
    } catch (const Ort::Exception&) {  // not given: the adapter in its own inputs
    }
    if (bits != 4 && bits != 6) ORT_CXX_API_THROW("MatMulQ41: bits must be 4 (Q4_1) or 6", ORT_INVALID_ARGUMENT);
    if (act != Act_fn::None && N % (2 * kGroup))
      ORT_CXX_API_THROW("MatMulQ41: with an activation, N (gate and up side by side) must be a multiple of 16", ORT_INVALID_ARGUMENT);
  }

  void Compute(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& w,
               Opt<T> lora_a, Opt<T> lora_b, Opt<float> bias, Opt<T> lora_b1, Opt<T> lora_b2,
               Ort::Custom::Tensor<float>& y) {
    const auto xs = x.Shape(), ws = w.Shape();
    const int64_t K = xs.back(), M = K ? x.NumberOfElement() / K : 0, groups = (N + kGroup - 1) / kGroup;
    const int64_t tile = bits == 4 ? kTile : kTile6;
    if (K % kBlock || ws.size() != 3 || ws[0] != groups || ws[1] != K / kBlock || ws[2] != tile)
      ORT_CXX_API_THROW(bits == 4 ? "MatMulQ41: w must be uint8 [ceil(N/8), K/32, 160] for an input of width K (a multiple of 32)"
                                  : "MatMulQ41: a 6-bit w must be uint8 [ceil(N/8), K/32, 208] for an input of width K (a multiple of 32)",
                        ORT_INVALID_ARGUMENT);
    Job j{};
    j.bits = bits, j.tile = tile;
    View va, vb[3];
    Lt lt = q8 ? Lt::Q8 : std::is_same<T, Ort::Float16_t>::value ? Lt::F16 : Lt::F32;
    if (slot >= 0) {  // lora_a is the adapter pack, shared by the graph's nodes: this node's entry
      if (!q8 || !lora_a.has_value() || (*lora_a)->Shape().size() != 1 || (lora_b.has_value() && (*lora_b)->NumberOfElement()))
        ORT_CXX_API_THROW("MatMulQ41: with lora_slot, lora_a is the adapter pack (uint8 [bytes]) and lora_b is empty", ORT_INVALID_ARGUMENT);
      const int64_t n = (*lora_a)->NumberOfElement();
      if (n) lt = unpack_entry(static_cast<const uint8_t*>((*lora_a)->DataRaw()), n, slot, va, vb);
    } else {
      if (lora_a.has_value() != lora_b.has_value() || (lora_b1.has_value() && !lora_b.has_value()) ||
          (lora_b2.has_value() && !lora_b1.has_value()))
        ORT_CXX_API_THROW("MatMulQ41: lora_a comes with lora_b (then lora_b1, lora_b2)", ORT_INVALID_ARGUMENT);
      va = view(lora_a), vb[0] = view(lora_b), vb[1] = view(lora_b1), vb[2] = view(lora_b2);
    }
    if (va.given) set_adapter(j, va, vb, lt, K, N);
    const int64_t nbias = bias.has_value() ? (*bias)->NumberOfElement() : 0;  // 0: none (ONNX Runtime's lite
    if (nbias != 0 && nbias != N)                                              // operators take no "" inputs)
      ORT_CXX_API_THROW("MatMulQ41: bias must hold N values (or none)", ORT_INVALID_ARGUMENT);
    std::vector<int64_t> ys(xs.begin(), xs.end());
    ys.back() = act == Act_fn::None ? N : N / 2;
    float* out = y.Allocate(ys);
    std::vector<float> both(act == Act_fn::None ? 0 : size_t(M * N));  // gate|up before the activation
    if (M == 0) return;
    const Act a = exact ? Act{} : quantize(x.Data(), M, K);
    float xa_here[kXaHere];  // a decode step's xa without an allocation (every rank is written before it is read)
    std::vector<float> xa_heap(M * j.rank > kXaHere ? size_t(M * j.rank) : 0);
    float* xa = xa_heap.empty() ? xa_here : xa_heap.data();
    j.act = act, j.out = out;
    j.w = w.Data(), j.y = act == Act_fn::None ? out : both.data(), j.M = M, j.N = N, j.K = K, j.blocks = K / kBlock, j.a = &a, j.xa = xa;
    j.bias = nbias ? (*bias)->Data() : nullptr, j.x = x.Data();
    Ort::KernelContext ctx(context);
    Job::Chunks chunks;
    if (j.rank && M <= 4) {  // a decode step: xa in the same pass as the weights (waking the pool costs more)
      j.xa_chunks = (j.rank + kRanks - 1) / kRanks;
      j.chunks = &chunks;
      if (slot >= 0 && groups * (K / kBlock) * tile <= l2_bytes()) {
        const auto [next, bytes] = next_lora_a(static_cast<const uint8_t*>((*lora_a)->DataRaw()), (*lora_a)->NumberOfElement(), slot);
        const int64_t tasks = act == Act_fn::None ? groups : groups / 2;
        j.next_a = reinterpret_cast<const char*>(next), j.next_lines = std::min<int64_t>((bytes + 63) / 64, kNextLines);
        j.lines_per_task = (j.next_lines + tasks - 1) / tasks;
      }
    } else if (j.rank) {
      ctx.ParallelFor(lora_rows, size_t(M), 0, &j);
    }
#if defined(EDGELORA_X86) && defined(EDGELORA_AVX512)
    j.group = use_avx512() ? group_avx512 : use_simd() ? group_avx2<4> : group_portable;
#elif defined(EDGELORA_X86)
    j.group = use_simd() ? group_avx2<4> : group_portable;
#elif defined(EDGELORA_ARM64)
    j.group = use_simd() ? group_neon<4> : group_portable;
#else
    j.group = group_portable;
#endif
    if (bits == 6) {  // the AVX-512 kernel is Q4_1's; an AVX-512 CPU has AVX2
#if defined(EDGELORA_X86)
      j.group = use_simd() ? group_avx2<6> : group_portable;
#elif defined(EDGELORA_ARM64)
      j.group = use_simd() ? group_neon<6> : group_portable;
#else
      j.group = group_portable;
#endif
    }
    if (exact) j.group = group_float;
    ctx.ParallelFor(task, size_t(j.xa_chunks + (act == Act_fn::None ? groups : groups / 2)), 0, &j);
  }

  int64_t N, slot = -1;
  int bits = 4;
  bool exact = false;
  Act_fn act = Act_fn::None;
  static constexpr bool q8 = std::is_same<T, uint8_t>::value;
};

}  // namespace

// Which kernel MatMulQ41 runs on this CPU: "avx512vnni", "avx2", "neon-dotprod" or "portable" (edgelora
// reports it; "avx512vnni-emulated" in the tests' build, where SIMDe computes the AVX-512 lanes).
extern "C" const char* edgelora_q41_kernel() { return simd_name(); }

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (!api) return nullptr;  // an onnxruntime older than these headers: it cannot report an error through an API it lacks
  Ort::InitApi(api);
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> q41{
      Ort::Custom::CreateLiteCustomOp<MatMulQ41<float>>("MatMulQ41", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> q41h{
      Ort::Custom::CreateLiteCustomOp<MatMulQ41<Ort::Float16_t>>("MatMulQ41", "CPUExecutionProvider")};
  static std::unique_ptr<Ort::Custom::OrtLiteCustomOp> q41q8{
      Ort::Custom::CreateLiteCustomOp<MatMulQ41<uint8_t>>("MatMulQ41", "CPUExecutionProvider")};
  static Ort::CustomOpDomain domain{nullptr};
  static std::once_flag once;
  try {
    std::call_once(once, [] { domain = Ort::CustomOpDomain{"edgelora"}; domain.Add(q41.get()); domain.Add(q41h.get()); domain.Add(q41q8.get()); });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
