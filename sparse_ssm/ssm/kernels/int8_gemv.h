// The product of a few float rows with a weight-only int8 matrix (`sparse_ssm.model.quantize`): W (O, I)
// int8 row-major with one float32 scale per output row, W ~ s[:, None] * q.  Each input row x (I) is
// quantised on the fly to int16 with its own scale a = max|x| / 32767 (x = a * xq + e, |e| <= a / 2),
// the dot products q . xq summed exactly in integers, and
//
//   out[j, o] = add[j, o] + s[o] * a_j * (q[o, :] . xq[j, :])        (add optional, may alias out)
//
// so the only error beyond the weights' own is sum_i |W[o, i]| a_j / 2 (int16 activations: ~3e-5 of a
// row's largest value), the same for a row whatever the rows beside it.  AVX-512 widens 32 weights to
// int16 and multiplies pairs into int32 lanes (`vpdpwssd` with VNNI, `vpmaddwd` + add without); elsewhere
// a plain loop the compiler vectorises.  Tiles of 4 weight rows x R input rows keep their sums in
// registers, so each weight byte is read once from memory for all rows (decoding: 1-8 rows, memory bound).
// Rows with a NaN or inf (or so small that 32767 / max|x| overflows) take the float path (s[o] * sum q x),
// which propagates a NaN as torch does.
#pragma once

#include <type_traits>

#include "vec.h"
#if defined(__AVX512BW__)
#include <immintrin.h>
#endif

namespace ssmk {

// A projection's weight: float w (O, I), or int8 q (O, I) with per-row scales s (O) when q is set
template <typename T> struct Weights {
  const T* w;
  const int8_t* q = nullptr;
  const float* s = nullptr;
};

// Inner elements summed in int32 before a flush to int64: an AVX-512 lane takes 2 of every 32, so 256
// products of |q| <= 127 and |xq| <= 32767 in a chunk (< 2^31; its 16 lanes are added in int64); the
// portable loop flushes every 256
constexpr int64_t kQ8Chunk = 4096;
constexpr int64_t kQ8PortableChunk = 256;
constexpr int64_t kQ8Align = 32;          // int16 lanes of a 512-bit register; xq rows are padded with zeros

// xq (I) = round(x / a) with a = max|x| / 32767 (0 for a zero row); false when x holds a NaN or inf, or
// its largest value is so small (subnormal) that 32767 / max|x| is not finite
template <typename T> bool quantize_i16(const T* x, int16_t* xq, int64_t I, T& a) {
  T amax = 0, check = 0;
  for (int64_t i = 0; i < I; ++i) {
    amax = std::max(amax, std::abs(x[i]));
    check += x[i] - x[i];                  // NaN once any x is NaN or inf
  }
  if (check != 0 || std::isnan(check)) return false;
  a = amax / T(32767);
  const T inv = amax > 0 ? T(32767) / amax : T(0);
  if (!(inv <= std::numeric_limits<T>::max())) return false;
  for (int64_t i = 0; i < I; ++i) xq[i] = int16_t(std::nearbyint(x[i] * inv));
  return true;
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The same for float32 rows, 16 lanes at a time (the scalar loop's rounding, to nearest even, is what
// the conversion does under the default rounding mode: the same int16 values); a decoding step rounds
// every projection's input rows, ~0.9 of 11 ms at eight rows of the 130 M model before
template <> inline bool quantize_i16<float>(const float* x, int16_t* xq, int64_t I, float& a) {
  __m512 amax = _mm512_setzero_ps(), check = _mm512_setzero_ps();
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    check = _mm512_add_ps(check, _mm512_sub_ps(v, v));     // NaN once any x is NaN or inf
  }
  const float c = _mm512_reduce_add_ps(check), top = _mm512_reduce_max_ps(amax);
  if (c != 0 || std::isnan(c)) return false;
  a = top / 32767.f;
  const float inv = top > 0 ? 32767.f / top : 0.f;
  if (!(inv <= std::numeric_limits<float>::max())) return false;
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - i)) - 1);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale));
    _mm256_mask_storeu_epi16(xq + i, m, _mm512_cvtsepi32_epi16(q));
  }
  return true;
}
#endif

#if defined(__AVX512BW__)
inline __m512i madd_i16(__m512i acc, __m512i w, __m512i x) {
#if defined(__AVX512VNNI__)
  asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));   // the intrinsic: GCC copies the tied
  return acc;                                                  // accumulator to a new register each time (2x)
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

// acc[k][j] += the products of q row w[k] and xq row j (rows Ip apart) at the 32 elements from i: all of
// them, or (Masked: the row's tail) those of the m bits, no weight byte past them read.  The weight rows
// `ahead` bytes on are prefetched (from memory while this tile computes: 2x the hardware's alone)
template <int R, bool Masked>
inline void q8_step(__m512i (&acc)[4][R], const int8_t* const w[4], const int16_t* xq, int64_t Ip, int64_t i,
                    int64_t ahead, __mmask32 m) {
  __m512i x[R];
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) x[j] = _mm512_loadu_si512(xq + j * Ip + i);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    if (!Masked) __builtin_prefetch(w[k] + i + ahead);
    const __m256i bytes =
        Masked ? _mm256_maskz_loadu_epi8(m, w[k] + i) : _mm256_loadu_si256((const __m256i*)(w[k] + i));
    const __m512i wk = _mm512_cvtepi8_epi16(bytes);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) acc[k][j] = madd_i16(acc[k][j], wk, x[j]);
  }
}

