// CPU kernels of the three ops. Each input row is read from memory once (later passes over it
// hit the cache), rows are split over threads with at::parallel_for, and every reduction runs in
// the accumulation type (float for float16 / bfloat16 /
// float32, double for float64). Inner loops are written so that the compiler vectorises them
// (no branches, an exp that is plain arithmetic), which is what makes the fused ops faster than
// the chain of ATen kernels they replace; the hot functions are additionally compiled for AVX2
// (x86-64-v3) and picked at run time where the compiler supports it.
#include "sslkernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && __GNUC__ >= 12
#define SSL_TARGET_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))  // AVX2 + FMA
#elif defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define SSL_TARGET_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SSL_TARGET_CLONES
#endif

#if defined(_OPENMP)
#define SSL_PRAGMA(x) _Pragma(#x)
#define SSL_SIMD SSL_PRAGMA(omp simd)
#define SSL_SIMD_SUM(var) SSL_PRAGMA(omp simd reduction(+ : var))
#define SSL_SIMD_MAX(var) SSL_PRAGMA(omp simd reduction(max : var))
#define SSL_SIMD_MAX_OR(var, flag) SSL_PRAGMA(omp simd reduction(max : var) reduction(| : flag))
#else
#define SSL_SIMD
#define SSL_SIMD_SUM(var)
#define SSL_SIMD_MAX(var)
#define SSL_SIMD_MAX_OR(var, flag)
#endif

#define SSL_INLINE inline __attribute__((always_inline))

namespace sslkernels {
namespace {

// Rows per block and the largest class count of the row-block path of masked_ce's forward.
constexpr int kBlockRows = 8;
constexpr int64_t kSmallClasses = 32;

// Rows handed to one thread at a time. Coarser than ATen's 32768 elements: an SSL batch
// (448 x 100) stays on one thread, where it takes tens of microseconds, because waking the
// OpenMP team costs about as much on an idle machine and far more on a busy one.
int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 131072 / std::max<int64_t>(C, 1)); }

// exp(x) for float in plain arithmetic (Cody-Waite reduction, Cephes polynomial, ~1 ulp) so
// that loops calling it vectorise; glibc's expf does not. NaN stays NaN; inputs below -87
// return ~1e-38 instead of a denormal or zero, which is immaterial next to the row maximum's 1.
SSL_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  // Round x / ln2 to the nearest integer with the 1.5 * 2^23 trick (vectorises without SSE4.1).
  const float shifter = 12582912.0f;
  float k = (x * 1.44269504088896341f + shifter) - shifter;
  float r = x - k * 0.693359375f;
  r = r - k * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
SSL_INLINE double exp_approx(double x) { return std::exp(x); }

template <typename scalar_t>
SSL_INLINE at::opmath_type<scalar_t> load(const scalar_t* p, int64_t j) {
  return static_cast<at::opmath_type<scalar_t>>(p[j]);
}

// Index of the row maximum, first index on ties; a NaN wins (first NaN), as torch.argmax.
template <typename scalar_t>
SSL_INLINE int64_t row_argmax(const scalar_t* x, int64_t C, at::opmath_type<scalar_t>& best) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  int has_nan = 0;
  SSL_SIMD_MAX_OR(m, has_nan)
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = load(x, j);
    m = v > m ? v : m;
    has_nan |= (v != v);
  }
  int64_t j = 0;
  if (has_nan) {
    while (!(load(x, j) != load(x, j))) ++j;
    best = load(x, j);
    return j;
  }
  while (j < C - 1 && !(load(x, j) == m)) ++j;
  best = load(x, j);
  return j;
}

// Maximum of a row and sum of exp(x - max), also written to e_out unless it is null; NaN
// propagates through the sum.
template <typename scalar_t>
SSL_INLINE void row_softmax_stats(const scalar_t* x, int64_t C, at::opmath_type<scalar_t>& max_out,
                                  at::opmath_type<scalar_t>& sum_out, at::opmath_type<scalar_t>* e_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // From -inf: a row of -inf logits only then gives -inf - -inf = NaN, as log_softmax does (from
  // the lowest finite value, exp_approx's floor of ~1e-38 would give it a finite sum). Every other
  // row has a finite or +inf maximum. The same start in every CPU path of masked_ce.
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  SSL_SIMD_MAX(m)
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = load(x, j);
    m = v > m ? v : m;
  }
  acc_t s = 0;
  if (e_out) {
    SSL_SIMD_SUM(s)
    for (int64_t j = 0; j < C; ++j) {
      const acc_t e = exp_approx(load(x, j) - m);
      e_out[j] = e;
      s += e;
    }
  } else {
    SSL_SIMD_SUM(s)
    for (int64_t j = 0; j < C; ++j) s += exp_approx(load(x, j) - m);
  }
  max_out = m;
  sum_out = s;
}

template <typename acc_t>
SSL_INLINE acc_t surrogate_mask(acc_t conf, acc_t tau, acc_t beta, bool hard) {
  if (hard) return conf >= tau ? acc_t(1) : acc_t(0);
  return acc_t(1) / (acc_t(1) + std::exp(-(beta * (conf - tau))));
}

