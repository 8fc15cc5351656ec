// The walk of one (batch row, head) that the structured scans with per-token operators share
// (`lowrank_scan.cpp`, `householder_scan.cpp`): the forward applies each token's operator to the
// state and writes y = C^T S + D u (gated); the backward recomputes one chunk of states at a time
// from the chunk-start states the forward saved and walks it in reverse.
//
// A kernel K supplies its operator type and three steps (K holds its own scratch, so one K per task):
//   typename K::Op;  Op K::make_op()
//   void K::build(const T* raw, T dt, Op& op)                    the token's operator from its raw row
//   void K::apply(const Op& op, const T* B, const T* u, T* S)    S <- A_bar S + B_bar u^T  (N x P)
//   void K::backward(const Op& op, T* G, const T* S_now, const T* S_prev, const T* B, const T* u,
//                    T* draw, T& ddt, T* dB, T* du)              G: adjoint of S_t in, of S_{t-1} out;
//                                                                writes draw, ddt, dB; adds to du
// Layouts (contiguous): u, y, z-view (b, L, H, P); dt, D (b, L, H); raw (b, L, H, R); B, C (b, L, G, N);
// states (b, H, N, P); chunk-start states (b, H, chunks, N, P); gradients of B and C per head (b, L, H, N).
#pragma once

#include "vec.h"

namespace ssmk {

constexpr int64_t kHeadChunk = 32;     // tokens per saved chunk-start state (as ssm_scan_chunk())

template <typename T> struct ScanTensors {
  const T *u, *dt, *raw, *B, *C, *D, *h0, *z;
  T *y, *hT, *saved, *ypre;
  const T *saved_in, *ypre_in, *dy, *dhT;
  T *du, *ddt, *draw, *dB, *dC, *dD, *dh0, *dz;
};

struct HeadDims {
  int64_t b, L, H, P, N, G, z_stride, R;
  int64_t chunks() const { return (L + kHeadChunk - 1) / kHeadChunk; }
};

template <typename T, typename K>
void forward_head(K& k, const HeadDims& d, const ScanTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H, g = hi / (d.H / d.G);
  std::vector<T> S(N * P, T(0)), yrow(P);
  auto op = k.make_op();
  if (x.h0) std::memcpy(S.data(), x.h0 + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t t = 0; t < d.L; ++t) {
    if (t % kHeadChunk == 0 && x.saved)
      std::memcpy(x.saved + ((bi * H + hi) * d.chunks() + t / kHeadChunk) * N * P, S.data(), sizeof(T) * N * P);
    const int64_t tok = bi * d.L + t, row = tok * H + hi;
    k.build(x.raw + row * d.R, x.dt[row], op);
    const T* u = x.u + row * P;
    k.apply(op, x.B + (tok * d.G + g) * N, u, S.data());
    const T* C = x.C + (tok * d.G + g) * N;
    for (int64_t p = 0; p < P; ++p) yrow[p] = x.D[row] * u[p];
    for (int64_t n = 0; n < N; ++n)
      for (int64_t p = 0; p < P; ++p) yrow[p] += C[n] * S[n * P + p];
    store_rows(yrow.data(), 1, P, x.y + row * P, x.ypre ? x.ypre + row * P : nullptr, P,
               x.z ? x.z + tok * d.z_stride + hi * P : nullptr, d.z_stride);
  }
  std::memcpy(x.hT + (bi * H + hi) * N * P, S.data(), sizeof(T) * N * P);
}

template <typename T, typename K>
void backward_head(K& k, const HeadDims& d, const ScanTensors<T>& x, int64_t bi, int64_t hi) {
  const int64_t N = d.N, P = d.P, H = d.H, g = hi / (d.H / d.G);
  std::vector<T> states((kHeadChunk + 1) * N * P), G(N * P, T(0)), dyp(P);
  std::vector<decltype(k.make_op())> ops;
  for (int64_t t = 0; t < kHeadChunk; ++t) ops.push_back(k.make_op());
  if (x.dhT) std::memcpy(G.data(), x.dhT + (bi * H + hi) * N * P, sizeof(T) * N * P);
  for (int64_t c = d.chunks() - 1; c >= 0; --c) {
    const int64_t t0 = c * kHeadChunk, tc = std::min(kHeadChunk, d.L - t0);
    // 1. recompute the chunk's operators and states from its saved start
    std::memcpy(states.data(), x.saved_in + ((bi * H + hi) * d.chunks() + c) * N * P, sizeof(T) * N * P);
    for (int64_t t = 0; t < tc; ++t) {
      const int64_t tok = bi * d.L + t0 + t, row = tok * H + hi;
      k.build(x.raw + row * d.R, x.dt[row], ops[t]);
      std::memcpy(&states[(t + 1) * N * P], &states[t * N * P], sizeof(T) * N * P);
      k.apply(ops[t], x.B + (tok * d.G + g) * N, x.u + row * P, &states[(t + 1) * N * P]);
    }
    // 2. walk it in reverse: the gate, the skip and the readout, then the kernel's own step
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
      k.backward(ops[t], G.data(), S_now, &states[t * N * P], x.B + (tok * d.G + g) * N, u, x.draw + row * d.R,
                 x.ddt[row], x.dB + row * N, du);
    }
  }
  if (x.dh0) std::memcpy(x.dh0 + (bi * H + hi) * N * P, G.data(), sizeof(T) * N * P);
}

// The C entry points' bodies: the tensors of a forward / backward call, one task per (batch row, head).
template <typename T> ScanTensors<T> forward_tensors(const T* u, const T* dt, const T* raw, const T* B, const T* C,
                                                     const T* D, const T* h0, const T* z, T* y, T* hT, T* saved,
                                                     T* ypre) {
  ScanTensors<T> x{};
  x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.h0 = h0, x.z = z;
  x.y = y, x.hT = hT, x.saved = saved, x.ypre = ypre;
  return x;
}

template <typename T>
ScanTensors<T> backward_tensors(const T* u, const T* dt, const T* raw, const T* B, const T* C, const T* D,
                                const T* saved, const T* z, const T* ypre, const T* dy, const T* dhT, T* du, T* ddt,
                                T* draw, T* dB, T* dC, T* dD, T* dh0, T* dz) {
  ScanTensors<T> x{};
  x.u = u, x.dt = dt, x.raw = raw, x.B = B, x.C = C, x.D = D, x.saved_in = saved, x.z = z, x.ypre_in = ypre;
  x.dy = dy, x.dhT = dhT, x.du = du, x.ddt = ddt, x.draw = draw, x.dB = dB, x.dC = dC, x.dD = dD;
  x.dh0 = dh0, x.dz = dz;
  return x;
}

}  // namespace ssmk
