// Every head's operator of one token at once, for the decoding step (`layer_step.cpp`): the block and
// banded kinds of `block_ops.h` with the same equations (A = -L L^T + K - K^T from a raw block, gbt by
// an unpivoted LU solve of M = I - alpha dt A, a banded edge block masked), the vector lanes running
// over heads (W = Vec<T>::lanes heads a vector) instead of one block at a time: a token of the step has
// one operator per head and no chunk of tokens to share the work with.  Block sizes without a
// compile-time specialisation (and rotation, whose builder already runs W blocks a vector) take
// build_token_ops head by head.
//
//   build_heads_ops(kind, refs, H, raw, dt, B, heads_per_group, Ab, Bb, scratch)
//       raw (H, R), dt (H), B (G, N) -> Ab (H, refs, bs, bs), Bb (H, N): build_token_ops for each head
//   step_heads(kind, H, P, G, raw, dt, B, C, D, u, z, S, y)     one row's token through every head
#pragma once

#include "block_ops.h"

namespace ssmk {

// The decoding step's method code (`ssm.fused.step_code`): bits 0-1 the discretisation (as the scans'),
// bits 2-7 the structure (0 the diagonal, else 1 + block_scan.cpp's kind), bits 8 and up its block size
inline int step_structure(int code) { return (code >> 2) & 63; }
inline BlockKind step_blocks(int code, int64_t N, double alpha) {
  return {N, int64_t(code >> 8), step_structure(code) - 1, code & 1, alpha};
}
// Can the step take the code (the block scan's own checks: rotation blocks of 2, block and banded with
// gbt only; the signed range the diagonal's only)?
inline bool step_code_ok(int code, int64_t N) {
  if (step_structure(code) == 0) return (code >> 8) == 0;
  const BlockKind k = step_blocks(code, N, 0);
  if (k.kind > 2 || k.bs < 1 || N % k.bs || (code & 2)) return false;
  return k.kind == 1 ? k.bs == 2 : (k.method == 1 && (k.kind == 0 || k.bs >= 2));
}

// The blocks of ref r for heads [0, n): head h reads raw + h * raw_stride (its bs x bs raw block), dt[h],
// B + (h / hpg) * N + r.state0 (stage 0) and writes Ab + h * ab_stride (bs x bs), Bb + h * N + r.state0
template <typename T, int BS>
void build_ref_heads(const BlockRef& r, int64_t n, const T* raw, int64_t raw_stride, const T* dt, const T* B,
                     int64_t N, int64_t hpg, T al, T* Ab, int64_t ab_stride, T* Bb) {
  constexpr int W = Vec<T>::lanes, NN = BS * BS, M1 = BS + 1;
  alignas(64) T in[NN + BS + 1][W], out[BS * M1][W];
  const bool input = r.stage == 0;
  for (int64_t h0 = 0; h0 < n; h0 += W) {
    for (int i = 0; i < W; ++i) {                     // lanes past the last head repeat it
      const int64_t h = std::min<int64_t>(h0 + i, n - 1);
      for (int e = 0; e < NN; ++e) in[e][i] = raw[h * raw_stride + e];
      for (int e = 0; e < BS; ++e) in[NN + e][i] = input ? B[(h / hpg) * N + r.state0 + e] : T(0);
      in[NN + BS][i] = dt[h];
    }
    V<T> R[NN], Lm[NN], M[NN], X[BS * M1];
    for (int e = 0; e < NN; ++e) R[e] = vload(in[e]);
    const V<T> dtv = vload(in[NN + BS]), zero = vsplat(T(0)), cap = vsplat(T(kRateExpMax));
    for (int i = 0; i < BS; ++i)
      for (int j = 0; j < BS; ++j) Lm[i * BS + j] = i > j ? R[i * BS + j] : (i == j ? vexp(R[i * BS + i] < cap ? R[i * BS + i] : cap) : zero);
    for (int i = 0; i < BS; ++i)
      for (int j = 0; j < BS; ++j) {
        V<T> a = zero;
        for (int k = 0; k <= std::min(i, j); ++k) a -= Lm[i * BS + k] * Lm[j * BS + k];
        a += i < j ? R[i * BS + j] : (i > j ? -R[j * BS + i] : zero);
        const bool real = i >= r.lo && i < r.lo + r.size && j >= r.lo && j < r.lo + r.size;
        const T id = i == j ? T(1) : T(0);
        M[i * BS + j] = real ? id - al * dtv * a : vsplat(id);
        X[i * M1 + j] = real ? id + (1 - al) * dtv * a : vsplat(id);
      }
    for (int i = 0; i < BS; ++i) X[i * M1 + BS] = dtv * vload(in[NN + i]);
    for (int k = 0; k < BS; ++k) {                    // solve_in_place, lane by lane
      const V<T> inv = 1 / M[k * BS + k];
      for (int i = k + 1; i < BS; ++i) {
        const V<T> f = M[i * BS + k] * inv;
        for (int j = k + 1; j < BS; ++j) M[i * BS + j] -= f * M[k * BS + j];
        for (int j = 0; j < M1; ++j) X[i * M1 + j] -= f * X[k * M1 + j];
      }
    }
    for (int k = BS - 1; k >= 0; --k) {
      const V<T> inv = 1 / M[k * BS + k];
      for (int j = 0; j < M1; ++j) {
        V<T> s = X[k * M1 + j];
        for (int i = k + 1; i < BS; ++i) s -= M[k * BS + i] * X[i * M1 + j];
        X[k * M1 + j] = s * inv;
      }
    }
    for (int e = 0; e < BS * M1; ++e) vstore(out[e], X[e]);
    for (int i = 0; i < W && h0 + i < n; ++i) {
      const int64_t h = h0 + i;
      for (int a = 0; a < BS; ++a) {
        for (int b = 0; b < BS; ++b) Ab[h * ab_stride + a * BS + b] = out[a * M1 + b][i];
        if (input) Bb[h * N + r.state0 + a] = out[a * M1 + BS][i];
      }
    }
  }
}

// Every block of `count` lanes at once (heads of a step, or tokens of a chunk), lane i's raw rows at
// raw + i * raw_stride, dt (count), B per lane i / hpg; Ab (count, blocks, bs, bs) and Bb (count, N) as
// build_token_ops writes them.  False (nothing written) for rotation and block sizes with no compiled builder.
template <typename T>
bool build_lanes(const BlockKind& d, const std::vector<BlockRef>& refs, int64_t count, const T* raw,
                 int64_t raw_stride, const T* dt, const T* B, int64_t hpg, T* Ab, T* Bb) {
  const int64_t nr = refs.size(), bs = d.bs;
  bool done = false;
  if (d.kind != 1)
    with_block_size(bs, [&](auto K) {
      constexpr int BS = decltype(K)::value;
      if constexpr (BS > 0) {
        for (int64_t k = 0; k < nr; ++k)
          build_ref_heads<T, BS>(refs[k], count, raw + refs[k].raw_index * bs * bs, raw_stride, dt, B, d.N, hpg,
                                 T(d.alpha), Ab + k * bs * bs, nr * bs * bs, Bb);
        done = true;
      }
    });
  return done;
}

template <typename T>
void build_heads_ops(const BlockKind& d, const std::vector<BlockRef>& refs, int64_t H, const T* raw, const T* dt,
                     const T* B, int64_t hpg, T* Ab, T* Bb, Scratch<T>& s) {
  const int64_t nr = refs.size(), bs = d.bs, R = d.R(), N = d.N;
  if (build_lanes(d, refs, H, raw, R, dt, B, hpg, Ab, Bb)) return;
  for (int64_t h = 0; h < H; ++h)
    build_token_ops(d, refs, raw + h * R, dt[h], B + (h / hpg) * N, Ab + h * nr * bs * bs, Bb + h * N, s);
}

// One row's token through every head (the decoding step's scan): raw (H, R), dt (H), B, C (G, N), D (H),
// u, z (H, P); the states S (H, N, P) advanced (S_h <- A_bar S_h + B_bar u_h^T) and
// y (H, P) = (C_g^T S_h + D_h u_h) * silu(z_h), g the group of head h
template <typename T>
void step_heads(const BlockKind& k, int64_t H, int64_t P, int64_t G, const T* raw, const T* dt, const T* B, const T* C,
                const T* D, const T* u, const T* z, T* S, T* y) {
  const std::vector<BlockRef> refs = block_refs(k);
  const int64_t N = k.N, bs = k.bs, op_size = refs.size() * bs * bs, hpg = H / G;
  std::vector<T> Ab(H * op_size), Bb(H * N), next(bs * Vec<T>::lanes);
  Scratch<T> scratch(bs);
  build_heads_ops(k, refs, H, raw, dt, B, hpg, Ab.data(), Bb.data(), scratch);
  for (int64_t h = 0; h < H; ++h) {
    T* Sh = S + h * N * P;
    const T *uh = u + h * P, *Ch = C + (h / hpg) * N;
    T* yh = y + h * P;
    apply_token_ops(refs, bs, P, &Ab[h * op_size], &Bb[h * N], uh, Sh, next.data(), k.last_stage());
    for (int64_t p = 0; p < P; ++p) yh[p] = D[h] * uh[p];
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) yh[p] += Ch[n] * Sh[n * P + p];
    gate_row(yh, z + h * P, yh, P);                              // y * silu(z)
  }
}

}  // namespace ssmk
