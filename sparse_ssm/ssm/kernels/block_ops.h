// The per-token operators of the block-diagonal family (block, rotation, banded: the kinds of
// `block_scan.cpp`, whose header comment states the equations), shared by the scan (`block_scan.cpp`)
// and the decoding step (`layer_step.cpp`), so that both build and apply the same A_bar, B_bar:
//
//   build_token_ops(kind, refs, raw, dt, B, Ab, Bb, scratch)   one head's operator of one token from its
//       raw row (R values), step dt and input B (N): Ab (blocks, bs, bs), Bb (N) (stage 0's input weights)
//   apply_token_ops(refs, bs, P, Ab, Bb, u, S, next, last_stage)   S (N x P) <- A_bar S + B_bar u^T
//
// The backward of these (the scan's) stays in block_scan.cpp.
#pragma once

#include <complex>
#include <type_traits>

#include "vec.h"

namespace ssmk {

// One head's operator family: kind 0 block, 1 rotation (bs = 2), 2 banded; method 0 zoh (rotation
// only), 1 gbt(alpha); N states in blocks of bs.
struct BlockKind {
  int64_t N, bs;
  int kind, method;
  double alpha;
  int64_t nb() const { return N / bs; }
  int64_t raw_block() const { return kind == 1 ? 2 : bs * bs; }
  int64_t raw_blocks() const { return kind == 2 ? 2 * nb() + 1 : nb(); }
  int64_t R() const { return raw_blocks() * raw_block(); }
  int64_t last_stage() const { return kind == 2 ? 1 : 0; }
};

// One block of a token's operator: state rows [state0, state0 + size) are acted on by the
// sub-block [lo, lo + size) of a bs x bs operator built from raw block `raw_index`; blocks of
// stage 0 also carry the input B (stage 1: the banded structure's shifted partition).
struct BlockRef {
  int64_t state0, size, lo, stage, raw_index;
};

inline std::vector<BlockRef> block_refs(const BlockKind& d) {
  std::vector<BlockRef> refs;
  for (int64_t j = 0; j < d.nb(); ++j) refs.push_back({j * d.bs, d.bs, 0, 0, j});
  if (d.kind == 2) {
    const int64_t front = d.bs - d.bs / 2;
    for (int64_t k = 0; k <= d.nb(); ++k) {
      const int64_t q_lo = std::max(k * d.bs, front), q_hi = std::min((k + 1) * d.bs, front + d.N);
      if (q_hi > q_lo) refs.push_back({q_lo - front, q_hi - q_lo, q_lo - k * d.bs, 1, d.nb() + k});
    }
  }
  return refs;
}

// ---- small dense linear algebra (row-major bs x bs) -------------------------------------------

// The systems solved here have M = I - alpha dt A with A's symmetric part negative definite, so
// M's symmetric part is positive definite: so are those of all its leading blocks, and Gaussian
// elimination needs no pivoting.  BS > 0: the size known at compile time (loops unrolled).

// Solve M X = Y in place for n x n M (destroyed: its LU, unit lower L below the diagonal) and
// n x m Y (row-major).
template <typename T, int BS> void solve_in_place(T* M, T* Y, int64_t n_, int64_t m) {
  const int64_t n = BS ? BS : n_;
  for (int64_t k = 0; k < n; ++k) {
    const T inv = 1 / M[k * n + k];
    for (int64_t i = k + 1; i < n; ++i) {
      const T f = M[i * n + k] * inv;
      M[i * n + k] = f;
      for (int64_t j = k + 1; j < n; ++j) M[i * n + j] -= f * M[k * n + j];
      for (int64_t j = 0; j < m; ++j) Y[i * m + j] -= f * Y[k * m + j];
    }
  }
  for (int64_t k = n - 1; k >= 0; --k) {
    const T inv = 1 / M[k * n + k];
    for (int64_t j = 0; j < m; ++j) {
      T s = Y[k * m + j];
      for (int64_t i = k + 1; i < n; ++i) s -= M[k * n + i] * Y[i * m + j];
      Y[k * m + j] = s * inv;
    }
  }
}

// Call f with the block size as a compile-time constant where one is specialised (else 0).
template <typename F> void with_block_size(int64_t bs, F f) {
  switch (bs) {
    case 2: f(std::integral_constant<int, 2>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 8: f(std::integral_constant<int, 8>()); break;
    default: f(std::integral_constant<int, 0>());
  }
}

// ---- the two kinds of block: operators from raw parameters -------------------------------------

// A of a kind-0 block from its raw R (bs x bs); also L (for the backward)
template <typename T, int BS> void block_matrix(const T* R, int64_t n_, T* A, T* Lm) {
  const int64_t n = BS ? BS : n_;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) Lm[i * n + j] = i > j ? R[i * n + j] : (i == j ? rate_exp(R[i * n + i]) : T(0));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T s = 0;
      for (int64_t k = 0; k <= std::min(i, j); ++k) s -= Lm[i * n + k] * Lm[j * n + k];
      const T skew = i < j ? R[i * n + j] : (i > j ? -R[j * n + i] : T(0));
      A[i * n + j] = s + skew;
    }
}

