// One decoding step of a selective SSM layer between its two projections, for a diagonal A (and the
// block family: below): the work of a whole `SelectiveSSMLayer.step` but for in_proj and out_proj, in
// one call, the states updated in place.  Per batch row, with E = H * P channels, from xz = in_proj(x) = [u, z]:
//
//   u      <- silu(conv_bias + sum_{k < K - 1} conv_w[:, k] conv_state[k] + conv_w[:, K - 1] u)
//   conv_state <- (conv_state[1:], u before the conv)                 (the K - 1 latest inputs)
//   g      = Wg @ src,  src = u (or a learned constant: the time-invariant ablation)
//   [dt_raw (H), a_low (r), B (G N), C (G N), d_raw (H)] = g
//   dt     = softplus(dt_raw + dt_bias)
//   a      = -exp(2 raw), raw = A_base + Wa @ a_low       (H, N)        the diagonal continuous A_t
//   D      = D_base + d_raw
//   per head h (group g = h / (H / G)) and state n: (A_bar, beta) = discretize(dt_h, a_hn)  (zoh / gbt,
//   method bit 1: the signed range 2 A_bar - 1, as in selective_scan.cpp)
//   S[h, n, :] = A_bar S[h, n, :] + beta B[g, n] u[h, :]
//   y[h, :]    = (sum_n C[g, n] S[h, n, :] + D_h u[h, :]) * silu(z[h, :])
//
// The structured A's of the block family (the structure in the method code, block_heads.h) take the
// scan part from block_heads.h / block_ops.h, the scan's operators (block_scan.cpp):
//   raw    = A_base + Wa @ a_low   (H, R), R the raw size (block N bs, rotation N, banded (2N/bs + 1) bs^2)
//   per head: (A_bar, B_bar) = the token's operator of block_scan.cpp from (raw[h], dt_h, B[g])
//   S[h] = A_bar S[h] + B_bar u[h]^T;  y[h, :] = (C[g]^T S[h] + D_h u[h, :]) * silu(z[h, :])
//
// Layouts: xz (b, 2E); conv_state (b, K - 1, E); conv_w (E, K); Wg (O, E) with O = 2H + r + 2GN
// (a Linear weight); Wa (H R, r); A_base (H, R) (R = N for the diagonal); the SSM state (b, H, N, P);
// y (b, E).
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
// its arithmetic.  With b rows (concurrent streams) the projections (in, out and the generator's) are
// matrix-matrix products: each weight tile is read once and used for all rows from registers; the
// conv and the scan run row by row (each row has its own state).  The block's FFN likewise
// (`ssm_ffn_step`): x_out = x + W_down @ act(W_up @ rms_norm(x) + b_up) + b_down, in one call.
// The `_q8` variants of the two take weight-only int8 projections (W_in, W_out, Wg; W_up, W_down: int8
// rows with float32 row scales, `int8_gemv.h`), the rest as the float ones; the block step's Wa float
// (Wa set) or int8 (Wa null; Wa_qt (r, H R) its int8 rows transposed, Wa_s (H R) their scales).

#include "block_heads.h"
#include "float_gemv.h"
#include "int8_columns.h"

namespace {

using namespace ssmk;

struct StepDims {
  int64_t b, E, H, P, N, G, r, K;
  int method;      // the step's code (block_heads.h): the discretisation, and the structure of the block family
  double alpha;
  int structure() const { return step_structure(method); }
  BlockKind blocks() const { return step_blocks(method, N, alpha); }
  int64_t R() const { return structure() ? blocks().R() : N; }    // the raw size of a head: Wa (H R, r)
};

template <typename T> struct StepArgs {
  const T *xz, *conv_w, *conv_b, *Wg, *dt_bias, *Wa, *A_base, *D_base, *lti;
  T *conv_state, *ssm_state, *y;
  const int8_t* Wg_q = nullptr;        // an int8 Wg (weight-only int8) with its row scales: Wg unused
  const float* Wg_s = nullptr;
  const int8_t* Wa_qt = nullptr;       // an int8 Wa likewise, transposed: (r, H R), Wa = s[:, None] * qt^T
  const float* Wa_s = nullptr;
};

template <typename T> inline T silu(T v) { return v / (1 + std::exp(-v)); }

// v[i] <- silu(v[i]) for i < n, with the vectorised exp (a scalar exp per channel and row cost more than
// the scan at 8 rows)
template <typename T> void silu_in_place(T* v, int64_t n) {
  constexpr int W = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V<T> x = vload(v + i);
    vstore(v + i, x * vsigmoid<T>(x));
  }
  for (; i < n; ++i) v[i] = silu(v[i]);
}

