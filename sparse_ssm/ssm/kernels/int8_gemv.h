// The product of a few float rows with a weight-only int8 matrix (`sparse_ssm.model.quantize`): W (O, I)
// int8 row-major with one float32 scale per output row, W ~ s[:, None] * q.  Each input row x (I) is
// quantised on the fly to int8 values with its own scale a = max|x| / 127 (x = a * xq + e, |e| <= a / 2;
// llama.cpp's q8_0 rounds its activations to int8 as well, with a scale per 32), the dot products
// q . xq summed exactly in integers, and
//
//   out[j, o] = add[j, o] + s[o] * a_j * (q[o, :] . xq[j, :])        (add optional, may alias out)
//
// so the only error beyond the weights' own is sum_i |W[o, i]| a_j / 2, the same for a row whatever the
// rows beside it and whichever loop below sums it (the integer sums are exact in all of them).
// Several rows, with AVX-512 VNNI: xq as unsigned bytes and 64 byte products a `vpdpbusd` (u8_tile).
// One row, or without VNNI: xq held in int16, 32 weights widened to int16 and multiplied in pairs
// (`vpdpwssd`, or `vpmaddwd` + add): one row streams its weights faster so (the 130 M LM head at one row
// took 1.2 ms so, ~1.9 ms as bytes).
// Elsewhere a plain loop the compiler vectorises.  Tiles of 4 weight rows x up to 4 input rows keep their
// sums in registers, so each weight byte is read once from memory for all rows (decoding: 1-8 rows).
// Rows with a NaN or inf (or so small that 127 / max|x| overflows) take the float path (s[o] * sum q x),
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

// Inner elements summed in int32 before a flush to int64: all of a chunk's products together stay below
// 2^31 (4096 x 127 x 128 = 6.7e7 with int16-held activations; the bytes' bound is at u8_chunk); the
// portable loop flushes every 256
constexpr int64_t kQ8Chunk = 4096;
constexpr int64_t kQ8PortableChunk = 256;
constexpr int64_t kQ8Align = 32;          // int16 lanes of a 512-bit register; xq rows are padded with zeros
constexpr int kQ8ActMax = 127;            // the activations' range: int8 values, whatever holds them

// The holder of a rounded activation: int16 (the value) or, for VNNI's unsigned operand, uint8 (value + 128)
template <typename Q> constexpr int kQ8Offset = std::is_same<Q, uint8_t>::value ? 128 : 0;
constexpr int64_t kU8Align = 64;          // bytes of a 512-bit register; xu rows are padded with the offset

// f(std::integral_constant<int, rows>) for rows in 1..R: a tile's row count as a template argument
template <int R = 4, typename F> inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R > 1)
    if (rows < R) return with_rows<R - 1>(rows, f);
  f(std::integral_constant<int, R>{});
}

// xq (I) = round(x / a) (+ kQ8Offset) with a = max|x| / 127 (0 for a zero row); false when x holds a NaN
// or inf, or its largest value is so small (subnormal) that 127 / max|x| is not finite
template <typename T, typename Q> bool quantize_row(const T* x, Q* xq, int64_t I, T& a) {
  T amax = 0, check = 0;
  for (int64_t i = 0; i < I; ++i) {
    amax = std::max(amax, std::abs(x[i]));
    check += x[i] - x[i];                  // NaN once any x is NaN or inf
  }
  if (check != 0 || std::isnan(check)) return false;
  a = amax / T(kQ8ActMax);
  const T inv = amax > 0 ? T(kQ8ActMax) / amax : T(0);
  if (!(inv <= std::numeric_limits<T>::max())) return false;
  for (int64_t i = 0; i < I; ++i) xq[i] = Q(int(std::nearbyint(x[i] * inv)) + kQ8Offset<Q>);
  return true;
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
// The same for float32 rows, 16 lanes at a time (the scalar loop's rounding, to nearest even, is what
// the conversion does under the default rounding mode: the same values); a decoding step rounds every
// projection's input rows, ~0.9 of 11 ms at eight rows of the 130 M model with a scalar loop
template <typename Q> bool quantize_row(const float* x, Q* xq, int64_t I, float& a) {
  __m512 amax = _mm512_setzero_ps(), check = _mm512_setzero_ps();
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    check = _mm512_add_ps(check, _mm512_sub_ps(v, v));     // NaN once any x is NaN or inf
  }
  const float c = _mm512_reduce_add_ps(check), top = _mm512_reduce_max_ps(amax);
  if (c != 0 || std::isnan(c)) return false;
  a = top / float(kQ8ActMax);
  const float inv = top > 0 ? float(kQ8ActMax) / top : 0.f;
  if (!(inv <= std::numeric_limits<float>::max())) return false;
  const __m512 scale = _mm512_set1_ps(inv);
  for (int64_t i = 0; i < I; i += 16) {
    const __mmask16 m = I - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - i)) - 1);
    const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), scale));
    if constexpr (std::is_same<Q, uint8_t>::value)
      _mm_mask_storeu_epi8(xq + i, m, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(kQ8Offset<Q>))));
    else
      _mm256_mask_storeu_epi16(xq + i, m, _mm512_cvtepi32_epi16(q));
  }
  return true;
}
#endif

