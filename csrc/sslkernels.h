// Kernel entry points shared by the operator front-ends (sslkernels.cpp), the CPU kernels
// (cpu_kernels.cpp) and the CUDA kernels (cuda_kernels.cu).
//
// The front-ends validate arguments and allocate outputs; the kernels below receive tensors that
// are already checked: 2-D inputs have a unit stride along the class dimension (any row stride),
// outputs are freshly allocated and contiguous, and `tau` (when defined) is a 0-dim or 1-D tensor
// in the accumulation dtype (float64 for float64 inputs, float32 otherwise). Only lean ATen
// headers are included so that nvcc stays fast.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace sslkernels {

// Numbers and shapes in error messages are formatted with these, never streamed into TORCH_CHECK's
// message: on an H200 machine (torch 2.11, GCC 13.3, the system libstdc++), any std::ostream number
// formatting compiled into an extension -- an integer, a double or t.sizes() in a message, even a
// plain `std::ostringstream o; o << 42;` -- crashed the process with SIGSEGV, while messages made of
// strings, dtypes and devices raised normally.
inline std::string number_string(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.9g", v);
  return buf;
}
inline std::string shape_string(const at::Tensor& t) {
  std::string out = "[";
  for (int64_t d = 0; d < t.dim(); ++d) out += (d ? ", " : "") + std::to_string(t.size(d));
  return out + "]";
}

// Rows per chunk and chunk count for class_confidence. Both depend only on (M, C), never on
// the number of threads or on the device, so the summation order (and therefore every bit of
// the result) is reproducible. `max_partial` bounds the K * C * C partial-sum workspace.
struct ChunkPlan {
  int64_t rows_per_chunk;
  int64_t num_chunks;
};

inline ChunkPlan plan_chunks(int64_t M, int64_t C, int64_t min_rows, int64_t max_partial) {
  const int64_t cc = C * C;
  const int64_t max_chunks = cc >= max_partial ? 1 : max_partial / cc;
  int64_t rows = (M + max_chunks - 1) / max_chunks;
  if (rows < min_rows) rows = min_rows;
  if (rows < 1) rows = 1;
  const int64_t chunks = M == 0 ? 0 : (M + rows - 1) / rows;
  return {rows, chunks};
}

// ---------------------------------------------------------------------------------------------
// CPU kernels (cpu_kernels.cpp)
// exp_z: an empty tensor, or a contiguous (N, C) tensor in the accumulation dtype that the
// forward fills with exp(logits - row max) and the backward then reads instead of recomputing.
void masked_ce_forward_cpu(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& tau,
                           double tau_value, double beta, at::Tensor& loss, at::Tensor& mask,
                           at::Tensor& pseudo_label, at::Tensor& aux, at::Tensor& exp_z);
void masked_ce_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& grad_mask,
                            const at::Tensor& logits, const at::Tensor& pseudo_label,
                            const at::Tensor& aux, const at::Tensor& tau, double tau_value,
                            double beta, const at::Tensor& exp_z, at::Tensor& grad_logits,
                            at::Tensor& grad_tau);
void class_confidence_cpu(const at::Tensor& probs, at::Tensor& mean, at::Tensor& counts);
void fd_pseudo_label_cpu(const at::Tensor& logits_plus, const at::Tensor& logits_minus,
                         const at::Tensor& y_tilde, double eps, double step, at::Tensor& y_hat);

#ifdef SSLKERNELS_WITH_CUDA
// ---------------------------------------------------------------------------------------------
// CUDA kernels (cuda_kernels.cu); same contracts, one kernel launch per call.
void masked_ce_forward_cuda(const at::Tensor& logits, const at::Tensor& probs, const at::Tensor& tau,
                            double tau_value, double beta, at::Tensor& loss, at::Tensor& mask,
                            at::Tensor& pseudo_label, at::Tensor& aux);
void masked_ce_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& grad_mask,
                             const at::Tensor& logits, const at::Tensor& pseudo_label,
                             const at::Tensor& aux, const at::Tensor& tau, double tau_value,
                             double beta, at::Tensor& grad_logits, at::Tensor& grad_tau);
void class_confidence_cuda(const at::Tensor& probs, at::Tensor& mean, at::Tensor& counts);
void fd_pseudo_label_cuda(const at::Tensor& logits_plus, const at::Tensor& logits_minus,
                          const at::Tensor& y_tilde, double eps, double step, at::Tensor& y_hat);
#endif

}  // namespace sslkernels
