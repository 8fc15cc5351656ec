// Fused CPU selective scan for products of Householder reflections times a diagonal (DeltaProduct,
// `structures.HouseholderStructure`), forward and backward: the reflections are applied to the
// state one rank-1 update at a time, O(r N P) per token instead of the N x N operator's O(N^2 P),
// and no per-token operator is stored (the backward recomputes the states chunk by chunk).
//
// Per batch row b, head h (P channels, N states, r reflections), group g of B and C, with raw per
// token [q (N), then per reflection i: k_i (N), c_i (1)]:
//   a = -exp(2 q),  x = dt a
//   zoh:     d = exp(x),                         gain = dt expm1(x) / x
//   gbt(al): d = (1 + (1 - al) x) / (1 - al x),  gain = dt / (1 - al x)
//   khat_i = k_i / max(|k_i|, 1e-12),  beta_i = 2 sigmoid(c_i)
//   S_t = H_r ... H_1 diag(d) S_{t-1} + (gain * B) u_t^T,   H_i = I - beta_i khat_i khat_i^T
//   y_t = C^T S_t + D u_t, optionally * silu(z_t)
//
// Backward of one token, with G the adjoint of S_t and g_0 = diag(d) S_{t-1}, g_i = H_i g_{i-1}
// (recomputed), going down i = r .. 1 with G_r = G, w = khat^T g_{i-1}, v = khat^T G_i (P-vectors):
//   dbeta_i = -v . w,   dkhat_i = -beta_i (G_i w + g_{i-1} v),   G_{i-1} = G_i - beta_i khat_i v^T
//   (H_i is symmetric), then dd = rowsum(G_0 * S_{t-1}), adjoint of S_{t-1} = diag(d) G_0;
//   d, gain -> dt, a -> q; khat -> k by the projection (I - khat khat^T) / |k|; beta -> c by beta (1 - beta/2).
// Cost per token and channel: N (decay) + 4 r N (reflections) + 2 N (input, output) multiply-adds.
//
// Layouts (contiguous): u, y, z-view (b, L, H, P); dt, D (b, L, H); raw (b, L, H, N + r (N + 1));
// B, C (b, L, G, N); states (b, H, N, P); chunk-start states (b, H, chunks, N, P); gradients of
// B and C per head (b, L, H, N).

#include "vec.h"

