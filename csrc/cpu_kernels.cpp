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

// Maximum of a row and sum of exp(x - max); NaN propagates through the sum.
template <typename scalar_t>
SSL_INLINE void row_softmax_stats(const scalar_t* x, int64_t C, at::opmath_type<scalar_t>& max_out,
                                  at::opmath_type<scalar_t>& sum_out) {
  using acc_t = at::opmath_type<scalar_t>;
  // The lowest finite value rather than -inf keeps x - m finite for -inf entries.
  acc_t m = std::numeric_limits<acc_t>::lowest();
  SSL_SIMD_MAX(m)
  for (int64_t j = 0; j < C; ++j) {
    const acc_t v = load(x, j);
    m = v > m ? v : m;
  }
  acc_t s = 0;
  SSL_SIMD_SUM(s)
  for (int64_t j = 0; j < C; ++j) s += exp_approx(load(x, j) - m);
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

  SSL_INLINE void rows(int64_t begin, int64_t end) const {
    if (C <= kSmallClasses) {
      for (int64_t i = begin; i < end; i += kBlockRows) block(i, static_cast<int>(std::min<int64_t>(kBlockRows, end - i)));
      return;
    }
    for (int64_t i = begin; i < end; ++i) {
      acc_t conf, mx, sum;
      const int64_t y = row_argmax(p + i * ps, C, conf);
      const scalar_t* zi = z + i * zs;
      row_softmax_stats(zi, C, mx, sum);
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
      mx[u] = std::numeric_limits<acc_t>::lowest();
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
    for (int64_t j = 0; j < C; ++j)
      for (int u = 0; u < kBlockRows; ++u) sum[u] += exp_approx(bz[j][u] - mx[u]);
    for (int u = 0; u < n; ++u) finish_row(i0 + u, arg[u], best[u], mx[u], sum[u], bz[arg[u]][u]);
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

  // e[j] = exp(x[j] - max x); returns the sum of e. NaN propagates through the sum.
  SSL_INLINE acc_t exp_row(const scalar_t* x, acc_t* e) const {
    acc_t m = std::numeric_limits<acc_t>::lowest();
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
                           at::Tensor& pseudo_label, at::Tensor& aux) {
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
                                  pseudo_label.data_ptr<int64_t>(),  aux.data_ptr<acc_t>()};
    at::parallel_for(0, N, row_grain(C), [&](int64_t b, int64_t e) { run(k, b, e); });
  });
}

void masked_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mask,
                            const at::Tensor& logits, const at::Tensor& pseudo_label,
                            const at::Tensor& aux, const at::Tensor& tau, double tau_value,
                            double beta, at::Tensor& grad_logits, at::Tensor& grad_tau) {
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
        grad_logits.data_ptr<scalar_t>(),
        grad_tau.data_ptr<acc_t>()};
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
      at::parallel_for(0, K, 1, [&](int64_t b, int64_t e) { run(k, b, e); });
    }
    const ClassConfidenceFinal<scalar_t> f{partial.get(), hist.get(), K, C, mean.data_ptr<scalar_t>(),
                                           counts.data_ptr<int64_t>()};
    at::parallel_for(0, C, std::max<int64_t>(1, 4096 / std::max<int64_t>(K * C, 1)),
                     [&](int64_t b, int64_t e) { run(f, b, e); });
  });
}

}  // namespace sslkernels
