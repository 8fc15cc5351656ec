// Fused CPU selective scan for block-diagonal state matrices: blocks of size bs (2, 4, 8, ... up to
// the whole state: the dense class), the per-token operators built from raw parameters inside the
// kernel (forward and, recomputed, backward), no per-token operator tensor stored.
//
// Per batch row b, head h (P channels, N = nb * bs states), group g of B and C, block j:
//
//   (A_bar_j, B_bar_j) = build(raw[t, h, j], dt[t, h], B[t, g, block j])     see the two kinds below
//   S_t[j] = A_bar_j S_{t-1}[j] + B_bar_j u_t^T              S[j]: (bs, P)
//   y_t    = sum_j C[t, g, j]^T S_t[j] + D[t] u_t            (optionally * silu(z_t): the gate)
//
// kind 0, "block" (any bs; raw = bs*bs values R per block):
//   A = -L L^T + (K - K^T),  L = strict_lower(R) + diag(exp(diag R)),  K = strict_upper(R)
//   (the symmetric part -L L^T is negative definite: every eigenvalue has a negative real part)
//   gbt(alpha): M = I - alpha dt A, A_bar = M^{-1} (I + (1 - alpha) dt A), B_bar = M^{-1} dt B
//   (bilinear = alpha 1/2: A_bar is the Cayley transform of dt A / 2 - orthogonal when A is skew,
//   a reflection in the limit of a large negative symmetric part.)  ZOH is not built here.
// kind 1, "rotation" (bs = 2; raw = (r0, r1) per block): A = [[-lam, -w], [w, -lam]],
//   lam = exp(2 r0), w = r1: the complex number a = -lam + i w acting on s0 + i s1, so
//   zoh: A_bar = exp(dt a), B_bar = (exp(dt a) - 1) / a * (B0 + i B1);  gbt: as for kind 0, in C.
//
// kind 2, "banded" (two partitions of kind-0 blocks, the second shifted by bs / 2, as
//   `structures.BandedStructure`): A_bar = D(A1) D(A0) (Lie-Trotter), B_bar = D(A1) B_bar(A0, B);
//   the shifted partition's edge blocks are cut at the state's ends (their couplings to the padding
//   are masked to zero, so those blocks act on their real rows only).
//
// Layouts (contiguous): u, y, z-view (b, L, H, P) (z rows z_stride apart); dt, D (b, L, H);
// raw (b, L, H, R) with R = nb * (bs*bs or 2) (banded: (nb + nb + 1) * bs*bs); B, C (b, L, G, N); states (b, H, N, P);
// chunk-start states saved by the forward (b, H, chunks, N, P).  Gradients of B and C come out per
// head (b, L, H, N); the caller sums them over the heads of a group.

#include "block_heads.h"