namespace {

using namespace ssmk;

constexpr int64_t CHUNK = 32;
constexpr double kNormEps = 1e-12;     // torch.nn.functional.normalize's eps

struct HHDims {
  int64_t b, L, H, P, N, G, r, z_stride;
  int method;                          // bit 0: gbt with alpha, else zoh
  double alpha;
  int64_t R() const { return N + r * (N + 1); }
  int64_t chunks() const { return (L + CHUNK - 1) / CHUNK; }
};

template <typename T> struct HHTensors {
  const T *u, *dt, *raw, *B, *C, *D, *h0, *z;
  T *y, *hT, *saved, *ypre;
  const T *saved_in, *ypre_in, *dy, *dhT;
  T *du, *ddt, *draw, *dB, *dC, *dD, *dh0, *dz;
};

// One token's operator: the decays d and input gains, their partial derivatives (backward), the
// unit keys (r x N), their norms and the betas.
template <typename T> struct HHOp {
  std::vector<T> a, a_dq, d, gain, d_dx, gain_ddt, gain_da, khat, knorm, kproj, beta;
  T dt;
  void resize(int64_t N, int64_t r) {
    a.resize(N), a_dq.resize(N), d.resize(N), gain.resize(N), d_dx.resize(N), gain_ddt.resize(N), gain_da.resize(N);
    khat.resize(r * N), knorm.resize(r), kproj.resize(r), beta.resize(r);
  }
};

// expm1(x) / x and its derivative (x e^x - expm1(x)) / x^2, by their series near 0
template <typename T> inline void phi_psi(T x, T e, T& phi, T& psi) {
  if (std::fabs(x) < T(1e-3)) {
    phi = 1 + x * (T(1) / 2 + x * (T(1) / 6 + x * (T(1) / 24)));
    psi = T(1) / 2 + x * (T(1) / 3 + x * (T(1) / 8 + x * (T(1) / 30)));
  } else {
    const T em1 = std::expm1(x);
    phi = em1 / x, psi = (x * e - em1) / (x * x);
  }
}

template <typename T> void build_op(const HHDims& d, const T* raw, T dt, HHOp<T>& op) {
  const int64_t N = d.N;
  op.dt = dt;
  const T al = T(d.alpha);
  for (int64_t n = 0; n < N; ++n) {
    const T a = -rate_exp(2 * raw[n]), x = dt * a;
    op.a[n] = a, op.a_dq[n] = -2 * rate_exp_grad(2 * raw[n]);
    if (d.method & 1) {
      const T inv = 1 / (1 - al * x);
      op.d[n] = (1 + (1 - al) * x) * inv, op.d_dx[n] = inv * inv;
      op.gain[n] = dt * inv, op.gain_ddt[n] = inv + al * x * inv * inv, op.gain_da[n] = al * dt * dt * inv * inv;
    } else {
      const T e = std::exp(x);
      T phi, psi;
      phi_psi(x, e, phi, psi);
      op.d[n] = e, op.d_dx[n] = e;
      op.gain[n] = dt * phi, op.gain_ddt[n] = phi + x * psi, op.gain_da[n] = dt * dt * psi;
    }
  }
  for (int64_t i = 0; i < d.r; ++i) {
    const T* k = raw + N + i * (N + 1);
    const T length = std::sqrt(dot(k, k, N)), norm = std::max(length, T(kNormEps));
    op.knorm[i] = norm, op.kproj[i] = length >= T(kNormEps) ? T(1) : T(0);   // below eps: k / eps, no projection
    for (int64_t n = 0; n < N; ++n) op.khat[i * N + n] = k[n] / norm;
    op.beta[i] = 2 / (1 + std::exp(-k[N]));
  }
}

// w (P) = khat^T S for S (N x P)
template <typename T> void kt_s(const T* khat, const T* S, int64_t N, int64_t P, T* w) {
  std::fill(w, w + P, T(0));
  for (int64_t n = 0; n < N; ++n) {
    const T k = khat[n];
    const T* s = S + n * P;
    for (int64_t p = 0; p < P; ++p) w[p] += k * s[p];
  }
}

// S (N x P) -= scale khat w^T
template <typename T> void sub_outer(T* S, const T* khat, const T* w, T scale, int64_t N, int64_t P) {
  for (int64_t n = 0; n < N; ++n) {
    const T k = scale * khat[n];
    T* s = S + n * P;
    for (int64_t p = 0; p < P; ++p) s[p] -= k * w[p];
  }
}

// S <- H_i S (one reflection); w: P values of scratch
template <typename T> void reflect(const HHDims& d, const HHOp<T>& op, int64_t i, T* S, T* w) {
  kt_s(&op.khat[i * d.N], S, d.N, d.P, w);
  sub_outer(S, &op.khat[i * d.N], w, op.beta[i], d.N, d.P);
}

// S <- H_r .. H_1 diag(d) S + (gain B) u^T; w: P values of scratch
template <typename T> void apply_op(const HHDims& d, const HHOp<T>& op, const T* B, const T* u, T* S, T* w) {
  const int64_t N = d.N, P = d.P;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) S[n * P + p] *= op.d[n];
  for (int64_t i = 0; i < d.r; ++i) reflect(d, op, i, S, w);
  for (int64_t n = 0; n < N; ++n) {
    const T bn = op.gain[n] * B[n];
    for (int64_t p = 0; p < P; ++p) S[n * P + p] += bn * u[p];
  }
}

template <typename T> void hh_forward_head(const HHDims& d, const HHTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H, g = hi / (d.H / d.G);
  std::vector<T> S(N * P, T(0)), w(P), yrow(P);
  HHOp<T> op;
  op.resize(N, d.r);
  if (x.h0) std::memcpy(S.data(), x.h0 + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t t = 0; t < d.L; ++t) {
    if (t % CHUNK == 0 && x.saved)
      std::memcpy(x.saved + ((bi * H + hi) * d.chunks() + t / CHUNK) * N * P, S.data(), sizeof(T) * N * P);
    const int64_t tok = bi * d.L + t, row = tok * H + hi;
    build_op(d, x.raw + row * d.R(), x.dt[row], op);
    const T* u = x.u + row * P;
    apply_op(d, op, x.B + (tok * d.G + g) * N, u, S.data(), w.data());
    const T* C = x.C + (tok * d.G + g) * N;
    for (int64_t p = 0; p < P; ++p) yrow[p] = x.D[row] * u[p];
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) yrow[p] += C[n] * S[n * P + p];
    store_rows(yrow.data(), 1, P, x.y + row * P, x.ypre ? x.ypre + row * P : nullptr, P,
               x.z ? x.z + tok * d.z_stride + hi * P : nullptr, d.z_stride);
  }
  std::memcpy(x.hT + (bi * H + hi) * N * P, S.data(), sizeof(T) * N * P);
}