// sums[k][j] += q row w[k] . xq row j over [lo, hi) (hi - lo <= kQ8Chunk); xq rows Ip apart, zero-padded.
// (The loop's body is a function of its own: with the tail's branch inside, GCC kept the 16 accumulators
// in memory as well, storing each at every step.)
template <int R> void q8_chunk(const int8_t* const w[4], const int16_t* xq, int64_t Ip, int64_t lo, int64_t hi,
                               int64_t ahead, int64_t sums[4][R]) {
  __m512i acc[4][R];
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < R; ++j) acc[k][j] = _mm512_setzero_si512();
  int64_t i = lo;
  for (; i + kQ8Align <= hi; i += kQ8Align) q8_step<R, false>(acc, w, xq, Ip, i, ahead, 0);
  if (i < hi) q8_step<R, true>(acc, w, xq, Ip, i, ahead, __mmask32((1u << (hi - i)) - 1));
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < R; ++j) {
      const __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[k][j]));
      const __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[k][j], 1));
      sums[k][j] += _mm512_reduce_add_epi64(_mm512_add_epi64(lo, hi));
    }
}
#else
template <int R> void q8_chunk(const int8_t* const w[4], const int16_t* xq, int64_t Ip, int64_t lo, int64_t hi,
                               int64_t, int64_t sums[4][R]) {
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < R; ++j) {
      const int16_t* x = xq + j * Ip;
      for (int64_t c = lo; c < hi; c += kQ8PortableChunk) {
        int32_t acc = 0;
        for (int64_t i = c; i < std::min(hi, c + kQ8PortableChunk); ++i) acc += int32_t(w[k][i]) * int32_t(x[i]);
        sums[k][j] += acc;
      }
    }
}
#endif

// Output columns o .. o + 4 (those below O) of R rows: out rows j at out + j * O
template <typename T, int R>
void q8_tile(const Weights<T>& W, const int16_t* xq, const T* a, const T* add, T* out, int64_t O, int64_t I,
             int64_t Ip, int64_t o) {
  const int8_t* w[4];
  for (int k = 0; k < 4; ++k) w[k] = W.q + std::min(o + k, O - 1) * I;      // past O: the last row again, unused
  int64_t sums[4][R] = {};
  for (int64_t lo = 0; lo < I; lo += kQ8Chunk) q8_chunk<R>(w, xq, Ip, lo, std::min(I, lo + kQ8Chunk), 8 * I, sums);
  for (int j = 0; j < R; ++j)
    for (int k = 0; k < 4 && o + k < O; ++k) {
      const int64_t at = j * O + o + k;
      out[at] = (add ? add[at] : T(0)) + T(W.s[o + k]) * a[j] * T(sums[k][j]);
    }
}

// The float path (a row with a NaN or inf): out = add + s[o] * sum_i q[o, i] x[i], rows o in [o0, o1)
template <typename T>
void q8_float_rows(const Weights<T>& W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I,
                   int64_t o0, int64_t o1) {
  for (int64_t j = 0; j < b; ++j)
    for (int64_t o = o0; o < o1; ++o) {
      T sum = 0;
      for (int64_t i = 0; i < I; ++i) sum += T(W.q[o * I + i]) * in[j * I + i];
      out[j * O + o] = (add ? add[j * O + o] : T(0)) + T(W.s[o]) * sum;
    }
}

// Maps of at least this many weights split their output rows over the threads (the kept workers of
// pool.h; the 130 M model's in/out projections, 1.2-2.6 M weights, take ~0.05-0.4 ms a decoding step)
constexpr int64_t kSplitWeights = int64_t(1) << 20;

// out (b, O) = in (b, I) @ (s[:, None] * q)^T (+ add (b, O)), the output columns split over `threads` for
// maps of kSplitWeights or more
template <typename T>
void project_rows_q8(const Weights<T>& W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I,
                     int threads = 1) {
  if (O * I < kSplitWeights) threads = 1;
  const int64_t Ip = (I + kQ8Align - 1) / kQ8Align * kQ8Align;
  std::vector<int16_t> xq(b * Ip, 0);
  std::vector<T> a(b);
  bool quantised = true;
  for (int64_t j = 0; j < b; ++j) quantised = quantised && quantize_i16(in + j * I, &xq[j * Ip], I, a[j]);
  const int64_t blocks = (O + 3) / 4;
  parallel_for(threads, threads, [&](int64_t t) {
    const int64_t o0 = 4 * (blocks * t / threads), o1 = std::min(O, 4 * (blocks * (t + 1) / threads));
    if (!quantised) return q8_float_rows(W, in, add, out, b, O, I, o0, o1);
    for (int64_t o = o0; o < o1; o += 4)
      for (int64_t j = 0; j < b;) {
        const int64_t rows = std::min<int64_t>(4, b - j);
        const int16_t* x = &xq[j * Ip];
        const T* more = add ? add + j * O : nullptr;
        T* dst = out + j * O;
        if (rows == 4) q8_tile<T, 4>(W, x, &a[j], more, dst, O, I, Ip, o);
        else if (rows == 3) q8_tile<T, 3>(W, x, &a[j], more, dst, O, I, Ip, o);
        else if (rows == 2) q8_tile<T, 2>(W, x, &a[j], more, dst, O, I, Ip, o);
        else q8_tile<T, 1>(W, x, &a[j], more, dst, O, I, Ip, o);
        j += rows;
      }
  });
}

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
// int16 rounding); float32 with AVX-512 in registers for 8 rows at a time, else a row's sums in memory
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