// ------------------------------------------------------------------------------------------
// masked_ce
template <typename scalar_t>
struct MaskedCEFwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* z;
  int64_t zs;
  const scalar_t* p;
  int64_t ps;
  const acc_t* tau;  // null: use tau_value
  int64_t taus;
  acc_t tau_value, beta;
  bool hard;
  int64_t C;
  scalar_t* loss;
  scalar_t* mask;
  int64_t* pseudo;
  acc_t* aux;  // (N, 3): max of the logits row, log of its sum of exp(z - max), conf
  acc_t* exps;  // null, or (N, C): exp(z - max), for the backward

  SSL_INLINE void rows(int64_t begin, int64_t end) const {
    if (C <= kSmallClasses) {
      for (int64_t i = begin; i < end; i += kBlockRows) block(i, static_cast<int>(std::min<int64_t>(kBlockRows, end - i)));
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      acc_t conf, mx, sum;
      const int64_t y = row_argmax(p + i * ps, C, conf);
      const scalar_t* zi = z + i * zs;
      row_softmax_stats(zi, C, mx, sum, exps ? exps + i * C : nullptr);
      finish_row(i, y, conf, mx, sum, load(zi, y));
    }
  }

  // (max - z_y) + log(sum) rather than logsumexp - z_y: no cancellation when the target is the
  // maximum of logits as large as 1e4.
  void finish_row(int64_t i, int64_t y, acc_t conf, acc_t mx, acc_t sum, acc_t z_y) const {
    const acc_t log_sum = std::log(sum);
    const acc_t ce = (mx - z_y) + log_sum;
    const acc_t t = tau ? tau[i * taus] : tau_value;
    const acc_t m = surrogate_mask(conf, t, beta, hard);
    loss[i] = static_cast<scalar_t>(m * ce);
    mask[i] = static_cast<scalar_t>(m);
    pseudo[i] = y;
    aux[3 * i] = mx;
    aux[3 * i + 1] = log_sum;
    aux[3 * i + 2] = conf;
  }

  // Few classes (an SSL batch has 10 or so): vectorising along a row wastes most of each vector
  // and its horizontal reductions dominate, so a block of rows is transposed into registers-sized
  // buffers and each vector lane follows one row. Same arithmetic, same NaN rules as rows().
  SSL_INLINE void block(int64_t i0, int n) const {
    using idx_t = std::conditional_t<sizeof(acc_t) == 8, int64_t, int32_t>;
    acc_t bp[kSmallClasses][kBlockRows], bz[kSmallClasses][kBlockRows];
    for (int u = 0; u < kBlockRows; ++u) {
      // Lanes past the end repeat the block's first row, so that every lane holds real data.
      const int64_t i = i0 + (u < n ? u : 0);
      const scalar_t* pr = p + i * ps;
      const scalar_t* zr = z + i * zs;
      for (int64_t j = 0; j < C; ++j) {
        bp[j][u] = load(pr, j);
        bz[j][u] = load(zr, j);
      }
    }
    acc_t best[kBlockRows], mx[kBlockRows], sum[kBlockRows];
    idx_t arg[kBlockRows];
    for (int u = 0; u < kBlockRows; ++u) {
      best[u] = bp[0][u];
      arg[u] = 0;
      mx[u] = -std::numeric_limits<acc_t>::infinity();  // as row_softmax_stats
      sum[u] = 0;
    }
    for (int64_t j = 1; j < C; ++j) {
      for (int u = 0; u < kBlockRows; ++u) {
        // torch.argmax order: a larger value wins, the first NaN wins, ties keep the first index.
        const acc_t v = bp[j][u];
        const bool take = (v > best[u]) | ((v != v) & (best[u] == best[u]));
        best[u] = take ? v : best[u];
        arg[u] = take ? static_cast<idx_t>(j) : arg[u];
      }
    }
    for (int64_t j = 0; j < C; ++j)
      for (int u = 0; u < kBlockRows; ++u) mx[u] = bz[j][u] > mx[u] ? bz[j][u] : mx[u];
    acc_t zy[kBlockRows];
    for (int u = 0; u < kBlockRows; ++u) zy[u] = bz[arg[u]][u];
    for (int64_t j = 0; j < C; ++j)
      for (int u = 0; u < kBlockRows; ++u) {
        bz[j][u] = exp_approx(bz[j][u] - mx[u]);  // bz becomes exp(z - max)
        sum[u] += bz[j][u];
      }
    if (exps)
      for (int u = 0; u < n; ++u)
        for (int64_t j = 0; j < C; ++j) exps[(i0 + u) * C + j] = bz[j][u];
    for (int u = 0; u < n; ++u) finish_row(i0 + u, arg[u], best[u], mx[u], sum[u], zy[u]);
  }
};

template <typename scalar_t>
struct MaskedCEBwd {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g;  // null: no gradient for the loss output
  int64_t gs;
  const scalar_t* gm;  // null: no gradient for the mask output
  int64_t gms;
  const scalar_t* z;
  int64_t zs;
  const int64_t* pseudo;
  const acc_t* aux;
  const acc_t* tau;
  int64_t taus;
  acc_t tau_value, beta;
  bool hard;
  int64_t C;
  const acc_t* exps;  // null (recompute), or the forward's (N, C) exp(z - max)
  scalar_t* grad_z;  // contiguous (N, C)
  acc_t* grad_tau;   // (N)

  SSL_INLINE void rows(int64_t begin, int64_t end) const {
    for (int64_t i = begin; i < end; ++i) {
      const acc_t mx = aux[3 * i], log_sum = aux[3 * i + 1], conf = aux[3 * i + 2];
      const acc_t t = tau ? tau[i * taus] : tau_value;
      // Recomputed exactly as in the forward, in the accumulation type.
      const acc_t m = surrogate_mask(conf, t, beta, hard);
      const acc_t gl = g ? load(g, i * gs) : acc_t(0);
      const acc_t scale = gl * m;
      const scalar_t* zi = z + i * zs;
      scalar_t* out = grad_z + i * C;
      const int64_t y = pseudo[i];
      if (scale == acc_t(0)) {
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) out[j] = scalar_t(0);
      } else if (exps) {
        const acc_t* ei = exps + i * C;
        const acc_t inv_sum = std::exp(-log_sum);
        const acc_t scaled = scale * inv_sum;
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) out[j] = static_cast<scalar_t>(scaled * ei[j]);
        out[y] = static_cast<scalar_t>(scale * (ei[y] * inv_sum - acc_t(1)));
      } else {
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j)
          out[j] = static_cast<scalar_t>(scale * exp_approx((load(zi, j) - mx) - log_sum));
        out[y] = static_cast<scalar_t>(scale * (exp_approx((load(zi, y) - mx) - log_sum) - acc_t(1)));
      }
      acc_t gt = 0;
      if (!hard) {
        const acc_t ce = (mx - load(zi, y)) + log_sum;
        const acc_t gmask = gm ? load(gm, i * gms) : acc_t(0);
        gt = -beta * m * (acc_t(1) - m) * (gl * ce + gmask);
      }
      grad_tau[i] = gt;
    }
  }
};

// ------------------------------------------------------------------------------------------
// float32 masked_ce with explicit AVX2 + FMA intrinsics (picked at run time). GCC does not
// vectorise the generic kernels well: its row-block transposition goes through the stack one
// scalar at a time, and std::log / std::exp are called once per row. Here a block of 8 rows is
// transposed in registers (8x8 shuffles) for few classes, so that each vector lane follows one
// row through argmax, max, sum of exp, log and the mask; many classes are vectorised along the
// row. Same definitions and NaN rules as the generic code; exp / log are ~1 ulp polynomials.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SSL_HAVE_AVX2_PATH 1
#define SSL_AVX2_FN __attribute__((target("avx2,fma")))
#define SSL_AVX2_INLINE static inline __attribute__((target("avx2,fma"), always_inline))

bool cpu_has_avx2_fma() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}

// exp_approx on 8 lanes for x <= 88 or NaN (the callers' arguments are z - max z <= 0, or
// clamped): clamp below at -87 (NaN kept), round(x / ln2), Cody-Waite, Cephes.
SSL_AVX2_INLINE __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.0f), x);  // max_ps returns the second operand on NaN
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r);
  p = _mm256_add_ps(p, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// Natural log of positive normal floats (Cephes logf, ~1 ulp); NaN stays NaN.
SSL_AVX2_INLINE __m256 log8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256i xi = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(xi, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(xi, _mm256_set1_epi32(0x807fffff)),
                                                 _mm256_set1_epi32(0x3f000000)));  // [0.5, 1)
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  m = _mm256_add_ps(_mm256_sub_ps(m, one), _mm256_and_ps(small, m));
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.1514610310e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.1676998740e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.2420140846e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(1.4249322787e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-1.6668057665e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(2.0000714765e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(-2.4999993993e-1f));
  y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(3.3333331174e-1f));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(z, _mm256_set1_ps(0.5f), y);
  __m256 r = _mm256_add_ps(m, y);
  r = _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), r);
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}