// One head's discretisation for its N states: Ab[n], Bb[n] = beta_n * B[n] from (A_bar, beta) =
// discretize(dt, a[n]) (zoh / gbt; method bit 1: the signed range), vectorised as selective_scan.cpp
template <typename T> void discretize_head(const StepDims& d, T dt, const T* a, const T* B, T* Ab, T* Bb) {
  constexpr int W = Vec<T>::lanes;
  int64_t n = 0;
  for (; n + W <= d.N; n += W) {
    const V<T> av = vload(a + n), dtv = vsplat(dt), xv = dtv * av;
    V<T> Abar, beta;
    if ((d.method & 1) == 0) {
      const V<T> e = vexp(xv);
      Abar = e, beta = dtv * phi_of<T>(xv, e);
    } else {
      const T al = T(d.alpha);
      const V<T> inv = 1 / (1 - al * xv);
      Abar = (1 + (1 - al) * xv) * inv, beta = dtv * inv;
    }
    if (d.method & 2) Abar = 2 * Abar - 1;                       // the signed range
    vstore(Ab + n, Abar);
    vstore(Bb + n, beta * vload(B + n));
  }
  for (; n < d.N; ++n) {
    const T an = a[n], xx = dt * an;
    T Abar, beta;
    if ((d.method & 1) == 0) {
      Abar = std::exp(xx);
      beta = xx == 0 ? dt : std::expm1(xx) / an;
    } else {
      const T al = T(d.alpha), den = 1 - al * xx;
      Abar = (1 + (1 - al) * xx) / den;
      beta = dt / den;
    }
    if (d.method & 2) Abar = 2 * Abar - 1;
    Ab[n] = Abar, Bb[n] = beta * B[n];
  }
}

// out (E) = the conv of the window ending at u (E) over the buffer cs (K - 1, E), weights w (E, K); inlined
// where K is the constant 4 (the default), the compiler vectorises over the channels, w's taps de-interleaved
template <typename T>
__attribute__((always_inline)) inline void conv_window(const T* __restrict__ w, const T* __restrict__ bias,
                                                       const T* __restrict__ u, const T* __restrict__ cs, int64_t E,
                                                       int64_t K, T* __restrict__ out) {
  for (int64_t e = 0; e < E; ++e) {
    T pre = bias[e] + w[e * K + K - 1] * u[e];
    for (int64_t k = 0; k < K - 1; ++k) pre += w[e * K + k] * cs[k * E + e];
    out[e] = pre;
  }
}

// The conv of row bi: u_out (E) = silu(conv of the window ending at u_in), the rolling buffer advanced
template <typename T> void conv_row(const StepDims& d, const StepArgs<T>& x, int64_t bi, T* u_out) {
  const int64_t E = d.E, K = d.K;
  const T* u_in = x.xz + bi * 2 * E;
  T* cs = x.conv_state + bi * (K - 1) * E;
  if (K == 4) conv_window(x.conv_w, x.conv_b, u_in, cs, E, int64_t(4), u_out);
  else conv_window(x.conv_w, x.conv_b, u_in, cs, E, K, u_out);
  silu_in_place(u_out, E);
  if (K > 1) {
    std::memmove(cs, cs + E, sizeof(T) * (K - 2) * E);
    std::memcpy(cs + (K - 2) * E, u_in, sizeof(T) * E);
  }
}

template <typename T> inline T softplus(T v) { return v > 20 ? v : std::log1p(std::exp(v)); }   // as torch's