namespace {

using namespace ssmk;

constexpr int64_t CHUNK = 32;

struct BDims {
  int64_t b, L, H, P, N, G, bs, z_stride;
  int kind, method;
  double alpha;
  BlockKind op() const { return {N, bs, kind, method, alpha}; }
  int64_t R() const { return op().R(); }
  int64_t chunks() const { return (L + CHUNK - 1) / CHUNK; }
};

template <typename T> struct BTensors {
  const T *u, *dt, *raw, *B, *C, *D, *h0, *z;
  T *y, *hT, *saved, *ypre;
  const T *saved_in, *ypre_in, *dy, *dhT;
  T *du, *ddt, *draw, *dB, *dC, *dD, *dh0, *dz;
};

// ---- backward of the small dense solve and of the two kinds of block (the forward: block_ops.h) ----

// Solve M^T X = Y given the LU of M from solve_in_place; Y (n x m) in place.
template <typename T, int BS> void solve_transposed(const T* LU, T* Y, int64_t n_, int64_t m) {
  const int64_t n = BS ? BS : n_;
  for (int64_t k = 0; k < n; ++k) {                   // U^T z = y
    const T inv = 1 / LU[k * n + k];
    for (int64_t j = 0; j < m; ++j) {
      T s = Y[k * m + j];
      for (int64_t i = 0; i < k; ++i) s -= LU[i * n + k] * Y[i * m + j];
      Y[k * m + j] = s * inv;
    }
  }
  for (int64_t k = n - 1; k >= 0; --k)                // L^T w = z (unit diagonal)
    for (int64_t j = 0; j < m; ++j) {
      T s = Y[k * m + j];
      for (int64_t i = k + 1; i < n; ++i) s -= LU[i * n + k] * Y[i * m + j];
      Y[k * m + j] = s;
    }
}

// kind 0 backward: from gA (gradient of A_bar, n x n) and gb (of B_bar, n) to the raw block, dt, B
template <typename T, int BS>
void build_block_backward(const T* R, T dt, const T* Bv, int64_t n_, T al, const T* Abar, const T* Bbar, const T* gA,
                          const T* gb, T* gR, T& gdt, T* gB, Scratch<T>& s, int64_t lo, int64_t size) {
  const int64_t n = BS ? BS : n_;
  block_matrix<T, BS>(R, n, s.A.data(), s.Lm.data());
  mask_block(s.A.data(), n, lo, size);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) s.M[i * n + j] = (i == j ? T(1) : T(0)) - al * dt * s.A[i * n + j];
  for (int64_t i = 0; i < n; ++i) {                   // W = M^{-T} [gA | gb]
    for (int64_t j = 0; j < n; ++j) s.W[i * (n + 1) + j] = gA[i * n + j];
    s.W[i * (n + 1) + n] = gb[i];
  }
  solve_in_place<T, BS>(s.M.data(), s.X.data(), n, 0);               // only the LU of M
  solve_transposed<T, BS>(s.M.data(), s.W.data(), n, n + 1);
  // G_Q = W_A;  G_M = -(W_A A_bar^T + W_b B_bar^T);  G_A = (1 - al) dt G_Q - al dt G_M
  gdt = 0;
  for (int64_t i = 0; i < n; ++i) {
    const T wb = s.W[i * (n + 1) + n];
    if (Bv) gB[i] = dt * wb, gdt += wb * Bv[i];
    for (int64_t j = 0; j < n; ++j) {
      T gm = -wb * Bbar[j];
      for (int64_t k = 0; k < n; ++k) gm -= s.W[i * (n + 1) + k] * Abar[j * n + k];
      const T gq = s.W[i * (n + 1) + j], a = s.A[i * n + j];
      s.G[i * n + j] = (1 - al) * dt * gq - al * dt * gm;
      gdt += (1 - al) * a * gq - al * a * gm;
    }
  }
  mask_block(s.G.data(), n, lo, size);                // A_masked = A * mask
  // A = -L L^T + K - K^T:  G_L = -(G_A + G_A^T) L;  G_K = G_A - G_A^T (strict upper)
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      if (i < j) {
        gR[i * n + j] = s.G[i * n + j] - s.G[j * n + i];
        continue;
      }
      T gl = 0;
      for (int64_t k = 0; k < n; ++k) gl -= (s.G[i * n + k] + s.G[k * n + i]) * s.Lm[k * n + j];
      gR[i * n + j] = i == j ? gl * rate_exp_grad(R[i * n + i]) : gl;
    }
}

template <typename T>
void build_rotation_backward(const T* r, T dt, const T* Bv, int method, T al, const T* gA, const T* gb, T* gR, T& gdt,
                             T* gB) {
  using C = std::complex<T>;
  const Rot<T> o = rotation(r, dt, method, al);
  const C Ge(gA[0] + gA[3], gA[2] - gA[1]), Gbb(gb[0], gb[1]), b(Bv[0], Bv[1]);
  const C Gb = std::conj(o.beta) * Gbb, Gbeta = Gbb * std::conj(b);
  const C Ga = std::conj(o.de_da) * Ge + std::conj(o.db_da) * Gbeta;
  gdt = (std::conj(o.de_ddt) * Ge + std::conj(o.db_ddt) * Gbeta).real();
  gB[0] = Gb.real(), gB[1] = Gb.imag();
  gR[0] = -Ga.real() * 2 * rate_exp_grad(2 * r[0]);   // a = -exp(2 r0) + i r1
  gR[1] = Ga.imag();
}