// Hard mask conf >= tau, or sigmoid(beta * (conf - tau)).
SSL_AVX2_INLINE __m256 mask8(__m256 conf, __m256 t, __m256 beta, bool hard) {
  const __m256 one = _mm256_set1_ps(1.0f);
  if (hard) return _mm256_and_ps(_mm256_cmp_ps(conf, t, _CMP_GE_OQ), one);
  const __m256 na = _mm256_mul_ps(beta, _mm256_sub_ps(t, conf));
  // exp(na) overflows to inf past ln(FLT_MAX), and the mask is then 0, as in the generic code.
  const __m256 ex = _mm256_blendv_ps(exp8(_mm256_min_ps(_mm256_set1_ps(88.0f), na)),  // NaN kept
                                     _mm256_set1_ps(std::numeric_limits<float>::infinity()),
                                     _mm256_cmp_ps(na, _mm256_set1_ps(88.72284f), _CMP_GT_OQ));
  return _mm256_div_ps(one, _mm256_add_ps(one, ex));
}

SSL_AVX2_INLINE float hmax8(__m256 v) {  // NaN-free input
  __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_max_ps(a, _mm_movehl_ps(a, a));
  a = _mm_max_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}
SSL_AVX2_INLINE float hsum8(__m256 v) {
  __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  a = _mm_add_ps(a, _mm_movehl_ps(a, a));
  a = _mm_add_ss(a, _mm_movehdup_ps(a));
  return _mm_cvtss_f32(a);
}

SSL_AVX2_INLINE int32_t hmin8_epi32(__m256i v) {
  __m128i a = _mm_min_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  a = _mm_min_epi32(a, _mm_shuffle_epi32(a, 0x4E));
  a = _mm_min_epi32(a, _mm_shuffle_epi32(a, 0xB1));
  return _mm_cvtsi128_si32(a);
}

// The argmax of a NaN-free row from two per-lane accumulators, each holding per lane the largest
// value seen and the first column holding it: merge them (a larger value wins, then the smaller
// column), then take the smallest column among the lanes equal to the maximum.
SSL_AVX2_INLINE int64_t argmax_merge8(__m256 b0, __m256i a0, __m256 b1, __m256i a1) {
  const __m256 eq = _mm256_cmp_ps(b1, b0, _CMP_EQ_OQ);
  const __m256 t = _mm256_or_ps(_mm256_cmp_ps(b1, b0, _CMP_GT_OQ),
                                _mm256_and_ps(eq, _mm256_castsi256_ps(_mm256_cmpgt_epi32(a0, a1))));
  const __m256 best = _mm256_blendv_ps(b0, b1, t);
  const __m256i arg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a0), _mm256_castsi256_ps(a1), t));
  const __m256 at_max = _mm256_cmp_ps(best, _mm256_set1_ps(hmax8(best)), _CMP_EQ_OQ);
  return hmin8_epi32(_mm256_castps_si256(_mm256_blendv_ps(
      _mm256_castsi256_ps(_mm256_set1_epi32(std::numeric_limits<int32_t>::max())), _mm256_castsi256_ps(arg), at_max)));
}

// torch.argmax of a float row of C >= 1 values (first column on ties; the first NaN's column
// if the row holds one) in one pass without a branch per element: two accumulators of
// argmax_merge8, fed alternately, and the tail read as -inf past C.
SSL_AVX2_INLINE int64_t argmax_row8(const float* pr, int64_t C, int64_t Cv, __m256i tm) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i sixteen = _mm256_set1_epi32(16);
  // Lanes start at -inf with their own column: a row of -inf only gives column 0.
  __m256 b0 = ninf, b1 = ninf, nan = _mm256_setzero_ps();
  __m256i col0 = iota, col1 = _mm256_add_epi32(iota, _mm256_set1_epi32(8)), a0 = col0, a1 = col1;
  int64_t j = 0;
  for (; j + 16 <= Cv; j += 16) {
    const __m256 v0 = _mm256_loadu_ps(pr + j), v1 = _mm256_loadu_ps(pr + j + 8);
    const __m256 t0 = _mm256_cmp_ps(v0, b0, _CMP_GT_OQ), t1 = _mm256_cmp_ps(v1, b1, _CMP_GT_OQ);
    b0 = _mm256_blendv_ps(b0, v0, t0);
    b1 = _mm256_blendv_ps(b1, v1, t1);
    a0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a0), _mm256_castsi256_ps(col0), t0));
    a1 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a1), _mm256_castsi256_ps(col1), t1));
    col0 = _mm256_add_epi32(col0, sixteen);
    col1 = _mm256_add_epi32(col1, sixteen);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
  }
  for (; j < C; j += 8) {  // one more full vector and / or the tail
    const __m256 v = j < Cv ? _mm256_loadu_ps(pr + j)
                            : _mm256_blendv_ps(ninf, _mm256_maskload_ps(pr + j, tm), _mm256_castsi256_ps(tm));
    const __m256 t = _mm256_cmp_ps(v, b0, _CMP_GT_OQ);
    b0 = _mm256_blendv_ps(b0, v, t);
    a0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a0),
                                              _mm256_castsi256_ps(_mm256_add_epi32(iota, _mm256_set1_epi32(static_cast<int>(j)))), t));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  if (_mm256_movemask_ps(nan)) {
    int64_t y = 0;
    while (!std::isnan(pr[y])) ++y;
    return y;
  }
  return argmax_merge8(b0, a0, b1, a1);
}