template <typename T> struct Scratch {               // per-thread work space of the block builders
  std::vector<T> A, Lm, M, X, W, G, no_input, b_bar;
  explicit Scratch(int64_t n)
      : A(n * n), Lm(n * n), M(n * n), X(n * (n + 1)), W(n * (n + 1)), G(n * n), no_input(n), b_bar(n) {}
};

// rows and columns outside [lo, lo + size) of a block's A set to zero (a banded edge block)
template <typename T> void mask_block(T* A, int64_t n, int64_t lo, int64_t size) {
  if (lo == 0 && size == n) return;
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j)
      if (i < lo || i >= lo + size || j < lo || j >= lo + size) A[i * n + j] = 0;
}

// kind 0 forward: A_bar (n x n) and B_bar (n) of one block (Bv null: no input)
template <typename T, int BS>
void build_block(const T* R, T dt, const T* Bv, int64_t n_, T al, T* Abar, T* Bbar, Scratch<T>& s, int64_t lo,
                 int64_t size) {
  const int64_t n = BS ? BS : n_;
  block_matrix<T, BS>(R, n, s.A.data(), s.Lm.data());
  mask_block(s.A.data(), n, lo, size);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < n; ++j) {
      const T a = s.A[i * n + j], id = i == j ? T(1) : T(0);
      s.M[i * n + j] = id - al * dt * a;
      s.X[i * (n + 1) + j] = id + (1 - al) * dt * a;
    }
  for (int64_t i = 0; i < n; ++i) s.X[i * (n + 1) + n] = Bv ? dt * Bv[i] : T(0);
  solve_in_place<T, BS>(s.M.data(), s.X.data(), n, n + 1);
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t j = 0; j < n; ++j) Abar[i * n + j] = s.X[i * (n + 1) + j];
    Bbar[i] = s.X[i * (n + 1) + n];
  }
}

// kind 1 (rotation): complex a = -exp(2 r0) + i r1;  e = A_bar, beta: B_bar = beta * (B0 + i B1)
template <typename T> struct Rot {
  std::complex<T> a, e, beta, de_da, de_ddt, db_da, db_ddt;
};

template <typename T> Rot<T> rotation(const T* r, T dt, int method, T al) {
  using C = std::complex<T>;
  Rot<T> o;
  o.a = C(-rate_exp(2 * r[0]), r[1]);
  const C x = dt * o.a;
  if (method == 0) {
    o.e = std::exp(x);
    C phi, psi;                                       // expm1(x) / x and (x e^x - expm1(x)) / x^2
    if (std::abs(x) < T(1e-3)) {
      phi = T(1) + x * (T(0.5) + x * (T(1) / 6 + x * (T(1) / 24 + x * (T(1) / 120))));
      psi = T(0.5) + x * (T(1) / 3 + x * (T(1) / 8 + x * (T(1) / 30 + x * (T(1) / 144))));
    } else {
      phi = (o.e - T(1)) / x;
      psi = (x * o.e - (o.e - T(1))) / (x * x);
    }
    o.beta = dt * phi;
    o.de_da = dt * o.e, o.de_ddt = o.a * o.e, o.db_da = dt * dt * psi, o.db_ddt = o.e;
  } else {
    const C den = T(1) - al * x, inv2 = T(1) / (den * den);
    o.e = (T(1) + (1 - al) * x) / den;
    o.beta = dt / den;
    o.de_da = dt * inv2, o.de_ddt = o.a * inv2, o.db_da = al * dt * dt * inv2, o.db_ddt = inv2;
  }
  return o;
}

