// One core's read bandwidth for a decoding step's product at one row (out = W x, W float32 row-major,
// O x I), by the order the weight is read in: row after row in one stream, with and without software
// prefetch, against tiles of four rows side by side (float_gemv.h's tiles for several rows).  This is
// what chose vec.h's row_dot_avx512 for one row.  Needs AVX-512:
//   python bench/row_stream.py   (builds this with gcc -O3 -march=native, runs it pinned to one core)
// Prints the median and the best of 11 interleaved rounds over a 360 MB weight (larger than the caches);
// results: bench/results/row_stream.md.
#include <immintrin.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define FLOATS ((360ull << 20) / 4)
#define ROUNDS 11

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

// row after row, 64 floats a step in four chains; `ahead` bytes on prefetched (0: none)
static void rows(const float* W, const float* x, float* y, size_t O, int I, int ahead) {
  for (size_t o = 0; o < O; o++) {
    const float* w = W + o * I;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int i = 0; i < I; i += 64) {
      if (ahead)
        for (int k = 0; k < 4; k++) _mm_prefetch((const char*)(w + i) + ahead + 64 * k, _MM_HINT_T0);
      c0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), c0);
      c1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), c1);
      c2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), c2);
      c3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), c3);
    }
    y[o] = _mm512_reduce_add_ps(c0 + c1 + c2 + c3);
  }
}

// four rows side by side, 16 floats of each a step; `prefetch`: the rows two tiles on
static void tiles(const float* W, const float* x, float* y, size_t O, int I, int prefetch) {
  for (size_t o = 0; o < O; o += 4) {
    const float* w = W + o * I;
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
    for (int i = 0; i < I; i += 16) {
      if (prefetch)
        for (int k = 0; k < 4; k++) _mm_prefetch((const char*)(w + k * I + i + 8 * I), _MM_HINT_T0);
      const __m512 v = _mm512_loadu_ps(x + i);
      c0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), v, c0);
      c1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + I + i), v, c1);
      c2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 2 * I + i), v, c2);
      c3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + 3 * I + i), v, c3);
    }
    y[o] = _mm512_reduce_add_ps(c0), y[o + 1] = _mm512_reduce_add_ps(c1);
    y[o + 2] = _mm512_reduce_add_ps(c2), y[o + 3] = _mm512_reduce_add_ps(c3);
  }
}

static int by_value(const void* a, const void* b) { double x = *(const double*)a, y = *(const double*)b; return (x > y) - (x < y); }

int main(int argc, char** argv) {
  const int I = argc > 1 ? atoi(argv[1]) : 768;
  if (I <= 0 || I % 64) { fprintf(stderr, "the row length must be a positive multiple of 64\n"); return 2; }
  float* W;
  if (posix_memalign((void**)&W, 64, FLOATS * 4)) return 1;
  for (size_t i = 0; i < FLOATS; i++) W[i] = (float)(i % 1000) * 1e-3f;
  float* x = aligned_alloc(64, (size_t)I * 4);
  for (int i = 0; i < I; i++) x[i] = 1;
  const size_t O = FLOATS / I / 4 * 4;
  float* y = malloc(O * 4);
  const char* names[] = {"rows", "rows, prefetch 1 KB", "rows, prefetch 4 KB", "tiles of 4", "tiles of 4, prefetch"};
  double gbs[5][ROUNDS];
  for (int r = 0; r < ROUNDS; r++)
    for (int k = 0; k < 5; k++) {
      const double t = now();
      if (k < 3) rows(W, x, y, O, I, k == 0 ? 0 : k == 1 ? 1024 : 4096);
      else tiles(W, x, y, O, I, k == 4);
      gbs[k][r] = O * I * 4.0 / (now() - t) / 1e9;
    }
  printf("I = %d, %zu rows (%.0f MB), %d rounds; GB/s median, best  (check %g)\n", I, O, O * I * 4e-6, ROUNDS, y[O - 1]);
  for (int k = 0; k < 5; k++) {
    qsort(gbs[k], ROUNDS, sizeof(double), by_value);
    printf("  %-22s %5.1f  %5.1f\n", names[k], gbs[k][ROUNDS / 2], gbs[k][ROUNDS - 1]);
  }
  return 0;
}
