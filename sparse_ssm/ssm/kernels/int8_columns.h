// The product of a few float rows with an int8 weight given transposed (weight-only int8,
// `sparse_ssm.model.quantize`): the generator's A map of the decoding step, whose inner size is short.
#pragma once

#include <type_traits>
#include <vector>

#include "vec.h"
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace ssmk {

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// project_columns_q8 of R (<= 8) float rows: 16 outputs at a time, their R sums in registers over the
// whole inner size (each weight vector widened once for the R rows; no pass over a sum row in memory)
template <int R>
void columns_q8_avx512(const int8_t* qt, const float* s, const float* in, const float* add, float* out, int64_t O,
                       int64_t I) {
  for (int64_t o = 0; o < O; o += 16) {
    const __mmask16 m = O - o >= 16 ? __mmask16(0xffff) : __mmask16((1u << (O - o)) - 1);
    __m512 acc[R];
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < I; ++i) {
      if ((o & 63) == 0) _mm_prefetch((const char*)(qt + i * O + o + 512), _MM_HINT_T0);   // 8 lines on
      const __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, qt + i * O + o)));
#pragma GCC unroll 8
      for (int j = 0; j < R; ++j) acc[j] = _mm512_fmadd_ps(_mm512_set1_ps(in[j * I + i]), w, acc[j]);
    }
    const __m512 scale = _mm512_maskz_loadu_ps(m, s + o);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      const __m512 base = add ? _mm512_maskz_loadu_ps(m, add + j * O + o) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(out + j * O + o, m, _mm512_fmadd_ps(scale, acc[j], base));
    }
  }
}

template <int R = 8>
void columns_q8_rows_avx512(const int8_t* qt, const float* s, const float* in, const float* add, float* out,
                            int64_t rows, int64_t O, int64_t I) {
  if constexpr (R > 1)
    if (rows < R) return columns_q8_rows_avx512<R - 1>(qt, s, in, add, out, rows, O, I);
  columns_q8_avx512<R>(qt, s, in, add, out, O, I);
}
#endif

// out (b, O) = add (b, O) + in (b, I) @ (s[:, None] * q)^T for a short inner size with the int8 weight
// given transposed, qt (I, O) = q^T (the generator's A map: I = r ~ 48, O = H R ~ 3072 at the 130 M size,
// where project_rows_q8's four horizontal sums a tile of 4 x 48 products cost more than streaming the
// weight): the sums accumulate across the outputs, each in the order of i, the activations float (no
// int8 rounding); float32 with AVX-512 in registers for 8 rows at a time, else a row's sums in memory
// with qt widened in the contiguous inner loop, which the compiler vectorises.  add may alias out.
template <typename T>
void project_columns_q8(const int8_t* qt, const float* s, const T* in, const T* add, T* out, int64_t b, int64_t O,
                        int64_t I) {
#if defined(__AVX512BW__) && defined(__AVX512VL__)
  if constexpr (std::is_same<T, float>::value) {
    for (int64_t j = 0; j < b; j += 8)
      columns_q8_rows_avx512(qt, s, in + j * I, add ? add + j * O : nullptr, out + j * O, std::min<int64_t>(8, b - j),
                             O, I);
    return;
  }
#endif
  std::vector<T> sum(O);
  for (int64_t j = 0; j < b; ++j) {
    std::fill(sum.begin(), sum.end(), T(0));
    for (int64_t i = 0; i < I; ++i) {
      const T v = in[j * I + i];
      const int8_t* __restrict__ q = qt + i * O;
      T* __restrict__ acc = sum.data();
      for (int64_t o = 0; o < O; ++o) acc[o] += v * T(q[o]);
    }
    for (int64_t o = 0; o < O; ++o) out[j * O + o] = (add ? add[j * O + o] : T(0)) + T(s[o]) * sum[o];
  }
}

}  // namespace ssmk