// Lanes [0, rem) set.
SSL_AVX2_INLINE __m256i tail_mask(int64_t rem) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(rem)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// 8 x 8 transpose in registers: out[j] lane u = r[u] lane j.
SSL_AVX2_INLINE void transpose8(const __m256* r, __m256* out) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  out[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  out[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  out[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  out[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  out[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  out[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  out[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  out[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// 8 rows x 8 columns (starting at column c0, rem <= 8 of them valid) -> 8 column vectors.
SSL_AVX2_INLINE void load_transposed(const float* const* rows, int64_t c0, int64_t rem, __m256* out) {
  __m256 r[8];
  if (rem == 8) {
    for (int u = 0; u < 8; ++u) r[u] = _mm256_loadu_ps(rows[u] + c0);
  } else {
    const __m256i mk = tail_mask(rem);
    for (int u = 0; u < 8; ++u) r[u] = _mm256_maskload_ps(rows[u] + c0, mk);
  }
  transpose8(r, out);
}

// The inverse: 8 column vectors (columns c0 .. c0 + rem - 1) -> columns of rows[0 .. n - 1].
SSL_AVX2_INLINE void store_transposed(const __m256* cols, float* const* rows, int n, int64_t c0, int64_t rem) {
  __m256 r[8];
  transpose8(cols, r);
  const __m256i mk = tail_mask(rem);
  for (int u = 0; u < n; ++u) {
    if (rem == 8)
      _mm256_storeu_ps(rows[u] + c0, r[u]);
    else
      _mm256_maskstore_ps(rows[u] + c0, mk, r[u]);
  }
}

constexpr int64_t kAvx2BlockClasses = 16;

// The outputs of rows i0 .. i0 + n - 1 from their statistics, one row per lane (lanes past n
// hold copies of real rows and are not stored): conf = probs_w[y], arg = y, the maximum mx of
// the logits row, its sum of exp(z - mx), z_y and tau.
SSL_AVX2_INLINE void finish8(const MaskedCEFwd<float>& k, int64_t i0, int n, __m256 conf, __m256i arg,
                             __m256 mx, __m256 sum, __m256 zy, __m256 tau) {
  const __m256 log_sum = log8(sum);
  const __m256 ce = _mm256_add_ps(_mm256_sub_ps(mx, zy), log_sum);
  const __m256 m = mask8(conf, tau, _mm256_set1_ps(k.beta), k.hard);
  const __m256 loss = _mm256_mul_ps(m, ce);
  alignas(32) float mxa[8], lsa[8], cfa[8];
  _mm256_store_ps(mxa, mx);
  _mm256_store_ps(lsa, log_sum);
  _mm256_store_ps(cfa, conf);
  float* aux = k.aux + 3 * i0;
  if (n == 8) {
    _mm256_storeu_ps(k.loss + i0, loss);
    _mm256_storeu_ps(k.mask + i0, m);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(k.pseudo + i0), _mm256_cvtepi32_epi64(_mm256_castsi256_si128(arg)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(k.pseudo + i0 + 4), _mm256_cvtepi32_epi64(_mm256_extracti128_si256(arg, 1)));
  } else {
    alignas(32) float la[8], ma[8];
    alignas(32) int32_t ya[8];
    _mm256_store_ps(la, loss);
    _mm256_store_ps(ma, m);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ya), arg);
    for (int u = 0; u < n; ++u) {
      k.loss[i0 + u] = la[u];
      k.mask[i0 + u] = ma[u];
      k.pseudo[i0 + u] = ya[u];
    }
  }
  for (int u = 0; u < n; ++u) {
    aux[3 * u] = mxa[u];
    aux[3 * u + 1] = lsa[u];
    aux[3 * u + 2] = cfa[u];
  }
}

// Few classes: 8 rows per step, one per lane.
SSL_AVX2_FN void fwd_f32_avx2_block(const MaskedCEFwd<float>& k, int64_t b, int64_t e) {
  const int64_t C = k.C;
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());  // as row_softmax_stats
  for (int64_t i0 = b; i0 < e; i0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, e - i0));
    const float* zr[8];
    const float* pr[8];
    alignas(32) float ta[8];
    for (int u = 0; u < 8; ++u) {
      // Lanes past the end repeat the block's first row, so that every lane holds real data.
      const int64_t i = i0 + (u < n ? u : 0);
      zr[u] = k.z + i * k.zs;
      pr[u] = k.p + i * k.ps;
      ta[u] = k.tau ? k.tau[i * k.taus] : k.tau_value;
    }
    __m256 Z[kAvx2BlockClasses], P[kAvx2BlockClasses];
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      const int64_t rem = std::min<int64_t>(8, C - c0);
      load_transposed(zr, c0, rem, Z + c0);
      load_transposed(pr, c0, rem, P + c0);
    }
    // torch.argmax order: a larger value wins, the first NaN wins, ties keep the first index.
    __m256 best = P[0];
    __m256i arg = _mm256_setzero_si256();
    __m256 mx = _mm256_max_ps(Z[0], ninf);  // NaN entries never become the maximum
    for (int64_t j = 1; j < C; ++j) {
      const __m256 v = P[j];
      const __m256 take = _mm256_or_ps(_mm256_cmp_ps(v, best, _CMP_GT_OQ),
                                       _mm256_andnot_ps(_mm256_cmp_ps(best, best, _CMP_UNORD_Q),
                                                        _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
      best = _mm256_blendv_ps(best, v, take);
      arg = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(arg),
                                                 _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(j))), take));
      mx = _mm256_max_ps(Z[j], mx);
    }
    __m256 sum = _mm256_setzero_ps(), zy = Z[0];
    __m256 E[kAvx2BlockClasses];
    for (int64_t j = 0; j < C; ++j) {
      E[j] = exp8(_mm256_sub_ps(Z[j], mx));
      sum = _mm256_add_ps(sum, E[j]);
      zy = _mm256_blendv_ps(zy, Z[j], _mm256_castsi256_ps(_mm256_cmpeq_epi32(arg, _mm256_set1_epi32(static_cast<int>(j)))));
    }
    if (k.exps) {
      for (int64_t j = C; j < kAvx2BlockClasses; ++j) E[j] = _mm256_setzero_ps();
      float* er[8];
      for (int u = 0; u < n; ++u) er[u] = k.exps + (i0 + u) * C;
      for (int64_t c0 = 0; c0 < C; c0 += 8) store_transposed(E + c0, er, n, c0, std::min<int64_t>(8, C - c0));
    }
    finish8(k, i0, n, best, arg, mx, sum, zy, _mm256_load_ps(ta));
  }
}