#if defined(__AVX512BW__)
// The sums of the 16 int32 lanes of each of a[0..3] (each sum below 2^31), added to out[0..3]
inline void add_lane_sums(const __m512i a0, const __m512i a1, const __m512i a2, const __m512i a3, int64_t* out) {
  const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
  const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
  const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
  const __m128i v = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  // one 256-bit store, which the tile's 256-bit read of out forwards (four 8-byte stores would stall it)
  const __m256i before = _mm256_loadu_si256((const __m256i*)out);
  _mm256_storeu_si256((__m256i*)out, _mm256_add_epi64(before, _mm256_cvtepi32_epi64(v)));
}

// x[j] = the 64 bytes of input row j (rows Ip elements apart) from element i, for the R rows of a tile
template <int R, typename Q> inline void load_rows(__m512i (&x)[R], const Q* rows, int64_t Ip, int64_t i) {
#pragma GCC unroll 4
  for (int j = 0; j < R; ++j) x[j] = _mm512_loadu_si512(rows + j * Ip + i);
}

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
  load_rows(x, xq, Ip, i);
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

// sums[j][k] += q row w[k] . xq row j over [lo, hi) (hi - lo <= kQ8Chunk); xq rows Ip apart, zero-padded.
// (The loop's body is a function of its own: with the tail's branch inside, GCC kept the 16 accumulators
// in memory as well, storing each at every step.)
template <int R> void q8_chunk(const int8_t* const w[4], const int16_t* xq, int64_t Ip, int64_t lo, int64_t hi,
                               int64_t ahead, int64_t sums[R][4]) {
  __m512i acc[4][R];
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < R; ++j) acc[k][j] = _mm512_setzero_si512();
  int64_t i = lo;
  for (; i + kQ8Align <= hi; i += kQ8Align) q8_step<R, false>(acc, w, xq, Ip, i, ahead, 0);
  if (i < hi) q8_step<R, true>(acc, w, xq, Ip, i, ahead, __mmask32((1u << (hi - i)) - 1));
  for (int j = 0; j < R; ++j) add_lane_sums(acc[0][j], acc[1][j], acc[2][j], acc[3][j], sums[j]);
}
#else
template <int R> void q8_chunk(const int8_t* const w[4], const int16_t* xq, int64_t Ip, int64_t lo, int64_t hi,
                               int64_t, int64_t sums[R][4]) {
  for (int k = 0; k < 4; ++k)
    for (int j = 0; j < R; ++j) {
      const int16_t* x = xq + j * Ip;
      for (int64_t c = lo; c < hi; c += kQ8PortableChunk) {
        int32_t acc = 0;
        for (int64_t i = c; i < std::min(hi, c + kQ8PortableChunk); ++i) acc += int32_t(w[k][i]) * int32_t(x[i]);
        sums[j][k] += acc;
      }
    }
}
#endif

