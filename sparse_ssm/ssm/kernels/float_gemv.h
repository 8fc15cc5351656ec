// The product of a few float rows with a float weight at a decoding step (`layer_step.cpp`'s projections):
// out (b, O) = in (b, I) @ W^T (+ add (b, O), which may alias out), W (O, I) row-major, b ~ 1-8 rows.  The
// time is one pass over W from memory: one row reads W row after row in one stream (vec.h
// row_dot_avx512, with AVX-512); more rows go by tiles of 4 W rows x up to 4 input rows that keep their
// sums in registers, so each W element is read from memory once for all rows.  `project` picks this or the
// int8 product of `int8_gemv.h` by the weight.
#pragma once

#include <type_traits>

#include "int8_gemv.h"

namespace ssmk {

// out rows r0 .. r0 + R of W rows o .. o + 4: a tile of 4 x R dot products whose accumulators stay in
// registers, so each vector load of W serves R rows and each load of an input serves 4 W rows
template <typename T, int R>
void project_tile(const T* W, const T* in, const T* add, T* out, int64_t O, int64_t I, int64_t o) {
  constexpr int Wd = Vec<T>::lanes;
  const T* w[4] = {W + o * I, W + (o + 1) * I, W + (o + 2) * I, W + (o + 3) * I};
  V<T> acc[4][R];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) acc[k][j] = vsplat(T(0));
  int64_t i = 0;
  for (; i + Wd <= I; i += Wd) {
    V<T> v[R];
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) v[j] = vload(in + j * I + i);
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      __builtin_prefetch(w[k] + i + 4 * I);   // the next 4 W rows, from memory while this tile computes
      V<T> wk = vload(w[k] + i);
#if defined(__GNUC__) && defined(__AVX__)
      if (R > 1) asm("" : "+x"(wk));   // load W once into a register (GCC folds it into each row's
#endif                                  // multiply-add: R loads instead of one; 1.4x at 8 rows)
#pragma GCC unroll 4
      for (int j = 0; j < R; ++j) acc[k][j] += wk * v[j];
    }
  }
  for (int j = 0; j < R; ++j) {
    T sum[4];
    hsum4<T>(acc[0][j], acc[1][j], acc[2][j], acc[3][j], sum);
    const T* v = in + j * I;
    for (int64_t t = i; t < I; ++t)
      for (int k = 0; k < 4; ++k) sum[k] += w[k][t] * v[t];
    for (int k = 0; k < 4; ++k) out[j * O + o + k] = (add ? add[j * O + o + k] : T(0)) + sum[k];
  }
}

// Rows a tile holds: 4 x 4 accumulators fit the 32 vector registers of AVX-512, 4 x 3 the 16 of AVX2
#if defined(__AVX512VL__)
constexpr int kTileRows = 4;
#else
constexpr int kTileRows = 3;
#endif

#if defined(__AVX512F__)
// float32 with AVX-512 (as lm_head.cpp): the 4 W rows' 16 floats from i loaded once into registers and
// multiplied with every input row (4 W loads and R input loads per 4 R FMAs; the generic tile above
// compiles to one W load per FMA), the rows `ahead` floats on prefetched (the hardware prefetcher alone
// streamed the step's weights at well below the core's read bandwidth); the tail by masked loads
template <int R, bool Masked>
inline void project_step_avx512(__m512 (&acc)[4][R], const float* w, const float* in, int64_t I, int64_t i,
                                int64_t ahead, __mmask16 m) {
  if (!Masked && ahead)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) _mm_prefetch((const char*)(w + k * I + i + ahead), _MM_HINT_T0);
  __m512 w0 = _mm512_maskz_loadu_ps(m, w + i), w1 = _mm512_maskz_loadu_ps(m, w + I + i);
  __m512 w2 = _mm512_maskz_loadu_ps(m, w + 2 * I + i), w3 = _mm512_maskz_loadu_ps(m, w + 3 * I + i);
  asm("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));   // each W vector loaded once (GCC would fold the
                                                       // loads into the FMAs: R loads of each)
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) {
    __m512 v = _mm512_maskz_loadu_ps(m, in + j * I + i);
    if (R > 1) asm("" : "+v"(v));
    acc[0][j] = _mm512_fmadd_ps(w0, v, acc[0][j]), acc[1][j] = _mm512_fmadd_ps(w1, v, acc[1][j]);
    acc[2][j] = _mm512_fmadd_ps(w2, v, acc[2][j]), acc[3][j] = _mm512_fmadd_ps(w3, v, acc[3][j]);
  }
}