template <typename T> void build_rotation(const T* r, T dt, const T* Bv, int method, T al, T* Abar, T* Bbar) {
  const Rot<T> o = rotation(r, dt, method, al);
  Abar[0] = o.e.real(), Abar[1] = -o.e.imag(), Abar[2] = o.e.imag(), Abar[3] = o.e.real();
  const std::complex<T> bb = o.beta * std::complex<T>(Bv[0], Bv[1]);
  Bbar[0] = bb.real(), Bbar[1] = bb.imag();
}

// complex helpers on pairs of vectors (re, im)
template <typename T> struct CV {
  V<T> re, im;
};
template <typename T> inline CV<T> cmul(CV<T> a, CV<T> b) { return {a.re * b.re - a.im * b.im, a.re * b.im + a.im * b.re}; }
template <typename T> inline CV<T> cdiv(CV<T> a, CV<T> b) {
  const V<T> den = b.re * b.re + b.im * b.im;
  return {(a.re * b.re + a.im * b.im) / den, (a.im * b.re - a.re * b.im) / den};
}

// Every rotation block of one token at once (W blocks per vector): A_bar (2 x 2 each) and B_bar.
template <typename T>
void build_rotations(const T* raw, T dt, const T* Bv, int64_t nb, int method, T al, T* Ab, T* Bb) {
  constexpr int W = Vec<T>::lanes;
  const T small = sizeof(T) == 4 ? T(0.01) : T(1e-6);      // |x|^2 below which phi's series is used
  int64_t j = 0;
  for (; j + W <= nb; j += W) {
    V<T> r0, r1, b0, b1;
    for (int i = 0; i < W; ++i) {
      r0[i] = std::min(2 * raw[2 * (j + i)], T(kRateExpMax));           // the argument of rate_exp
      r1[i] = raw[2 * (j + i) + 1], b0[i] = Bv[2 * (j + i)], b1[i] = Bv[2 * (j + i) + 1];
    }
    const CV<T> x{-dt * vexp(r0), dt * r1};
    CV<T> e, beta;
    if (method == 0) {
      V<T> sn, cs;
      vsincos(x.im, sn, cs);
      const V<T> m = vexp(x.re);
      e = {m * cs, m * sn};
      const CV<T> direct = cdiv(CV<T>{e.re - 1, e.im}, x);
      CV<T> series{vsplat(T(1) / 720), vsplat(T(0))};      // 1 + x/2 + x^2/6 + ... + x^5/720
      for (T coef : {T(1) / 120, T(1) / 24, T(1) / 6, T(1) / 2, T(1)}) {
        series = cmul(series, x);
        series.re += coef;
      }
      const auto use_series = (x.re * x.re + x.im * x.im) < small;
      beta = {dt * (use_series ? series.re : direct.re), dt * (use_series ? series.im : direct.im)};
    } else {
      const CV<T> num{1 + (1 - al) * x.re, (1 - al) * x.im}, den{1 - al * x.re, -al * x.im};
      e = cdiv(num, den);
      beta = cdiv(CV<T>{vsplat(dt), vsplat(T(0))}, den);
    }
    const CV<T> bb = cmul(beta, CV<T>{b0, b1});
    for (int i = 0; i < W; ++i) {
      T* A = Ab + (j + i) * 4;
      A[0] = e.re[i], A[1] = -e.im[i], A[2] = e.im[i], A[3] = e.re[i];
      Bb[2 * (j + i)] = bb.re[i], Bb[2 * (j + i) + 1] = bb.im[i];
    }
  }
  for (; j < nb; ++j) build_rotation(raw + 2 * j, dt, Bv + 2 * j, method, al, Ab + 4 * j, Bb + 2 * j);
}

// One head's operator of one token (kind, refs as block_refs(kind)): Ab (refs, bs, bs), Bb (N) from the
// raw row (kind.R()), the step dt and the input B (N)
template <typename T>
void build_token_ops(const BlockKind& d, const std::vector<BlockRef>& refs, const T* raw, T dt, const T* B, T* Ab_tok,
                     T* Bb_tok, Scratch<T>& s) {
  const int64_t bs = d.bs, nr = refs.size();
  if (d.kind == 1) {                                  // all rotation blocks of the token, vectorised
    build_rotations(raw, dt, B, nr, d.method, T(d.alpha), Ab_tok, Bb_tok);
    return;
  }
  for (int64_t k = 0; k < nr; ++k) {
    const BlockRef& r = refs[k];
    T* Ab = Ab_tok + k * bs * bs;
    with_block_size(bs, [&](auto K) {
      constexpr int BS = decltype(K)::value;
      if (r.stage == 0)
        build_block<T, BS>(raw + r.raw_index * bs * bs, dt, B + r.state0, bs, T(d.alpha), Ab, Bb_tok + r.state0, s,
                           r.lo, r.size);
      else                                            // the shifted partition: no input of its own
        build_block<T, BS>(raw + r.raw_index * bs * bs, dt, (const T*)nullptr, bs, T(d.alpha), Ab,
                           s.no_input.data(), s, r.lo, r.size);
    });
  }
}