// One row's outputs of a tile, out[o + k] = add[o + k] + s[o + k] * a * dot[k] for k < 4 (those below O),
// the one expression every loop ends with (so a row's answer is the same whichever loop summed it)
template <typename T>
inline void tile_out(const float* s, T a, const int64_t (&dot)[4], const T* add, T* out, int64_t o, int64_t O) {
#if defined(__AVX512DQ__) && defined(__AVX512VL__)
  if constexpr (std::is_same<T, float>::value) {
    const __mmask8 m = O - o >= 4 ? __mmask8(0xf) : __mmask8((1u << (O - o)) - 1);
    const __m128 v = _mm256_cvtepi64_ps(_mm256_loadu_si256((const __m256i*)dot));
    const __m128 sa = _mm_mul_ps(_mm_maskz_loadu_ps(m, s + o), _mm_set1_ps(a));
    const __m128 base = add ? _mm_maskz_loadu_ps(m, add + o) : _mm_setzero_ps();
    return _mm_mask_storeu_ps(out + o, m, _mm_fmadd_ps(sa, v, base));
  }
#endif
  for (int k = 0; k < 4 && o + k < O; ++k) out[o + k] = std::fma(T(s[o + k]) * a, T(dot[k]), add ? add[o + k] : T(0));
}

// w[k] = weight row o + k of the tile (past O: the last row again, unused); the scales 4 tiles on prefetched
// (else a miss at every 16th tile)
template <typename T>
inline void tile_rows(const Weights<T>& W, int64_t o, int64_t O, int64_t I, const int8_t* (&w)[4]) {
  for (int k = 0; k < 4; ++k) w[k] = W.q + std::min(o + k, O - 1) * I;
  __builtin_prefetch(W.s + std::min(o + 16, O - 1));
}

// Output columns o .. o + 4 (those below O) of R rows: out rows j at out + j * O
template <typename T, int R>
void q8_tile(const Weights<T>& W, const int16_t* xq, const T* a, const T* add, T* out, int64_t O, int64_t I,
             int64_t Ip, int64_t o) {
  const int8_t* w[4];
  tile_rows(W, o, O, I, w);
  int64_t sums[R][4] = {};
  for (int64_t lo = 0; lo < I; lo += kQ8Chunk) q8_chunk<R>(w, xq, Ip, lo, std::min(I, lo + kQ8Chunk), 8 * I, sums);
  for (int j = 0; j < R; ++j) tile_out(W.s, a[j], sums[j], add ? add + j * O : nullptr, out + j * O, o, O);
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
// With VNNI the activations go as unsigned bytes xu = xq + 128 (1..255; rows padded with 128, i.e. zero):
// `vpdpbusd` sums 64 byte products a 512-bit register (2x `vpdpwssd`'s 32 of int16), and
// q . xq = q . xu - 128 sum(q), the sum of each weight row formed alongside (a product with a vector of
// ones), once for all the input rows.  The integer sums are those of the int16 path above.

inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));     // acc += u (unsigned) . s (signed), 4 a lane
  return acc;
}

// acc[k][j] += weight row w[k] . xu row j at the 64 elements from i (Masked: those of m, no weight byte past
// them read); Sum: wsum[k] += sum of w[k] there
template <int R, bool Sum, bool Masked>
inline void u8_step(__m512i (&acc)[4][4], __m512i (&wsum)[4], const int8_t* const w[4], const uint8_t* xu, int64_t Ip,
                    int64_t i, int64_t ahead, __mmask64 m) {
  __m512i x[R];
  load_rows(x, xu, Ip, i);
#pragma GCC unroll 4
  for (int k = 0; k < 4; ++k) {
    if (!Masked) __builtin_prefetch(w[k] + i + ahead);
    const __m512i wk = Masked ? _mm512_maskz_loadu_epi8(m, w[k] + i) : _mm512_loadu_si512(w[k] + i);
    if (Sum) wsum[k] = dot_u8s8(wsum[k], _mm512_set1_epi8(1), wk);
#pragma GCC unroll 4
    for (int j = 0; j < R; ++j) acc[k][j] = dot_u8s8(acc[k][j], x[j], wk);
  }
}

// sums[j][k] (+ wsums[k] when Sum) over [lo, hi), hi - lo <= kQ8Chunk: a lane gains at most 4 * 255 * 128 a
// step, so a chunk's 16 lanes stay below 2^31 in all (16 lanes x 64 steps x 130,560 = 1.3e8)
template <int R, bool Sum>
void u8_chunk(const int8_t* const w[4], const uint8_t* xu, int64_t Ip, int64_t lo, int64_t hi, int64_t ahead,
              int64_t (&sums)[4][4], int64_t (&wsums)[4]) {
  __m512i acc[4][4], wsum[4];
  for (int k = 0; k < 4; ++k) {
    wsum[k] = _mm512_setzero_si512();
    for (int j = 0; j < R; ++j) acc[k][j] = _mm512_setzero_si512();
  }
  int64_t i = lo;
  for (; i + kU8Align <= hi; i += kU8Align) u8_step<R, Sum, false>(acc, wsum, w, xu, Ip, i, ahead, 0);
  if (i < hi) u8_step<R, Sum, true>(acc, wsum, w, xu, Ip, i, ahead, (__mmask64(1) << (hi - i)) - 1);
  for (int j = 0; j < R; ++j) add_lane_sums(acc[0][j], acc[1][j], acc[2][j], acc[3][j], sums[j]);
  if (Sum) add_lane_sums(wsum[0], wsum[1], wsum[2], wsum[3], wsums);
}

