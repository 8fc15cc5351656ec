// The LM head at decoding: logits (rows, vocab) = x (rows, dim) W^T for a weight W (vocab, dim)
// and few rows (a decoding batch, rows <= ~8), where a GEMM library's packing and blocking for
// large matrices costs more than it saves and the time is one pass over W (154 MB in float32 at
// the 130 M size: the bound is memory bandwidth).  Every weight row is read from memory once: a
// block of four weight rows is multiplied with every x row while it is in L1 (x stays there too;
// float32 with AVX-512 goes by float_gemv.h's products of the decoding step instead),
// the vocabulary split into contiguous ranges, one a thread.  Weights float32, float64 (x and the
// logits of the same dtype) or bf16 (x and logits bf16, accumulation in float32, each product of
// two bf16 values exact in float32; the logits rounded to nearest even once; the AVX512-BF16 dot
// product where the CPU has it, else the weight widened to float32 as it is read).

#include <type_traits>

#include "float_gemv.h"

namespace {

using namespace ssmk;

constexpr int kWeightRows = 4;     // weight rows a block
constexpr int kXRows = 4;          // x rows a pass over a block
constexpr int kPrefetchBlocks = 2; // how far ahead the AVX-512 path prefetches the weight

// 64-byte vectors (one AVX-512 register; two AVX2 / four SSE registers elsewhere)
template <typename T> struct Wide {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
};
template <typename T> using W = typename Wide<T>::type;
template <typename T> inline W<T> wload(const T* p) { W<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> inline T wsum(W<T> v) {
  T s = 0;
  for (int i = 0; i < Wide<T>::lanes; ++i) s += v[i];
  return s;
}

inline float bf16_to_float(uint16_t b) {
  const uint32_t bits = uint32_t(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline uint16_t float_to_bf16(float f) {          // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40);
  return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
}
// 16 bf16 values -> 16 floats
inline W<float> wload_bf16(const uint16_t* p) {
  typedef uint16_t H __attribute__((vector_size(32)));
  typedef uint32_t U __attribute__((vector_size(64)));
  H h;
  std::memcpy(&h, p, sizeof h);
  const U u = __builtin_convertvector(h, U) << 16;
  W<float> f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The element loads of a weight (float/double as they are; bf16 widened to float): WT the stored
// type, A the accumulation type.
template <typename WT> struct Load;
template <> struct Load<float> {
  typedef float A;
  static W<float> vec(const float* p) { return wload(p); }
  static float one(const float* p) { return *p; }
};
template <> struct Load<double> {
  typedef double A;
  static W<double> vec(const double* p) { return wload(p); }
  static double one(const double* p) { return *p; }
};
template <> struct Load<uint16_t> {
  typedef float A;
  static W<float> vec(const uint16_t* p) { return wload_bf16(p); }
  static float one(const uint16_t* p) { return bf16_to_float(*p); }
};

// out[r][j] = sum_k x[r][k] w[j][k] for NW weight rows (<= kWeightRows) and NX x rows (<= kXRows);
// x is given in the accumulation type A (rows of `dim`), out rows `vocab` apart.
template <typename WT, int NW, int NX>
void block_dots_portable(const typename Load<WT>::A* x, const WT* w, int64_t dim, typename Load<WT>::A* out,
                         int64_t vocab) {
  typedef typename Load<WT>::A A;
  constexpr int L = Wide<A>::lanes;
  W<A> acc[NX][NW];
  for (int r = 0; r < NX; ++r)
    for (int j = 0; j < NW; ++j) acc[r][j] = W<A>{};
  int64_t k = 0;
  for (; k + L <= dim; k += L) {
    W<A> wv[NW];
    for (int j = 0; j < NW; ++j) wv[j] = Load<WT>::vec(w + j * dim + k);
    for (int r = 0; r < NX; ++r) {
      const W<A> xv = wload(x + r * dim + k);
      for (int j = 0; j < NW; ++j) acc[r][j] += xv * wv[j];
    }
  }
  for (int r = 0; r < NX; ++r)
    for (int j = 0; j < NW; ++j) {
      A s = wsum<A>(acc[r][j]);
      for (int64_t t = k; t < dim; ++t) s += x[r * dim + t] * Load<WT>::one(w + j * dim + t);
      out[r * vocab + j] = s;
    }
}

#if defined(__AVX512F__)
// AVX-512 for bf16 weights widened to float32 (float32 weights go by float_gemv.h): 16 lanes a register,
// the dim tail by masked loads, the sums by the reduce instruction (the generic vectors above compile to
// a slower reduction and spills)
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

// kWeightRows (4) weight rows times one x row at a time (the weight rows stay in L1 for the next x
// rows); named accumulators, which GCC keeps in registers (an array of them it stores every step).
// With `prefetch` (the first x row), the same place kPrefetchBlocks blocks ahead is prefetched: the
// hardware prefetcher alone left the cold weight at 8-16 GB/s (130 M head, one Zen 5 core: float32
// 8.3 -> 6.1 ms, bf16 8.8 -> 2.7 ms at one row; the prefetch past the weight's end is harmless)
template <typename WT>
void block4_dots_avx512(const float* x, const WT* w, int64_t dim, float* out, bool prefetch) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t k = 0; k < dim; k += 16) {
    const __mmask16 m = dim - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (dim - k)) - 1);
    const __m512 xv = _mm512_maskz_loadu_ps(m, x + k);
    if (prefetch)
      for (int j = 0; j < kWeightRows; ++j)
        _mm_prefetch((const char*)(w + (j + kPrefetchBlocks * kWeightRows) * dim + k), _MM_HINT_T0);
    a0 = _mm512_fmadd_ps(xv, load16(w + k, m), a0);
    a1 = _mm512_fmadd_ps(xv, load16(w + dim + k, m), a1);
    a2 = _mm512_fmadd_ps(xv, load16(w + 2 * dim + k, m), a2);
    a3 = _mm512_fmadd_ps(xv, load16(w + 3 * dim + k, m), a3);
  }
  out[0] = _mm512_reduce_add_ps(a0), out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2), out[3] = _mm512_reduce_add_ps(a3);
}

