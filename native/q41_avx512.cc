// MatMulQ41's AVX-512 VNNI kernel (see edgelora_ort.cc for the operator and its weight tiles).
//
// Written with SIMDe's names (simde_mm512_...): built with -mavx512f -mavx512bw -mavx512vl
// -mavx512vnni, as scripts/native.sh builds it, each is the native instruction; built without those
// flags (EDGELORA_AVX512_EMULATED, the tests' build) SIMDe computes the same lanes in portable code, so
// this kernel is checked against numpy on a machine without AVX-512, as the NEON one is under qemu.
//
// This file holds no C++ library code: it is compiled with AVX-512 enabled for the whole file, and an
// inline function emitted here could be picked by the linker for the rest of the library, which must
// run on any x86-64. Only edgelora_q41_dots_avx512 leaves it.
#include <simde/x86/avx512.h>
#include <simde/x86/f16c.h>
#include <stdint.h>

namespace {

constexpr int kBlock = 32, kTile = 160, kPrefetch = 2560;  // as edgelora_ort.cc's

// 64 code bytes (two pairs: four columns' blocks) x the activation block -> 16 int32, four per column
// (a 128-bit lane holds one column's 16 bytes: low nibbles codes 0..15, high nibbles 16..31).
inline simde__m512i quad_dot(const uint8_t* p, simde__m512i qlo, simde__m512i qhi) {
  const simde__m512i low = simde_mm512_set1_epi8(0x0F);
  const simde__m512i bytes = simde_mm512_loadu_si512(p);
  const simde__m512i lo = simde_mm512_and_si512(bytes, low);
  const simde__m512i hi = simde_mm512_and_si512(simde_mm512_srli_epi16(bytes, 4), low);
  return simde_mm512_dpbusd_epi32(simde_mm512_dpbusd_epi32(simde_mm512_setzero_si512(), lo, qlo), hi, qhi);
}

}  // namespace

// The 8 columns' dots of one tile stream (blocks tiles of 160 bytes) with one row of int8 activations
// q (blocks x 32 codes, scales s, s x code sums sum): out[c] = sum over blocks of d_c s dot_c + m_c sum.
// The four int32 partial dots of a column are scaled in their lanes and summed once, after the last
// block (no horizontal sum per block, which AVX-512 has no instruction for).
extern "C" void edgelora_q41_dots_avx512(const uint8_t* tile, const int8_t* q, const float* s, const float* sum,
                                         int64_t blocks, float* out) {
  // lane order of the two quad dots: columns 0 4 1 5 (pairs 0, 1) and 2 6 3 7 (pairs 2, 3)
  const simde__m512i at01 = simde_mm512_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4, 1, 1, 1, 1, 5, 5, 5, 5);
  const simde__m512i at23 = simde_mm512_setr_epi32(2, 2, 2, 2, 6, 6, 6, 6, 3, 3, 3, 3, 7, 7, 7, 7);
  simde__m512 acc01 = simde_mm512_setzero_ps(), acc23 = simde_mm512_setzero_ps();
  simde__m256 accm = simde_mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b, tile += kTile, q += kBlock) {
    __builtin_prefetch(tile + kPrefetch);
    __builtin_prefetch(tile + kPrefetch + 64);
    __builtin_prefetch(tile + kPrefetch + 128);
    const simde__m512i qlo = simde_mm512_broadcast_i32x4(simde_mm_loadu_si128(q));
    const simde__m512i qhi = simde_mm512_broadcast_i32x4(simde_mm_loadu_si128(q + 16));
    const simde__m512i v01 = quad_dot(tile, qlo, qhi), v23 = quad_dot(tile + 64, qlo, qhi);
    const simde__m256 d = simde_mm256_cvtph_ps(simde_mm_loadu_si128(tile + 128));
    const simde__m256 m = simde_mm256_cvtph_ps(simde_mm_loadu_si128(tile + 144));
    const simde__m512 ds = simde_mm512_castps256_ps512(simde_mm256_mul_ps(d, simde_mm256_set1_ps(s[b])));
    acc01 = simde_mm512_fmadd_ps(simde_mm512_cvtepi32_ps(v01), simde_mm512_permutexvar_ps(at01, ds), acc01);
    acc23 = simde_mm512_fmadd_ps(simde_mm512_cvtepi32_ps(v23), simde_mm512_permutexvar_ps(at23, ds), acc23);
    accm = simde_mm256_fmadd_ps(m, simde_mm256_set1_ps(sum[b]), accm);
  }
  float lanes[32], mterm[8];
  simde_mm512_storeu_ps(lanes, acc01);
  simde_mm512_storeu_ps(lanes + 16, acc23);
  simde_mm256_storeu_ps(mterm, accm);
  static const int column[8] = {0, 4, 1, 5, 2, 6, 3, 7};  // lane group i holds this column
  for (int i = 0; i < 8; ++i) {
    const float* l = lanes + 4 * i;
    out[column[i]] = ((l[0] + l[1]) + (l[2] + l[3])) + mterm[column[i]];
  }
}
