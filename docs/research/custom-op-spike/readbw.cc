// Single-stream read bandwidth on this machine, for comparison with the ops' bytes per second:
// sums 32-byte loads over BUFFERS buffers of MB megabytes each, visited in turn (as vs_nbits.py
// interleaves sessions, so no buffer stays in cache). g++ -O2 -mavx2 readbw.cc -o readbw && ./readbw MB BUFFERS
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <algorithm>
__attribute__((noinline)) uint64_t sum(const uint8_t* p, size_t bytes) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t k = 0; k < bytes; k += 128) {
    a0 = _mm256_add_epi8(a0, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + k)));
    a1 = _mm256_add_epi8(a1, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + k + 32)));
    a2 = _mm256_add_epi8(a2, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + k + 64)));
    a3 = _mm256_add_epi8(a3, _mm256_load_si256(reinterpret_cast<const __m256i*>(p + k + 96)));
  }
  const __m256i a = _mm256_add_epi8(_mm256_add_epi8(a0, a1), _mm256_add_epi8(a2, a3));
  return uint64_t(_mm256_extract_epi64(a, 0)) ^ uint64_t(_mm256_extract_epi64(a, 3));
}

int main(int argc, char** argv) {
  const size_t bytes = size_t(std::atof(argv[1]) * 1e6) / 128 * 128;
  const int nbuf = std::atoi(argv[2]);
  std::vector<uint8_t*> bufs;
  for (int i = 0; i < nbuf; ++i) {
    bufs.push_back(static_cast<uint8_t*>(std::aligned_alloc(64, bytes)));
    for (size_t k = 0; k < bytes; ++k) bufs.back()[k] = uint8_t(k * 7 + i);
  }
  std::vector<double> t;
  uint64_t sink = 0;
  for (int rep = 0; rep < 40; ++rep)
    for (int i = 0; i < nbuf; ++i) {
      auto t0 = std::chrono::steady_clock::now();
      sink += sum(bufs[i], bytes);
      if (i == 0) t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
  std::sort(t.begin(), t.end());
  std::printf("%.1f MB x %d buffers: median %.3f ms = %.1f GB/s (best %.1f GB/s) [%d]\n", bytes / 1e6, nbuf, t[t.size() / 2] * 1e3,
              bytes / t[t.size() / 2] / 1e9, bytes / t[0] / 1e9, int(sink & 1));
}
