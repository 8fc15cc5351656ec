// Fused CPU selective scan for the diagonal-plus-low-rank structure, forward and backward, with the
// bilinear / gbt discretisation applied through the Woodbury identity in O(N r) per channel: no
// N x N matrix is formed, no per-token operator is stored (the backward recomputes them per chunk).
//
// Per batch row b, head h (P channels, N states, rank r), group g of B and C, with raw per token
//   [d (N), U (N x r), V (N x r)]:
//   lam = -exp(d) - |U|_F |V|_F,   A = diag(lam) + U V^T          (the symmetric part <= -exp(d): stable)
//   c = alpha dt, f = (1 - alpha) dt,  m = 1 - c lam,  M = diag(m) - c U V^T,  Q = I + f A
//   S_t = M^{-1} (Q S_{t-1} + dt B u_t^T)                          (A_bar = M^{-1} Q, B_bar = M^{-1} dt B)
//   M^{-1} Y = Z + diag(1/m) U K^{-1} (c V^T Z),   Z = diag(1/m) Y,   K = I_r - c V^T diag(1/m) U
//   y_t = C^T S_t + D u_t, optionally * silu(z_t)
//
// Backward of one token, with H = M^{-T} G (G: the adjoint of S_t; M^T = diag(m) - c V U^T, the same
// Woodbury form with U and V swapped and K^T):
//   adjoint of S_{t-1} = Q^T H = H + f (lam H + V (U^T H));  du_t += dt B^T H;  dB = dt H u_t
//   from M (dM = -H S_t^T):  dm = -rowsum(H * S_t), dU += c H (S_t^T V), dV += c S_t (H^T U),
//                            dc += sum (U^T H) * (V^T S_t)
//   from Q (dQ = H S_{t-1}^T): dlam += f rowsum(H * S_{t-1}), dU += f H (S_{t-1}^T V),
//                              dV += f S_{t-1} (H^T U), df += sum_n lam rowsum(H * S_{t-1}) + sum (U^T H) * (V^T S_{t-1})
//   then m -> lam, c, f -> dt, and lam -> d, U, V through the shift |U|_F |V|_F.
//
// Layouts as in scan_head.h (which walks the heads), with raw (b, L, H, N + 2 N r).

#include "scan_head.h"

namespace {

using namespace ssmk;

struct LRDims {
  int64_t N, P, r;
  double alpha;
};

// One token's operator: lam, U, V (views into raw), 1/m, K^{-1} (r x r), c, f, dt, the norms.
template <typename T> struct LROp {
  const T *d, *U, *V;
  std::vector<T> lam, minv, Kinv;
  T c, f, dt, nu, nv;
  void resize(int64_t N, int64_t r) {
    lam.resize(N), minv.resize(N), Kinv.resize(r * r);
  }
};

// inverse of a small r x r matrix (Gauss-Jordan with partial pivoting), in place into out
template <typename T> void invert(std::vector<T>& a, int64_t r, std::vector<T>& out) {
  out.assign(r * r, T(0));
  for (int64_t i = 0; i < r; ++i) out[i * r + i] = 1;
  for (int64_t k = 0; k < r; ++k) {
    int64_t p = k;
    for (int64_t i = k + 1; i < r; ++i)
      if (std::fabs(a[i * r + k]) > std::fabs(a[p * r + k])) p = i;
    for (int64_t j = 0; j < r; ++j) std::swap(a[k * r + j], a[p * r + j]), std::swap(out[k * r + j], out[p * r + j]);
    const T inv = 1 / a[k * r + k];
    for (int64_t j = 0; j < r; ++j) a[k * r + j] *= inv, out[k * r + j] *= inv;
    for (int64_t i = 0; i < r; ++i) {
      if (i == k) continue;
      const T f = a[i * r + k];
      for (int64_t j = 0; j < r; ++j) a[i * r + j] -= f * a[k * r + j], out[i * r + j] -= f * out[k * r + j];
    }
  }
}

template <typename T> void build_op(const LRDims& d, const T* raw, T dt, LROp<T>& op, std::vector<T>& work) {
  const int64_t N = d.N, r = d.r;
  op.d = raw, op.U = raw + N, op.V = raw + N + N * r;
  op.nu = std::sqrt(dot(op.U, op.U, N * r)), op.nv = std::sqrt(dot(op.V, op.V, N * r));
  op.dt = dt, op.c = T(d.alpha) * dt, op.f = (1 - T(d.alpha)) * dt;
  for (int64_t n = 0; n < N; ++n) {
    op.lam[n] = -rate_exp(op.d[n]) - op.nu * op.nv;
    op.minv[n] = 1 / (1 - op.c * op.lam[n]);
  }
  work.assign(r * r, T(0));                           // K = I - c V^T diag(1/m) U
  for (int64_t i = 0; i < r; ++i)
    for (int64_t j = 0; j < r; ++j) {
      T s = 0;
      for (int64_t n = 0; n < N; ++n) s += op.V[n * r + i] * op.minv[n] * op.U[n * r + j];
      work[i * r + j] = (i == j ? T(1) : T(0)) - op.c * s;
    }
  invert(work, r, op.Kinv);
}

// out (r x P) = X^T Y for X (N x r), Y (N x P)
template <typename T> void xt_y(const T* X, const T* Y, int64_t N, int64_t r, int64_t P, T* out) {
  std::fill(out, out + r * P, T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < r; ++k) {
      const T x = X[n * r + k];
      T* o = out + k * P;
      const T* y = Y + n * P;
      for (int64_t p = 0; p < P; ++p) o[p] += x * y[p];
    }
}

// Y (N x P) += X (N x r) W (r x P) scaled per row by s (null: 1)
template <typename T> void add_x_w(T* Y, const T* X, const T* W, const T* s, int64_t N, int64_t r, int64_t P) {
  for (int64_t n = 0; n < N; ++n) {
    T* y = Y + n * P;
    for (int64_t k = 0; k < r; ++k) {
      const T x = X[n * r + k] * (s ? s[n] : T(1));
      const T* w = W + k * P;
      for (int64_t p = 0; p < P; ++p) y[p] += x * w[p];
    }
  }
}

// Y <- M^{-1} Y (transposed: M^{-T} Y) in place; tmp: 2 r P values
template <typename T> void solve_m(const LRDims& d, const LROp<T>& op, T* Y, bool transposed, T* tmp) {
  const int64_t N = d.N, r = d.r, P = d.P;
  const T* X1 = transposed ? op.U : op.V;             // M = diag(m) - c U V^T: Y <- Z + diag(1/m) U K^{-1} c V^T Z
  const T* X2 = transposed ? op.V : op.U;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t p = 0; p < P; ++p) Y[n * P + p] *= op.minv[n];
  T* w = tmp;
  T* kw = w + r * P;
  xt_y(X1, Y, N, r, P, w);
  for (int64_t i = 0; i < r; ++i) {                   // kw = K^{-1} c w  (K^{-T} for the transpose)
    T* o = kw + i * P;
    std::fill(o, o + P, T(0));
    for (int64_t j = 0; j < r; ++j) {
      const T k = op.c * (transposed ? op.Kinv[j * r + i] : op.Kinv[i * r + j]);
      for (int64_t p = 0; p < P; ++p) o[p] += k * w[j * P + p];
    }
  }
  add_x_w(Y, X2, kw, op.minv.data(), N, r, P);
}

