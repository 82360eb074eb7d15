// CUDA kernels of the three ops: one kernel launch per op and direction.
//
// masked_ce (forward, backward) and fd_pseudo_label give one warp to each row (grid-stride over
// rows), reduce with warp shuffles and read each input row once. class_confidence is one
// cooperative kernel whose phases are separated by grid-wide barriers; every float sum runs in a
// fixed order (no float atomics), so its result is deterministic. Where cooperative launch is not
// available the same phases run as consecutive launches of the same kernel, with the same result.
//
// Only lean ATen / c10 headers: this file is compiled by nvcc for several architectures.
#include "sslkernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace sslkernels {
namespace {

constexpr int kWarp = 32;
constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / kWarp;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float dexp(float x) { return expf(x); }
__device__ __forceinline__ double dexp(double x) { return exp(x); }
__device__ __forceinline__ float dlog(float x) { return logf(x); }
__device__ __forceinline__ double dlog(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Maximum that ignores NaN (NaN reaches the result through the sum of exponentials instead).
template <typename T>
__device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T o = __shfl_xor_sync(kFullMask, v, offset);
    v = o > v ? o : v;
  }
  return v;
}

// The better of two (value, index) candidates under torch.argmax's order: a NaN beats any
// number, a larger value beats a smaller one, and ties go to the smaller index.
template <typename T>
__device__ __forceinline__ void argmax_merge(T& v, int64_t& i, T ov, int64_t oi) {
  const bool v_nan = v != v, o_nan = ov != ov;
  bool take;
  if (v_nan != o_nan) {
    take = o_nan;
  } else if (v_nan) {
    take = oi < i;
  } else {
    take = ov > v || (ov == v && oi < i);
  }
  if (take) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__device__ __forceinline__ void warp_argmax(T& v, int64_t& i) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const T ov = __shfl_xor_sync(kFullMask, v, offset);
    const int64_t oi = __shfl_xor_sync(kFullMask, i, offset);
    argmax_merge(v, i, ov, oi);
  }
}

// Argmax of row x[0..C) by one warp; every lane gets the result.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t row_argmax(const scalar_t* __restrict__ x, int64_t C, int lane,
                                              acc_t& best) {
  acc_t v = -std::numeric_limits<acc_t>::infinity();
  int64_t i = std::numeric_limits<int64_t>::max();
  for (int64_t j = lane; j < C; j += kWarp) argmax_merge(v, i, static_cast<acc_t>(x[j]), j);
  warp_argmax(v, i);
  best = v;
  return i;
}

// Single-pass (online) max and sum of exp over a row by one warp. Starting from the lowest
// finite value instead of -inf keeps every difference finite when the row holds -inf.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void row_softmax_stats(const scalar_t* __restrict__ x, int64_t C, int lane,
                                                  acc_t& m_out, acc_t& s_out) {
  acc_t m = std::numeric_limits<acc_t>::lowest(), s = 0;
  for (int64_t j = lane; j < C; j += kWarp) {
    const acc_t v = static_cast<acc_t>(x[j]);
    if (v > m) {
      s = s * dexp(m - v) + acc_t(1);
      m = v;
    } else {
      s += dexp(v - m);
    }
  }
  const acc_t wm = warp_max(m);
  s = warp_sum(s * dexp(m - wm));
  m_out = wm;
  s_out = s;
}

template <typename acc_t>
__device__ __forceinline__ acc_t surrogate_mask(acc_t conf, acc_t tau, acc_t beta, bool hard) {
  if (hard) return conf >= tau ? acc_t(1) : acc_t(0);
  return acc_t(1) / (acc_t(1) + dexp(-(beta * (conf - tau))));
}