// out rows 0 .. R of W rows o .. o + 4 (as project_tile); `prefetch`: the W rows two blocks (8 rows) on
template <int R>
void project_tile_avx512(const float* W, const float* in, const float* add, float* out, int64_t O, int64_t I,
                         int64_t o, bool prefetch) {
  const float* w = W + o * I;
  __m512 acc[4][R];
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k)
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) acc[k][j] = _mm512_setzero_ps();
  const int64_t ahead = prefetch ? 8 * I : 0;
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) project_step_avx512<R, false>(acc, w, in, I, i, ahead, __mmask16(0xffff));
  if (i < I) project_step_avx512<R, true>(acc, w, in, I, i, 0, __mmask16((1u << (I - i)) - 1));
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j)                // unrolled: a loop here kept the accumulators in memory
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
      out[j * O + o + k] = (add ? add[j * O + o + k] : 0.f) + _mm512_reduce_add_ps(acc[k][j]);
}
#endif

// The tile of `rows` (<= kTileRows) input rows and W rows o .. o + 4; `first`: the first tile of the W rows
template <typename T>
void project_rows_tile(const T* W, const T* in, const T* add, T* out, int64_t O, int64_t I, int64_t o,
                       int64_t rows, bool first) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    if (rows >= 4) project_tile_avx512<4>(W, in, add, out, O, I, o, first);
    else if (rows == 3) project_tile_avx512<3>(W, in, add, out, O, I, o, first);
    else if (rows == 2) project_tile_avx512<2>(W, in, add, out, O, I, o, first);
    else project_tile_avx512<1>(W, in, add, out, O, I, o, first);
    return;
  }
#endif
  if (rows >= 4 && kTileRows >= 4) project_tile<T, kTileRows>(W, in, add, out, O, I, o);
  else if (rows == 3) project_tile<T, 3>(W, in, add, out, O, I, o);
  else if (rows == 2) project_tile<T, 2>(W, in, add, out, O, I, o);
  else project_tile<T, 1>(W, in, add, out, O, I, o);
}

// out (b, O) = in (b, I) @ W^T (+ add (b, O) when given), W (O, I) row-major: every block of 4 W rows
// is read once for all b rows (a matrix-matrix product in tiles of 4 W rows x kTileRows rows)
template <typename T> void project_rows(const T* W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value)
    if (b == 1) {   // one row: W read row after row in one stream (vec.h row_dot_avx512)
      for (int64_t o = 0; o < O; ++o) out[o] = (add ? add[o] : 0.f) + row_dot_avx512(W + o * I, in, I);
      return;
    }
#endif
  int64_t o = 0;
  for (; o + 4 <= O; o += 4)
    for (int64_t bi = 0; bi < b;) {
      const int64_t rows = std::min<int64_t>(kTileRows, b - bi);
      project_rows_tile(W, in + bi * I, add ? add + bi * O : nullptr, out + bi * O, O, I, o, rows, bi == 0);
      bi += rows;
    }
  for (; o < O; ++o)
    for (int64_t bi = 0; bi < b; ++bi) out[bi * O + o] = (add ? add[bi * O + o] : T(0)) + dot(W + o * I, in + bi * I, I);
}

// out (b, O) = in (b, I) @ W^T (+ add): a float W as project_rows, an int8 one as project_rows_q8
template <typename T>
void project(const Weights<T>& W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I) {
  if (W.q) project_rows_q8(W, in, add, out, b, O, I);
  else project_rows(W.w, in, add, out, b, O, I);
}

}  // namespace ssmk
