// Fused CPU selective scan for the diagonal structure: forward and backward in one pass over the
// sequence each, the state kept in registers and L1, no (batch, length, channels, state) tensor.
//
// Semantics (exactly those of sparse_ssm.ssm.scan.selective_scan_ref for a diagonal A), per batch
// row b, head h (P channels, state size N), group g = h / (H / G) of B and C:
//
//   x_tn     = dt[t] * a[t, n]                           a < 0: the continuous diagonal A_t
//   zoh:     A_bar = exp(x),  beta = expm1(x) / a        (exact zero-order hold, beta -> dt as a -> 0)
//   gbt(al): A_bar = (1 + (1 - al) x) / (1 - al x),  beta = dt / (1 - al x)     (bilinear: al = 1/2)
//   signed range (method bit 2): A_bar <- 2 A_bar - 1, eigenvalues in (-1, 1] instead of (0, 1]
//   S_t[n, p] = A_bar[t, n] S_{t-1}[n, p] + beta[t, n] B[t, g, n] u[t, p]
//   y[t, p]   = sum_n C[t, g, n] S_t[n, p] + D[t] u[t, p]
//   with a gate z (optional): y[t, p] <- y[t, p] * silu(z[t, p])      (Mamba's output gate, fused)
//
// Layouts (contiguous): u, y (b, L, H, P); dt, D (b, L, H); a (b, L, H, N); B, C (b, L, G, N);
// states h0, hT (b, H, N, P); saved chunk-start states (b, H, chunks, N, P); z (b, L, H, P) with
// `z_stride` elements from one token to the next (a view into a wider projection output); the
// ungated output (b, L, H, P) is kept for the backward of the gate.
// The backward recomputes the states of one chunk at a time from the saved chunk-start state and
// walks the chunk in reverse; gradients of B and C come out per head (b, L, H, N) and are summed
// over the heads of a group by the caller.
//
// Vectorisation (vec.h) over the P channels of a head; the state size is padded to a multiple of 8
// inside the kernel.  Parallel over (batch, head).

#include "vec.h"

