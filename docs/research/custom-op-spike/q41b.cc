// Spike: exact-Q4_1 matmuls as an ONNX Runtime custom op library, built against Debian's 1.21
// headers, loaded into the pip wheel's onnxruntime. y[M,N] = x[M,K] . W^T with
// W[n,k] = d[n,b] * code + m[n,b] in blocks of 32 along K; each block's 16 bytes hold codes k..k+15
// in the low nibbles and k+16..k+31 in the high ones (llama.cpp's layout).
//   MatMulQ41:   float activations (exact to the dequantized weights)
//   MatMulQ41I8: activations quantized to int8 per block of 32 (scale max|x|/127), the block sums
//                applied with m inside the dot product, as llama.cpp's q4_1 x q8_1; AVX2 when the
//                CPU has it (chosen at run time), else portable C++.
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

__attribute__((target("avx2,fma"))) void col_i8_avx2(void* p, size_t n) {
  const Job& j = *static_cast<const Job*>(p);
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
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
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk));
      __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
      __m256i qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, qx), ones);  // 8 x int32
      acc = _mm256_fmadd_ps(_mm256_set1_ps(d[b] * sx[b]), _mm256_cvtepi32_ps(dot), acc);
      acc_m += m[b] * sumx[b];
    }
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    j.y[r * j.N + n] = _mm_cvtss_f32(s) + acc_m;
  }
}


// 4 output columns per pass: the block of quantized activations is loaded once for the four; the
// m x block-sum term is one SIMD dot per column after the loop.
__attribute__((target("avx2,fma"))) void col4_i8_avx2(void* p, size_t g) {
  const Job& j = *static_cast<const Job*>(p);
  const __m128i low = _mm_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
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
        __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(j.codes + (n * j.blocks + b) * 16));
        __m256i codes = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), _mm_and_si128(bytes, low));
        __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(codes, qx), ones);
        acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(j.d[n * j.blocks + b] * sx[b]), _mm256_cvtepi32_ps(dot), acc[c]);
      }
    }
    for (int c = 0; c < nc; ++c) {
      const float* m = j.m + (n0 + c) * j.blocks;
      __m256 am = _mm256_setzero_ps();
      int64_t b = 0;
      for (; b + 8 <= j.blocks; b += 8) am = _mm256_fmadd_ps(_mm256_loadu_ps(m + b), _mm256_loadu_ps(sumx + b), am);
      __m256 t = _mm256_add_ps(acc[c], am);
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
      float tail = 0.f;
      for (; b < j.blocks; ++b) tail += m[b] * sumx[b];
      j.y[r * j.N + n0 + c] = _mm_cvtss_f32(s) + tail;
    }
  }
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

void MatMulQ41I8(OrtKernelContext* context, const Ort::Custom::Tensor<float>& x, const Ort::Custom::Tensor<uint8_t>& codes,
                 const Ort::Custom::Tensor<float>& d, const Ort::Custom::Tensor<float>& m, Ort::Custom::Tensor<float>& y) {
  int64_t M, K, N, blocks;
  check_shapes(x, d, M, K, N, blocks);
  std::vector<int8_t> qx(M * K);
  std::vector<float> sx(M * blocks), sumx(M * blocks);
  const float* xd = x.Data();
  for (int64_t i = 0; i < M * blocks; ++i) {  // quantize each block of 32 activations
    const float* v = xd + i * 32;
    float amax = 0.f;
    for (int k = 0; k < 32; ++k) amax = std::fmax(amax, std::fabs(v[k]));
    const float s = amax / 127.f, inv = s > 0 ? 1.f / s : 0.f;
    int32_t total = 0;
    for (int k = 0; k < 32; ++k) { qx[i * 32 + k] = int8_t(std::nearbyint(v[k] * inv)); total += qx[i * 32 + k]; }
    sx[i] = s; sumx[i] = s * float(total);
  }
  Job j{xd, codes.Data(), d.Data(), m.Data(), out(x, N, y), M, K, N, blocks, qx.data(), sx.data(), sumx.data()};
  if (has_avx2())
    Ort::KernelContext(context).ParallelFor(col4_i8_avx2, size_t((N + 3) / 4), 0, &j);
  else
    Ort::KernelContext(context).ParallelFor(col_i8_portable, size_t(N), 0, &j);
}

}  // namespace

extern "C" OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  Ort::InitApi(api_base->GetApi(ORT_API_VERSION));
  using Op = std::unique_ptr<Ort::Custom::OrtLiteCustomOp>;
  static Op f32{Ort::Custom::CreateLiteCustomOp("MatMulQ41", "CPUExecutionProvider", MatMulQ41)};
  static Op i8{Ort::Custom::CreateLiteCustomOp("MatMulQ41I8", "CPUExecutionProvider", MatMulQ41I8)};
  static Ort::CustomOpDomain domain{nullptr};
  static std::once_flag once;
  try {
    std::call_once(once, [] { domain = Ort::CustomOpDomain{"edgelora"}; domain.Add(f32.get()); domain.Add(i8.get()); });
    Ort::UnownedSessionOptions(options).Add(domain);
  } catch (const Ort::Exception& e) {
    return Ort::GetApi().CreateStatus(e.GetOrtErrorCode(), e.what());
  }
  return nullptr;
}
