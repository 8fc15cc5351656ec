// The product of a few float rows with a float weight at a decoding step (`layer_step.cpp`'s projections):
// out (b, O) = in (b, I) @ W^T (+ add (b, O), which may alias out), W (O, I) row-major, b ~ 1-8 rows.  The
// time is one pass over W from memory (at eight rows, as much arithmetic).  float32 with AVX-512: one row
// reads W row after row in one stream (vec.h row_dot_avx512), more rows go by tiles of 3 W rows x up to 8
// input rows; elsewhere tiles of 4 W rows x up to 4 (3) rows.  The tiles keep their sums in registers, so
// each W element is read from memory once for all rows.  `project` picks this or the
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
// float32 with AVX-512, 2-8 rows: tiles of 3 W rows x R input rows, whose 3 R (<= 24) sums stay in
// registers over the whole inner size, so each W vector is loaded once for all R rows (3 W loads and R
// input loads per 3 R FMAs) and eight rows take one pass over W; the W rows four tiles (12 rows) on
// are prefetched into L2.  At eight rows a step is as much arithmetic as reading: 3 x 8 tiles with
// that prefetch took a 377 MB product (I = 768) from 17-18 ms (4 x 4 tiles, two passes, prefetch into
// L1 two tiles on) to 14-15 ms in a C loop on one Zen 5 core.  The tail by masked loads.
constexpr int kTile3Rows = 8;
template <int R, bool Masked>
inline void tile3_step_avx512(__m512 (&acc)[3][R], const float* w, const float* in, int64_t I, int64_t i,
                              __mmask16 m) {
  if (!Masked)
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k) _mm_prefetch((const char*)(w + (k + 12) * I + i), _MM_HINT_T1);
  __m512 w0 = _mm512_maskz_loadu_ps(m, w + i), w1 = _mm512_maskz_loadu_ps(m, w + I + i);
  __m512 w2 = _mm512_maskz_loadu_ps(m, w + 2 * I + i);
  asm("" : "+v"(w0), "+v"(w1), "+v"(w2));   // each W vector loaded once (GCC would fold the loads
                                            // into the FMAs: R loads of each)
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j) {
    __m512 v = _mm512_maskz_loadu_ps(m, in + j * I + i);
    asm("" : "+v"(v));
    acc[0][j] = _mm512_fmadd_ps(w0, v, acc[0][j]), acc[1][j] = _mm512_fmadd_ps(w1, v, acc[1][j]);
    acc[2][j] = _mm512_fmadd_ps(w2, v, acc[2][j]);
  }
}

// out rows j < R (ldo apart) at W rows o .. o + 3 (+ add, which may alias out)
template <int R>
void tile3_avx512(const float* W, const float* in, const float* add, float* out, int64_t ldo, int64_t I, int64_t o) {
  const float* w = W + o * I;
  __m512 acc[3][R];
#pragma GCC unroll 3
  for (int k = 0; k < 3; ++k)
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) acc[k][j] = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) tile3_step_avx512<R, false>(acc, w, in, I, i, __mmask16(0xffff));
  if (i < I) tile3_step_avx512<R, true>(acc, w, in, I, i, __mmask16((1u << (I - i)) - 1));
#pragma GCC unroll 8
  for (int j = 0; j < R; ++j)                // unrolled: a loop here kept the accumulators in memory
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k)
      out[j * ldo + o + k] = (add ? add[j * ldo + o + k] : 0.f) + _mm512_reduce_add_ps(acc[k][j]);
}