namespace {

using namespace ssmk;

constexpr int NB = 8;            // state rows kept in registers at once (the state is padded to a multiple)
constexpr int64_t CHUNK = 32;    // tokens per chunk: the chunk's operators and outputs stay in L1

struct Dims {
  int64_t b, L, H, P, N, G, z_stride;
  int method;      // bit 0: gbt with alpha (bilinear = 0.5), else zoh; bit 1: the signed range
  double alpha;
  int64_t Np() const { return (N + NB - 1) / NB * NB; }
  int64_t chunks() const { return (L + CHUNK - 1) / CHUNK; }
};

template <typename T> struct Tensors {
  const T *u, *dt, *a, *B, *C, *D, *h0, *z;  // inputs (h0, z may be null: zero initial state, no gate)
  T *y, *hT, *saved, *ypre;                   // forward outputs (saved, ypre may be null: no backward)
  const T *saved_in, *ypre_in, *dy, *dhT;     // backward inputs (dhT may be null)
  T *du, *ddt, *da, *dB, *dC, *dD, *dh0, *dz; // backward outputs (dB, dC per head)
};

// The operators of tokens [t0, t0 + tc) of head (bi, hi), each row padded to Np:
// Ab = A_bar, Bb = beta * B (the input weight), Cc = C; with derivatives, also beta, and the
// partial derivatives of A_bar and beta by dt and by a.
template <typename T> struct Ops {
  std::vector<T> Ab, Bb, Cc, beta, dA_dt, dA_da, db_dt, db_da;
  void resize(int64_t n, bool grads) {
    for (auto* v : {&Ab, &Bb, &Cc}) v->assign(n, T(0));
    if (grads)
      for (auto* v : {&beta, &dA_dt, &dA_da, &db_dt, &db_da}) v->assign(n, T(0));
  }
};

template <typename T>
void discretize_chunk(const Dims& d, const Tensors<T>& x, int64_t bi, int64_t hi, int64_t t0, int64_t tc, Ops<T>& ops,
                      bool grads) {
  constexpr int W = Vec<T>::lanes;
  const int64_t Np = d.Np(), g = hi / (d.H / d.G);
  T arow[W], brow[W], crow[W];                       // W state entries of one token's a, B, C (zero-padded)
  for (int64_t t = 0; t < tc; ++t) {
    const int64_t tok = (bi * d.L + t0 + t);
    const T dt = x.dt[tok * d.H + hi];
    const T* a = x.a + (tok * d.H + hi) * d.N;
    const T* B = x.B + (tok * d.G + g) * d.N;
    const T* C = x.C + (tok * d.G + g) * d.N;
    for (int64_t n0 = 0; n0 < Np; n0 += W) {
      V<T> av, Bv, Cv;
      if (n0 + W <= d.N) {
        av = vload(a + n0), Bv = vload(B + n0), Cv = vload(C + n0);
      } else {
        for (int i = 0; i < W; ++i) {
          const int64_t n = n0 + i;
          arow[i] = n < d.N ? a[n] : T(0);
          brow[i] = n < d.N ? B[n] : T(0);
          crow[i] = n < d.N ? C[n] : T(0);
        }
        av = vload(arow), Bv = vload(brow), Cv = vload(crow);
      }
      V<T> dtv = vsplat(dt), xv = dtv * av, Abar, beta, Adt, Ada, bdt, bda;
      if ((d.method & 1) == 0) {
        V<T> e = vexp(xv);
        Abar = e;
        beta = dtv * phi_of<T>(xv, e);
        Adt = av * e, Ada = dtv * e, bdt = e, bda = dtv * dtv * psi_of<T>(xv, e);
      } else {
        const T al = T(d.alpha);
        V<T> den = 1 - al * xv, inv = 1 / den, inv2 = inv * inv;
        Abar = (1 + (1 - al) * xv) * inv;
        beta = dtv * inv;
        Adt = av * inv2, Ada = dtv * inv2, bdt = inv2, bda = al * dtv * dtv * inv2;
      }
      if (d.method & 2) Abar = 2 * Abar - 1, Adt = 2 * Adt, Ada = 2 * Ada;     // the signed range
      const int64_t o = t * Np + n0;
      vstore(&ops.Ab[o], Abar);
      vstore(&ops.Bb[o], beta * Bv);
      vstore(&ops.Cc[o], Cv);
      if (grads) {
        vstore(&ops.beta[o], beta);
        vstore(&ops.dA_dt[o], Adt);
        vstore(&ops.dA_da[o], Ada);
        vstore(&ops.db_dt[o], bdt);
        vstore(&ops.db_da[o], bda);
      }
    }
  }
}

// S (Np x P) advanced over tc tokens; y rows (tc x P) get sum_n C S added when `ych` is given, and
// every intermediate state is written to `states` ((tc + 1) x Np x P, first row = start) when given.
template <typename T>
void advance(const Dims& d, const T* u0, int64_t u_stride, const Ops<T>& ops, int64_t tc, T* S, T* ych, T* states) {
  constexpr int W = Vec<T>::lanes;
  const int64_t Np = d.Np(), P = d.P;
  if (P % W == 0) {
    for (int64_t pv = 0; pv < P; pv += W) {
      for (int64_t n0 = 0; n0 < Np; n0 += NB) {
        V<T> s[NB];
        for (int j = 0; j < NB; ++j) s[j] = vload(S + (n0 + j) * P + pv);
        for (int64_t t = 0; t < tc; ++t) {
          const V<T> uv = vload(u0 + t * u_stride + pv);
          const T* Ab = &ops.Ab[t * Np + n0];
          const T* Bb = &ops.Bb[t * Np + n0];
          if (ych) {
            const T* Cc = &ops.Cc[t * Np + n0];
            V<T> yv = vload(ych + t * P + pv);
#pragma GCC unroll 8
            for (int j = 0; j < NB; ++j) {
              s[j] = s[j] * Ab[j] + uv * Bb[j];
              yv += s[j] * Cc[j];
            }
            vstore(ych + t * P + pv, yv);
          } else {
#pragma GCC unroll 8
            for (int j = 0; j < NB; ++j) s[j] = s[j] * Ab[j] + uv * Bb[j];
          }
          if (states)
            for (int j = 0; j < NB; ++j) vstore(states + ((t + 1) * Np + n0 + j) * P + pv, s[j]);
        }
        for (int j = 0; j < NB; ++j) vstore(S + (n0 + j) * P + pv, s[j]);
      }
    }
    return;
  }
  for (int64_t t = 0; t < tc; ++t) {               // any P: scalar over channels, the state rows vectorised
    const T* u = u0 + t * u_stride;
    for (int64_t p = 0; p < P; ++p) {
      T yv = 0;
      for (int64_t n = 0; n < Np; ++n) {
        T& s = S[n * P + p];
        s = s * ops.Ab[t * Np + n] + u[p] * ops.Bb[t * Np + n];
        yv += s * ops.Cc[t * Np + n];
      }
      if (ych) ych[t * P + p] += yv;
    }
    if (states) std::memcpy(states + (t + 1) * Np * P, S, sizeof(T) * Np * P);
  }
}

// Software prefetch (towards L2) of the u and A rows of tokens [t_begin, t_end) of one (batch row,
// head): consecutive tokens' rows are H * P and H * N elements apart, too far for the hardware
// prefetcher to run ahead of a chunk (measured: 6-10% off the forward + backward at 8 heads).
template <typename T>
void prefetch_rows(const Dims& d, const Tensors<T>& x, int64_t bi, int64_t hi, int64_t t_begin, int64_t t_end) {
  for (int64_t t = std::max<int64_t>(t_begin, 0); t < std::min(t_end, d.L); ++t) {
    const int64_t row = (bi * d.L + t) * d.H + hi;
    for (int64_t q = 0; q < d.P; q += 64 / int64_t(sizeof(T))) __builtin_prefetch(x.u + row * d.P + q, 0, 1);
    __builtin_prefetch(x.a + row * d.N, 0, 1);
  }
}

template <typename T> void load_state(const Dims& d, const T* src, T* S) {    // (N, P) -> padded (Np, P)
  std::fill(S, S + d.Np() * d.P, T(0));
  if (src) std::memcpy(S, src, sizeof(T) * d.N * d.P);
}

template <typename T> void forward_head(const Dims& d, const Tensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t Np = d.Np(), P = d.P, H = d.H;
  std::vector<T> S(Np * P), ych(CHUNK * P);
  Ops<T> ops;
  ops.resize(CHUNK * Np, false);
  load_state(d, x.h0 ? x.h0 + (bi * H + hi) * d.N * P : nullptr, S.data());
  for (int64_t c = 0, t0 = 0; t0 < d.L; ++c, t0 += CHUNK) {
    const int64_t tc = std::min(CHUNK, d.L - t0);
    if (x.saved) std::memcpy(x.saved + ((bi * H + hi) * d.chunks() + c) * d.N * P, S.data(), sizeof(T) * d.N * P);
    discretize_chunk(d, x, bi, hi, t0, tc, ops, false);
    prefetch_rows(d, x, bi, hi, t0 + CHUNK, t0 + 2 * CHUNK);
    const T* u0 = x.u + ((bi * d.L + t0) * H + hi) * P;
    skip_rows(x.D + (bi * d.L + t0) * H + hi, H, u0, H * P, tc, P, ych.data());
    advance(d, u0, H * P, ops, tc, S.data(), ych.data(), (T*)nullptr);
    const int64_t row0 = ((bi * d.L + t0) * H + hi) * P;
    store_rows(ych.data(), tc, P, x.y + row0, x.ypre ? x.ypre + row0 : nullptr, H * P,
               x.z ? x.z + (bi * d.L + t0) * d.z_stride + hi * P : nullptr, d.z_stride);
  }
  std::memcpy(x.hT + (bi * H + hi) * d.N * P, S.data(), sizeof(T) * d.N * P);
}

// One token of the reverse walk for K state rows n0 .. n0 + K - 1 (K = 1 or 2, sharing the loads
// of dy, u and du): dS (Np x P) holds the adjoint of the state after token t from the later tokens;
// adds y_t's part, writes the gradients of the C, B_bar and A_bar rows, accumulates du_t, then
// turns those dS rows into the adjoint of the state before token t.
template <typename T, int K>
void reverse_rows(const Dims& d, const Ops<T>& ops, int64_t t, int64_t n0, const T* S_now, const T* S_prev,
                  const T* u, const T* dy, T* dS, T* du, T* gC, T* gB, T* gA) {
  constexpr int W = Vec<T>::lanes;
  const int64_t Np = d.Np(), P = d.P;
  T c[K], b[K], ab[K];
  for (int k = 0; k < K; ++k)
    c[k] = ops.Cc[t * Np + n0 + k], b[k] = ops.Bb[t * Np + n0 + k], ab[k] = ops.Ab[t * Np + n0 + k];
  T accC[K] = {}, accB[K] = {}, accA[K] = {};
  int64_t p = 0;
  if (P % W == 0) {
    V<T> vC[K], vB[K], vA[K];
    for (int k = 0; k < K; ++k) vC[k] = vB[k] = vA[k] = vsplat(T(0));
    for (; p < P; p += W) {
      const V<T> dyv = vload(dy + p), uv = vload(u + p);
      V<T> duv = vload(du + p);
      for (int k = 0; k < K; ++k) {
        const int64_t row = (n0 + k) * P + p;
        const V<T> ds = vload(dS + row) + c[k] * dyv;
        vC[k] += vload(S_now + row) * dyv;
        vB[k] += ds * uv;
        vA[k] += ds * vload(S_prev + row);
        duv += ds * b[k];
        vstore(dS + row, ds * ab[k]);
      }
      vstore(du + p, duv);
    }
    if (K == 2) {
      T four[4];
      hsum4<T>(vC[0], vC[K - 1], vB[0], vB[K - 1], four);
      accC[0] = four[0], accC[K - 1] = four[1], accB[0] = four[2], accB[K - 1] = four[3];
      accA[0] = hsum<T>(vA[0]), accA[K - 1] = hsum<T>(vA[K - 1]);
    } else {
      accC[0] = hsum<T>(vC[0]), accB[0] = hsum<T>(vB[0]), accA[0] = hsum<T>(vA[0]);
    }
  }
  for (; p < P; ++p) {
    for (int k = 0; k < K; ++k) {
      const int64_t row = (n0 + k) * P + p;
      const T ds = dS[row] + c[k] * dy[p];
      accC[k] += S_now[row] * dy[p];
      accB[k] += ds * u[p];
      accA[k] += ds * S_prev[row];
      du[p] += ds * b[k];
      dS[row] = ds * ab[k];
    }
  }
  for (int k = 0; k < K; ++k) gC[n0 + k] = accC[k], gB[n0 + k] = accB[k], gA[n0 + k] = accA[k];
}

template <typename T>
void reverse_token(const Dims& d, const Ops<T>& ops, int64_t t, const T* S_now, const T* S_prev, const T* u, const T* dy,
                   T Dt, T* dS, T* du, T* gC, T* gB, T* gA) {
  for (int64_t p = 0; p < d.P; ++p) du[p] = Dt * dy[p];
  int64_t n = 0;
  for (; n + 2 <= d.N; n += 2) reverse_rows<T, 2>(d, ops, t, n, S_now, S_prev, u, dy, dS, du, gC, gB, gA);
  if (n < d.N) reverse_rows<T, 1>(d, ops, t, n, S_now, S_prev, u, dy, dS, du, gC, gB, gA);
}

// The gradients of one token's a, B (per head), C (per head) and dt from those of its A_bar rows
// (gA), input weights beta * B (gB) and C rows (gC); returns d dt.  gA, gB, gC are padded to Np.
template <typename T>
T chain_rule(const Dims& d, const Ops<T>& ops, int64_t t, const T* B, const T* gA, const T* gB, const T* gC, T* da,
             T* dB, T* dC) {
  constexpr int W = Vec<T>::lanes;
  const int64_t N = d.N, o = t * d.Np();
  V<T> vdt = vsplat(T(0));
  int64_t n = 0;
  for (; n + W <= N; n += W) {
    const V<T> ga = vload(gA + n), gb = vload(gB + n), gbeta = gb * vload(B + n);   // beta * B is the input weight
    vdt += ga * vload(&ops.dA_dt[o + n]) + gbeta * vload(&ops.db_dt[o + n]);
    vstore(da + n, ga * vload(&ops.dA_da[o + n]) + gbeta * vload(&ops.db_da[o + n]));
    vstore(dB + n, gb * vload(&ops.beta[o + n]));
    vstore(dC + n, vload(gC + n));
  }
  T ddt = hsum<T>(vdt);
  for (; n < N; ++n) {
    const T gbeta = gB[n] * B[n];
    ddt += gA[n] * ops.dA_dt[o + n] + gbeta * ops.db_dt[o + n];
    da[n] = gA[n] * ops.dA_da[o + n] + gbeta * ops.db_da[o + n];
    dB[n] = gB[n] * ops.beta[o + n];
    dC[n] = gC[n];
  }
  return ddt;
}

template <typename T> void backward_head(const Dims& d, const Tensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t Np = d.Np(), P = d.P, H = d.H, N = d.N, g = hi / (d.H / d.G);
  std::vector<T> S(Np * P), states((CHUNK + 1) * Np * P), dS(Np * P, T(0)), gC(Np), gB(Np), gA(Np), dyp(P);
  Ops<T> ops;
  ops.resize(CHUNK * Np, true);
  if (x.dhT)
    std::memcpy(dS.data(), x.dhT + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t c = d.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * CHUNK, tc = std::min(CHUNK, d.L - t0);
    load_state(d, x.saved_in + ((bi * H + hi) * d.chunks() + c) * N * P, S.data());
    std::memcpy(states.data(), S.data(), sizeof(T) * Np * P);
    discretize_chunk(d, x, bi, hi, t0, tc, ops, true);
    const T* u0 = x.u + ((bi * d.L + t0) * H + hi) * P;
    advance(d, u0, H * P, ops, tc, S.data(), (T*)nullptr, states.data());
    prefetch_rows(d, x, bi, hi, t0 - CHUNK, t0);           // the chunk the reverse walk takes next
    for (int64_t t = tc - 1; t >= 0; --t) {
      const int64_t tok = bi * d.L + t0 + t, row = tok * H + hi;
      const T* u = u0 + t * H * P;
      const T* dy = x.dy + row * P;
      if (t > 0)                                          // the earlier token's rows, read and written next
        for (int64_t q = 0; q < P; q += 64 / int64_t(sizeof(T))) {
          __builtin_prefetch(x.du + (row - H) * P + q, 1);
          __builtin_prefetch(x.dy + (row - H) * P + q, 0);
          __builtin_prefetch(u - H * P + q, 0);
          if (x.z) __builtin_prefetch(x.dz + (row - H) * P + q, 1);
        }
      if (x.z) {                                          // through the gate: the ungated output's gradient
        gate_row_backward(dy, x.ypre_in + row * P, x.z + tok * d.z_stride + hi * P, dyp.data(), x.dz + row * P, P);
        dy = dyp.data();
      }
      reverse_token(d, ops, t, &states[(t + 1) * Np * P], &states[t * Np * P], u, dy, x.D[row], dS.data(),
                    x.du + row * P, gC.data(), gB.data(), gA.data());
      x.dD[row] = dot(dy, u, P);
      x.ddt[row] = chain_rule(d, ops, t, x.B + (tok * d.G + g) * N, gA.data(), gB.data(), gC.data(), x.da + row * N,
                              x.dB + row * N, x.dC + row * N);
    }
  }
  if (x.dh0) std::memcpy(x.dh0 + (bi * H + hi) * N * P, dS.data(), sizeof(T) * N * P);
}

template <typename T> int checked(const Dims& d) {
  if (d.b < 0 || d.L < 0 || d.H < 1 || d.P < 1 || d.N < 1 || d.G < 1 || d.H % d.G) return 1;
  if (d.method < 0 || d.method > 3) return 2;
  return 0;
}

}  // namespace