// S <- M^{-1} (Q S + dt B u^T); tmp: 3 r P values
template <typename T> void apply_op(const LRDims& d, const LROp<T>& op, const T* B, const T* u, T* S, T* tmp) {
  const int64_t N = d.N, r = d.r, P = d.P;
  T* vs = tmp;                                        // f V^T S (r x P)
  xt_y(op.V, S, N, r, P, vs);
  for (int64_t i = 0; i < r * P; ++i) vs[i] *= op.f;
  for (int64_t n = 0; n < N; ++n) {
    const T g = 1 + op.f * op.lam[n], bn = op.dt * B[n];
    for (int64_t p = 0; p < P; ++p) S[n * P + p] = g * S[n * P + p] + bn * u[p];
  }
  add_x_w(S, op.U, vs, (const T*)nullptr, N, r, P);
  solve_m(d, op, S, false, tmp + r * P);
}

// The parameter gradients of one token from H = M^{-T} G, S_t (after) and S_{t-1} (before).
template <typename T>
void op_backward(const LRDims& d, const LROp<T>& op, const T* H, const T* S_now, const T* S_prev, const T* B,
                 const T* u, T* draw, T& ddt, T* dB, T* du) {
  const int64_t N = d.N, r = d.r, P = d.P;
  std::vector<T> uh(r * P), vsn(r * P), vsp(r * P), dlam(N), dm(N);
  xt_y(op.U, H, N, r, P, uh.data());                  // U^T H
  xt_y(op.V, S_now, N, r, P, vsn.data());             // V^T S_t
  xt_y(op.V, S_prev, N, r, P, vsp.data());            // V^T S_{t-1}
  T dc = dot(uh.data(), vsn.data(), r * P), df = dot(uh.data(), vsp.data(), r * P), ddt_b = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T* h = H + n * P;
    dm[n] = -dot(h, S_now + n * P, P);
    const T hs = dot(h, S_prev + n * P, P);
    dlam[n] = op.f * hs - op.c * dm[n];
    df += op.lam[n] * hs;
    dc -= op.lam[n] * dm[n];
    const T hu = dot(h, u, P);
    dB[n] = op.dt * hu;
    ddt_b += B[n] * hu;
    for (int64_t p = 0; p < P; ++p) du[p] += op.dt * B[n] * h[p];
  }
  ddt = T(d.alpha) * dc + (1 - T(d.alpha)) * df + ddt_b;
  // with mix = c S_t + f S_{t-1}:  dU = H (V^T mix)^T,  dV = mix (U^T H)^T
  T* dd = draw;
  T* dU = draw + N;
  T* dV = draw + N + N * r;
  std::vector<T> mix(P), vmix(r * P);
  for (int64_t i = 0; i < r * P; ++i) vmix[i] = op.c * vsn[i] + op.f * vsp[i];
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t p = 0; p < P; ++p) mix[p] = op.c * S_now[n * P + p] + op.f * S_prev[n * P + p];
    for (int64_t k = 0; k < r; ++k) {
      dU[n * r + k] = dot(H + n * P, vmix.data() + k * P, P);
      dV[n * r + k] = dot(mix.data(), uh.data() + k * P, P);
    }
  }
  // lam = -exp(d) - |U|_F |V|_F
  T sum_dlam = 0;
  for (int64_t n = 0; n < N; ++n) {
    dd[n] = -rate_exp_grad(op.d[n]) * dlam[n];
    sum_dlam += dlam[n];
  }
  if (op.nu > 0 && op.nv > 0)
    for (int64_t i = 0; i < N * r; ++i) {
      dU[i] -= sum_dlam * op.nv * op.U[i] / op.nu;
      dV[i] -= sum_dlam * op.nu * op.V[i] / op.nv;
    }
}