// the same for two x rows at once: eight accumulators, each weight vector loaded once for both (six
// loads per eight FMAs instead of ten: 8 rows of the 130 M head 13.5 -> 10.8 ms in a C loop)
template <typename WT>
void block4x2_dots_avx512(const float* x, const WT* w, int64_t dim, float* out, int64_t vocab, bool prefetch) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
  for (int64_t k = 0; k < dim; k += 16) {
    const __mmask16 m = dim - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (dim - k)) - 1);
    const __m512 xa = _mm512_maskz_loadu_ps(m, x + k), xb = _mm512_maskz_loadu_ps(m, x + dim + k);
    if (prefetch)
      for (int j = 0; j < kWeightRows; ++j)
        _mm_prefetch((const char*)(w + (j + kPrefetchBlocks * kWeightRows) * dim + k), _MM_HINT_T0);
    const __m512 w0 = load16(w + k, m), w1 = load16(w + dim + k, m);
    const __m512 w2 = load16(w + 2 * dim + k, m), w3 = load16(w + 3 * dim + k, m);
    a0 = _mm512_fmadd_ps(xa, w0, a0), b0 = _mm512_fmadd_ps(xb, w0, b0);
    a1 = _mm512_fmadd_ps(xa, w1, a1), b1 = _mm512_fmadd_ps(xb, w1, b1);
    a2 = _mm512_fmadd_ps(xa, w2, a2), b2 = _mm512_fmadd_ps(xb, w2, b2);
    a3 = _mm512_fmadd_ps(xa, w3, a3), b3 = _mm512_fmadd_ps(xb, w3, b3);
  }
  out[0] = _mm512_reduce_add_ps(a0), out[1] = _mm512_reduce_add_ps(a1);
  out[2] = _mm512_reduce_add_ps(a2), out[3] = _mm512_reduce_add_ps(a3);
  out[vocab] = _mm512_reduce_add_ps(b0), out[vocab + 1] = _mm512_reduce_add_ps(b1);
  out[vocab + 2] = _mm512_reduce_add_ps(b2), out[vocab + 3] = _mm512_reduce_add_ps(b3);
}

