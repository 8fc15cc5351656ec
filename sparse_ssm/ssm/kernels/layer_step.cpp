// One decoding step of a selective SSM layer between its two projections, for a diagonal A: the
// work of a whole `SelectiveSSMLayer.step` but for in_proj and out_proj, in one call, the states
// updated in place.  Per batch row, with E = H * P channels, from xz = in_proj(x) = [u, z]:
//
//   u      <- silu(conv_bias + sum_{k < K - 1} conv_w[:, k] conv_state[k] + conv_w[:, K - 1] u)
//   conv_state <- (conv_state[1:], u before the conv)                 (the K - 1 latest inputs)
//   g      = Wg @ src,  src = u (or a learned constant: the time-invariant ablation)
//   [dt_raw (H), a_low (r), B (G N), C (G N), d_raw (H)] = g
//   dt     = softplus(dt_raw + dt_bias)
//   a      = -exp(2 (A_base + Wa @ a_low))        (H, N)                 the diagonal continuous A_t
//   D      = D_base + d_raw
//   per head h (group g = h / (H / G)) and state n: (A_bar, beta) = discretize(dt_h, a_hn)  (zoh / gbt,
//   method bit 1: the signed range 2 A_bar - 1, as in selective_scan.cpp)
//   S[h, n, :] = A_bar S[h, n, :] + beta B[g, n] u[h, :]
//   y[h, :]    = (sum_n C[g, n] S[h, n, :] + D_h u[h, :]) * silu(z[h, :])
//
// Layouts: xz (b, 2E); conv_state (b, K - 1, E); conv_w (E, K); Wg (O, E) with O = 2H + r + 2GN
// (a Linear weight); Wa (H N, r); A_base (H, N); the SSM state (b, H, N, P); y (b, E).
// `sparse_ssm.ssm.selective.SelectiveParameterGenerator.decode_weights` hands these over; the
// decode-equals-forward tests hold the two in step.
//
// Also the RMSNorm of a few rows (the decoding step's norms: at one token a row, torch's rms_norm
// costs 10x the arithmetic in operator dispatch): out[i, :] = x[i, :] / sqrt(mean(x[i, :]^2) + eps) * w,
// and a whole residual block around the layer step (`ssm_block_step`), for rows x (b, D):
//
//   x_out = x + W_out @ layer_step(W_in @ rms_norm(x; norm_w, eps))      W_in (2E, D), W_out (D, E)
//
// one call per layer and token instead of five PyTorch operators: at decode sizes the weights stream
// from memory and push the operators' code and data out of the caches, so each dispatch costs ~10x
// its arithmetic.  The projections read each weight row once for all b rows.

#include "vec.h"

