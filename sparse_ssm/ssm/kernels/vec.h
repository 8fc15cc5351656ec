// Vector utilities of the native kernels: GCC/Clang vector extensions (8 floats or 4 doubles:
// AVX2 with -march=native, two SSE halves or NEON elsewhere), horizontal sums, a vectorised exp and
// sigmoid, and a parallel loop over independent tasks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#include "pool.h"
#if defined(__AVX__)
#include <immintrin.h>
#endif

namespace ssmk {

// The exponentials that turn raw parameters into decay rates take their argument capped at
// kRateExpMax (as sparse_ssm.ssm.structures.block.rate_exp): a float32 rate would overflow to inf
// above ~88 and its gradient would be NaN.  rate_exp_grad is the derivative (0 above the cap).
constexpr double kRateExpMax = 20;
template <typename T> inline T rate_exp(T x) { return std::exp(std::min(x, T(kRateExpMax))); }
template <typename T> inline T rate_exp_grad(T x) { return x > T(kRateExpMax) ? T(0) : std::exp(x); }

template <typename T> struct Vec;
template <> struct Vec<float> {
  typedef float type __attribute__((vector_size(32)));
  typedef int32_t itype __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <> struct Vec<double> {
  typedef double type __attribute__((vector_size(32)));
  typedef int64_t itype __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename T> using V = typename Vec<T>::type;

template <typename T> inline V<T> vload(const T* p) { V<T> v; std::memcpy(&v, p, sizeof v); return v; }
template <typename T> inline void vstore(T* p, V<T> v) { std::memcpy(p, &v, sizeof v); }
template <typename T> inline V<T> vsplat(T x) { return V<T>{} + x; }
template <typename T> inline T hsum(V<T> v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}
#if defined(__AVX__)
template <> inline float hsum<float>(V<float> v) {
  __m256 x;
  std::memcpy(&x, &v, sizeof x);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
#endif

// exp of a float vector (Cephes' expf: range reduction by ln 2, degree-6 polynomial; ~1 ulp)
inline V<float> vexp(V<float> x) {
  typedef Vec<float>::itype VI;
  x = x < -87.3f ? vsplat(-87.3f) : x;
  x = x > 88.7f ? vsplat(88.7f) : x;
  V<float> fx = x * 1.44269504088896341f + 0.5f;
  VI n = __builtin_convertvector(fx, VI);
  V<float> fn = __builtin_convertvector(n, V<float>);
  n = fn > fx ? n - 1 : n;                                  // floor
  fn = __builtin_convertvector(n, V<float>);
  V<float> r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  V<float> p = vsplat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  VI bits = (n + 127) << 23;
  V<float> scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline V<double> vexp(V<double> x) {
  V<double> out;
  for (int i = 0; i < Vec<double>::lanes; ++i) out[i] = std::exp(x[i]);
  return out;
}

template <typename T> inline V<T> vsigmoid(V<T> x) { return 1 / (1 + vexp(-x)); }

// sin and cos of a float vector (Cephes' sinf/cosf: reduction by pi/4 in three parts, degree-5/6
// polynomials; accurate to a few ulp for |x| < 8192)
inline void vsincos(V<float> x, V<float>& s, V<float>& c) {
  typedef Vec<float>::itype VI;
  const VI negative = x < 0.0f;
  V<float> ax = negative ? -x : x;
  VI j = __builtin_convertvector(ax * 1.27323954473516f, VI);   // 4 / pi
  j = (j + 1) & ~1;
  const V<float> y = __builtin_convertvector(j, V<float>);
  ax = ((ax - y * 0.78515625f) - y * 2.4187564849853515625e-4f) - y * 3.77489497744594108e-8f;
  const V<float> z = ax * ax;
  const V<float> pc = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z
                      - 0.5f * z + 1.0f;
  const V<float> ps = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * ax + ax;
  const VI swap = (j & 2) != 0;
  s = swap ? pc : ps;
  c = swap ? ps : pc;
  const VI sin_negative = ((j & 4) != 0) != negative;
  const VI cos_negative = ((j + 2) & 4) != 0;
  s = sin_negative ? -s : s;
  c = cos_negative ? -c : c;
}

inline void vsincos(V<double> x, V<double>& s, V<double>& c) {
  for (int i = 0; i < Vec<double>::lanes; ++i) s[i] = std::sin(x[i]), c[i] = std::cos(x[i]);
}

// ZOH's input gain and its derivative (the diagonal and Householder scans):
// phi(x) = expm1(x) / x and psi(x) = (x e^x - expm1(x)) / x^2 given e = exp(x); series near 0
template <typename T> inline V<T> phi_of(V<T> x, V<T> e) {
  V<T> series = 1 + x * (T(1) / 2 + x * (T(1) / 6 + x * (T(1) / 24 + x * (T(1) / 120 + x * (T(1) / 720)))));
  V<T> direct = (e - 1) / x;
  return ((x > T(-0.1)) & (x < T(0.1))) ? series : direct;
}
template <typename T> inline V<T> psi_of(V<T> x, V<T> e) {
  V<T> series = T(1) / 2 + x * (T(1) / 3 + x * (T(1) / 8 + x * (T(1) / 30 + x * (T(1) / 144 + x * (T(1) / 840)))));
  V<T> direct = (x * e - (e - 1)) / (x * x);
  return ((x > T(-0.1)) & (x < T(0.1))) ? series : direct;
}
// float64 (the precision of the reference tests): libm's expm1, and the series only where it is exact
template <> inline V<double> phi_of<double>(V<double> x, V<double>) {
  V<double> out;
  for (int i = 0; i < Vec<double>::lanes; ++i) out[i] = x[i] == 0 ? 1.0 : std::expm1(x[i]) / x[i];
  return out;
}
template <> inline V<double> psi_of<double>(V<double> x, V<double> e) {
  V<double> out;
  for (int i = 0; i < Vec<double>::lanes; ++i) {
    const double v = x[i];
    out[i] = std::fabs(v) < 1e-3 ? 0.5 + v * (1.0 / 3 + v * (1.0 / 8 + v * (1.0 / 30 + v * (1.0 / 144 + v / 840))))
                                 : (v * e[i] - std::expm1(v)) / (v * v);
  }
  return out;
}

// Four sums at once: (sum v0, sum v1, sum v2, sum v3)
template <typename T> inline void hsum4(V<T> v0, V<T> v1, V<T> v2, V<T> v3, T* out) {
  out[0] = hsum<T>(v0), out[1] = hsum<T>(v1), out[2] = hsum<T>(v2), out[3] = hsum<T>(v3);
}
#if defined(__AVX__)
template <> inline void hsum4<float>(V<float> v0, V<float> v1, V<float> v2, V<float> v3, float* out) {
  __m256 a, b, c, e;
  std::memcpy(&a, &v0, 32), std::memcpy(&b, &v1, 32), std::memcpy(&c, &v2, 32), std::memcpy(&e, &v3, 32);
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, e));
  _mm_storeu_ps(out, _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1)));
}
#endif

// sum_i x[i] y[i]
template <typename T> T dot(const T* x, const T* y, int64_t n) {
  constexpr int W = Vec<T>::lanes;
  V<T> acc = vsplat(T(0));
  int64_t i = 0;
  for (; i + W <= n; i += W) acc += vload(x + i) * vload(y + i);
  T s = hsum<T>(acc);
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

#if defined(__AVX512F__)
// sum_i w[i] x[i] for one float row w read front to back.  At one row a decoding product's time is one
// pass over its weight; read row after row in one sequential stream (the hardware prefetcher alone),
// the 130 M diagonal model's fp32 step went from 19.4 to 13.6 ms on one Zen core, against tiles of
// four rows side by side with software prefetch (float_gemv.h, still used for several rows; the
// read orders alone: bench/row_stream.c).  64 floats a step in four chains, the tail masked.
inline float row_dot_avx512(const float* w, const float* x, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (n - i)) - 1);
    a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + i), _mm512_maskz_loadu_ps(m, x + i), a0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}