// ---- one head: operators of a chunk, the forward walk, the reverse walk ----------------------------

template <typename T> struct ChunkOps {
  std::vector<T> Ab, Bb, Cc;      // (tc, blocks, bs, bs), (tc, N) stage-0 input weights, (tc, N)
  std::vector<T> dt, Bin;         // the head's dt (tc) and input B (tc, N), gathered for the builder
};

// The operators of head hi for tokens [t0, t0 + tc): blocks of a compile-time size (block and banded
// kinds) by `block_heads.h`'s builder with its vector lanes over the chunk's tokens (W tokens at once,
// the same equations as build_token_ops), other sizes and rotation token by token.
template <typename T>
void build_chunk(const BDims& d, const std::vector<BlockRef>& refs, const BTensors<T>& x, int64_t bi, int64_t hi,
                 int64_t t0, int64_t tc, ChunkOps<T>& ops, Scratch<T>& s) {
  const int64_t N = d.N, bs = d.bs, nr = refs.size(), g = hi / (d.H / d.G), R = d.R(), tok0 = bi * d.L + t0;
  ops.dt.resize(CHUNK), ops.Bin.resize(CHUNK * N);
  for (int64_t t = 0; t < tc; ++t) {
    const int64_t tok = tok0 + t;
    std::memcpy(&ops.Cc[t * N], x.C + (tok * d.G + g) * N, sizeof(T) * N);
    std::memcpy(&ops.Bin[t * N], x.B + (tok * d.G + g) * N, sizeof(T) * N);
    ops.dt[t] = x.dt[tok * d.H + hi];
  }
  const T* raw0 = x.raw + (tok0 * d.H + hi) * R;      // token t's raw row: raw0 + t * H * R
  if (build_lanes(d.op(), refs, tc, raw0, d.H * R, ops.dt.data(), ops.Bin.data(), 1, ops.Ab.data(), ops.Bb.data()))
    return;
  for (int64_t t = 0; t < tc; ++t)
    build_token_ops(d.op(), refs, raw0 + t * d.H * R, ops.dt[t], &ops.Bin[t * N], &ops.Ab[t * nr * bs * bs],
                    &ops.Bb[t * N], s);
}

// one token's operator applied to S (N x P): every block of stage 0 (with the input), then stage 1
template <typename T>
void apply_token(const BDims& d, const std::vector<BlockRef>& refs, const ChunkOps<T>& ops, int64_t t, const T* u, T* S,
                 T* next, int64_t last_stage) {
  apply_token_ops(refs, d.bs, d.P, &ops.Ab[t * refs.size() * d.bs * d.bs], &ops.Bb[t * d.N], u, S, next, last_stage);
}

// S (N x P) advanced over tc tokens: y rows += C^T S when `ych` is given; every state after each
// token written to `states` ((tc + 1) x N x P, row 0 = the start) when given.
template <typename T>
void advance_blocks(const BDims& d, const std::vector<BlockRef>& refs, const T* u0, int64_t u_stride,
                    const ChunkOps<T>& ops, int64_t tc, T* S, T* ych, T* states) {
  const int64_t N = d.N, P = d.P;
  std::vector<T> next(d.bs * Vec<T>::lanes);
  for (int64_t t = 0; t < tc; ++t) {
    apply_token(d, refs, ops, t, u0 + t * u_stride, S, next.data(), d.kind == 2 ? 1 : 0);
    if (ych)
      for (int64_t n = 0; n < N; ++n) {
        const T c = ops.Cc[t * N + n];
        for (int64_t p = 0; p < P; ++p) ych[t * P + p] += c * S[n * P + p];
      }
    if (states) std::memcpy(states + (t + 1) * N * P, S, sizeof(T) * N * P);
  }
}