// out rows j < b (ldo apart) of W rows [o0, o1) for b >= 1 rows: one row by row_dot_avx512 (vec.h),
// more in passes of up to 8 rows over tiles of 3 W rows; the last O % 3 W rows one at a time
inline void project_rows_avx512(const float* W, const float* in, const float* add, float* out, int64_t b,
                                int64_t ldo, int64_t I, int64_t o0, int64_t o1) {
  if (b == 1) {
    for (int64_t o = o0; o < o1; ++o) out[o] = (add ? add[o] : 0.f) + row_dot_avx512(W + o * I, in, I);
    return;
  }
  int64_t o = o0;
  for (; o + 3 <= o1; o += 3)
    for (int64_t j = 0; j < b; j += kTile3Rows) {
      const float* x = in + j * I;
      const float* more = add ? add + j * ldo : nullptr;
      float* dst = out + j * ldo;
      switch (std::min<int64_t>(kTile3Rows, b - j)) {
        case 8: tile3_avx512<8>(W, x, more, dst, ldo, I, o); break;
        case 7: tile3_avx512<7>(W, x, more, dst, ldo, I, o); break;
        case 6: tile3_avx512<6>(W, x, more, dst, ldo, I, o); break;
        case 5: tile3_avx512<5>(W, x, more, dst, ldo, I, o); break;
        case 4: tile3_avx512<4>(W, x, more, dst, ldo, I, o); break;
        case 3: tile3_avx512<3>(W, x, more, dst, ldo, I, o); break;
        case 2: tile3_avx512<2>(W, x, more, dst, ldo, I, o); break;
        default: tile3_avx512<1>(W, x, more, dst, ldo, I, o); break;
      }
    }
  for (; o < o1; ++o)
    for (int64_t j = 0; j < b; ++j) out[j * ldo + o] = (add ? add[j * ldo + o] : 0.f) + row_dot_avx512(W + o * I, in + j * I, I);
}
#endif

// The tile of `rows` (<= kTileRows) input rows and W rows o .. o + 4
template <typename T>
void project_rows_tile(const T* W, const T* in, const T* add, T* out, int64_t O, int64_t I, int64_t o, int64_t rows) {
  if (rows >= 4 && kTileRows >= 4) project_tile<T, kTileRows>(W, in, add, out, O, I, o);
  else if (rows == 3) project_tile<T, 3>(W, in, add, out, O, I, o);
  else if (rows == 2) project_tile<T, 2>(W, in, add, out, O, I, o);
  else project_tile<T, 1>(W, in, add, out, O, I, o);
}

// out (b, O) = in (b, I) @ W^T (+ add (b, O) when given), W (O, I) row-major: every block of W rows is
// read once for all b rows (a matrix-matrix product in tiles; float32 with AVX-512 as above)
template <typename T> void project_rows(const T* W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) return project_rows_avx512(W, in, add, out, b, O, I, 0, O);
#endif
  int64_t o = 0;
  for (; o + 4 <= O; o += 4)
    for (int64_t bi = 0; bi < b;) {
      const int64_t rows = std::min<int64_t>(kTileRows, b - bi);
      project_rows_tile(W, in + bi * I, add ? add + bi * O : nullptr, out + bi * O, O, I, o, rows);
      bi += rows;
    }
  for (; o < O; ++o)
    for (int64_t bi = 0; bi < b; ++bi) out[bi * O + o] = (add ? add[bi * O + o] : T(0)) + dot(W + o * I, in + bi * I, I);
}

// out (b, O) = in (b, I) @ W^T (+ add): a float W as project_rows, an int8 one as project_rows_q8; a map of
// kSplitWeights or more in `threads` ranges of output rows (float32 with AVX-512 and int8)
template <typename T>
void project(const Weights<T>& W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I,
             int threads = 1) {
  if (W.q) return project_rows_q8(W, in, add, out, b, O, I, threads);
  if (O * I < kSplitWeights) threads = 1;
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    const int64_t tiles = (O + 2) / 3;       // ranges of whole tiles of 3 rows
    parallel_for(threads, threads, [&](int64_t k) {
      project_rows_avx512(W.w, in, add, out, b, O, I, 3 * (tiles * k / threads),
                          std::min(O, 3 * (tiles * (k + 1) / threads)));
    });
    return;
  }
#endif
  project_rows(W.w, in, add, out, b, O, I);
}

}  // namespace ssmk