// apply_block for a whole block of compile-time size BS (the loops unrolled, the rows in registers)
template <typename T, int BS>
void apply_fixed(const BlockRef& r, int64_t P, const T* A, const T* Bb, const T* u, T* S) {
  constexpr int W = Vec<T>::lanes;
  T* rows = S + r.state0 * P;
  int64_t p = 0;
  for (; p + W <= P; p += W) {
    V<T> old[BS], acc[BS];
    for (int k = 0; k < BS; ++k) old[k] = vload(rows + k * P + p);
    const V<T> uv = Bb ? vload(u + p) : vsplat(T(0));
    for (int i = 0; i < BS; ++i) {
      acc[i] = Bb ? uv * Bb[i] : vsplat(T(0));
      for (int k = 0; k < BS; ++k) acc[i] += old[k] * A[i * BS + k];
    }
    for (int i = 0; i < BS; ++i) vstore(rows + i * P + p, acc[i]);
  }
  for (; p < P; ++p) {
    T old[BS];
    for (int k = 0; k < BS; ++k) old[k] = rows[k * P + p];
    for (int i = 0; i < BS; ++i) {
      T acc = Bb ? u[p] * Bb[i] : T(0);
      for (int k = 0; k < BS; ++k) acc += old[k] * A[i * BS + k];
      rows[i * P + p] = acc;
    }
  }
}

// rows [state0, state0 + size) of S <- A_sub S_rows (+ Bb_rows u^T), A_sub the block's sub-block
template <typename T>
void apply_block(const BlockRef& r, int64_t bs, int64_t P, const T* A, const T* Bb, const T* u, T* S, T* next) {
  constexpr int W = Vec<T>::lanes;
  if (r.lo == 0 && r.size == bs) {
    if (bs == 2) return apply_fixed<T, 2>(r, P, A, Bb, u, S);
    if (bs == 4) return apply_fixed<T, 4>(r, P, A, Bb, u, S);
    if (bs == 8) return apply_fixed<T, 8>(r, P, A, Bb, u, S);
  }
  T* rows = S + r.state0 * P;
  const int64_t n = r.size;
  int64_t p = 0;
  for (; p + W <= P; p += W) {
    const V<T> uv = Bb ? vload(u + p) : vsplat(T(0));
    for (int64_t i = 0; i < n; ++i) {
      V<T> acc = Bb ? uv * Bb[i] : vsplat(T(0));
      const T* Ai = A + (r.lo + i) * bs + r.lo;
      for (int64_t k = 0; k < n; ++k) acc += vload(rows + k * P + p) * Ai[k];
      vstore(next + i * W, acc);
    }
    for (int64_t i = 0; i < n; ++i) vstore(rows + i * P + p, vload(next + i * W));
  }
  for (; p < P; ++p) {
    for (int64_t i = 0; i < n; ++i) {
      T acc = Bb ? u[p] * Bb[i] : T(0);
      const T* Ai = A + (r.lo + i) * bs + r.lo;
      for (int64_t k = 0; k < n; ++k) acc += rows[k * P + p] * Ai[k];
      next[i] = acc;
    }
    for (int64_t i = 0; i < n; ++i) rows[i * P + p] = next[i];
  }
}

// One token's operator (Ab, Bb from build_token_ops) applied to S (N x P): every block of stage 0
// (with the input u (P)), then those of stage 1 up to last_stage; next: bs * lanes scratch
template <typename T>
void apply_token_ops(const std::vector<BlockRef>& refs, int64_t bs, int64_t P, const T* Ab_tok, const T* Bb_tok,
                     const T* u, T* S, T* next, int64_t last_stage) {
  const int64_t nr = refs.size();
  for (int64_t stage = 0; stage <= last_stage; ++stage)
    for (int64_t k = 0; k < nr; ++k)
      if (refs[k].stage == stage)
        apply_block(refs[k], bs, P, Ab_tok + k * bs * bs, stage == 0 ? Bb_tok + refs[k].state0 : (const T*)nullptr, u,
                    S, next);
}

}  // namespace ssmk