template <typename T> void block_forward_head(const BDims& d, const BTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H;
  const std::vector<BlockRef> refs = block_refs(d.op());
  std::vector<T> S(N * P, T(0)), ych(CHUNK * P);
  ChunkOps<T> ops{std::vector<T>(CHUNK * refs.size() * d.bs * d.bs), std::vector<T>(CHUNK * N),
                  std::vector<T>(CHUNK * N)};
  Scratch<T> scratch(d.bs);
  if (x.h0) std::memcpy(S.data(), x.h0 + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t c = 0, t0 = 0; t0 < d.L; ++c, t0 += CHUNK) {
    const int64_t tc = std::min(CHUNK, d.L - t0);
    if (x.saved) std::memcpy(x.saved + ((bi * H + hi) * d.chunks() + c) * N * P, S.data(), sizeof(T) * N * P);
    build_chunk(d, refs, x, bi, hi, t0, tc, ops, scratch);
    const T* u0 = x.u + ((bi * d.L + t0) * H + hi) * P;
    skip_rows(x.D + (bi * d.L + t0) * H + hi, H, u0, H * P, tc, P, ych.data());
    advance_blocks(d, refs, u0, H * P, ops, tc, S.data(), ych.data(), (T*)nullptr);
    const int64_t row0 = ((bi * d.L + t0) * H + hi) * P;
    store_rows(ych.data(), tc, P, x.y + row0, x.ypre ? x.ypre + row0 : nullptr, H * P,
               x.z ? x.z + (bi * d.L + t0) * d.z_stride + hi * P : nullptr, d.z_stride);
  }
  std::memcpy(x.hT + (bi * H + hi) * N * P, S.data(), sizeof(T) * N * P);
}

// Backward through one block's apply: gA (bs x bs, the sub-block filled) = dS_rows Sin_rows^T,
// gb = dS_rows u (stage 0), du += Bb_rows^T dS_rows, then dS_rows <- A_sub^T dS_rows.
template <typename T>
void block_apply_backward(const BlockRef& r, int64_t bs, int64_t P, const T* A, const T* Bb, const T* u, const T* Sin,
                          T* dS, T* du, T* gA, T* gb, std::vector<T>& tmp) {
  const int64_t n = r.size;
  T* drows = dS + r.state0 * P;
  const T* srows = Sin + r.state0 * P;
  std::fill(gA, gA + bs * bs, T(0));
  for (int64_t i = 0; i < n; ++i) {
    const T* dsi = drows + i * P;
    if (Bb) {
      const T b = Bb[i];
      for (int64_t p = 0; p < P; ++p) du[p] += dsi[p] * b;
      gb[r.lo + i] = dot(dsi, u, P);
    }
    for (int64_t k = 0; k < n; ++k) gA[(r.lo + i) * bs + r.lo + k] = dot(dsi, srows + k * P, P);
  }
  for (int64_t k = 0; k < n; ++k) {                  // tmp = A_sub^T dS_rows
    T* out = &tmp[k * P];
    std::fill(out, out + P, T(0));
    for (int64_t i = 0; i < n; ++i) {
      const T a = A[(r.lo + i) * bs + r.lo + k];
      const T* dsi = drows + i * P;
      for (int64_t p = 0; p < P; ++p) out[p] += a * dsi[p];
    }
  }
  std::memcpy(drows, tmp.data(), sizeof(T) * n * P);
}