template <typename WT>
void block1_dot_avx512(const float* x, const WT* w, int64_t dim, float* out) {
  __m512 a = _mm512_setzero_ps();
  for (int64_t k = 0; k < dim; k += 16) {
    const __mmask16 m = dim - k >= 16 ? __mmask16(0xffff) : __mmask16((1u << (dim - k)) - 1);
    a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + k), load16(w + k, m), a);
  }
  *out = _mm512_reduce_add_ps(a);
}

template <typename WT, int NW, int NX>
void block_dots_avx512(const float* x, const WT* w, int64_t dim, float* out, int64_t vocab) {
  static_assert(NW == kWeightRows || NW == 1, "blocks of 4 weight rows, or one");
  int r = 0;
  if constexpr (NW == kWeightRows)
    for (; r + 2 <= NX; r += 2) block4x2_dots_avx512(x + r * dim, w, dim, out + r * vocab, vocab, r == 0);
  for (; r < NX; ++r) {
    if constexpr (NW == 1) block1_dot_avx512(x + r * dim, w, dim, out + r * vocab);
    else block4_dots_avx512(x + r * dim, w, dim, out + r * vocab, r == 0);
  }
}
#endif

template <typename WT, int NW, int NX>
void block_dots(const typename Load<WT>::A* x, const WT* w, int64_t dim, typename Load<WT>::A* out, int64_t vocab) {
#if defined(__AVX512F__)
  if constexpr (!std::is_same<WT, double>::value) return block_dots_avx512<WT, NW, NX>(x, w, dim, out, vocab);
#endif
  block_dots_portable<WT, NW, NX>(x, w, dim, out, vocab);
}

template <typename WT, int NW>
void weight_block(const typename Load<WT>::A* x, int64_t rows, const WT* w, int64_t dim, typename Load<WT>::A* out,
                  int64_t vocab) {
  int64_t r = 0;
  for (; r + kXRows <= rows; r += kXRows) block_dots<WT, NW, kXRows>(x + r * dim, w, dim, out + r * vocab, vocab);
  switch (rows - r) {
    case 3: block_dots<WT, NW, 3>(x + r * dim, w, dim, out + r * vocab, vocab); break;
    case 2: block_dots<WT, NW, 2>(x + r * dim, w, dim, out + r * vocab, vocab); break;
    case 1: block_dots<WT, NW, 1>(x + r * dim, w, dim, out + r * vocab, vocab); break;
    default: break;
  }
}

// logits (rows, vocab) in the accumulation type, the vocabulary in `threads` ranges of whole blocks
template <typename WT>
void lm_head(const typename Load<WT>::A* x, const WT* w, typename Load<WT>::A* out, int64_t rows, int64_t vocab,
             int64_t dim, int threads) {
  const int64_t blocks = (vocab + kWeightRows - 1) / kWeightRows;
  const int parts = (int)std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  parallel_for(parts, parts, [&](int64_t part) {
#if defined(__AVX512F__)
    if constexpr (std::is_same<WT, float>::value) {   // float32: the decoding step's products (float_gemv.h)
      const int64_t o1 = std::min(vocab, blocks * (part + 1) / parts * kWeightRows);
      project_rows_avx512(w, x, nullptr, out, rows, vocab, dim, blocks * part / parts * kWeightRows, o1);
      return;
    } else
#endif
    for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
      const int64_t j = b * kWeightRows;
      if (j + kWeightRows <= vocab) {
        weight_block<WT, kWeightRows>(x, rows, w + j * dim, dim, out + j, vocab);
      } else {
        for (int64_t t = j; t < vocab; ++t) weight_block<WT, 1>(x, rows, w + t * dim, dim, out + t, vocab);
      }
    }
  });
}