namespace {

using namespace ssmk;

struct StepDims {
  int64_t b, E, H, P, N, G, r, K;
  int method;
  double alpha;
};

template <typename T> struct StepArgs {
  const T *xz, *conv_w, *conv_b, *Wg, *dt_bias, *Wa, *A_base, *D_base, *lti;
  T *conv_state, *ssm_state, *y;
};

template <typename T> inline T silu(T v) { return v / (1 + std::exp(-v)); }

template <typename T> void step_row(const StepDims& d, const StepArgs<T>& x, int64_t bi) {
  const int64_t E = d.E, H = d.H, P = d.P, N = d.N, G = d.G, r = d.r, K = d.K, O = 2 * H + r + 2 * G * N;
  const T* u_in = x.xz + bi * 2 * E;
  const T* z = u_in + E;
  T* cs = x.conv_state + bi * (K - 1) * E;
  std::vector<T> u(E), g(O), a(H * N);
  for (int64_t e = 0; e < E; ++e) {                 // the conv window, then the rolling buffer
    T pre = x.conv_b[e] + x.conv_w[e * K + K - 1] * u_in[e];
    for (int64_t k = 0; k < K - 1; ++k) pre += x.conv_w[e * K + k] * cs[k * E + e];
    u[e] = silu(pre);
  }
  if (K > 1) {
    std::memmove(cs, cs + E, sizeof(T) * (K - 2) * E);
    std::memcpy(cs + (K - 2) * E, u_in, sizeof(T) * E);
  }
  const T* src = x.lti ? x.lti : u.data();
  for (int64_t o = 0; o < O; ++o) g[o] = dot(x.Wg + o * E, src, E);
  const T *dt_raw = g.data(), *a_low = dt_raw + H, *Bv = a_low + r, *Cv = Bv + G * N, *d_raw = Cv + G * N;
  for (int64_t i = 0; i < H * N; ++i) a[i] = -rate_exp(2 * (x.A_base[i] + dot(x.Wa + i * r, a_low, r)));
  for (int64_t h = 0; h < H; ++h) {
    const T v = dt_raw[h] + x.dt_bias[h];
    const T dt = v > 20 ? v : std::log1p(std::exp(v));          // softplus (as torch's, threshold 20)
    const T Dh = x.D_base[h] + d_raw[h];
    const int64_t grp = h / (H / G);
    T* S = x.ssm_state + (bi * H + h) * N * P;
    const T* uh = u.data() + h * P;
    T* yh = x.y + bi * E + h * P;
    for (int64_t p = 0; p < P; ++p) yh[p] = Dh * uh[p];
    for (int64_t n = 0; n < N; ++n) {
      const T an = a[h * N + n], xx = dt * an;
      T Abar, beta;
      if ((d.method & 1) == 0) {
        Abar = std::exp(xx);
        beta = xx == 0 ? dt : std::expm1(xx) / an;
      } else {
        const T al = T(d.alpha), den = 1 - al * xx;
        Abar = (1 + (1 - al) * xx) / den;
        beta = dt / den;
      }
      if (d.method & 2) Abar = 2 * Abar - 1;                     // the signed range
      const T bn = beta * Bv[grp * N + n], cn = Cv[grp * N + n];
      T* Sn = S + n * P;
      for (int64_t p = 0; p < P; ++p) {
        Sn[p] = Abar * Sn[p] + bn * uh[p];
        yh[p] += cn * Sn[p];
      }
    }
    for (int64_t p = 0; p < P; ++p) yh[p] *= silu(z[h * P + p]);
  }
}

template <typename T> void rms_norm_row(const T* x, const T* w, T* out, int64_t dim, double eps) {
  const T scale = T(1) / std::sqrt(dot(x, x, dim) / T(dim) + T(eps));
  for (int64_t i = 0; i < dim; ++i) out[i] = x[i] * scale * w[i];
}

// out (b, O) = in (b, I) @ W^T (+ add (b, O) when given), W (O, I) row-major: every W row is read
// once for all b rows
template <typename T> void project_rows(const T* W, const T* in, const T* add, T* out, int64_t b, int64_t O, int64_t I) {
  constexpr int Wd = Vec<T>::lanes;
  int64_t o = 0;
  for (; o + 4 <= O; o += 4) {
    const T *w0 = W + o * I, *w1 = w0 + I, *w2 = w1 + I, *w3 = w2 + I;
    for (int64_t bi = 0; bi < b; ++bi) {
      const T* v = in + bi * I;
      V<T> a0 = vsplat(T(0)), a1 = a0, a2 = a0, a3 = a0;
      int64_t i = 0;
      for (; i + Wd <= I; i += Wd) {
        const V<T> x = vload(v + i);
        a0 += vload(w0 + i) * x, a1 += vload(w1 + i) * x, a2 += vload(w2 + i) * x, a3 += vload(w3 + i) * x;
      }
      T sum[4];
      hsum4<T>(a0, a1, a2, a3, sum);
      for (; i < I; ++i) sum[0] += w0[i] * v[i], sum[1] += w1[i] * v[i], sum[2] += w2[i] * v[i], sum[3] += w3[i] * v[i];
      for (int k = 0; k < 4; ++k) out[bi * O + o + k] = (add ? add[bi * O + o + k] : T(0)) + sum[k];
    }
  }
  for (; o < O; ++o)
    for (int64_t bi = 0; bi < b; ++bi) out[bi * O + o] = (add ? add[bi * O + o] : T(0)) + dot(W + o * I, in + bi * I, I);
}

template <typename T>
void block_step(const StepDims& d, StepArgs<T> x, const T* x_in, T* x_out, const T* norm_w, double eps, const T* W_in,
                const T* W_out, int64_t D, int threads) {
  std::vector<T> h(d.b * D), xz(d.b * 2 * d.E), y(d.b * d.E);
  for (int64_t bi = 0; bi < d.b; ++bi) rms_norm_row(x_in + bi * D, norm_w, &h[bi * D], D, eps);
  project_rows(W_in, h.data(), (const T*)nullptr, xz.data(), d.b, 2 * d.E, D);
  x.xz = xz.data(), x.y = y.data();
  parallel_for(d.b, threads, [&](int64_t bi) { step_row(d, x, bi); });
  project_rows(W_out, y.data(), x_in, x_out, d.b, D, d.E);
}

}  // namespace

