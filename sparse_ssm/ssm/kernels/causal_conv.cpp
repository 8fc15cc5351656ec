// Causal depthwise convolution + SiLU over (batch, length, channels), forward and backward, fused
// (what Mamba's causal_conv1d does on a GPU), in the layout the projections produce:
//
//   pre[t, e] = bias[e] + sum_{k < K} w[e, k] x[t - K + 1 + k, e]     x[t' < 0] comes from the state
//   out[t, e] = silu(pre[t, e])
//
// x: (b, L, E) with rows `x_stride` elements apart (a view into a wider projection output);
// w: (E, K) (a Conv1d weight (E, 1, K)); bias: (E); state: (b, K - 1, E), the K - 1 inputs before x,
// oldest first (null: zeros); final_state: (b, K - 1, E), the last K - 1 inputs (null: not wanted).
// Vectorised over channels, the window of K inputs kept in registers; parallel over blocks of
// channels (each block runs every batch row, so the weight gradients need no atomics).
// The backward recomputes pre from x.

#include "vec.h"

namespace {

using namespace ssmk;

struct ConvDims {
  int64_t b, L, E, x_stride;
};

template <typename T, int K> struct Conv {
  using Vt = V<T>;
  static constexpr int W = Vec<T>::lanes;

  // the K - 1 inputs before row 0 of batch row bi, channels [e, e + W)
  static void initial_window(const ConvDims& d, const T* state, int64_t bi, int64_t e, Vt* win) {
    for (int k = 0; k < K - 1; ++k) win[k] = state ? vload(state + (bi * (K - 1) + k) * d.E + e) : vsplat(T(0));
  }

  static void forward(const ConvDims& d, const T* x, const T* w, const T* bias, const T* state, T* out, T* final_state,
                      int64_t e) {
    Vt wk[K];
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < W; ++i) wk[k][i] = w[(e + i) * K + k];
    const Vt bv = vload(bias + e);
    for (int64_t bi = 0; bi < d.b; ++bi) {
      Vt win[K];
      initial_window(d, state, bi, e, win);
      for (int64_t t = 0; t < d.L; ++t) {
        win[K - 1] = vload(x + (bi * d.L + t) * d.x_stride + e);
        Vt pre = bv;
        for (int k = 0; k < K; ++k) pre += wk[k] * win[k];
        vstore(out + (bi * d.L + t) * d.E + e, pre * vsigmoid<T>(pre));
        for (int k = 0; k + 1 < K; ++k) win[k] = win[k + 1];
      }
      if (final_state)
        for (int k = 0; k < K - 1; ++k) vstore(final_state + (bi * (K - 1) + k) * d.E + e, win[k]);
    }
  }

  // dx (b, L, E) contiguous; dw (E, K), dbias (E) written for channels [e, e + W); dstate
  // (b, K - 1, E) (null: not wanted); `dpre` a buffer of L vectors.
  static void backward(const ConvDims& d, const T* x, const T* w, const T* bias, const T* state, const T* dout, T* dx,
                       T* dw, T* dbias, T* dstate, Vt* dpre, int64_t e) {
    Vt wk[K], gw[K], gb = vsplat(T(0));
    for (int k = 0; k < K; ++k) {
      for (int i = 0; i < W; ++i) wk[k][i] = w[(e + i) * K + k];
      gw[k] = vsplat(T(0));
    }
    const Vt bv = vload(bias + e);
    for (int64_t bi = 0; bi < d.b; ++bi) {
      Vt win[K];
      initial_window(d, state, bi, e, win);
      for (int64_t t = 0; t < d.L; ++t) {             // dpre = dout * silu'(pre); the weight gradients
        win[K - 1] = vload(x + (bi * d.L + t) * d.x_stride + e);
        Vt pre = bv;
        for (int k = 0; k < K; ++k) pre += wk[k] * win[k];
        const Vt s = vsigmoid<T>(pre);
        const Vt g = vload(dout + (bi * d.L + t) * d.E + e) * s * (1 + pre * (1 - s));
        dpre[t] = g;
        gb += g;
        for (int k = 0; k < K; ++k) gw[k] += g * win[k];
        for (int k = 0; k + 1 < K; ++k) win[k] = win[k + 1];
      }
      // dx[t'] = sum_k w[k] dpre[t' + K - 1 - k]; t' < 0 are the state's rows
      for (int64_t tp = -(K - 1); tp < d.L; ++tp) {
        Vt g = vsplat(T(0));
        for (int k = 0; k < K; ++k) {
          const int64_t t = tp + K - 1 - k;
          if (t >= 0 && t < d.L) g += wk[k] * dpre[t];
        }
        if (tp >= 0)
          vstore(dx + (bi * d.L + tp) * d.E + e, g);
        else if (dstate)
          vstore(dstate + (bi * (K - 1) + tp + K - 1) * d.E + e, g);
      }
    }
    for (int k = 0; k < K; ++k)
      for (int i = 0; i < W; ++i) dw[(e + i) * K + k] = gw[k][i];
    vstore(dbias + e, gb);
  }
};