int num_sms(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Blocks for a warp-per-row grid-stride kernel: enough to fill the GPU, no more than needed.
int row_grid(int64_t rows, int device) {
  const int64_t needed = (rows + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int64_t cap = static_cast<int64_t>(num_sms(device)) * (2048 / kBlock) * 4;
  return static_cast<int>(std::max<int64_t>(1, std::min(needed, cap)));
}

__device__ __forceinline__ int64_t global_warp() {
  return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
}
__device__ __forceinline__ int64_t total_warps() {
  return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarp;
}

// ------------------------------------------------------------------------------------------
// masked_ce

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) masked_ce_fwd_kernel(
    const scalar_t* __restrict__ z, int64_t zs, const scalar_t* __restrict__ p, int64_t ps,
    const at::opmath_type<scalar_t>* __restrict__ tau, int64_t taus, at::opmath_type<scalar_t> tau_value,
    at::opmath_type<scalar_t> beta, bool hard, int64_t N, int64_t C, scalar_t* __restrict__ loss,
    scalar_t* __restrict__ mask, int64_t* __restrict__ pseudo, at::opmath_type<scalar_t>* __restrict__ aux) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = global_warp(); i < N; i += total_warps()) {
    acc_t conf;
    const int64_t y = row_argmax(p + i * ps, C, lane, conf);
    acc_t mx, sum;
    const scalar_t* zi = z + i * zs;
    row_softmax_stats(zi, C, lane, mx, sum);
    if (lane == 0) {
      const acc_t log_sum = dlog(sum);
      // (max - z_y) + log_sum rather than logsumexp - z_y: no cancellation for large logits.
      const acc_t ce = (mx - static_cast<acc_t>(zi[y])) + log_sum;
      const acc_t t = tau ? tau[i * taus] : tau_value;
      const acc_t m = surrogate_mask(conf, t, beta, hard);
      loss[i] = static_cast<scalar_t>(m * ce);
      mask[i] = static_cast<scalar_t>(m);
      pseudo[i] = y;
      aux[3 * i] = mx;
      aux[3 * i + 1] = log_sum;
      aux[3 * i + 2] = conf;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) masked_ce_bwd_kernel(
    const scalar_t* __restrict__ g, int64_t gs, const scalar_t* __restrict__ gm, int64_t gms,
    const scalar_t* __restrict__ z, int64_t zs, const int64_t* __restrict__ pseudo,
    const at::opmath_type<scalar_t>* __restrict__ aux, const at::opmath_type<scalar_t>* __restrict__ tau,
    int64_t taus, at::opmath_type<scalar_t> tau_value, at::opmath_type<scalar_t> beta, bool hard,
    int64_t N, int64_t C, scalar_t* __restrict__ grad_z, at::opmath_type<scalar_t>* __restrict__ grad_tau) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  for (int64_t i = global_warp(); i < N; i += total_warps()) {
    const acc_t mx = aux[3 * i], log_sum = aux[3 * i + 1], conf = aux[3 * i + 2];
    const acc_t t = tau ? tau[i * taus] : tau_value;
    const acc_t m = surrogate_mask(conf, t, beta, hard);
    const acc_t gl = g ? static_cast<acc_t>(g[i * gs]) : acc_t(0);
    const acc_t scale = gl * m;
    const int64_t y = pseudo[i];
    CUDA_KERNEL_ASSERT(y >= 0 && y < C);  // a direct call's label outside the row (checked on CPU)
    const scalar_t* zi = z + i * zs;
    scalar_t* out = grad_z + i * C;
    if (scale == acc_t(0)) {
      // Masked-out row: the gradient is zero, the logits need not be read.
      for (int64_t j = lane; j < C; j += kWarp) out[j] = scalar_t(0);
    } else {
      for (int64_t j = lane; j < C; j += kWarp) {
        const acc_t pj = dexp((static_cast<acc_t>(zi[j]) - mx) - log_sum);
        out[j] = static_cast<scalar_t>(scale * (j == y ? pj - acc_t(1) : pj));
      }
    }
    if (lane == 0) {
      acc_t gt = 0;
      if (!hard) {
        const acc_t ce = (mx - static_cast<acc_t>(zi[y])) + log_sum;
        const acc_t gmask = gm ? static_cast<acc_t>(gm[i * gms]) : acc_t(0);
        gt = -beta * m * (acc_t(1) - m) * (gl * ce + gmask);
      }
      grad_tau[i] = gt;
    }
  }
}

// ------------------------------------------------------------------------------------------
// fd_pseudo_label. PER_LANE > 0 keeps a row (C <= 32 * PER_LANE) in registers so that each input
// is read from memory once; PER_LANE == 0 handles any C by reading the row again per pass.

