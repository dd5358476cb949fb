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
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
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

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  using Op = std::unique_ptr<Ort::Custom::OrtLiteCustomOp>;
  static Op f32{Ort::Custom::CreateLiteCustomOp("MatMulQ41", "CPUExecutionProvider", MatMulQ41)};
  static Op i8{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8", "CPUExecutionProvider", MatMulQ41I8<1>)};
  static Op i8x4{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8x4", "CPUExecutionProvider", MatMulQ41I8<4>)};
  static Op i8h{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8H", "CPUExecutionProvider", MatMulQ41I8H)};
  static Ort::CustomOpDomain domain{nullptr};
  static std::once_flag once;
  try {
    std::call_once(once, [] { domain = Ort::CustomOpDomain{"edgelora"}; domain.Add(f32.get()); domain.Add(i8.get()); domain.Add(i8x4.get());
                            domain.Add(i8h.get()); });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