template <typename T> void block_backward_head(const BDims& d, const BTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H, bs = d.bs, g = hi / (d.H / d.G);
  const std::vector<BlockRef> refs = block_refs(d.op());
  const int64_t nr = refs.size(), last_stage = d.kind == 2 ? 1 : 0;
  std::vector<T> S(N * P), states((CHUNK + 1) * N * P), dS(N * P, T(0)), mid(N * P), dyp(P), tmp(bs * P),
      next(bs * Vec<T>::lanes), gA(nr * bs * bs), gb(nr * bs), gBblk(bs), graw(bs * bs);
  ChunkOps<T> ops{std::vector<T>(CHUNK * nr * bs * bs), std::vector<T>(CHUNK * N), std::vector<T>(CHUNK * N)};
  Scratch<T> scratch(bs);
  if (x.dhT) std::memcpy(dS.data(), x.dhT + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t c = d.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * CHUNK, tc = std::min(CHUNK, d.L - t0);
    std::memcpy(S.data(), x.saved_in + ((bi * H + hi) * d.chunks() + c) * N * P, sizeof(T) * N * P);
    std::memcpy(states.data(), S.data(), sizeof(T) * N * P);
    build_chunk(d, refs, x, bi, hi, t0, tc, ops, scratch);
    const T* u0 = x.u + ((bi * d.L + t0) * H + hi) * P;
    advance_blocks(d, refs, u0, H * P, ops, tc, S.data(), (T*)nullptr, states.data());
    for (int64_t t = tc - 1; t >= 0; --t) {
      const int64_t tok = bi * d.L + t0 + t, row = tok * H + hi;
      const T* u = u0 + t * H * P;
      const T* dy = x.dy + row * P;
      const T* S_prev = &states[t * N * P];
      if (x.z) {                                       // through the gate: the ungated output's gradient
        gate_row_backward(dy, x.ypre_in + row * P, x.z + tok * d.z_stride + hi * P, dyp.data(), x.dz + row * P, P);
        dy = dyp.data();
      }
      T* du = x.du + row * P;
      for (int64_t p = 0; p < P; ++p) du[p] = x.D[row] * dy[p];
      x.dD[row] = dot(dy, u, P);
      for (int64_t n = 0; n < N; ++n) {                // the readout y_t = C^T S_t
        const T cn = ops.Cc[t * N + n];
        for (int64_t p = 0; p < P; ++p) dS[n * P + p] += cn * dy[p];
        x.dC[row * N + n] = dot(&states[(t + 1) * N * P + n * P], dy, P);
      }
      if (last_stage == 1) {                           // the state between the two stages, recomputed
        std::memcpy(mid.data(), S_prev, sizeof(T) * N * P);
        apply_token(d, refs, ops, t, u, mid.data(), next.data(), 0);
      }
      for (int64_t stage = last_stage; stage >= 0; --stage)
        for (int64_t k = 0; k < nr; ++k)
          if (refs[k].stage == stage)
            block_apply_backward(refs[k], bs, P, &ops.Ab[(t * nr + k) * bs * bs],
                                 stage == 0 ? &ops.Bb[t * N + refs[k].state0] : (const T*)nullptr, u,
                                 stage == 0 ? S_prev : mid.data(), dS.data(), du, &gA[k * bs * bs], &gb[k * bs], tmp);
      const T dt = x.dt[row];
      const T* raw = x.raw + row * d.R();
      const T* B = x.B + (tok * d.G + g) * N;
      T ddt = 0;
      std::fill(x.draw + row * d.R(), x.draw + (row + 1) * d.R(), T(0));
      for (int64_t k = 0; k < nr; ++k) {
        const BlockRef& r = refs[k];
        const T* Ab = &ops.Ab[(t * nr + k) * bs * bs];
        T gdt = 0;
        if (d.kind == 1) {
          build_rotation_backward(raw + r.raw_index * 2, dt, B + r.state0, d.method, T(d.alpha), &gA[k * bs * bs],
                                  &gb[k * bs], x.draw + row * d.R() + r.raw_index * 2, gdt, gBblk.data());
        } else {
          T* b_bar = scratch.b_bar.data();             // this block's B_bar (stage 0; none in stage 1)
          if (r.stage == 0)
            std::memcpy(b_bar, &ops.Bb[t * N + r.state0], sizeof(T) * bs);
          else
            std::fill(b_bar, b_bar + bs, T(0));
          with_block_size(bs, [&](auto K) {
            build_block_backward<T, decltype(K)::value>(
                raw + r.raw_index * bs * bs, dt, r.stage == 0 ? B + r.state0 : (const T*)nullptr, bs, T(d.alpha), Ab,
                b_bar, &gA[k * bs * bs], r.stage == 0 ? &gb[k * bs] : b_bar, graw.data(), gdt, gBblk.data(), scratch,
                r.lo, r.size);
          });
          if (r.stage != 0) std::fill(gBblk.begin(), gBblk.end(), T(0));
          T* dst = x.draw + row * d.R() + r.raw_index * bs * bs;
          for (int64_t i = 0; i < bs * bs; ++i) dst[i] += graw[i];
        }
        ddt += gdt;
        if (r.stage == 0) std::memcpy(x.dB + row * N + r.state0, gBblk.data(), sizeof(T) * r.size);
      }
      x.ddt[row] = ddt;
    }
  }
  if (x.dh0) std::memcpy(x.dh0 + (bi * H + hi) * N * P, dS.data(), sizeof(T) * N * P);
}