// Many classes: vectorised along each row, 8 rows at a time so that the per-row tail (log,
// mask, loss) runs once per 8 rows on vectors. For the hard mask, a row whose mask is 0 and
// whose logits hold no NaN skips the sum of exp: its loss is 0 * CE = 0 whatever the sum, and
// its gradient is 0 (the backward skips rows with a zero scale). Its sum is set to 1, so that
// the loss is computed as 0 * (max - z_y), which keeps the reference's NaN for infinite logits;
// aux then holds log 1 = 0 for it and exp_z (when saved) zeros; a zero scale reads neither.
SSL_AVX2_FN void fwd_f32_avx2_rows(const MaskedCEFwd<float>& k, int64_t b, int64_t e) {
  const int64_t C = k.C;  // > kAvx2BlockClasses, so a row holds at least two full vectors
  const int64_t Cv = C & ~int64_t(7);
  const int64_t rem = C - Cv;
  const __m256i tm = tail_mask(rem);
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());  // also the logits' max's start
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i eight = _mm256_set1_epi32(8);
  for (int64_t i0 = b; i0 < e; i0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, e - i0));
    alignas(32) float cfa[8], mxa[8], sma[8], zya[8], ta[8];
    alignas(32) int32_t ya[8];
    for (int u = 0; u < n; ++u) {
      const int64_t i = i0 + u;
      const float* pr = k.p + i * k.ps;
      const float* zr = k.z + i * k.zs;
      ta[u] = k.tau ? k.tau[i * k.taus] : k.tau_value;
      // One pass over both rows (argmax_row8's loop, fused with the logits' maximum so that each
      // row is read once here). The argmax of the probabilities: per lane the largest value
      // and the first column holding it, two accumulators (even and odd vectors); then the first
      // column among the lanes that hold the row maximum. A NaN anywhere: the first NaN's column.
      // The maximum of the logits (NaN ignored, as the generic code).
      __m256 b0 = _mm256_loadu_ps(pr), b1 = _mm256_loadu_ps(pr + 8);
      __m256i a0 = iota, a1 = _mm256_add_epi32(iota, eight);
      __m256 nan = _mm256_or_ps(_mm256_cmp_ps(b0, b0, _CMP_UNORD_Q), _mm256_cmp_ps(b1, b1, _CMP_UNORD_Q));
      __m256i col = _mm256_add_epi32(a1, eight);
      __m256 zm0 = _mm256_max_ps(_mm256_loadu_ps(zr), ninf), zm1 = _mm256_max_ps(_mm256_loadu_ps(zr + 8), ninf);
      int64_t j = 16;
      for (; j + 16 <= Cv; j += 16) {
        zm0 = _mm256_max_ps(_mm256_loadu_ps(zr + j), zm0);
        zm1 = _mm256_max_ps(_mm256_loadu_ps(zr + j + 8), zm1);
        const __m256 v0 = _mm256_loadu_ps(pr + j), v1 = _mm256_loadu_ps(pr + j + 8);
        const __m256 t0 = _mm256_cmp_ps(v0, b0, _CMP_GT_OQ), t1 = _mm256_cmp_ps(v1, b1, _CMP_GT_OQ);
        b0 = _mm256_blendv_ps(b0, v0, t0);
        b1 = _mm256_blendv_ps(b1, v1, t1);
        a0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a0), _mm256_castsi256_ps(col), t0));
        col = _mm256_add_epi32(col, eight);
        a1 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a1), _mm256_castsi256_ps(col), t1));
        col = _mm256_add_epi32(col, eight);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v0, v1, _CMP_UNORD_Q));
      }
      for (; j < C; j += 8) {  // one more full vector and / or the tail, which reads -inf past C
        const bool full = j < Cv;
        zm0 = _mm256_max_ps(full ? _mm256_loadu_ps(zr + j)
                                 : _mm256_blendv_ps(ninf, _mm256_maskload_ps(zr + j, tm), _mm256_castsi256_ps(tm)),
                            zm0);
        const __m256 v = full ? _mm256_loadu_ps(pr + j)
                              : _mm256_blendv_ps(ninf, _mm256_maskload_ps(pr + j, tm), _mm256_castsi256_ps(tm));
        const __m256 t = _mm256_cmp_ps(v, b0, _CMP_GT_OQ);
        b0 = _mm256_blendv_ps(b0, v, t);
        a0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(a0), _mm256_castsi256_ps(col), t));
        col = _mm256_add_epi32(col, eight);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      int64_t y = 0;
      if (_mm256_movemask_ps(nan)) {
        while (!std::isnan(pr[y])) ++y;
      } else {
        y = argmax_merge8(b0, a0, b1, a1);
      }
      const float conf = pr[y];
      cfa[u] = conf;
      ya[u] = static_cast<int32_t>(y);
      zya[u] = zr[y];
      const float mx = hmax8(_mm256_max_ps(zm0, zm1));
      mxa[u] = mx;
      if (k.hard && !(conf >= ta[u])) {
        __m256 zn = _mm256_setzero_ps();
        for (j = 0; j < Cv; j += 8) {
          const __m256 v = _mm256_loadu_ps(zr + j);
          zn = _mm256_or_ps(zn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (rem) {
          const __m256 v = _mm256_maskload_ps(zr + Cv, tm);  // masked-off lanes read 0
          zn = _mm256_or_ps(zn, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        }
        if (!_mm256_movemask_ps(zn)) {
          sma[u] = 1.0f;
          if (k.exps) std::memset(k.exps + i * C, 0, sizeof(float) * C);
          continue;
        }
      }
      const __m256 vmx = _mm256_set1_ps(mx);
      __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
      float* er = k.exps ? k.exps + i * C : nullptr;  // also store exp(z - max) when asked
      for (j = 0; j + 16 <= Cv; j += 16) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(zr + j), vmx));
        const __m256 e1 = exp8(_mm256_sub_ps(_mm256_loadu_ps(zr + j + 8), vmx));
        if (er) {
          _mm256_storeu_ps(er + j, e0);
          _mm256_storeu_ps(er + j + 8, e1);
        }
        s0 = _mm256_add_ps(s0, e0);
        s1 = _mm256_add_ps(s1, e1);
      }
      for (; j < Cv; j += 8) {
        const __m256 e0 = exp8(_mm256_sub_ps(_mm256_loadu_ps(zr + j), vmx));
        if (er) _mm256_storeu_ps(er + j, e0);
        s0 = _mm256_add_ps(s0, e0);
      }
      if (rem) {
        const __m256 e1 = _mm256_and_ps(_mm256_castsi256_ps(tm), exp8(_mm256_sub_ps(_mm256_maskload_ps(zr + Cv, tm), vmx)));
        if (er) _mm256_maskstore_ps(er + Cv, tm, e1);
        s1 = _mm256_add_ps(s1, e1);
      }
      sma[u] = hsum8(_mm256_add_ps(s0, s1));
    }
    for (int u = n; u < 8; ++u) {  // lanes past the end copy the block's first row
      cfa[u] = cfa[0], mxa[u] = mxa[0], sma[u] = sma[0], zya[u] = zya[0], ta[u] = ta[0], ya[u] = ya[0];
    }
    finish8(k, i0, n, _mm256_load_ps(cfa), _mm256_load_si256(reinterpret_cast<const __m256i*>(ya)),
            _mm256_load_ps(mxa), _mm256_load_ps(sma), _mm256_load_ps(zya), _mm256_load_ps(ta));
  }
}

SSL_AVX2_FN void fwd_f32_avx2(const MaskedCEFwd<float>& k, int64_t b, int64_t e) {
  if (k.C <= kAvx2BlockClasses)
    fwd_f32_avx2_block(k, b, e);
  else
    fwd_f32_avx2_rows(k, b, e);
}