template <typename T, int K>
void run_forward(const ConvDims& d, const T* x, const T* w, const T* bias, const T* state, T* out, T* final_state,
                 int threads) {
  constexpr int W = Vec<T>::lanes;
  parallel_for(d.E / W, threads,
               [&](int64_t blk) { Conv<T, K>::forward(d, x, w, bias, state, out, final_state, blk * W); });
}

template <typename T, int K>
void run_backward(const ConvDims& d, const T* x, const T* w, const T* bias, const T* state, const T* dout, T* dx,
                  T* dw, T* dbias, T* dstate, int threads) {
  constexpr int W = Vec<T>::lanes;
  parallel_for(d.E / W, threads, [&](int64_t blk) {
    std::vector<V<T>> dpre(std::max<int64_t>(d.L, 1));
    Conv<T, K>::backward(d, x, w, bias, state, dout, dx, dw, dbias, dstate, dpre.data(), blk * W);
  });
}

// K is a template parameter (the window lives in registers): 1 .. 8 are compiled
template <typename T>
int conv_forward(const ConvDims& d, int64_t K, const T* x, const T* w, const T* bias, const T* state, T* out,
                 T* final_state, int threads) {
  if (d.b < 0 || d.L < 0 || d.E % Vec<T>::lanes) return 1;
  switch (K) {
    case 1: run_forward<T, 1>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 2: run_forward<T, 2>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 3: run_forward<T, 3>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 4: run_forward<T, 4>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 5: run_forward<T, 5>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 6: run_forward<T, 6>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 7: run_forward<T, 7>(d, x, w, bias, state, out, final_state, threads); return 0;
    case 8: run_forward<T, 8>(d, x, w, bias, state, out, final_state, threads); return 0;
  }
  return 2;
}

template <typename T>
int conv_backward(const ConvDims& d, int64_t K, const T* x, const T* w, const T* bias, const T* state, const T* dout,
                  T* dx, T* dw, T* dbias, T* dstate, int threads) {
  if (d.b < 0 || d.L < 0 || d.E % Vec<T>::lanes) return 1;
  switch (K) {
    case 1: run_backward<T, 1>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 2: run_backward<T, 2>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 3: run_backward<T, 3>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 4: run_backward<T, 4>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 5: run_backward<T, 5>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 6: run_backward<T, 6>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 7: run_backward<T, 7>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
    case 8: run_backward<T, 8>(d, x, w, bias, state, dout, dx, dw, dbias, dstate, threads); return 0;
  }
  return 2;
}

}  // namespace

#define SSM_CONV_EXPORT(T, SUFFIX)                                                                              \
  extern "C" int ssm_conv_forward_##SUFFIX(const T* x, const T* w, const T* bias, const T* state, T* out,          \
                                           T* final_state, int64_t b, int64_t L, int64_t E, int64_t K,           \
                                           int64_t x_stride, int threads) {                                     \
    return conv_forward<T>(ConvDims{b, L, E, x_stride}, K, x, w, bias, state, out, final_state, threads);       \
  }                                                                                                             \
  extern "C" int ssm_conv_backward_##SUFFIX(const T* x, const T* w, const T* bias, const T* state, const T* dout, \
                                            T* dx, T* dw, T* dbias, T* dstate, int64_t b, int64_t L, int64_t E,  \
                                            int64_t K, int64_t x_stride, int threads) {                         \
    return conv_backward<T>(ConvDims{b, L, E, x_stride}, K, x, w, bias, state, dout, dx, dw, dbias, dstate,     \
                            threads);                                                                           \
  }

SSM_CONV_EXPORT(float, f32)
SSM_CONV_EXPORT(double, f64)
