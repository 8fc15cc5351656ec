// The C entry point of the int8 weight product (`int8_gemv.h`): out (b, O) = x (b, I) @ (s[:, None] * q)^T
// + bias, q (O, I) int8, s (O) float32, bias (O) or null; the output columns split over `threads`.
// `sparse_ssm.ssm.quantized.int8_linear` calls it for the few rows of a decoding step.

#include "int8_gemv.h"

#define SSM_INT8_EXPORT(T, SUFFIX)                                                                              \
  extern "C" int ssm_int8_linear_##SUFFIX(const T* x, const int8_t* q, const float* s, const T* bias, T* out,    \
                                          int64_t b, int64_t O, int64_t I, int threads) {                      \
    if (b < 0 || O < 1 || I < 1) return 1;                                                                      \
    if (bias)                                                                                                   \
      for (int64_t j = 0; j < b; ++j) std::memcpy(out + j * O, bias, sizeof(T) * O);                            \
    ssmk::project_rows_q8(ssmk::Weights<T>{nullptr, q, s}, x, bias ? out : nullptr, out, b, O, I, threads);     \
    return 0;                                                                                                   \
  }

SSM_INT8_EXPORT(float, f32)
SSM_INT8_EXPORT(double, f64)
