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
//   signed range (method bit 1): d <- 2 d - 1, in (-1, 1] (the diagonal's signed range; gain unchanged)
//   khat_i = k_i / max(|k_i|, 1e-12),  beta_i = 2 sigmoid(c_i)
//   S_t = H_r ... H_1 diag(d) S_{t-1} + (gain * B) u_t^T,   H_i = I - beta_i khat_i khat_i^T
//   delta writes (method bit 2): each H_i S is instead S - beta_i khat_i (khat_i^T S - u_t^T), the
//   delta rule (DeltaNet): the state's value along khat_i moves to u_t at beta = 1 and is mirrored
//   about u_t at beta = 2; method bit 3 drops the (gain * B) u_t^T term (the input enters only so)
//   y_t = C^T S_t + D u_t, optionally * silu(z_t)
//
// Backward of one token, with G the adjoint of S_t and g_0 = diag(d) S_{t-1}, g_i = H_i g_{i-1}
// (recomputed), going down i = r .. 1 with G_r = G, w = khat^T g_{i-1}, v = khat^T G_i (P-vectors):
//   dbeta_i = -v . w,   dkhat_i = -beta_i (G_i w + g_{i-1} v),   G_{i-1} = G_i - beta_i khat_i v^T
//   (H_i is symmetric; with delta writes w = khat^T g_{i-1} - u and du += beta_i v), then
//   dd = rowsum(G_0 * S_{t-1}), adjoint of S_{t-1} = diag(d) G_0;
//   d, gain -> dt, a -> q; khat -> k by the projection (I - khat khat^T) / |k|; beta -> c by beta (1 - beta/2).
// Cost per token and channel: N (decay) + 4 r N (reflections) + 2 N (input, output) multiply-adds.
//
// Layouts as in scan_head.h (which walks the heads), with raw (b, L, H, N + r (N + 1)).

#include "scan_head.h"

namespace {

using namespace ssmk;

constexpr double kNormEps = 1e-12;     // torch.nn.functional.normalize's eps

// One token's operator: the decays d and input gains, their partial derivatives (backward), the
// unit keys (r x N), their norms and the betas.
template <typename T> struct HHOp {
  std::vector<T> a, a_dq, d, gain, d_dx, gain_ddt, gain_da, khat, knorm, kproj, beta;
  T dt;
};

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

template <typename T> class HHKernel {
 public:
  using Op = HHOp<T>;
  HHKernel(int64_t N, int64_t P, int64_t r, int method, double alpha)
      : N(N), P(P), r(r), method(method), alpha(T(alpha)), delta(method & 4), b_input(!(method & 8)), g(r * N * P),
        w(P), v(P), dkhat(N), da(N) {}

  Op make_op() const {
    Op op;
    for (auto* x : {&op.a, &op.a_dq, &op.d, &op.gain, &op.d_dx, &op.gain_ddt, &op.gain_da}) x->resize(N);
    op.khat.resize(r * N), op.knorm.resize(r), op.kproj.resize(r), op.beta.resize(r);
    return op;
  }

  void build(const T* raw, T dt, Op& op) const {
    op.dt = dt;
    for (int64_t n = 0; n < N; ++n) {
      const T a = -rate_exp(2 * raw[n]), x = dt * a;
      op.a[n] = a, op.a_dq[n] = -2 * rate_exp_grad(2 * raw[n]);
      if (method & 1) {
        const T inv = 1 / (1 - alpha * x);
        op.d[n] = (1 + (1 - alpha) * x) * inv, op.d_dx[n] = inv * inv;
        op.gain[n] = dt * inv, op.gain_ddt[n] = inv + alpha * x * inv * inv, op.gain_da[n] = alpha * dt * dt * inv * inv;
      } else {
        const T e = std::exp(x);
        const T phi = phi_of<T>(vsplat(x), vsplat(e))[0], psi = psi_of<T>(vsplat(x), vsplat(e))[0];
        op.d[n] = e, op.d_dx[n] = e;
        op.gain[n] = dt * phi, op.gain_ddt[n] = phi + x * psi, op.gain_da[n] = dt * dt * psi;
      }
      if (method & 2) op.d[n] = 2 * op.d[n] - 1, op.d_dx[n] = 2 * op.d_dx[n];     // the signed range
    }
    for (int64_t i = 0; i < r; ++i) {
      const T* k = raw + N + i * (N + 1);
      const T length = std::sqrt(dot(k, k, N)), norm = std::max(length, T(kNormEps));
      op.knorm[i] = norm, op.kproj[i] = length >= T(kNormEps) ? T(1) : T(0);   // below eps: k / eps, no projection
      for (int64_t n = 0; n < N; ++n) op.khat[i * N + n] = k[n] / norm;
      op.beta[i] = 2 / (1 + std::exp(-k[N]));
    }
  }

  // S <- H_r .. H_1 diag(d) S + (gain B) u^T (each H_i a delta write with bit 2; no B term with bit 3)
  void apply(const Op& op, const T* B, const T* u, T* S) {
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) S[n * P + p] *= op.d[n];
    for (int64_t i = 0; i < r; ++i) reflect(op, i, u, S);
    if (!b_input) return;
    for (int64_t n = 0; n < N; ++n) {
      const T bn = op.gain[n] * B[n];
      for (int64_t p = 0; p < P; ++p) S[n * P + p] += bn * u[p];
    }
  }