// scan_row for the block family (block_heads.h's step_heads) from the row's raw (H, R) = A_base + Wa @ a_low
template <typename T>
void scan_row_blocks(const StepDims& d, const StepArgs<T>& x, int64_t bi, const T* u, const T* g, const T* raw) {
  const int64_t E = d.E, H = d.H, N = d.N, G = d.G;
  std::vector<T> dt(H), D(H);
  const T *dt_raw = g, *Bv = dt_raw + H + d.r, *Cv = Bv + G * N, *d_raw = Cv + G * N;
  for (int64_t h = 0; h < H; ++h) dt[h] = softplus(dt_raw[h] + x.dt_bias[h]), D[h] = x.D_base[h] + d_raw[h];
  step_heads(d.blocks(), H, d.P, G, raw, dt.data(), Bv, Cv, D.data(), u, x.xz + bi * 2 * E + E,
             x.ssm_state + bi * H * N * d.P, x.y + bi * E);
}

// The scan of row bi from its conv output u (E), generator output g (O) and raw row (H R): y row bi, the
// state advanced
template <typename T>
void scan_row(const StepDims& d, const StepArgs<T>& x, int64_t bi, const T* u, const T* g, const T* raw) {
  if (d.structure()) return scan_row_blocks(d, x, bi, u, g, raw);
  const int64_t E = d.E, H = d.H, P = d.P, N = d.N, G = d.G, r = d.r;
  const T* z = x.xz + bi * 2 * E + E;
  std::vector<T> a(H * N), Ab(N), Bb(N);
  const T *dt_raw = g, *Bv = dt_raw + H + r, *Cv = Bv + G * N, *d_raw = Cv + G * N;
  for (int64_t i = 0; i < H * N; ++i) a[i] = -rate_exp(2 * raw[i]);
  for (int64_t h = 0; h < H; ++h) {
    const T dt = softplus(dt_raw[h] + x.dt_bias[h]);
    const T Dh = x.D_base[h] + d_raw[h];
    const int64_t grp = h / (H / G);
    discretize_head(d, dt, &a[h * N], Bv + grp * N, Ab.data(), Bb.data());
    T* S = x.ssm_state + (bi * H + h) * N * P;
    const T* uh = u + h * P;
    T* yh = x.y + bi * E + h * P;
    for (int64_t p = 0; p < P; ++p) yh[p] = Dh * uh[p];
    for (int64_t n = 0; n < N; ++n) {
      const T Abar = Ab[n], bn = Bb[n], cn = Cv[grp * N + n];
      T* __restrict__ Sn = S + n * P;
      for (int64_t p = 0; p < P; ++p) {
        Sn[p] = Abar * Sn[p] + bn * uh[p];
        yh[p] += cn * Sn[p];
      }
    }
    gate_row(yh, z + h * P, yh, P);                              // y * silu(z)
  }
}

template <typename T> void rms_norm_row(const T* x, const T* w, T* out, int64_t dim, double eps) {
  const T scale = T(1) / std::sqrt(dot(x, x, dim) / T(dim) + T(eps));
  for (int64_t i = 0; i < dim; ++i) out[i] = x[i] * scale * w[i];
}

// The raw rows (b, H R) = A_base + Wa @ a_low of all b rows at once (each tile of Wa read once for a tile
// of rows; Wa float, or int8 transposed) from the generator's outputs g (b, O)
template <typename T> std::vector<T> raw_rows(const StepDims& d, const StepArgs<T>& x, const T* g) {
  const int64_t O = 2 * d.H + d.r + 2 * d.G * d.N, HR = d.H * d.R(), r = d.r;
  std::vector<T> a_low(d.b * r), raw(d.b * HR);
  for (int64_t bi = 0; bi < d.b; ++bi) {
    std::memcpy(&a_low[bi * r], g + bi * O + d.H, sizeof(T) * r);
    std::memcpy(&raw[bi * HR], x.A_base, sizeof(T) * HR);
  }
  if (x.Wa_qt) project_columns_q8(x.Wa_qt, x.Wa_s, a_low.data(), raw.data(), raw.data(), d.b, HR, r);
  else project_rows(x.Wa, a_low.data(), raw.data(), raw.data(), d.b, HR, r);
  return raw;
}