template <typename T> class LRKernel {
 public:
  using Op = LROp<T>;
  explicit LRKernel(const LRDims& d) : d(d), tmp(3 * d.r * d.P), Hm(d.N * d.P) {}

  Op make_op() const {
    Op op;
    op.resize(d.N, d.r);
    return op;
  }
  void build(const T* raw, T dt, Op& op) { build_op(d, raw, dt, op, work); }
  void apply(const Op& op, const T* B, const T* u, T* S) { apply_op(d, op, B, u, S, tmp.data()); }

  void backward(const Op& op, T* G, const T* S_now, const T* S_prev, const T* B, const T* u, T* draw, T& ddt, T* dB,
                T* du) {
    const int64_t N = d.N, r = d.r, P = d.P;
    std::memcpy(Hm.data(), G, sizeof(T) * N * P);
    solve_m(d, op, Hm.data(), true, tmp.data());          // H = M^{-T} G
    op_backward(d, op, Hm.data(), S_now, S_prev, B, u, draw, ddt, dB, du);
    // adjoint of S_{t-1} = Q^T H = H + f (lam H + V (U^T H))
    xt_y(op.U, Hm.data(), N, r, P, tmp.data());
    for (int64_t n = 0; n < N; ++n) {
      const T gscale = 1 + op.f * op.lam[n];
      for (int64_t p = 0; p < P; ++p) G[n * P + p] = gscale * Hm[n * P + p];
    }
    for (int64_t i = 0; i < r * P; ++i) tmp[i] *= op.f;
    add_x_w(G, op.V, tmp.data(), (const T*)nullptr, N, r, P);
  }

 private:
  LRDims d;
  std::vector<T> tmp, work, Hm;
};

}  // namespace

#define SSM_LR_EXPORT(T, SUFFIX)                                                                                \
  extern "C" int ssm_lowrank_forward_##SUFFIX(const T* u, const T* dt, const T* raw, const T* B, const T* C,     \
                                              const T* D, const T* h0, const T* z, T* y, T* hT, T* saved,       \
                                              T* ypre, int64_t b, int64_t L, int64_t H, int64_t P, int64_t N,    \
                                              int64_t G, int64_t r, int64_t z_stride, double alpha, int threads) { \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1 || r > N) return 1;              \
    const HeadDims d{b, L, H, P, N, G, z_stride, N * (1 + 2 * r)};                                             \
    const auto x = forward_tensors<T>(u, dt, raw, B, C, D, h0, z, y, hT, saved, ypre);                          \
    parallel_for(b * H, threads, [&](int64_t i) {                                                               \
      LRKernel<T> k(LRDims{N, P, r, alpha});                                                                    \
      forward_head(k, d, x, i / H, i % H);                                                                      \
    });                                                                                                         \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_lowrank_backward_##SUFFIX(                                                                 \
      const T* u, const T* dt, const T* raw, const T* B, const T* C, const T* D, const T* saved, const T* z,     \
      const T* ypre, const T* dy, const T* dhT, T* du, T* ddt, T* draw, T* dB, T* dC, T* dD, T* dh0, T* dz,     \
      int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t r, int64_t z_stride,           \
      double alpha, int threads) {                                                                              \
    if (b < 0 || L < 0 || H < 1 || P < 1 || N < 1 || G < 1 || H % G || r < 1 || r > N) return 1;              \
    if (z && !ypre) return 5;                                                                                   \
    const HeadDims d{b, L, H, P, N, G, z_stride, N * (1 + 2 * r)};                                             \
    const auto x = backward_tensors<T>(u, dt, raw, B, C, D, saved, z, ypre, dy, dhT, du, ddt, draw, dB, dC, dD, \
                                       dh0, dz);                                                                \
    parallel_for(b * H, threads, [&](int64_t i) {                                                               \
      LRKernel<T> k(LRDims{N, P, r, alpha});                                                                    \
      backward_head(k, d, x, i / H, i % H);                                                                     \
    });                                                                                                         \
    return 0;                                                                                                   \
  }

SSM_LR_EXPORT(float, f32)
SSM_LR_EXPORT(double, f64)