// Scratch of the backward of one head: the reflections' inputs g_0 .. g_{r-1} (r N P) and P-vectors.
template <typename T> struct HHScratch {
  std::vector<T> g, w, v, dkhat, da;
  HHScratch(const HHDims& d) : g(d.r * d.N * d.P), w(d.P), v(d.P), dkhat(d.N), da(d.N) {}
};

// The token's backward: G (N x P) holds the adjoint of S_t (C dy included) and leaves as the adjoint
// of S_{t-1}; S_prev is S_{t-1}; writes the raw, dt and B gradients and adds the input's to du.
template <typename T>
void token_backward(const HHDims& d, const HHOp<T>& op, T* G, const T* S_prev, const T* B, const T* u, T* draw,
                    T& ddt, T* dB, T* du, HHScratch<T>& s) {
  const int64_t N = d.N, P = d.P, r = d.r;
  // 1. the input term (gain B) u^T: gradients of B, u and of the gain (through dt and a)
  ddt = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* gr = G + n * P;
    const T gu = dot(gr, u, P), dgain = B[n] * gu, gb = op.gain[n] * B[n];
    dB[n] = op.gain[n] * gu;
    for (int64_t p = 0; p < P; ++p) du[p] += gb * gr[p];
    ddt += dgain * op.gain_ddt[n];
    s.da[n] = dgain * op.gain_da[n];
  }
  // 2. recompute the reflections' inputs g_0 = diag(d) S_{t-1}, g_i = H_i g_{i-1}
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) s.g[n * P + p] = op.d[n] * S_prev[n * P + p];
  for (int64_t i = 1; i < r; ++i) {
    std::memcpy(&s.g[i * N * P], &s.g[(i - 1) * N * P], sizeof(T) * N * P);
    reflect(d, op, i - 1, &s.g[i * N * P], s.w.data());
  }
  // 3. down through the reflections (H_i is symmetric: its adjoint is itself)
  for (int64_t i = r - 1; i >= 0; --i) {
    const T* khat = &op.khat[i * N];
    const T* gin = &s.g[i * N * P];
    kt_s(khat, gin, N, P, s.w.data());
    kt_s(khat, G, N, P, s.v.data());
    const T beta = op.beta[i], dbeta = -dot(s.v.data(), s.w.data(), P);
    T proj = 0;
    for (int64_t n = 0; n < N; ++n) {
      s.dkhat[n] = -beta * (dot(G + n * P, s.w.data(), P) + dot(gin + n * P, s.v.data(), P));
      proj += khat[n] * s.dkhat[n];
    }
    T* dk = draw + N + i * (N + 1);
    for (int64_t n = 0; n < N; ++n) dk[n] = (s.dkhat[n] - op.kproj[i] * khat[n] * proj) / op.knorm[i];
    dk[N] = dbeta * beta * (1 - beta / 2);
    sub_outer(G, khat, s.v.data(), beta, N, P);
  }
  // 4. the decay: G becomes diag(d) G, the adjoint of S_{t-1}; d -> x = dt a -> (dt, a); a -> q
  for (int64_t n = 0; n < N; ++n) {
    T* gr = G + n * P;
    const T dx = dot(gr, S_prev + n * P, P) * op.d_dx[n];
    for (int64_t p = 0; p < P; ++p) gr[p] *= op.d[n];
    ddt += dx * op.a[n];
    draw[n] = (s.da[n] + dx * op.dt) * op.a_dq[n];
  }
}