#if defined(__AVX512BF16__)
// bf16 x and weight by the AVX512-BF16 dot product (32 bf16 pairs a step, each pair's products exact
// in float32 and added in float32; no widening of the weight): NW weight rows (4 or 1) against
// every x row, logits float32, the weight prefetched kPrefetchBlocks blocks ahead on the first row
template <int NW>
void bf16_block_dots(const uint16_t* x, int64_t rows, const uint16_t* w, int64_t dim, float* out, int64_t vocab) {
  for (int64_t r = 0; r < rows; ++r) {
    __m512 acc[NW];
    for (int j = 0; j < NW; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < dim; k += 32) {
      const __mmask32 m = dim - k >= 32 ? __mmask32(0xffffffffu) : __mmask32((1u << (dim - k)) - 1);
      const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(m, x + r * dim + k);
      if (NW == kWeightRows && r == 0)
        for (int j = 0; j < kWeightRows; ++j)
          _mm_prefetch((const char*)(w + (j + kPrefetchBlocks * kWeightRows) * dim + k), _MM_HINT_T0);
      for (int j = 0; j < NW; ++j)
        acc[j] = _mm512_dpbf16_ps(acc[j], xv, (__m512bh)_mm512_maskz_loadu_epi16(m, w + j * dim + k));
    }
    for (int j = 0; j < NW; ++j) out[r * vocab + j] = _mm512_reduce_add_ps(acc[j]);
  }
}

void lm_head_bf16_dot(const uint16_t* x, const uint16_t* w, float* out, int64_t rows, int64_t vocab, int64_t dim,
                      int threads) {
  const int64_t blocks = (vocab + kWeightRows - 1) / kWeightRows;
  const int parts = (int)std::max<int64_t>(1, std::min<int64_t>(threads, blocks));
  parallel_for(parts, parts, [&](int64_t part) {
    for (int64_t b = blocks * part / parts; b < blocks * (part + 1) / parts; ++b) {
      const int64_t j = b * kWeightRows;
      if (j + kWeightRows <= vocab) bf16_block_dots<kWeightRows>(x, rows, w + j * dim, dim, out + j, vocab);
      else
        for (int64_t t = j; t < vocab; ++t) bf16_block_dots<1>(x, rows, w + t * dim, dim, out + t, vocab);
    }
  });
}
#endif

}  // namespace

#define SSM_LM_HEAD_EXPORT(T, SUFFIX)                                                                             \
  extern "C" int ssm_lm_head_##SUFFIX(const T* x, const T* w, T* out, int64_t rows, int64_t vocab, int64_t dim, \
                                      int threads) {                                                             \
    if (rows < 0 || vocab < 0 || dim < 0) return 1;                                                              \
    lm_head<T>(x, w, out, rows, vocab, dim, threads);                                                            \
    return 0;                                                                                                    \
  }

SSM_LM_HEAD_EXPORT(float, f32)
SSM_LM_HEAD_EXPORT(double, f64)

// bf16 x (rows, dim), weight (vocab, dim) and logits (rows, vocab), as uint16 bit patterns
extern "C" int ssm_lm_head_bf16(const uint16_t* x, const uint16_t* w, uint16_t* out, int64_t rows, int64_t vocab,
                                int64_t dim, int threads) {
  if (rows < 0 || vocab < 0 || dim < 0) return 1;
  std::vector<float> logits(rows * vocab);
#if defined(__AVX512BF16__)
  lm_head_bf16_dot(x, w, logits.data(), rows, vocab, dim, threads);
#else
  std::vector<float> xf(rows * dim);
  for (int64_t i = 0; i < rows * dim; ++i) xf[i] = bf16_to_float(x[i]);
  lm_head<uint16_t>(xf.data(), w, logits.data(), rows, vocab, dim, threads);
#endif
  for (int64_t i = 0; i < rows * vocab; ++i) out[i] = float_to_bf16(logits[i]);
  return 0;
}