SSL_AVX2_FN void bwd_f32_avx2(const MaskedCEBwd<float>& k, int64_t b, int64_t e) {
  const int64_t C = k.C;
  const int64_t Cv = C & ~int64_t(7);
  const int64_t rem = C - Cv;
  const __m256i tm = tail_mask(rem);
  const __m256 beta = _mm256_set1_ps(k.beta);
  const __m256 one = _mm256_set1_ps(1.0f);
  for (int64_t i0 = b; i0 < e; i0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, e - i0));
    alignas(32) float mxa[8], lsa[8], cfa[8], ta[8], gla[8], gma[8], zya[8], sca[8];
    for (int u = 0; u < 8; ++u) {
      const int64_t i = i0 + (u < n ? u : 0);
      mxa[u] = k.aux[3 * i];
      lsa[u] = k.aux[3 * i + 1];
      cfa[u] = k.aux[3 * i + 2];
      ta[u] = k.tau ? k.tau[i * k.taus] : k.tau_value;
      gla[u] = k.g ? k.g[i * k.gs] : 0.0f;
    }
    const __m256 m = mask8(_mm256_load_ps(cfa), _mm256_load_ps(ta), beta, k.hard);
    const __m256 gl = _mm256_load_ps(gla);
    _mm256_store_ps(sca, _mm256_mul_ps(gl, m));
    alignas(32) float inva[8];  // 1 / sum of exp(z - max) = exp(-log_sum), log_sum >= 0
    if (k.exps) _mm256_store_ps(inva, exp8(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_load_ps(lsa))));
    if (k.hard) {
      for (int u = 0; u < n; ++u) k.grad_tau[i0 + u] = 0.0f;
    } else {
      for (int u = 0; u < 8; ++u) {
        const int64_t i = i0 + (u < n ? u : 0);
        zya[u] = k.z[i * k.zs + k.pseudo[i]];
        gma[u] = k.gm ? k.gm[i * k.gms] : 0.0f;
      }
      const __m256 ce = _mm256_add_ps(_mm256_sub_ps(_mm256_load_ps(mxa), _mm256_load_ps(zya)), _mm256_load_ps(lsa));
      const __m256 up = _mm256_add_ps(_mm256_mul_ps(gl, ce), _mm256_load_ps(gma));
      const __m256 gt = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_xor_ps(beta, _mm256_set1_ps(-0.0f)), m),
                                                    _mm256_sub_ps(one, m)), up);
      alignas(32) float gta[8];
      _mm256_store_ps(gta, gt);
      for (int u = 0; u < n; ++u) k.grad_tau[i0 + u] = gta[u];
    }
    for (int u = 0; u < n; ++u) {
      const int64_t i = i0 + u;
      const float* zi = k.z + i * k.zs;
      float* out = k.grad_z + i * C;
      const float s = sca[u];
      if (s == 0.0f) {
        for (int64_t j = 0; j < Cv; j += 8) _mm256_storeu_ps(out + j, _mm256_setzero_ps());
        if (rem) _mm256_maskstore_ps(out + Cv, tm, _mm256_setzero_ps());
        continue;
      }
      const int64_t y = k.pseudo[i];
      if (k.exps) {  // the forward's exp(z - max): scale * exp(z - max) / sum
        const float* ei = k.exps + i * C;
        const __m256 vs = _mm256_set1_ps(s * inva[u]);
        int64_t j = 0;
        for (; j < Cv; j += 8) _mm256_storeu_ps(out + j, _mm256_mul_ps(vs, _mm256_loadu_ps(ei + j)));
        if (rem) _mm256_maskstore_ps(out + j, tm, _mm256_mul_ps(vs, _mm256_maskload_ps(ei + j, tm)));
        out[y] = s * (ei[y] * inva[u] - 1.0f);
        continue;
      }
      // scale * softmax, then the pseudo-label's column once more as scale * (softmax - 1),
      // with the same exp (not scale * softmax - scale, which cancels when softmax is near 1).
      // log_sum >= 0, so (z - max) - log_sum <= 0.
      const __m256 vs = _mm256_set1_ps(s), vmx = _mm256_set1_ps(mxa[u]), vls = _mm256_set1_ps(lsa[u]);
      int64_t j = 0;
      for (; j < Cv; j += 8) {
        const __m256 ex = exp8(_mm256_sub_ps(_mm256_sub_ps(_mm256_loadu_ps(zi + j), vmx), vls));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(vs, ex));
      }
      if (rem) {
        const __m256 ex = exp8(_mm256_sub_ps(_mm256_sub_ps(_mm256_maskload_ps(zi + j, tm), vmx), vls));
        _mm256_maskstore_ps(out + j, tm, _mm256_mul_ps(vs, ex));
      }
      const float ey = _mm256_cvtss_f32(exp8(_mm256_set1_ps((zi[y] - mxa[u]) - lsa[u])));
      out[y] = s * (ey - 1.0f);
    }
  }
}
#endif  // AVX2 path

// ------------------------------------------------------------------------------------------
// fd_pseudo_label
template <typename scalar_t>
struct FDPseudoLabel {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* a;
  int64_t as;
  const scalar_t* b;
  int64_t bs;
  const scalar_t* y;
  int64_t ys;
  acc_t eps, step;
  int64_t C;
  scalar_t* out;

  SSL_INLINE void rows(int64_t begin, int64_t end) const {
    // exp(a - max a), exp(b - max b) and the unnormalised result of the current row.
    std::vector<acc_t> buf(3 * C);
    acc_t* ea = buf.data();
    acc_t* eb = ea + C;
    acc_t* v = eb + C;
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* ai = a + i * as;
      const scalar_t* bi = b + i * bs;
      const scalar_t* yi = y + i * ys;
      const acc_t sa = exp_row(ai, ea), sb = exp_row(bi, eb);
      const acc_t ia = acc_t(1) / sa, ib = acc_t(1) / sb;
      acc_t total = 0;
      SSL_SIMD_SUM(total)
      for (int64_t j = 0; j < C; ++j) {
        const acc_t grad = (ea[j] * ia - eb[j] * ib) / eps;
        acc_t u = load(yi, j) - step * grad;
        u = u < acc_t(0) ? acc_t(0) : u;  // relu that keeps NaN
        v[j] = u;
        total += u;
      }
      scalar_t* o = out + i * C;
      if (total > acc_t(0)) {
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) o[j] = static_cast<scalar_t>(v[j] / total);
      } else {
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) o[j] = static_cast<scalar_t>(v[j]);
      }
    }
  }

  // e[j] = exp(x[j] - max x); returns the sum of e. NaN propagates through the sum. The maximum
  // starts at -inf, so that a row of -inf gives NaN (-inf - -inf), as torch.softmax does, rather
  // than the uniform row that exp_approx's floor of ~1e-38 would give.
  SSL_INLINE acc_t exp_row(const scalar_t* x, acc_t* e) const {
    acc_t m = -std::numeric_limits<acc_t>::infinity();
    SSL_SIMD_MAX(m)
    for (int64_t j = 0; j < C; ++j) {
      const acc_t xj = load(x, j);
      m = xj > m ? xj : m;
    }
    acc_t s = 0;
    SSL_SIMD_SUM(s)
    for (int64_t j = 0; j < C; ++j) {
      e[j] = exp_approx(load(x, j) - m);
      s += e[j];
    }
    return s;
  }
};

// ------------------------------------------------------------------------------------------
// class_confidence: chunk k sums its rows into partial[k] (C x C) in row order, then every
// output row adds the chunks in chunk order. No atomics; the plan depends only on (M, C).
template <typename scalar_t>
struct ClassConfidenceChunks {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  int64_t xs;
  int64_t M, C, rows_per_chunk;
  acc_t* partial;    // (K, C, C)
  int64_t* hist;     // (K, C)

  SSL_INLINE void chunks(int64_t kbegin, int64_t kend) const {
    for (int64_t k = kbegin; k < kend; ++k) {
      acc_t* P = partial + k * C * C;
      int64_t* H = hist + k * C;
      std::fill(P, P + C * C, acc_t(0));
      std::fill(H, H + C, int64_t(0));
      const int64_t r1 = std::min(M, (k + 1) * rows_per_chunk);
      for (int64_t r = k * rows_per_chunk; r < r1; ++r) {
        const scalar_t* row = x + r * xs;
        acc_t best;
        const int64_t c = row_argmax(row, C, best);
        ++H[c];
        acc_t* dst = P + c * C;
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) dst[j] += load(row, j);
      }
    }
  }
};

template <typename scalar_t>
struct ClassConfidenceFinal {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* partial;
  const int64_t* hist;
  int64_t K, C;
  scalar_t* mean;
  int64_t* counts;

  SSL_INLINE void classes(int64_t cbegin, int64_t cend) const {
    std::vector<acc_t> buf(C);
    acc_t* s = buf.data();
    for (int64_t c = cbegin; c < cend; ++c) {
      int64_t n = 0;
      std::fill(s, s + C, acc_t(0));
      for (int64_t k = 0; k < K; ++k) {
        const int64_t h = hist[k * C + c];
        if (h == 0) continue;
        n += h;
        const acc_t* src = partial + (k * C + c) * C;
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) s[j] += src[j];
      }
      counts[c] = n;
      scalar_t* dst = mean + c * C;
      if (n == 0) {
        const scalar_t u = static_cast<scalar_t>(acc_t(1) / acc_t(C));
        for (int64_t j = 0; j < C; ++j) dst[j] = u;
      } else {
        const acc_t cnt = static_cast<acc_t>(n);
        SSL_SIMD
        for (int64_t j = 0; j < C; ++j) dst[j] = static_cast<scalar_t>(s[j] / cnt);
      }
    }
  }
};