// The layer step of all b rows (x.xz and x.y set): the conv of every row, the generator projection of
// all rows as one product (for the time-invariant ablation: once, the same for every row), the scans
template <typename T> void layer_step(const StepDims& d, const StepArgs<T>& x, int threads) {
  const int64_t O = 2 * d.H + d.r + 2 * d.G * d.N;
  const Weights<T> Wg{x.Wg, x.Wg_q, x.Wg_s};
  std::vector<T> u(d.b * d.E), g(d.b * O);
  parallel_for(d.b, threads, [&](int64_t bi) { conv_row(d, x, bi, &u[bi * d.E]); });
  if (x.lti) {
    if (d.b > 0) project(Wg, x.lti, (const T*)nullptr, g.data(), 1, O, d.E, threads);
    for (int64_t bi = 1; bi < d.b; ++bi) std::memcpy(&g[bi * O], g.data(), sizeof(T) * O);
  } else {
    project(Wg, u.data(), (const T*)nullptr, g.data(), d.b, O, d.E, threads);
  }
  const std::vector<T> raw = raw_rows(d, x, g.data());
  parallel_for(d.b, threads, [&](int64_t bi) {
    scan_row(d, x, bi, &u[bi * d.E], &g[bi * O], &raw[bi * d.H * d.R()]);
  });
}

template <typename T>
void block_step(const StepDims& d, StepArgs<T> x, const T* x_in, T* x_out, const T* norm_w, double eps,
                const Weights<T>& W_in, const Weights<T>& W_out, int64_t D, int threads) {
  std::vector<T> h(d.b * D), xz(d.b * 2 * d.E), y(d.b * d.E);
  for (int64_t bi = 0; bi < d.b; ++bi) rms_norm_row(x_in + bi * D, norm_w, &h[bi * D], D, eps);
  project(W_in, h.data(), (const T*)nullptr, xz.data(), d.b, 2 * d.E, D, threads);
  x.xz = xz.data(), x.y = y.data();
  layer_step(d, x, threads);
  project(W_out, y.data(), x_in, x_out, d.b, D, d.E, threads);
}

// The pre-norm FFN of a block for b rows (`ssm_ffn_step`): x_out = x + W_down @ act(W_up @ rms_norm(x) + b_up)
// + b_down, W_up (F, D), W_down (D, F); act 0 gelu (erf), 1 gelu (tanh), 2 silu, 3 relu, as torch's
template <typename T> void activate(T* v, int64_t n, int act) {
  if (act == 2) return silu_in_place(v, n);
  for (int64_t i = 0; i < n; ++i) {
    const T x = v[i];
    if (act == 0) v[i] = T(0.5) * x * (1 + std::erf(x * T(M_SQRT1_2)));
    else if (act == 1) v[i] = T(0.5) * x * (1 + std::tanh(T(0.7978845608028654) * (x + T(0.044715) * x * x * x)));
    else v[i] = x > 0 ? x : T(0);
  }
}

template <typename T>
void ffn_step(const T* x_in, T* x_out, const T* norm_w, double eps, const Weights<T>& W_up, const T* b_up,
              const Weights<T>& W_down, const T* b_down, int64_t b, int64_t D, int64_t F, int act, int threads) {
  std::vector<T> h(b * D), f(b * F), res(b * D);
  for (int64_t bi = 0; bi < b; ++bi) {
    rms_norm_row(x_in + bi * D, norm_w, &h[bi * D], D, eps);
    std::memcpy(&f[bi * F], b_up, sizeof(T) * F);
    for (int64_t i = 0; i < D; ++i) res[bi * D + i] = x_in[bi * D + i] + b_down[i];
  }
  project(W_up, h.data(), f.data(), f.data(), b, F, D, threads);
  activate(f.data(), b * F, act);
  project(W_down, f.data(), res.data(), x_out, b, D, F, threads);
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
    if (!step_code_ok(method, N)) return 2;                                                                     \
    StepArgs<T> x{xz, conv_w, conv_b, Wg, dt_bias, Wa, A_base, D_base, lti, conv_state, ssm_state, y};         \
    layer_step(d, x, threads);                                                                                  \
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
    if (!step_code_ok(method, N)) return 2;                                                                     \
    StepArgs<T> x{nullptr, conv_w, conv_b, Wg, dt_bias, Wa, A_base, D_base, lti, conv_state, ssm_state, nullptr}; \
    block_step(d, x, x_in, x_out, norm_w, eps, {W_in}, {W_out}, D, threads);                                   \
    return 0;                                                                                                   \
  }

