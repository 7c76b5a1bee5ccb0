// How the CPU backend's ops read a weight, which it keeps in f32, bf16 or f16, as f32 values:
// widening is exact (bf16 is the high half of an f32; every f16 is an f32), so an op computes
// the same values from a 16-bit weight as from an f32 copy of it.
#pragma once
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>  // SSE2, and F16C for the functions that ask for it
#elif defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../engine/backend.h"
#include "../engine/weights.h"

namespace lckv::cpu {

// Every f16 value widened to f32, for the scalar reads (embed, norm, and linear on a CPU without
// F16C): a lookup is cheaper than the bit recipe, whose subnormal case loops. Built on first use.
inline const float* f16Table() {
  static const std::vector<float> table = [] {
    std::vector<float> t(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = f16ToF32((uint16_t)h);
    return t;
  }();
  return table.data();
}

inline float bf16Value(uint16_t h) {
  const uint32_t bits = (uint32_t)h << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

// Rows x[0..R) (each `in` long) . w[0, in), w[k] given by wAt(k), into out[0..R): each row's
// four running sums in one fixed order, whatever the batch (the reduction of every linear
// output). Rows share the weight reads, and their independent sums keep the adder busy where one
// row's chain waits on each add; a row's result is the same whichever R it is computed in.
template <int R, class WeightAt>
inline void dotRows(const float* const* x, WeightAt wAt, int64_t in, float* out) {
  float acc[R][4] = {};
  int64_t k = 0;
  for (; k + 4 <= in; k += 4) {
    const float w0 = wAt(k), w1 = wAt(k + 1), w2 = wAt(k + 2), w3 = wAt(k + 3);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      acc[r][0] += x[r][k] * w0;
      acc[r][1] += x[r][k + 1] * w1;
      acc[r][2] += x[r][k + 2] * w2;
      acc[r][3] += x[r][k + 3] * w3;
    }
  }
  for (; k < in; ++k) {
    const float w = wAt(k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r][0] += x[r][k] * w;
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r) out[r] = (acc[r][0] + acc[r][1]) + (acc[r][2] + acc[r][3]);
}

// The same four sums as dotRows() with SIMD lanes: lane q of `acc[r]` holds row r's sum q, and
// the tail after the last whole four goes to sum 0. widen4 gives the f32 values of the four
// 16-bit weights in the low 64 bits of a vector; the tail's weights are widened the same way,
// from a copy padded with zeros (no call in the loop's function, so the sums stay in registers).
#define LCKV_DOT16_ROWS_BODY(widen4)                                                              \
  __m128 acc[R];                                                                                  \
  _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) acc[r] = _mm_setzero_ps();                  \
  int64_t k = 0;                                                                                  \
  for (; k + 8 <= in; k += 8) {                                                                   \
    const __m128i hv = _mm_loadu_si128(reinterpret_cast<const __m128i*>(h + k));                  \
    const __m128 lo = widen4(hv), hi = widen4(_mm_unpackhi_epi64(hv, hv));                        \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r) {                                         \
      acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(_mm_loadu_ps(x[r] + k), lo));                        \
      acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(_mm_loadu_ps(x[r] + k + 4), hi));                    \
    }                                                                                             \
  }                                                                                               \
  if (k + 4 <= in) {                                                                              \
    const __m128 lo = widen4(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(h + k)));           \
    _Pragma("GCC unroll 4") for (int r = 0; r < R; ++r)                                           \
      acc[r] = _mm_add_ps(acc[r], _mm_mul_ps(_mm_loadu_ps(x[r] + k), lo));                        \
    k += 4;                                                                                       \
  }                                                                                               \
  uint16_t rest[4] = {0, 0, 0, 0};                                                                \
  for (int64_t i = 0; k + i < in; ++i) rest[i] = h[k + i];                                        \
  float tail[4];                                                                                  \
  _mm_storeu_ps(tail, widen4(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(rest))));           \
  for (int r = 0; r < R; ++r) {                                                                   \
    float sums[4];                                                                                \
    _mm_storeu_ps(sums, acc[r]);                                                                  \
    float acc0 = sums[0];                                                                         \
    for (int64_t i = 0; k + i < in; ++i) acc0 += x[r][k + i] * tail[i];                           \
    out[r] = (acc0 + sums[1]) + (sums[2] + sums[3]);                                              \
  }

#if defined(__SSE2__)
// Interleaving zeros below four bf16 values gives their f32 bits.
inline __m128 widenBf16x4(__m128i hv) { return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), hv)); }
#endif

// dotRows() of rows x and a bf16 row h, each weight widened as it is read (linear's hot path):
// with SSE2, one instruction widens four, which a plain loop does not get from the compiler.
template <int R>
inline void dotBf16Rows(const float* const* x, const uint16_t* h, int64_t in, float* out) {
#if defined(__SSE2__)
  LCKV_DOT16_ROWS_BODY(widenBf16x4)
#else
  dotRows<R>(x, [h](int64_t k) { return bf16Value(h[k]); }, in, out);
#endif
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LCKV_F16C 1
// dotF16Rows with the F16C conversion (x86 since 2012), exact, subnormal values included,
// whatever the FPU's flush modes (it ignores MXCSR.DAZ).
template <int R>
__attribute__((target("f16c"))) inline void dotF16CRows(const float* const* x, const uint16_t* h, int64_t in, float* out) {
  LCKV_DOT16_ROWS_BODY(_mm_cvtph_ps)
}
#endif
#undef LCKV_DOT16_ROWS_BODY

// dotRows() of rows x and an f16 row h, each weight widened as it is read: by F16C where the CPU
// has it, else through the table.
template <int R>
inline void dotF16Rows(const float* const* x, const uint16_t* h, int64_t in, float* out) {
#ifdef LCKV_F16C
  static const bool f16c = __builtin_cpu_supports("f16c");
  if (f16c) return dotF16CRows<R>(x, h, in, out);
#endif
  const float* table = f16Table();
  dotRows<R>(x, [h, table](int64_t k) { return table[h[k]]; }, in, out);
}

// Rows x[0..R) . row j of weight w [rows, in], in whatever dtype w is kept: dotRows()'s order.
template <int R>
inline void dotRowsOf(const float* const* x, const Tensor& w, int64_t j, float* out) {
  const int64_t in = w.cols;
  const uint16_t* h = static_cast<const uint16_t*>(w.data) + j * in;
  if (w.dtype == DType::BF16) return dotBf16Rows<R>(x, h, in, out);
  if (w.dtype == DType::F16) return dotF16Rows<R>(x, h, in, out);
  const float* wj = static_cast<const float*>(w.data) + j * in;
  dotRows<R>(x, [wj](int64_t k) { return wj[k]; }, in, out);
}

// Values [start, start + n) of weight t (row-major) as f32: a pointer into t when it is f32, else
// those values widened into buf.
inline const float* weightF32(const Tensor& t, int64_t start, int64_t n, std::vector<float>& buf) {
  if (t.dtype == DType::F32) return static_cast<const float*>(t.data) + start;
  buf.resize((size_t)n);
  const uint16_t* h = static_cast<const uint16_t*>(t.data) + start;
  if (t.dtype == DType::BF16) {
    for (int64_t i = 0; i < n; ++i) buf[(size_t)i] = bf16Value(h[i]);
  } else {
    const float* table = f16Table();
    for (int64_t i = 0; i < n; ++i) buf[(size_t)i] = table[h[i]];
  }
  return buf.data();
}

}  // namespace lckv::cpu