// Non-template entry points per dtype, so that SSL_TARGET_CLONES can compile each hot loop
// for AVX2 and for the baseline ISA (function multiversioning does not mix with templates).
#define SSL_DEFINE_ROW_FNS(T, SUFFIX)                                                          \
  SSL_TARGET_CLONES void fwd_rows_##SUFFIX(const MaskedCEFwd<T>& k, int64_t b, int64_t e) {    \
    k.rows(b, e);                                                                              \
  }                                                                                            \
  SSL_TARGET_CLONES void bwd_rows_##SUFFIX(const MaskedCEBwd<T>& k, int64_t b, int64_t e) {    \
    k.rows(b, e);                                                                              \
  }                                                                                            \
  SSL_TARGET_CLONES void fd_rows_##SUFFIX(const FDPseudoLabel<T>& k, int64_t b, int64_t e) {   \
    k.rows(b, e);                                                                              \
  }                                                                                            \
  SSL_TARGET_CLONES void cc_chunks_##SUFFIX(const ClassConfidenceChunks<T>& k, int64_t b,      \
                                            int64_t e) {                                       \
    k.chunks(b, e);                                                                            \
  }                                                                                            \
  SSL_TARGET_CLONES void cc_final_##SUFFIX(const ClassConfidenceFinal<T>& k, int64_t b,        \
                                           int64_t e) {                                        \
    k.classes(b, e);                                                                           \
  }                                                                                            \
  void run(const MaskedCEFwd<T>& k, int64_t b, int64_t e) { fwd_rows_##SUFFIX(k, b, e); }     \
  void run(const MaskedCEBwd<T>& k, int64_t b, int64_t e) { bwd_rows_##SUFFIX(k, b, e); }     \
  void run(const FDPseudoLabel<T>& k, int64_t b, int64_t e) { fd_rows_##SUFFIX(k, b, e); }    \
  void run(const ClassConfidenceChunks<T>& k, int64_t b, int64_t e) {                         \
    cc_chunks_##SUFFIX(k, b, e);                                                               \
  }                                                                                            \
  void run(const ClassConfidenceFinal<T>& k, int64_t b, int64_t e) { cc_final_##SUFFIX(k, b, e); }

SSL_DEFINE_ROW_FNS(float, f32)
SSL_DEFINE_ROW_FNS(double, f64)
SSL_DEFINE_ROW_FNS(c10::Half, f16)
SSL_DEFINE_ROW_FNS(c10::BFloat16, bf16)
#undef SSL_DEFINE_ROW_FNS


// The float32 AVX2 kernels where the CPU has them; false: use the generic kernels.
template <typename K>
bool run_avx2(const K&, int64_t, int64_t) {
  return false;
}
#ifdef SSL_HAVE_AVX2_PATH
bool run_avx2(const MaskedCEFwd<float>& k, int64_t N, int64_t C) {
  if (!cpu_has_avx2_fma()) return false;
  at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { fwd_f32_avx2(k, b, e); });
  return true;
}
bool run_avx2(const MaskedCEBwd<float>& k, int64_t N, int64_t C) {
  if (!cpu_has_avx2_fma()) return false;
  at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { bwd_f32_avx2(k, b, e); });
  return true;
}

// class_confidence in float32: the generic chunks with the one-pass argmax of argmax_row8 (the
// generic argmax finds the maximum, then scans the row again for its first column) and the row
// added to its class's partial sum on vectors. Each sum still adds the rows in row order, so the
// result is bitwise that of the generic code.
SSL_AVX2_FN void cc_chunks_f32_avx2(const ClassConfidenceChunks<float>& k, int64_t kbegin, int64_t kend) {
  const int64_t C = k.C;
  const int64_t Cv = C & ~int64_t(7);
  const __m256i tm = tail_mask(C - Cv);
  for (int64_t ch = kbegin; ch < kend; ++ch) {
    float* P = k.partial + ch * C * C;
    int64_t* H = k.hist + ch * C;
    std::fill(P, P + C * C, 0.0f);
    std::fill(H, H + C, int64_t(0));
    const int64_t r1 = std::min(k.M, (ch + 1) * k.rows_per_chunk);
    for (int64_t r = ch * k.rows_per_chunk; r < r1; ++r) {
      const float* row = k.x + r * k.xs;
      const int64_t y = argmax_row8(row, C, Cv, tm);
      ++H[y];
      float* dst = P + y * C;
      for (int64_t j = 0; j < Cv; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_add_ps(_mm256_loadu_ps(dst + j), _mm256_loadu_ps(row + j)));
      if (C > Cv)
        _mm256_maskstore_ps(dst + Cv, tm, _mm256_add_ps(_mm256_maskload_ps(dst + Cv, tm), _mm256_maskload_ps(row + Cv, tm)));
    }
  }
}
bool run_avx2(const ClassConfidenceChunks<float>& k, int64_t K, int64_t) {
  if (!cpu_has_avx2_fma()) return false;
  at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) { cc_chunks_f32_avx2(k, b, e); });
  return true;
}