template <typename T> int block_checked(const BDims& d) {
  if (d.b < 0 || d.L < 0 || d.H < 1 || d.P < 1 || d.N < 1 || d.G < 1 || d.H % d.G || d.bs < 1 || d.N % d.bs) return 1;
  if (d.kind == 1 && d.bs != 2) return 2;
  if ((d.kind == 0 || d.kind == 2) && d.method != 1) return 3;   // kinds 0 and 2 build gbt only
  if (d.kind < 0 || d.kind > 2 || (d.kind == 2 && d.bs < 2)) return 4;
  return 0;
}

}  // namespace

#define SSM_BLOCK_EXPORT(T, SUFFIX)                                                                             \
  extern "C" int ssm_block_forward_##SUFFIX(const T* u, const T* dt, const T* raw, const T* B, const T* C,       \
                                            const T* D, const T* h0, const T* z, T* y, T* hT, T* saved, T* ypre, \
                                            int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G,    \
                                            int64_t bs, int64_t z_stride, int kind, int method, double alpha,    \
                                            int threads) {                                                      \
    BDims d{b, L, H, P, N, G, bs, z_stride, kind, method, alpha};                                              \
    if (int err = block_checked<T>(d)) return err;                                                             \
    BTensors<T> x{};                                                                                            \
    x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.h0 = h0, x.z = z;                             \
    x.y = y, x.hT = hT, x.saved = saved, x.ypre = ypre;                                                         \
    parallel_for(b * H, threads, [&](int64_t i) { block_forward_head(d, x, i / H, i % H); });                   \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_block_backward_##SUFFIX(                                                                   \
      const T* u, const T* dt, const T* raw, const T* B, const T* C, const T* D, const T* saved, const T* z,     \
      const T* ypre, const T* dy, const T* dhT, T* du, T* ddt, T* draw, T* dB, T* dC, T* dD, T* dh0, T* dz,     \
      int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t bs, int64_t z_stride, int kind, \
      int method, double alpha, int threads) {                                                                  \
    BDims d{b, L, H, P, N, G, bs, z_stride, kind, method, alpha};                                              \
    if (int err = block_checked<T>(d)) return err;                                                             \
    if (z && !ypre) return 5;                                                                                   \
    BTensors<T> x{};                                                                                            \
    x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.saved_in = saved, x.z = z, x.ypre_in = ypre;  \
    x.dy = dy, x.dhT = dhT, x.du = du, x.ddt = ddt, x.draw = draw, x.dB = dB, x.dC = dC, x.dD = dD;             \
    x.dh0 = dh0, x.dz = dz;                                                                                     \
    parallel_for(b * H, threads, [&](int64_t i) { block_backward_head(d, x, i / H, i % H); });                  \
    return 0;                                                                                                   \
  }

SSM_BLOCK_EXPORT(float, f32)
SSM_BLOCK_EXPORT(double, f64)