  void backward(const Op& op, T* G, const T*, const T* S_prev, const T* B, const T* u, T* draw, T& ddt, T* dB,
                T* du) {
    // 1. the input term (gain B) u^T: gradients of B, u and of the gain (through dt and a)
    ddt = 0;
    if (!b_input) {
      std::fill(dB, dB + N, T(0));
      std::fill(da.begin(), da.end(), T(0));
    }
    for (int64_t n = 0; b_input && n < N; ++n) {
      const T* gr = G + n * P;
      const T gu = dot(gr, u, P), dgain = B[n] * gu, gb = op.gain[n] * B[n];
      dB[n] = op.gain[n] * gu;
      for (int64_t p = 0; p < P; ++p) du[p] += gb * gr[p];
      ddt += dgain * op.gain_ddt[n];
      da[n] = dgain * op.gain_da[n];
    }
    // 2. recompute the reflections' inputs g_0 = diag(d) S_{t-1}, g_i = H_i g_{i-1}
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) g[n * P + p] = op.d[n] * S_prev[n * P + p];
    for (int64_t i = 1; i < r; ++i) {
      std::memcpy(&g[i * N * P], &g[(i - 1) * N * P], sizeof(T) * N * P);
      reflect(op, i - 1, u, &g[i * N * P]);
    }
    // 3. down through the reflections (H_i is symmetric: its adjoint is itself)
    for (int64_t i = r - 1; i >= 0; --i) {
      const T* khat = &op.khat[i * N];
      const T* gin = &g[i * N * P];
      kt_s(khat, gin, N, P, w.data());
      kt_s(khat, G, N, P, v.data());
      const T beta = op.beta[i];
      if (delta)
        for (int64_t p = 0; p < P; ++p) w[p] -= u[p], du[p] += beta * v[p];
      const T dbeta = -dot(v.data(), w.data(), P);
      T proj = 0;
      for (int64_t n = 0; n < N; ++n) {
        dkhat[n] = -beta * (dot(G + n * P, w.data(), P) + dot(gin + n * P, v.data(), P));
        proj += khat[n] * dkhat[n];
      }
      T* dk = draw + N + i * (N + 1);
      for (int64_t n = 0; n < N; ++n) dk[n] = (dkhat[n] - op.kproj[i] * khat[n] * proj) / op.knorm[i];
      dk[N] = dbeta * beta * (1 - beta / 2);
      sub_outer(G, khat, v.data(), beta, N, P);
    }
    // 4. the decay: G becomes diag(d) G, the adjoint of S_{t-1}; d -> x = dt a -> (dt, a); a -> q
    for (int64_t n = 0; n < N; ++n) {
      T* gr = G + n * P;
      const T dx = dot(gr, S_prev + n * P, P) * op.d_dx[n];
      for (int64_t p = 0; p < P; ++p) gr[p] *= op.d[n];
      ddt += dx * op.a[n];
      draw[n] = (da[n] + dx * op.dt) * op.a_dq[n];
    }
  }

 private:
  // S <- H_i S (one reflection), or S - beta_i khat_i (khat_i^T S - u^T) (a delta write)
  void reflect(const Op& op, int64_t i, const T* u, T* S) {
    kt_s(&op.khat[i * N], S, N, P, w.data());
    if (delta)
      for (int64_t p = 0; p < P; ++p) w[p] -= u[p];
    sub_outer(S, &op.khat[i * N], w.data(), op.beta[i], N, P);
  }

  int64_t N, P, r;
  int method;
  T alpha;
  bool delta, b_input;
  std::vector<T> g, w, v, dkhat, da;     // the reflections' inputs g_0 .. g_{r-1} (r N P), P- and N-vectors
};

}  // namespace

#define SSM_HH_EXPORT(T, SUFFIX)                                                                                \
  extern "C" int ssm_householder_forward_##SUFFIX(const T* u, const T* dt, const T* raw, const T* B,            \
                                                  const T* C, const T* D, const T* h0, const T* z, T* y, T* hT, \
                                                  T* saved, T* ypre, int64_t b, int64_t L, int64_t H, int64_t P, \
                                                  int64_t N, int64_t G, int64_t r, int64_t z_stride, int method, \
                                                  double alpha, int threads) {                                 \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1) return 1;                        \
    const HeadDims d{b, L, H, P, N, G, z_stride, N + r * (N + 1)};                                             \
    const auto x = forward_tensors<T>(u, dt, raw, B, C, D, h0, z, y, hT, saved, ypre);                          \
    parallel_for(b * H, threads, [&](int64_t i) {                                                               \
      HHKernel<T> k(N, P, r, method, alpha);                                                                    \
      forward_head(k, d, x, i / H, i % H);                                                                      \
    });                                                                                                         \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_householder_backward_##SUFFIX(                                                             \
      const T* u, const T* dt, const T* raw, const T* B, const T* C, const T* D, const T* saved, const T* z,     \
      const T* ypre, const T* dy, const T* dhT, T* du, T* ddt, T* draw, T* dB, T* dC, T* dD, T* dh0, T* dz,     \
      int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t r, int64_t z_stride,           \
      int method, double alpha, int threads) {                                                                  \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1) return 1;                        \
    if (z && !ypre) return 5;                                                                                   \
    const HeadDims d{b, L, H, P, N, G, z_stride, N + r * (N + 1)};                                             \
    const auto x = backward_tensors<T>(u, dt, raw, B, C, D, saved, z, ypre, dy, dhT, du, ddt, draw, dB, dC, dD, \
                                       dh0, dz);                                                                \
    parallel_for(b * H, threads, [&](int64_t i) {                                                               \
      HHKernel<T> k(N, P, r, method, alpha);                                                                    \
      backward_head(k, d, x, i / H, i % H);                                                                     \
    });                                                                                                         \
    return 0;                                                                                                   \
  }

SSM_HH_EXPORT(float, f32)
SSM_HH_EXPORT(double, f64)
