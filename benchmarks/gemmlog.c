/* An LD_PRELOAD interposer for cblas_sgemm: every call's shape, count and wall time.
 *
 * benchmarks/gemm_shapes.py compiles it (cc -O2 -shared -fPIC) and runs a grid worker with it
 * preloaded. MLX's CPU matmuls (and mlx-lm-lora's, the same library) reach the BLAS through
 * cblas_sgemm, so each is timed here and passed on to the next definition in the search order:
 * the fast BLAS mlx_dpo preloads. At exit one line per distinct call shape goes to $GEMMLOG:
 * transA transB M N K lda ldb beta calls seconds. Linux only (macOS has no LD_PRELOAD). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef struct {
  int ta, tb, m, n, k, lda, ldb;
  float beta;
  long calls;
  double seconds;
} shape;

enum { MAX_SHAPES = 8192 };
static shape shapes[MAX_SHAPES];
static int used;
static sgemm_fn next_sgemm;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

static void write_log(void) {
  const char *path = getenv("GEMMLOG");
  FILE *f = path ? fopen(path, "w") : NULL;
  if (!f) return;
  for (int i = 0; i < used; i++) {
    shape *s = &shapes[i];
    fprintf(f, "%d %d %d %d %d %d %d %g %ld %.9f\n", s->ta, s->tb, s->m, s->n, s->k, s->lda,
            s->ldb, s->beta, s->calls, s->seconds);
  }
  fclose(f);
}

__attribute__((constructor)) static void start(void) { atexit(write_log); }

static void record(int ta, int tb, int m, int n, int k, int lda, int ldb, float beta, double dt) {
  pthread_mutex_lock(&lock);
  int i = 0;
  while (i < used && !(shapes[i].ta == ta && shapes[i].tb == tb && shapes[i].m == m &&
                       shapes[i].n == n && shapes[i].k == k && shapes[i].lda == lda &&
                       shapes[i].ldb == ldb && shapes[i].beta == beta))
    i++;
  if (i == used && used < MAX_SHAPES) shapes[used++] = (shape){ta, tb, m, n, k, lda, ldb, beta, 0, 0};
  if (i < used) {
    shapes[i].calls++;
    shapes[i].seconds += dt;
  }
  pthread_mutex_unlock(&lock);
}

void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  if (!next_sgemm) next_sgemm = (sgemm_fn)dlsym(RTLD_NEXT, "cblas_sgemm");
  double t0 = now();
  next_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  record(ta, tb, m, n, k, lda, ldb, beta, now() - t0);
}