#define SSM_EXPORT(T, SUFFIX)                                                                                   \
  extern "C" int ssm_diag_forward_##SUFFIX(const T* u, const T* dt, const T* a, const T* B, const T* C, const T* D, \
                                           const T* h0, const T* z, T* y, T* hT, T* saved, T* ypre, int64_t b,      \
                                           int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t z_stride, \
                                           int method, double alpha, int threads) {                                 \
    Dims d{b, L, H, P, N, G, z_stride, method, alpha};                                                          \
    if (int err = checked<T>(d)) return err;                                                                    \
    Tensors<T> x{};                                                                                             \
    x.u = u, x.dt = dt, x.a = a, x.B = B, x.C = C, x.D = D, x.h0 = h0, x.z = z;                                 \
    x.y = y, x.hT = hT, x.saved = saved, x.ypre = ypre;                                                         \
    parallel_for(d.b * d.H, threads, [&](int64_t i) { forward_head(d, x, i / d.H, i % d.H); });                 \
    return 0;                                                                                                   \
  }                                                                                                             \
  extern "C" int ssm_diag_backward_##SUFFIX(                                                                    \
      const T* u, const T* dt, const T* a, const T* B, const T* C, const T* D, const T* saved, const T* z,       \
      const T* ypre, const T* dy, const T* dhT, T* du, T* ddt, T* da, T* dB, T* dC, T* dD, T* dh0, T* dz,       \
      int64_t b, int64_t L, int64_t H, int64_t P, int64_t N, int64_t G, int64_t z_stride, int method,           \
      double alpha, int threads) {                                                                              \
    Dims d{b, L, H, P, N, G, z_stride, method, alpha};                                                          \
    if (int err = checked<T>(d)) return err;                                                                    \
    if (z && !ypre) return 3;                                                                                   \
    Tensors<T> x{};                                                                                             \
    x.u = u, x.dt = dt, x.a = a, x.B = B, x.C = C, x.D = D, x.saved_in = saved, x.z = z, x.ypre_in = ypre;      \
    x.dy = dy, x.dhT = dhT, x.du = du, x.ddt = ddt, x.da = da, x.dB = dB, x.dC = dC, x.dD = dD, x.dh0 = dh0;    \
    x.dz = dz;                                                                                                  \
    parallel_for(d.b * d.H, threads, [&](int64_t i) { backward_head(d, x, i / d.H, i % d.H); });                \
    return 0;                                                                                                   \
  }

SSM_EXPORT(float, f32)
SSM_EXPORT(double, f64)

extern "C" int ssm_kernel_abi_version() { return 3; }
extern "C" int64_t ssm_scan_chunk() { return CHUNK; }   // tokens per saved chunk-start state
