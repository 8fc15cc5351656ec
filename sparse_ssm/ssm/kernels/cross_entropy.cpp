// Softmax cross-entropy of a block of logits rows, in place: for every row r with target t_r >= 0
//
//   loss_r   = logsumexp(x_r) - x_r[t_r]
//   x_r     <- scale * (softmax(x_r) - onehot(t_r))        (the gradient of scale * sum_r loss_r)
//
// and rows with a negative target (ignored) get loss 0 and, with grad, a zero gradient.  Three
// passes over a row that stays in L1 (max; exp and sum; normalise), instead of the half-dozen
// full-size tensors the same computation costs as separate PyTorch operations.  Rows in parallel.

#include "vec.h"

namespace {

using namespace ssmk;

template <typename T>
void row_cross_entropy(T* x, int64_t vocab, int64_t target, T scale, bool grad, T* loss) {
  constexpr int W = Vec<T>::lanes;
  if (target < 0) {
    *loss = 0;
    if (grad) std::fill(x, x + vocab, T(0));
    return;
  }
  const T x_target = x[target];
  V<T> vmax = vsplat(-std::numeric_limits<T>::infinity());
  int64_t i = 0;
  for (; i + W <= vocab; i += W) {
    const V<T> v = vload(x + i);
    vmax = v > vmax ? v : vmax;
  }
  T m = -std::numeric_limits<T>::infinity();
  for (int k = 0; k < W; ++k) m = std::max(m, vmax[k]);
  for (; i < vocab; ++i) m = std::max(m, x[i]);
  V<T> vsum = vsplat(T(0));
  for (i = 0; i + W <= vocab; i += W) {
    const V<T> e = vexp(vload(x + i) - m);
    if (grad) vstore(x + i, e);
    vsum += e;
  }
  T sum = hsum<T>(vsum);
  for (; i < vocab; ++i) {
    const T e = std::exp(x[i] - m);
    if (grad) x[i] = e;
    sum += e;
  }
  *loss = m + std::log(sum) - x_target;
  if (!grad) return;
  const T f = scale / sum;
  for (i = 0; i + W <= vocab; i += W) vstore(x + i, vload(x + i) * f);
  for (; i < vocab; ++i) x[i] *= f;
  x[target] -= scale;
}

}  // namespace

#define SSM_CE_EXPORT(T, SUFFIX)                                                                                \
  extern "C" int ssm_cross_entropy_##SUFFIX(T* logits, const int64_t* targets, T* losses, int64_t rows,        \
                                            int64_t vocab, double scale, int grad, int threads) {              \
    if (rows < 0 || vocab < 1) return 1;                                                                        \
    for (int64_t r = 0; r < rows; ++r)                                                                          \
      if (targets[r] >= vocab) return 2;                                                                        \
    parallel_for(rows, threads, [&](int64_t r) {                                                                \
      row_cross_entropy<T>(logits + r * vocab, vocab, targets[r], T(scale), grad != 0, losses + r);            \
    });                                                                                                         \
    return 0;                                                                                                   \
  }

SSM_CE_EXPORT(float, f32)
SSM_CE_EXPORT(double, f64)