template <typename T> void hh_backward_head(const HHDims& d, const HHTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H, g = hi / (d.H / d.G);
  std::vector<T> states((CHUNK + 1) * N * P), G(N * P, T(0)), dyp(P);
  std::vector<HHOp<T>> ops(CHUNK);
  for (auto& op : ops) op.resize(N, d.r);
  HHScratch<T> s(d);
  if (x.dhT) std::memcpy(G.data(), x.dhT + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t c = d.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * CHUNK, tc = std::min(CHUNK, d.L - t0);
    std::memcpy(states.data(), x.saved_in + ((bi * H + hi) * d.chunks() + c) * N * P, sizeof(T) * N * P);
    for (int64_t t = 0; t < tc; ++t) {                // recompute the chunk's operators and states
      const int64_t tok = bi * d.L + t0 + t, row = tok * H + hi;
      build_op(d, x.raw + row * d.R(), x.dt[row], ops[t]);
      std::memcpy(&states[(t + 1) * N * P], &states[t * N * P], sizeof(T) * N * P);
      apply_op(d, ops[t], x.B + (tok * d.G + g) * N, x.u + row * P, &states[(t + 1) * N * P], s.w.data());
    }
    for (int64_t t = tc - 1; t >= 0; --t) {
      const int64_t tok = bi * d.L + t0 + t, row = tok * H + hi;
      const T* u = x.u + row * P;
      const T* dy = x.dy + row * P;
      if (x.z) {
        gate_row_backward(dy, x.ypre_in + row * P, x.z + tok * d.z_stride + hi * P, dyp.data(), x.dz + row * P, P);
        dy = dyp.data();
      }
      const T* S_now = &states[(t + 1) * N * P];
      const T* C = x.C + (tok * d.G + g) * N;
      T* du = x.du + row * P;
      for (int64_t p = 0; p < P; ++p) du[p] = x.D[row] * dy[p];
      x.dD[row] = dot(dy, u, P);
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t p = 0; p < P; ++p) G[n * P + p] += C[n] * dy[p];
        x.dC[row * N + n] = dot(S_now + n * P, dy, P);
      }
      token_backward(d, ops[t], G.data(), &states[t * N * P], x.B + (tok * d.G + g) * N, u, x.draw + row * d.R(),
                     x.ddt[row], x.dB + row * N, du, s);
    }
  }
  if (x.dh0) std::memcpy(x.dh0 + (bi * H + hi) * N * P, G.data(), sizeof(T) * N * P);
}

}  // namespace

#define SSM_HH_EXPORT(T, SUFFIX)                                                                                \
  extern "C" int ssm_householder_forward_##SUFFIX(const T* u, const T* dt, const T* raw, const T* B,            \
                                                  const T* C, const T* D, const T* h0, const T* z, T* y, T* hT, \
                                                  T* saved, T* ypre, int64_t b, int64_t L, int64_t H, int64_t P, \
                                                  int64_t N, int64_t G, int64_t r, int64_t z_stride, int method, \
                                                  double alpha, int threads) {                                 \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1) return 1;                        \
    HHDims d{b, L, H, P, N, G, r, z_stride, method, alpha};                                                    \
    HHTensors<T> x{};                                                                                           \
    x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.h0 = h0, x.z = z;                             \
    x.y = y, x.hT = hT, x.saved = saved, x.ypre = ypre;                                                         \
    parallel_for(b * H, threads, [&](int64_t i) { hh_forward_head(d, x, i / H, i % H); });                     \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_householder_backward_##SUFFIX(                                                             \
      const T* u, const T* dt, const T* raw, const T* B, const T* C, const T* D, const T* saved, const T* z,     \
      const T* ypre, const T* dy, const T* dhT, T* du, T* ddt, T* draw, T* dB, T* dC, T* dD, T* dh0, T* dz,     \
      int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t r, int64_t z_stride,           \
      int method, double alpha, int threads) {                                                                  \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1) return 1;                        \
    if (z && !ypre) return 5;                                                                                   \
    HHDims d{b, L, H, P, N, G, r, z_stride, method, alpha};                                                    \
    HHTensors<T> x{};                                                                                           \
    x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.saved_in = saved, x.z = z, x.ypre_in = ypre;  \
    x.dy = dy, x.dhT = dhT, x.du = du, x.ddt = ddt, x.draw = draw, x.dB = dB, x.dC = dC, x.dD = dD;             \
    x.dh0 = dh0, x.dz = dz;                                                                                     \
    parallel_for(b * H, threads, [&](int64_t i) { hh_backward_head(d, x, i / H, i % H); });                    \
    return 0;                                                                                                   \
  }

SSM_HH_EXPORT(float, f32)
SSM_HH_EXPORT(double, f64)