#define SSM_FFN_EXPORT(T, SUFFIX)                                                                               \
  extern "C" int ssm_ffn_step_##SUFFIX(const T* x_in, T* x_out, const T* norm_w, double eps, const T* W_up,      \
                                       const T* b_up, const T* W_down, const T* b_down, int64_t b, int64_t D,   \
                                       int64_t F, int act, int threads) {                                       \
    if (b < 0 || D < 1 || F < 1 || act < 0 || act > 3) return 1;                                                \
    ffn_step(x_in, x_out, norm_w, eps, {W_up}, b_up, {W_down}, b_down, b, D, F, act, threads);                  \
    return 0;                                                                                                   \
  }

// The same two with int8 weights (weight-only int8: each an int8 matrix q and its row scales s, float32)
#define SSM_Q8_EXPORT(T, SUFFIX)                                                                                \
  extern "C" int ssm_block_step_q8_##SUFFIX(const T* x_in, T* x_out, const T* norm_w, double eps,               \
                                            const int8_t* W_in_q, const float* W_in_s, const int8_t* W_out_q,   \
                                            const float* W_out_s, int64_t D, T* conv_state, const T* conv_w,    \
                                            const T* conv_b, const int8_t* Wg_q, const float* Wg_s,            \
                                            const T* dt_bias, const T* Wa, const int8_t* Wa_qt,                 \
                                            const float* Wa_s, const T* A_base, const T* D_base,                \
                                            const T* lti, T* ssm_state, int64_t b, int64_t E, int64_t H,        \
                                            int64_t P, int64_t N, int64_t G, int64_t r, int64_t K, int method,  \
                                            double alpha, int threads) {                                        \
    if (b < 0 || D < 1 || H < 1 || E != H * P || N < 1 || G < 1 || H % G || r < 1 || K < 1) return 1;          \
    StepDims d{b, E, H, P, N, G, r, K, method, alpha};                                                         \
    if (!step_code_ok(method, N)) return 2;                                                                     \
    StepArgs<T> x{nullptr, conv_w,    conv_b,    nullptr, dt_bias, Wa,   A_base, D_base,                        \
                  lti,     conv_state, ssm_state, nullptr, Wg_q,    Wg_s, Wa_qt, Wa_s};                          \
    block_step(d, x, x_in, x_out, norm_w, eps, {nullptr, W_in_q, W_in_s}, {nullptr, W_out_q, W_out_s}, D,       \
               threads);                                                                                        \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_ffn_step_q8_##SUFFIX(const T* x_in, T* x_out, const T* norm_w, double eps,                 \
                                          const int8_t* W_up_q, const float* W_up_s, const T* b_up,             \
                                          const int8_t* W_down_q, const float* W_down_s, const T* b_down,       \
                                          int64_t b, int64_t D, int64_t F, int act, int threads) {              \
    if (b < 0 || D < 1 || F < 1 || act < 0 || act > 3) return 1;                                                \
    ffn_step(x_in, x_out, norm_w, eps, {nullptr, W_up_q, W_up_s}, b_up, {nullptr, W_down_q, W_down_s}, b_down,  \
             b, D, F, act, threads);                                                                            \
    return 0;                                                                                                   \
  }

SSM_Q8_EXPORT(float, f32)
SSM_Q8_EXPORT(double, f64)
SSM_FFN_EXPORT(float, f32)
SSM_FFN_EXPORT(double, f64)
SSM_STEP_EXPORT(float, f32)
SSM_STEP_EXPORT(double, f64)