template <int R>
void u8_rows(const int8_t* const w[4], const uint8_t* xu, int64_t Ip, int64_t I, bool first, int64_t (&sums)[4][4],
             int64_t (&wsums)[4]) {
  for (int64_t lo = 0; lo < I; lo += kQ8Chunk) {
    const int64_t hi = std::min(I, lo + kQ8Chunk);
    if (first) u8_chunk<R, true>(w, xu, Ip, lo, hi, 8 * I, sums, wsums);
    else u8_chunk<R, false>(w, xu, Ip, lo, hi, 8 * I, sums, wsums);
  }
}

// Output columns o .. o + 4 (those below O) of all b rows, 4 rows at a time (the weight rows' sums from the
// first 4); xu rows Ip apart
template <typename T>
void u8_tile(const Weights<T>& W, const uint8_t* xu, const T* a, const T* add, T* out, int64_t b, int64_t O,
             int64_t I, int64_t Ip, int64_t o) {
  const int8_t* w[4];
  tile_rows(W, o, O, I, w);
  int64_t wsums[4] = {};
  for (int64_t j0 = 0; j0 < b; j0 += 4) {
    const int64_t rows = std::min<int64_t>(4, b - j0);
    int64_t sums[4][4] = {};
    const uint8_t* x = xu + j0 * Ip;
    with_rows(rows, [&](auto r) { u8_rows<decltype(r)::value>(w, x, Ip, I, j0 == 0, sums, wsums); });
    for (int j = 0; j < rows; ++j) {
      constexpr int64_t c = kQ8Offset<uint8_t>;
      const int64_t dot[4] = {sums[j][0] - c * wsums[0], sums[j][1] - c * wsums[1], sums[j][2] - c * wsums[2],
                              sums[j][3] - c * wsums[3]};
      tile_out(W.s, a[j0 + j], dot, add ? add + (j0 + j) * O : nullptr, out + (j0 + j) * O, o, O);
    }
  }
}
#endif

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
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
  const bool bytes = b > 1;                 // VNNI's unsigned bytes (one row: the int16 loop streams faster)
#else
  const bool bytes = false;
#endif
  const int64_t Ip = (I + kQ8Align - 1) / kQ8Align * kQ8Align, Iu = (I + kU8Align - 1) / kU8Align * kU8Align;
  std::vector<int16_t> xq(bytes ? 0 : b * Ip, 0);
  std::vector<uint8_t> xu(bytes ? b * Iu : 0, kQ8Offset<uint8_t>);      // the padding: zeros
  std::vector<T> a(b);
  bool quantised = true;
  for (int64_t j = 0; j < b && quantised; ++j)
    quantised = bytes ? quantize_row(in + j * I, &xu[j * Iu], I, a[j]) : quantize_row(in + j * I, &xq[j * Ip], I, a[j]);
  const int64_t blocks = (O + 3) / 4;
  parallel_for(threads, threads, [&](int64_t t) {
    const int64_t o0 = 4 * (blocks * t / threads), o1 = std::min(O, 4 * (blocks * (t + 1) / threads));
    if (!quantised) return q8_float_rows(W, in, add, out, b, O, I, o0, o1);
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (bytes) {
      for (int64_t o = o0; o < o1; o += 4) u8_tile(W, xu.data(), a.data(), add, out, b, O, I, Iu, o);
      return;
    }
#endif
    for (int64_t o = o0; o < o1; o += 4)
      for (int64_t j = 0; j < b; j += 4)
        with_rows(std::min<int64_t>(4, b - j), [&](auto r) {
          q8_tile<T, decltype(r)::value>(W, &xq[j * Ip], &a[j], add ? add + j * O : nullptr, out + j * O, O, I, Ip, o);
        });
  });
}

}  // namespace ssmk