template <typename scalar_t, int PER_LANE>
__global__ void __launch_bounds__(kBlock) fd_pseudo_label_kernel(
    const scalar_t* __restrict__ a, int64_t as, const scalar_t* __restrict__ b, int64_t bs,
    const scalar_t* __restrict__ y, int64_t ys, at::opmath_type<scalar_t> eps,
    at::opmath_type<scalar_t> step, int64_t N, int64_t C, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % kWarp;
  const acc_t lowest = std::numeric_limits<acc_t>::lowest();
  for (int64_t i = global_warp(); i < N; i += total_warps()) {
    const scalar_t* ai = a + i * as;
    const scalar_t* bi = b + i * bs;
    const scalar_t* yi = y + i * ys;
    scalar_t* oi = out + i * C;
    if constexpr (PER_LANE > 0) {
      acc_t ra[PER_LANE], rb[PER_LANE];
      acc_t ma = lowest, mb = lowest;
#pragma unroll
      for (int k = 0; k < PER_LANE; ++k) {
        const int64_t j = lane + k * kWarp;
        ra[k] = j < C ? static_cast<acc_t>(ai[j]) : lowest;
        rb[k] = j < C ? static_cast<acc_t>(bi[j]) : lowest;
        ma = ra[k] > ma ? ra[k] : ma;
        mb = rb[k] > mb ? rb[k] : mb;
      }
      ma = warp_max(ma);
      mb = warp_max(mb);
      acc_t sa = 0, sb = 0;
#pragma unroll
      for (int k = 0; k < PER_LANE; ++k) {
        if (lane + k * kWarp < C) {
          ra[k] = dexp(ra[k] - ma);
          rb[k] = dexp(rb[k] - mb);
          sa += ra[k];
          sb += rb[k];
        }
      }
      const acc_t ia = acc_t(1) / warp_sum(sa), ib = acc_t(1) / warp_sum(sb);
      acc_t total = 0;
#pragma unroll
      for (int k = 0; k < PER_LANE; ++k) {
        const int64_t j = lane + k * kWarp;
        if (j < C) {
          acc_t u = static_cast<acc_t>(yi[j]) - step * ((ra[k] * ia - rb[k] * ib) / eps);
          u = u < acc_t(0) ? acc_t(0) : u;  // relu that keeps NaN
          ra[k] = u;
          total += u;
        }
      }
      total = warp_sum(total);
#pragma unroll
      for (int k = 0; k < PER_LANE; ++k) {
        const int64_t j = lane + k * kWarp;
        if (j < C) oi[j] = static_cast<scalar_t>(total > acc_t(0) ? ra[k] / total : ra[k]);
      }
    } else {
      acc_t ma, sa, mb, sb;
      row_softmax_stats(ai, C, lane, ma, sa);
      row_softmax_stats(bi, C, lane, mb, sb);
      const acc_t ia = acc_t(1) / sa, ib = acc_t(1) / sb;
      auto value = [&](int64_t j) {
        const acc_t pa = dexp(static_cast<acc_t>(ai[j]) - ma) * ia;
        const acc_t pb = dexp(static_cast<acc_t>(bi[j]) - mb) * ib;
        const acc_t u = static_cast<acc_t>(yi[j]) - step * ((pa - pb) / eps);
        return u < acc_t(0) ? acc_t(0) : u;
      };
      acc_t total = 0;
      for (int64_t j = lane; j < C; j += kWarp) total += value(j);
      total = warp_sum(total);
      for (int64_t j = lane; j < C; j += kWarp) {
        const acc_t u = value(j);
        oi[j] = static_cast<scalar_t>(total > acc_t(0) ? u / total : u);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// class_confidence. Rows are split into K chunks of R rows (a plan that depends on M and C only).
//   phase 0: zero the per-chunk class histograms hist[K][C]
//   phase 1: one warp per row: pseudo[r] = argmax, hist[chunk][pseudo[r]] += 1 (integer atomics
//            are exact, hence deterministic)
//   phase 2: one thread per (chunk, column): zero the touched rows of partial[chunk], then add
//            the chunk's rows in row order into partial[chunk][pseudo[r]][column]
//   phase 3: one thread per output (class, column): add the partials in chunk order, divide.

template <typename scalar_t>
struct ClassConfidenceArgs {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x;
  int64_t xs, M, C, R, K, tiles;
  int32_t* pseudo;  // (M)
  int32_t* hist;    // (K, C)
  acc_t* partial;   // (K, C, C)
  scalar_t* mean;   // (C, C)
  int64_t* counts;  // (C)
};

template <typename scalar_t>
__device__ __forceinline__ void cc_phase(const ClassConfidenceArgs<scalar_t>& p, int phase) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = p.C;
  const int64_t threads = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (phase == 0) {
    for (int64_t e = tid; e < p.K * C; e += threads) p.hist[e] = 0;
  } else if (phase == 1) {
    const int lane = threadIdx.x % kWarp;
    for (int64_t r = global_warp(); r < p.M; r += total_warps()) {
      acc_t best;
      const int64_t c = row_argmax(p.x + r * p.xs, C, lane, best);
      if (lane == 0) {
        p.pseudo[r] = static_cast<int32_t>(c);
        atomicAdd(p.hist + (r / p.R) * C + c, 1);
      }
    }
  } else if (phase == 2) {
    for (int64_t item = blockIdx.x; item < p.K * p.tiles; item += gridDim.x) {
      const int64_t k = item / p.tiles;
      const int64_t j = (item % p.tiles) * blockDim.x + threadIdx.x;
      if (j >= C) continue;
      acc_t* P = p.partial + k * C * C + j;
      const int32_t* H = p.hist + k * C;
      for (int64_t c = 0; c < C; ++c)
        if (H[c] != 0) P[c * C] = acc_t(0);
      const int64_t r1 = std::min(p.M, (k + 1) * p.R);
      int64_t r = k * p.R;
      // Four rows in flight per step; the additions still happen in row order.
      for (; r + 4 <= r1; r += 4) {
        int32_t c[4];
        acc_t v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          c[u] = p.pseudo[r + u];
          v[u] = static_cast<acc_t>(p.x[(r + u) * p.xs + j]);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) P[static_cast<int64_t>(c[u]) * C] += v[u];
      }
      for (; r < r1; ++r) P[static_cast<int64_t>(p.pseudo[r]) * C] += static_cast<acc_t>(p.x[r * p.xs + j]);
    }
  } else {
    for (int64_t e = tid; e < C * C; e += threads) {
      const int64_t c = e / C, j = e % C;
      int64_t n = 0;
      acc_t s = 0;
      for (int64_t k = 0; k < p.K; ++k) {
        const int32_t h = p.hist[k * C + c];
        if (h != 0) {
          n += h;
          s += p.partial[(k * C + c) * C + j];
        }
      }
      p.mean[e] = static_cast<scalar_t>(n > 0 ? s / static_cast<acc_t>(n) : acc_t(1) / static_cast<acc_t>(C));
      if (j == 0) p.counts[c] = n;
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kBlock) class_confidence_kernel(ClassConfidenceArgs<scalar_t> p,
                                                                   int phase_begin, int phase_end) {
  for (int phase = phase_begin; phase < phase_end; ++phase) {
    // Only a cooperative launch runs several phases, and only then is the grid barrier legal.
    if (phase > phase_begin) cooperative_groups::this_grid().sync();
    cc_phase(p, phase);
  }
}

template <typename scalar_t>
const at::opmath_type<scalar_t>* tau_ptr(const at::Tensor& tau) {
  return tau.defined() ? tau.data_ptr<at::opmath_type<scalar_t>>() : nullptr;
}
int64_t tau_stride(const at::Tensor& tau) { return (tau.defined() && tau.dim() == 1) ? tau.stride(0) : 0; }

}  // namespace

void masked_ce_forward_cuda(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& tau,
                            double tau_value, double beta, at::Tensor& loss, at::Tensor& mask,
                            at::Tensor& pseudo_label, at::Tensor& aux) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = row_grid(N, logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "masked_ce_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_ce_fwd_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), probs.const_data_ptr<scalar_t>(),
        probs.stride(0), tau_ptr<scalar_t>(tau), tau_stride(tau), static_cast<acc_t>(tau_value),
        static_cast<acc_t>(beta), std::isinf(beta), N, C, loss.data_ptr<scalar_t>(),
        mask.data_ptr<scalar_t>(), pseudo_label.data_ptr<int64_t>(), aux.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void masked_ce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mask,
                             const at::Tensor& logits, const at::Tensor& pseudo_label,
                             const at::Tensor& aux, const at::Tensor& tau, double tau_value,
                             double beta, at::Tensor& grad_logits, at::Tensor& grad_tau) {
  const int64_t N = logits.size(0), C = logits.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = row_grid(N, logits.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "masked_ce_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    masked_ce_bwd_kernel<scalar_t><<<grid, kBlock, 0, stream>>>(
        grad_loss.defined() ? grad_loss.const_data_ptr<scalar_t>() : nullptr,
        grad_loss.defined() ? grad_loss.stride(0) : 0,
        grad_mask.defined() ? grad_mask.const_data_ptr<scalar_t>() : nullptr,
        grad_mask.defined() ? grad_mask.stride(0) : 0, logits.const_data_ptr<scalar_t>(),
        logits.stride(0), pseudo_label.const_data_ptr<int64_t>(), aux.const_data_ptr<acc_t>(),
        tau_ptr<scalar_t>(tau), tau_stride(tau), static_cast<acc_t>(tau_value),
        static_cast<acc_t>(beta), std::isinf(beta), N, C, grad_logits.data_ptr<scalar_t>(),
        grad_tau.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void fd_pseudo_label_cuda(const at::Tensor& logits_plus, const at::Tensor& logits_minus,
                          const at::Tensor& y_tilde, double eps, double step, at::Tensor& y_hat) {
  const int64_t N = y_tilde.size(0), C = y_tilde.size(1);
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(y_tilde.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = row_grid(N, y_tilde.get_device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y_tilde.scalar_type(), "fd_pseudo_label_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto launch = [&](auto kernel) {
      kernel<<<grid, kBlock, 0, stream>>>(
          logits_plus.const_data_ptr<scalar_t>(), logits_plus.stride(0),
          logits_minus.const_data_ptr<scalar_t>(), logits_minus.stride(0),
          y_tilde.const_data_ptr<scalar_t>(), y_tilde.stride(0), static_cast<acc_t>(eps),
          static_cast<acc_t>(step), N, C, y_hat.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (C <= 4 * kWarp) {
      launch(fd_pseudo_label_kernel<scalar_t, 4>);
    } else if (C <= 32 * kWarp) {
      launch(fd_pseudo_label_kernel<scalar_t, 32>);
    } else {
      launch(fd_pseudo_label_kernel<scalar_t, 0>);
    }
  });
}

void class_confidence_cuda(const at::Tensor& probs, at::Tensor& mean, at::Tensor& counts) {
  const int64_t M = probs.size(0), C = probs.size(1);
  TORCH_CHECK_VALUE(M < std::numeric_limits<int32_t>::max() && C < std::numeric_limits<int32_t>::max(),
                    "sslkernels.class_confidence: probs is too large for the CUDA kernel, got shape ",
                    shape_string(probs));
  const c10::cuda::CUDAGuard guard(probs.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = probs.get_device();
  // Partials of at most half the input's size (and at least one C x C), chunks of >= 32 rows.
  const ChunkPlan plan = plan_chunks(M, C, /*min_rows=*/32, std::max(M * C / 2, C * C));
  const int64_t K = plan.num_chunks, tiles = (C + kBlock - 1) / kBlock;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, probs.scalar_type(), "class_confidence_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // One workspace: partial sums (K*C*C acc_t), then hist (K*C int32), then pseudo (M int32).
    const int64_t partial_bytes = K * C * C * static_cast<int64_t>(sizeof(acc_t));
    const int64_t hist_bytes = K * C * 4;
    const int64_t bytes = partial_bytes + hist_bytes + M * 4;
    at::Tensor ws = at::empty({std::max<int64_t>(bytes, 1)}, probs.options().dtype(at::kByte));
    auto* base = static_cast<char*>(ws.data_ptr());
    ClassConfidenceArgs<scalar_t> args{probs.const_data_ptr<scalar_t>(),
                                       probs.stride(0),
                                       M,
                                       C,
                                       plan.rows_per_chunk,
                                       K,
                                       tiles,
                                       reinterpret_cast<int32_t*>(base + partial_bytes + hist_bytes),
                                       reinterpret_cast<int32_t*>(base + partial_bytes),
                                       reinterpret_cast<acc_t*>(base),
                                       mean.data_ptr<scalar_t>(),
                                       counts.data_ptr<int64_t>()};
    auto kernel = class_confidence_kernel<scalar_t>;
    // Enough blocks for the widest phase, capped by what can be co-resident.
    const int64_t want = std::max({(K * C + kBlock - 1) / kBlock, (M + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                   K * tiles, (C * C + kBlock - 1) / kBlock, int64_t(1)});
    int coop = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kBlock, 0));
    const int64_t resident = static_cast<int64_t>(per_sm) * num_sms(device);
    bool launched = false;
    if (coop && resident > 0) {
      const int grid = static_cast<int>(std::min(want, resident));
      int phase_begin = 0, phase_end = 4;
      void* params[] = {&args, &phase_begin, &phase_end};
      const cudaError_t err = cudaLaunchCooperativeKernel(reinterpret_cast<void*>(kernel), dim3(grid),
                                                          dim3(kBlock), params, 0, stream);
      // Fewer blocks may fit than the occupancy query says (e.g. under MPS with a thread limit):
      // then the phases run as separate launches below, with the same result.
      if (err == cudaErrorCooperativeLaunchTooLarge) {
        (void)cudaGetLastError();  // clear it
      } else {
        C10_CUDA_CHECK(err);
        launched = true;
      }
    }
    if (!launched) {
      const int grid = static_cast<int>(std::min<int64_t>(want, int64_t(num_sms(device)) * 32));
      for (int phase = 0; phase < 4; ++phase) {
        kernel<<<grid, kBlock, 0, stream>>>(args, phase, phase + 1);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  });
}

}  // namespace sslkernels