#define SSM_STEP_EXPORT(T, SUFFIX)                                                                              \
  extern "C" int ssm_layer_step_##SUFFIX(const T* xz, T* conv_state, const T* conv_w, const T* conv_b,          \
                                         const T* Wg, const T* dt_bias, const T* Wa, const T* A_base,           \
                                         const T* D_base, const T* lti, T* ssm_state, T* y, int64_t b,          \
                                         int64_t E, int64_t H, int64_t P, int64_t N, int64_t G, int64_t r,      \
                                         int64_t K, int method, double alpha, int threads) {                    \
    if (b < 0 || H < 1 || E != H * P || N < 1 || G < 1 || H % G || r < 1 || K < 1) return 1;                   \
    StepDims d{b, E, H, P, N, G, r, K, method, alpha};                                                         \
    StepArgs<T> x{xz, conv_w, conv_b, Wg, dt_bias, Wa, A_base, D_base, lti, conv_state, ssm_state, y};         \
    parallel_for(b, threads, [&](int64_t bi) { step_row(d, x, bi); });                                         \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_rms_norm_##SUFFIX(const T* x, const T* w, T* out, int64_t rows, int64_t dim, double eps) {  \
    if (rows < 0 || dim < 1) return 1;                                                                          \
    for (int64_t i = 0; i < rows; ++i) rms_norm_row(x + i * dim, w, out + i * dim, dim, eps);                   \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_block_step_##SUFFIX(const T* x_in, T* x_out, const T* norm_w, double eps, const T* W_in,     \
                                         const T* W_out, int64_t D, T* conv_state, const T* conv_w,             \
                                         const T* conv_b, const T* Wg, const T* dt_bias, const T* Wa,          \
                                         const T* A_base, const T* D_base, const T* lti, T* ssm_state,          \
                                         int64_t b, int64_t E, int64_t H, int64_t P, int64_t N, int64_t G,      \
                                         int64_t r, int64_t K, int method, double alpha, int threads) {         \
    if (b < 0 || D < 1 || H < 1 || E != H * P || N < 1 || G < 1 || H % G || r < 1 || K < 1) return 1;          \
    StepDims d{b, E, H, P, N, G, r, K, method, alpha};                                                         \
    StepArgs<T> x{nullptr, conv_w, conv_b, Wg, dt_bias, Wa, A_base, D_base, lti, conv_state, ssm_state, nullptr}; \
    block_step(d, x, x_in, x_out, norm_w, eps, W_in, W_out, D, threads);                                       \
    return 0;                                                                                                   \
  }

SSM_STEP_EXPORT(float, f32)
SSM_STEP_EXPORT(double, f64)