#endif

// out[p] = y[p] * silu(z[p]) for p < P
template <typename T> void gate_row(const T* y, const T* z, T* out, int64_t P) {
  constexpr int W = Vec<T>::lanes;
  int64_t p = 0;
  for (; p + W <= P; p += W) {
    const V<T> zv = vload(z + p);
    vstore(out + p, vload(y + p) * zv * vsigmoid<T>(zv));
  }
  for (; p < P; ++p) out[p] = y[p] * z[p] / (1 + std::exp(-z[p]));
}

// the gate's backward: dyp = dy * silu(z), dz = dy * y * silu'(z), silu'(z) = s (1 + z (1 - s))
template <typename T> void gate_row_backward(const T* dy, const T* y, const T* z, T* dyp, T* dz, int64_t P) {
  constexpr int W = Vec<T>::lanes;
  int64_t p = 0;
  for (; p + W <= P; p += W) {
    const V<T> zv = vload(z + p), s = vsigmoid<T>(zv), g = vload(dy + p);
    vstore(dyp + p, g * zv * s);
    vstore(dz + p, g * vload(y + p) * s * (1 + zv * (1 - s)));
  }
  for (; p < P; ++p) {
    const T s = 1 / (1 + std::exp(-z[p]));
    dyp[p] = dy[p] * z[p] * s;
    dz[p] = dy[p] * y[p] * s * (1 + z[p] * (1 - s));
  }
}

// The skip term of tc tokens of one head: ych[t, p] = D[t * D_stride] * u[t * u_stride + p]
template <typename T>
void skip_rows(const T* D, int64_t D_stride, const T* u, int64_t u_stride, int64_t tc, int64_t P, T* ych) {
  for (int64_t t = 0; t < tc; ++t)
    for (int64_t p = 0; p < P; ++p) ych[t * P + p] = D[t * D_stride] * u[t * u_stride + p];
}

// Store tc rows ych (tc, P) of one head: to ypre (if any, the ungated output the backward needs) and
// to y, gated by z if given (y * silu(z)); y, ypre and z advance by their strides from token to token.
template <typename T>
void store_rows(const T* ych, int64_t tc, int64_t P, T* y, T* ypre, int64_t y_stride, const T* z, int64_t z_stride) {
  for (int64_t t = 0; t < tc; ++t) {
    if (ypre) std::memcpy(ypre + t * y_stride, &ych[t * P], sizeof(T) * P);
    if (z)
      gate_row(&ych[t * P], z + t * z_stride, y + t * y_stride, P);
    else
      std::memcpy(y + t * y_stride, &ych[t * P], sizeof(T) * P);
  }
}

// Run work(task) for task in [0, tasks) on up to `threads` threads (contiguous ranges each): the
// process's kept workers (pool.h), or threads of its own when they are busy.
template <typename F> void parallel_for(int64_t tasks, int threads, F work) {
  threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, tasks));
  auto run = [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) work(i);
  };
  if (threads == 1) {
    run(0, tasks);
    return;
  }
  const std::function<void(int64_t)> part = [&](int64_t k) { run(tasks * k / threads, tasks * (k + 1) / threads); };
  if (WorkerPool::get().run(threads, part)) return;
  std::vector<std::thread> pool;
  for (int k = 0; k < threads; ++k) pool.emplace_back(part, k);
  for (auto& t : pool) t.join();
}

}  // namespace ssmk