// fd_pseudo_label in float32 for few classes: 8 rows per step, one per lane (as masked_ce's block
// path), where the generic code runs its six loops per row over C values each. The same operations
// per row: softmaxes from exp(x - max) (NaN ignored by the max), the step, relu keeping NaN, and
// the division by a positive row sum.
SSL_AVX2_FN void fd_f32_avx2_block(const FDPseudoLabel<float>& k, int64_t b, int64_t e) {
  const int64_t C = k.C;
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());  // as exp_row
  const __m256 zero = _mm256_setzero_ps(), one = _mm256_set1_ps(1.0f);
  const __m256 eps = _mm256_set1_ps(k.eps), step = _mm256_set1_ps(k.step);
  for (int64_t i0 = b; i0 < e; i0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, e - i0));
    const float *ar[8], *br[8], *yr[8];
    float* outr[8];
    for (int u = 0; u < 8; ++u) {
      const int64_t i = i0 + (u < n ? u : 0);  // lanes past the end repeat the block's first row
      ar[u] = k.a + i * k.as;
      br[u] = k.b + i * k.bs;
      yr[u] = k.y + i * k.ys;
      outr[u] = k.out + i * C;
    }
    __m256 A[kAvx2BlockClasses], B[kAvx2BlockClasses], Y[kAvx2BlockClasses];
    for (int64_t c0 = 0; c0 < C; c0 += 8) {
      const int64_t rem = std::min<int64_t>(8, C - c0);
      load_transposed(ar, c0, rem, A + c0);
      load_transposed(br, c0, rem, B + c0);
      load_transposed(yr, c0, rem, Y + c0);
    }
    __m256 ma = ninf, mb = ninf;
    for (int64_t j = 0; j < C; ++j) {
      ma = _mm256_max_ps(A[j], ma);  // max_ps returns the second operand on NaN
      mb = _mm256_max_ps(B[j], mb);
    }
    __m256 sa = zero, sb = zero;
    for (int64_t j = 0; j < C; ++j) {
      A[j] = exp8(_mm256_sub_ps(A[j], ma));
      B[j] = exp8(_mm256_sub_ps(B[j], mb));
      sa = _mm256_add_ps(sa, A[j]);
      sb = _mm256_add_ps(sb, B[j]);
    }
    const __m256 ia = _mm256_div_ps(one, sa), ib = _mm256_div_ps(one, sb);
    __m256 total = zero;
    for (int64_t j = 0; j < C; ++j) {
      const __m256 grad = _mm256_div_ps(_mm256_sub_ps(_mm256_mul_ps(A[j], ia), _mm256_mul_ps(B[j], ib)), eps);
      const __m256 u = _mm256_sub_ps(Y[j], _mm256_mul_ps(step, grad));
      Y[j] = _mm256_blendv_ps(u, zero, _mm256_cmp_ps(u, zero, _CMP_LT_OQ));  // relu, NaN kept
      total = _mm256_add_ps(total, Y[j]);
    }
    const __m256 scale = _mm256_blendv_ps(one, total, _mm256_cmp_ps(total, zero, _CMP_GT_OQ));
    for (int64_t j = 0; j < C; ++j) Y[j] = _mm256_div_ps(Y[j], scale);
    for (int64_t c0 = 0; c0 < C; c0 += 8) store_transposed(Y + c0, outr, n, c0, std::min<int64_t>(8, C - c0));
  }
}
bool run_avx2(const FDPseudoLabel<float>& k, int64_t N, int64_t C) {
  if (C > kAvx2BlockClasses || !cpu_has_avx2_fma()) return false;
  at::parallel_for(0, N, row_grain(3 * C), [&](int64_t b, int64_t e) { fd_f32_avx2_block(k, b, e); });
  return true;
}
#endif

template <typename scalar_t>
const at::opmath_type<scalar_t>* tau_ptr(const at::Tensor& tau) {
  return tau.defined() ? tau.data_ptr<at::opmath_type<scalar_t>>() : nullptr;
}
int64_t tau_stride(const at::Tensor& tau) {
  return (tau.defined() && tau.dim() == 1) ? tau.stride(0) : 0;
}

}  // namespace

void masked_ce_forward_cpu(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& tau,
                           double tau_value, double beta, at::Tensor& loss, at::Tensor& mask,
                           at::Tensor& pseudo_label, at::Tensor& aux, at::Tensor& exp_z) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "masked_ce_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MaskedCEFwd<scalar_t> k{logits.const_data_ptr<scalar_t>(), logits.stride(0),
                                  probs.const_data_ptr<scalar_t>(),  probs.stride(0),
                                  tau_ptr<scalar_t>(tau),            tau_stride(tau),
                                  static_cast<acc_t>(tau_value),     static_cast<acc_t>(beta),
                                  std::isinf(beta),                  C,
                                  loss.data_ptr<scalar_t>(),         mask.data_ptr<scalar_t>(),
                                  pseudo_label.data_ptr<int64_t>(),  aux.data_ptr<acc_t>(),
                                  exp_z.numel() ? exp_z.data_ptr<acc_t>() : nullptr};
    if (run_avx2(k, N, C)) return;
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { run(k, b, e); });
  });
}

void masked_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mask,
                            const at::Tensor& logits, const at::Tensor& pseudo_label,
                            const at::Tensor& aux, const at::Tensor& tau, double tau_value,
                            double beta, const at::Tensor& exp_z, at::Tensor& grad_logits,
                            at::Tensor& grad_tau) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "masked_ce_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const MaskedCEBwd<scalar_t> k{
        grad_loss.defined() ? grad_loss.const_data_ptr<scalar_t>() : nullptr,
        grad_loss.defined() ? grad_loss.stride(0) : 0,
        grad_mask.defined() ? grad_mask.const_data_ptr<scalar_t>() : nullptr,
        grad_mask.defined() ? grad_mask.stride(0) : 0,
        logits.const_data_ptr<scalar_t>(),
        logits.stride(0),
        pseudo_label.const_data_ptr<int64_t>(),
        aux.const_data_ptr<acc_t>(),
        tau_ptr<scalar_t>(tau),
        tau_stride(tau),
        static_cast<acc_t>(tau_value),
        static_cast<acc_t>(beta),
        std::isinf(beta),
        C,
        exp_z.defined() ? exp_z.const_data_ptr<acc_t>() : nullptr,
        grad_logits.data_ptr<scalar_t>(),
        grad_tau.data_ptr<acc_t>()};
    if (run_avx2(k, N, C)) return;
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { run(k, b, e); });
  });
}

void fd_pseudo_label_cpu(const at::Tensor& logits_plus, const at::Tensor& logits_minus,
                         const at::Tensor& y_tilde, double eps, double step, at::Tensor& y_hat) {
  const int64_t N = y_tilde.size(0), C = y_tilde.size(1);
  if (N == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_tilde.scalar_type(), "fd_pseudo_label_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const FDPseudoLabel<scalar_t> k{logits_plus.const_data_ptr<scalar_t>(),  logits_plus.stride(0),
                                    logits_minus.const_data_ptr<scalar_t>(), logits_minus.stride(0),
                                    y_tilde.const_data_ptr<scalar_t>(),      y_tilde.stride(0),
                                    static_cast<acc_t>(eps),                 static_cast<acc_t>(step),
                                    C,                                       y_hat.data_ptr<scalar_t>()};
    if (run_avx2(k, N, C)) return;
    at::parallel_for(0, N, row_grain(3 * C), [&](int64_t b, int64_t e) { run(k, b, e); });
  });
}

void class_confidence_cpu(const at::Tensor& probs, at::Tensor& mean, at::Tensor& counts) {
  const int64_t M = probs.size(0), C = probs.size(1);
  // 2048-row chunks (or fewer, larger ones when C * C is big): a partial of C x C per chunk.
  const ChunkPlan plan = plan_chunks(M, C, /*min_rows=*/2048, /*max_partial=*/int64_t(1) << 23);
  const int64_t K = plan.num_chunks;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "class_confidence_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Each chunk zeroes its own slice, so the workspace is left uninitialised here.
    std::unique_ptr<acc_t[]> partial(new acc_t[static_cast<size_t>(K * C * C)]);
    std::unique_ptr<int64_t[]> hist(new int64_t[static_cast<size_t>(K * C)]);
    if (K > 0) {
      const ClassConfidenceChunks<scalar_t> k{probs.const_data_ptr<scalar_t>(), probs.stride(0), M, C,
                                              plan.rows_per_chunk, partial.get(), hist.get()};
      if (!run_avx2(k, K, C)) at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) { run(k, b, e); });
    }
    const ClassConfidenceFinal<scalar_t> f{partial.get(), hist.get(), K, C, mean.data_ptr<scalar_t>(),
                                           counts.data_ptr<int64_t>()};
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * C, 1)),
                     [&](int64_t b, int64_t e) { run(f, b, e); });
  });
}

}  // namespace sslkernels
