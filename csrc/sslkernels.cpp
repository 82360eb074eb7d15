// Operator schemas, argument checks, output allocation and autograd of the `sslkernels` ops.
//
//   sslkernels::masked_ce           per-sample mask * CE(logits_s, argmax probs_w) (+ mask, label)
//   sslkernels::masked_ce_backward  its fused backward (gradients to logits_s and tau)
//   sslkernels::class_confidence    per-class mean soft label and counts (forward only)
//   sslkernels::fd_pseudo_label     MetaSemi's finite-difference pseudo-label (forward only)
//
// The CPU and CUDA dispatch keys share one front-end per op that checks arguments (errors name
// the argument), allocates outputs and calls the device kernel. Autograd is registered here in
// C++ rather than through torch.library.register_autograd: at the shapes of an SSL step
// (N = 448) the op is dominated by per-call overhead, and a Python autograd.Function on the
// forward and on the backward costs more than the whole fused kernel. Fake (meta) kernels for
// torch.compile are registered in Python (sslkernels/__init__.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

#include "sslkernels.h"

extern "C" {
// A module without methods: importing it loads this library, whose static initialisers register
// the operators with the dispatcher. CUDA_COMPILED tells Python whether the CUDA kernels are in.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef SSLKERNELS_WITH_CUDA
  const long cuda_compiled = 1;
#else
  const long cuda_compiled = 0;
#endif
  if (PyModule_AddIntConstant(module, "CUDA_COMPILED", cuda_compiled) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

namespace sslkernels {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// A 2-D floating tensor with at least one column.
void check_matrix(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 2, "sslkernels.", op, ": ", name,
                    " must be a 2-D (N, C) tensor, got shape ", shape_string(t));
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), "sslkernels.", op, ": ", name,
                   " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) >= 1, "sslkernels.", op, ": ", name,
                    " must have at least one class (C >= 1), got shape ", shape_string(t));
}

// `other` must match `ref` in shape, dtype and device.
void check_like(const Tensor& other, const Tensor& ref, const char* op, const char* name,
                const char* ref_name) {
  TORCH_CHECK_VALUE(other.dim() == 2 && other.sizes() == ref.sizes(), "sslkernels.", op, ": ",
                    name, " must have the shape of ", ref_name, " ", shape_string(ref), ", got ",
                    shape_string(other));
  TORCH_CHECK_TYPE(other.scalar_type() == ref.scalar_type(), "sslkernels.", op, ": ", name,
                   " must have the dtype of ", ref_name, " (", ref.scalar_type(), "), got ",
                   other.scalar_type());
  TORCH_CHECK(other.device() == ref.device(), "sslkernels.", op, ": ", name,
              " must be on the device of ", ref_name, " (", ref.device(), "), got ",
              other.device());
}

void check_device(const Tensor& t, const Tensor& logits_s, const char* op, const char* name) {
  TORCH_CHECK(t.device() == logits_s.device(), "sslkernels.", op, ": ", name,
              " must be on the device of logits_s (", logits_s.device(), "), got ", t.device());
}

// Kernels index rows with an arbitrary stride but need unit stride along the classes.
Tensor unit_inner_stride(const Tensor& t) {
  return (t.size(1) <= 1 || t.stride(1) == 1) ? t : t.contiguous();
}

Tensor prepare_tau(const std::optional<Tensor>& tau, const Tensor& logits, at::ScalarType acc) {
  if (!tau.has_value() || !tau->defined()) return Tensor();
  const Tensor& t = *tau;
  const int64_t N = logits.size(0);
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()),
                   "sslkernels.masked_ce: tau must be a float or a floating-point tensor, got ",
                   t.scalar_type());
  check_device(t, logits, "masked_ce", "tau");
  TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.size(0) == N),
                    "sslkernels.masked_ce: tau must be a float, a 0-dim tensor or a 1-D tensor of "
                    "length N = ", std::to_string(N), " (one threshold per sample), got shape ", shape_string(t));
  return t.to(acc);
}

void check_beta(double beta) {
  TORCH_CHECK_VALUE(!std::isnan(beta) && beta >= 0,
                    "sslkernels.masked_ce: beta must be >= 0 (math.inf for the hard mask), got ",
                    number_string(beta));
}

#ifndef SSLKERNELS_WITH_CUDA
[[noreturn]] void no_cuda(const char* op) {
  TORCH_CHECK(false, "sslkernels.", op, ": got CUDA tensors but this build of sslkernels has no ",
              "CUDA kernels (rebuild with nvcc and a CUDA build of torch; see README)");
}
#endif

// ------------------------------------------------------------------------------------------
// Device-generic front-ends.

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_ce_impl(const Tensor& logits_s,
                                                                  const Tensor& probs_w,
                                                                  const std::optional<Tensor>& tau,
                                                                  double tau_value, double beta,
                                                                  bool save_exp) {
  check_matrix(logits_s, "masked_ce", "logits_s");
  check_like(probs_w, logits_s, "masked_ce", "probs_w", "logits_s");
  check_beta(beta);
  const at::ScalarType acc = acc_type_of(logits_s.scalar_type());
  const Tensor t = prepare_tau(tau, logits_s, acc);
  TORCH_CHECK_VALUE(t.defined() || !std::isnan(tau_value), "sslkernels.masked_ce: tau is NaN");

  const int64_t N = logits_s.size(0);
  const auto opts = logits_s.options();
  Tensor loss = at::empty({N}, opts);
  Tensor mask = at::empty({N}, opts);
  Tensor pseudo = at::empty({N}, opts.dtype(at::kLong));
  Tensor aux = at::empty({N, 3}, opts.dtype(acc));
  // Saved on CPU only, where the backward's exp was its main cost. On a GPU the backward is
  // expected to be bound by memory, where writing and reading exp_z would cost more than reading
  // the logits again (not measured: no GPU has run these kernels yet).
  const bool saved = save_exp && !logits_s.is_cuda();
  Tensor exp_z = at::empty({saved ? N : 0, logits_s.size(1)}, opts.dtype(acc));
  const Tensor z = unit_inner_stride(logits_s), p = unit_inner_stride(probs_w);
  if (logits_s.is_cuda()) {
#ifdef SSLKERNELS_WITH_CUDA
    masked_ce_forward_cuda(z, p, t, tau_value, beta, loss, mask, pseudo, aux);
#else
    no_cuda("masked_ce");
#endif
  } else {
    masked_ce_forward_cpu(z, p, t, tau_value, beta, loss, mask, pseudo, aux, exp_z);
  }
  return {loss, mask, pseudo, aux, exp_z};
}

std::tuple<Tensor, Tensor> masked_ce_backward_impl(
    const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_mask,
    const Tensor& logits_s, const Tensor& pseudo_label, const Tensor& aux,
    const std::optional<Tensor>& tau, double tau_value, double beta,
    const std::optional<Tensor>& exp_z) {
  check_matrix(logits_s, "masked_ce_backward", "logits_s");
  check_beta(beta);
  const int64_t N = logits_s.size(0);
  const at::ScalarType acc = acc_type_of(logits_s.scalar_type());
  TORCH_CHECK_VALUE(pseudo_label.dim() == 1 && pseudo_label.size(0) == N &&
                        pseudo_label.scalar_type() == at::kLong,
                    "sslkernels.masked_ce_backward: pseudo_label must be int64 of shape (N,)");
  TORCH_CHECK_VALUE(aux.dim() == 2 && aux.size(0) == N && aux.size(1) == 3 &&
                        aux.scalar_type() == acc,
                    "sslkernels.masked_ce_backward: aux must be the (N, 3) output of masked_ce");
  // Autograd always passes tensors of one device, but a direct call need not: without these
  // checks a kernel would read another device's memory.
  check_device(pseudo_label, logits_s, "masked_ce_backward", "pseudo_label");
  check_device(aux, logits_s, "masked_ce_backward", "aux");
  auto grad_of = [&](const std::optional<Tensor>& g, const char* name) -> Tensor {
    if (!g.has_value() || !g->defined()) return Tensor();
    TORCH_CHECK_VALUE(g->dim() == 1 && g->size(0) == N && g->scalar_type() == logits_s.scalar_type(),
                      "sslkernels.masked_ce_backward: ", name,
                      " must have shape (N,) and the dtype of logits_s");
    check_device(*g, logits_s, "masked_ce_backward", name);
    return *g;
  };
  const Tensor gl = grad_of(grad_loss, "grad_loss"), gm = grad_of(grad_mask, "grad_mask");
  const Tensor t = prepare_tau(tau, logits_s, acc);

  Tensor grad_logits = at::empty({N, logits_s.size(1)}, logits_s.options());
  Tensor grad_tau = at::empty({N}, logits_s.options().dtype(acc));
  // An empty exp_z (what masked_ce returns on CUDA or without save_exp): recompute the exps.
  Tensor e;
  if (exp_z.has_value() && exp_z->defined() && exp_z->numel() > 0) {
    TORCH_CHECK_VALUE(exp_z->dim() == 2 && exp_z->size(0) == N && exp_z->size(1) == logits_s.size(1) &&
                          exp_z->scalar_type() == acc && exp_z->device() == logits_s.device(),
                      "sslkernels.masked_ce_backward: exp_z must be the (N, C) exp_z output of masked_ce");
    e = exp_z->contiguous();
  }
  const Tensor z = unit_inner_stride(logits_s);
  const Tensor p = pseudo_label.contiguous(), a = aux.contiguous();
  if (!logits_s.is_cuda()) {
    // A label outside [0, C) would index outside its row. Here that costs one pass over N
    // integers; on CUDA the kernel asserts instead, since a check here would wait for the GPU.
    const int64_t C = logits_s.size(1);
    const int64_t* y = p.const_data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK_VALUE(y[i] >= 0 && y[i] < C, "sslkernels.masked_ce_backward: pseudo_label[", std::to_string(i),
                        "] = ", std::to_string(y[i]), " is not a class index in [0, C = ", std::to_string(C), ")");
  }
  if (logits_s.is_cuda()) {
#ifdef SSLKERNELS_WITH_CUDA
    masked_ce_backward_cuda(gl, gm, z, p, a, t, tau_value, beta, grad_logits, grad_tau);
#else
    no_cuda("masked_ce_backward");
#endif
  } else {
    masked_ce_backward_cpu(gl, gm, z, p, a, t, tau_value, beta, e, grad_logits, grad_tau);
  }
  return {grad_logits, grad_tau};
}

std::tuple<Tensor, Tensor> class_confidence_impl(const Tensor& probs) {
  check_matrix(probs, "class_confidence", "probs");
  const int64_t C = probs.size(1);
  Tensor mean = at::empty({C, C}, probs.options());
  Tensor counts = at::empty({C}, probs.options().dtype(at::kLong));
  const Tensor x = unit_inner_stride(probs);
  if (probs.is_cuda()) {
#ifdef SSLKERNELS_WITH_CUDA
    class_confidence_cuda(x, mean, counts);
#else
    no_cuda("class_confidence");
#endif
  } else {
    class_confidence_cpu(x, mean, counts);
  }
  return {mean, counts};
}

Tensor fd_pseudo_label_impl(const Tensor& logits_plus, const Tensor& logits_minus,
                            const Tensor& y_tilde, double eps, double step) {
  check_matrix(y_tilde, "fd_pseudo_label", "y_tilde");
  check_like(logits_plus, y_tilde, "fd_pseudo_label", "logits_plus", "y_tilde");
  check_like(logits_minus, y_tilde, "fd_pseudo_label", "logits_minus", "y_tilde");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps > 0,
                    "sslkernels.fd_pseudo_label: eps must be a finite number > 0, got ", number_string(eps));
  TORCH_CHECK_VALUE(std::isfinite(step), "sslkernels.fd_pseudo_label: step must be finite, got ",
                    number_string(step));
  Tensor y_hat = at::empty(y_tilde.sizes(), y_tilde.options());
  const Tensor a = unit_inner_stride(logits_plus), b = unit_inner_stride(logits_minus);
  const Tensor y = unit_inner_stride(y_tilde);
  if (y_tilde.is_cuda()) {
#ifdef SSLKERNELS_WITH_CUDA
    fd_pseudo_label_cuda(a, b, y, eps, step, y_hat);
#else
    no_cuda("fd_pseudo_label");
#endif
  } else {
    fd_pseudo_label_cpu(a, b, y, eps, step, y_hat);
  }
  return y_hat;
}

// ------------------------------------------------------------------------------------------
// Autograd.

const c10::TypedOperatorHandle<decltype(masked_ce_impl)>& masked_ce_op() {
  static const auto op = c10::Dispatcher::singleton()
                              .findSchemaOrThrow("sslkernels::masked_ce", "")
                              .typed<decltype(masked_ce_impl)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(masked_ce_backward_impl)>& masked_ce_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sslkernels::masked_ce_backward", "")
                             .typed<decltype(masked_ce_backward_impl)>();
  return op;
}

// The backward of masked_ce written with differentiable ATen ops. Used instead of the fused
// kernel when the backward itself is recorded (create_graph=True, e.g. Meta-T's virtual step
// differentiates the gradient with respect to tau and logits_s again).
std::tuple<Tensor, Tensor> masked_ce_backward_math(const Tensor& grad_loss, const Tensor& grad_mask,
                                                   const Tensor& logits_s, const Tensor& pseudo_label,
                                                   const Tensor& aux, const Tensor& tau,
                                                   double tau_value, double beta) {
  const at::ScalarType acc = aux.scalar_type();
  const bool hard = std::isinf(beta);
  const Tensor z = logits_s.to(acc);
  const Tensor conf = aux.select(1, 2);
  Tensor mask;
  if (tau.defined()) {
    const Tensor t = tau.to(acc);
    mask = hard ? at::ge(conf, t).to(acc) : at::sigmoid((conf - t) * beta);
  } else {
    mask = hard ? at::ge(conf, tau_value).to(acc) : at::sigmoid((conf - tau_value) * beta);
  }
  const Tensor log_p = at::log_softmax(z, 1);
  const Tensor y = pseudo_label.unsqueeze(1);
  const Tensor ce = -log_p.gather(1, y).squeeze(1);
  const Tensor g = grad_loss.defined() ? grad_loss.to(acc) : at::zeros_like(ce);
  const Tensor one_hot = at::arange(z.size(1), pseudo_label.options()).eq(y).to(acc);
  const Tensor grad_logits = ((g * mask).unsqueeze(1) * (log_p.exp() - one_hot)).to(logits_s.scalar_type());
  Tensor grad_tau;
  if (hard) {
    grad_tau = at::zeros_like(ce);
  } else {
    Tensor upstream = g * ce;
    if (grad_mask.defined()) upstream = upstream + grad_mask.to(acc);
    grad_tau = mask * (1 - mask) * upstream * (-beta);
  }
  return {grad_logits, grad_tau};
}

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const std::optional<Tensor>& t) { return t.has_value() && requires_grad(*t); }

// Autograd kernel of masked_ce_backward: the fused kernel, or the differentiable formula when
// the result has to carry a graph.
std::tuple<Tensor, Tensor> masked_ce_backward_autograd(
    const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_mask,
    const Tensor& logits_s, const Tensor& pseudo_label, const Tensor& aux,
    const std::optional<Tensor>& tau, double tau_value, double beta,
    const std::optional<Tensor>& exp_z) {
  if (at::GradMode::is_enabled() &&
      (requires_grad(grad_loss) || requires_grad(grad_mask) || requires_grad(logits_s) ||
       requires_grad(tau))) {
    return masked_ce_backward_math(grad_loss.value_or(Tensor()), grad_mask.value_or(Tensor()),
                                   logits_s, pseudo_label, aux, tau.value_or(Tensor()), tau_value,
                                   beta);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  return masked_ce_backward_op().call(grad_loss, grad_mask, logits_s, pseudo_label, aux, tau,
                                      tau_value, beta, exp_z);
}

class MaskedCEFunction : public torch::autograd::Function<MaskedCEFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& logits_s, const Tensor& probs_w,
                               const std::optional<Tensor>& tau, double tau_value, double beta,
                               bool save_exp) {
    Tensor loss, mask, pseudo, aux, exp_z;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      std::tie(loss, mask, pseudo, aux, exp_z) =
          masked_ce_op().call(logits_s, probs_w, tau, tau_value, beta, save_exp);
    }
    const Tensor t = tau.has_value() ? *tau : Tensor();
    ctx->save_for_backward({logits_s, t, pseudo, aux, exp_z});
    ctx->saved_data["tau_value"] = tau_value;
    ctx->saved_data["beta"] = beta;
    ctx->mark_non_differentiable({pseudo, aux, exp_z});
    // Unused outputs (usually the mask) then arrive as undefined gradients, not as zeros.
    ctx->set_materialize_grads(false);
    return {loss, mask, pseudo, aux, exp_z};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &logits_s = saved[0], &tau = saved[1], &pseudo = saved[2], &aux = saved[3],
                 &exp_z = saved[4];
    const double tau_value = ctx->saved_data["tau_value"].toDouble();
    const double beta = ctx->saved_data["beta"].toDouble();
    // Edges exist only for tensor inputs: logits_s (0), probs_w (1) and tau (2) when given.
    const bool need_logits = ctx->needs_input_grad(0);
    const bool need_tau = tau.defined() && ctx->needs_input_grad(2);
    const Tensor &grad_loss = grads[0], &grad_mask = grads[1];
    Tensor grad_logits, grad_tau;
    if ((need_logits || need_tau) && (grad_loss.defined() || grad_mask.defined())) {
      // Through the dispatcher, so that a recorded backward (create_graph=True) is differentiable.
      std::tie(grad_logits, grad_tau) =
          masked_ce_backward_op().call(grad_loss, grad_mask, logits_s, pseudo, aux,
                                       tau.defined() ? std::optional<Tensor>(tau) : std::nullopt,
                                       tau_value, beta, exp_z);
      if (need_tau) {
        if (tau.dim() == 0) grad_tau = grad_tau.sum();
        grad_tau = grad_tau.to(tau.scalar_type());
      } else {
        grad_tau = Tensor();
      }
      if (!need_logits) grad_logits = Tensor();
    }
    return {grad_logits, Tensor(), grad_tau, Tensor(), Tensor(), Tensor()};
  }
};

// The forward-only ops treat their inputs as constants: outputs never require grad.
std::tuple<Tensor, Tensor> class_confidence_autograd(const Tensor& probs) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sslkernels::class_confidence", "")
                             .typed<decltype(class_confidence_impl)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(probs);
}

Tensor fd_pseudo_label_autograd(const Tensor& logits_plus, const Tensor& logits_minus,
                                const Tensor& y_tilde, double eps, double step) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("sslkernels::fd_pseudo_label", "")
                             .typed<decltype(fd_pseudo_label_impl)>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(logits_plus, logits_minus, y_tilde, eps, step);
}

constexpr int64_t kMaxSavedExps = int64_t(1) << 21;  // 8 MiB of float32

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> masked_ce_autograd(
    const Tensor& logits_s, const Tensor& probs_w, const std::optional<Tensor>& tau,
    double tau_value, double beta, bool save_exp) {
  // The backward to logits_s is cheaper with the forward's exps (on CPU): save them whenever
  // that backward can happen, up to kMaxSavedExps values. Past that, a fresh buffer of that size
  // costs more in page faults than the exps it saves: one thread, forward + backward through the
  // ops, saved against recomputed, 0.056 / 0.074 ms at 448 x 100 and 1.7 / 2.1 ms at 2048 x 1000,
  // but 85 / 54 ms at 16384 x 1000 (2026-11-22; between, it varied with the allocator's state).
  // sym_numel: the sizes are symbolic when torch.compile traces with dynamic shapes.
  const bool save = save_exp || (at::GradMode::is_enabled() && logits_s.requires_grad() &&
                                 logits_s.sym_numel() <= kMaxSavedExps);
  variable_list out = MaskedCEFunction::apply(logits_s, probs_w, tau, tau_value, beta, save);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

// `aux` is (N, 3) in the accumulation dtype: per row the maximum of logits_s, the log of the sum
// of exp(logits_s - maximum) and conf = max probs_w. It is what the backward needs to rebuild the
// softmax and the mask in one pass without cancellation; it carries no gradient.
// `exp_z` is, with save_exp on a CPU tensor, the (N, C) exp(logits_s - row maximum) in the
// accumulation dtype (the softmax before normalisation; zeros for rows the hard mask skips, see
// cpu_kernels.cpp), so that the backward need not compute them again; otherwise it is (0, C).
// The autograd kernel sets save_exp when logits_s requires grad (and is not too large).
TORCH_LIBRARY(sslkernels, m) {
  m.def(
      "masked_ce(Tensor logits_s, Tensor probs_w, Tensor? tau, float tau_value, float beta, "
      "bool save_exp=False) -> (Tensor loss, Tensor mask, Tensor pseudo_label, Tensor aux, Tensor exp_z)");
  m.def(
      "masked_ce_backward(Tensor? grad_loss, Tensor? grad_mask, Tensor logits_s, "
      "Tensor pseudo_label, Tensor aux, Tensor? tau, float tau_value, float beta, "
      "Tensor? exp_z=None) -> (Tensor grad_logits, Tensor grad_tau)");
  m.def("class_confidence(Tensor probs) -> (Tensor mean, Tensor counts)");
  m.def(
      "fd_pseudo_label(Tensor logits_plus, Tensor logits_minus, Tensor y_tilde, float eps, "
      "float step) -> Tensor");
}

TORCH_LIBRARY_IMPL(sslkernels, CPU, m) {
  m.impl("masked_ce", &masked_ce_impl);
  m.impl("masked_ce_backward", &masked_ce_backward_impl);
  m.impl("class_confidence", &class_confidence_impl);
  m.impl("fd_pseudo_label", &fd_pseudo_label_impl);
}

// Registered in every build: without CUDA kernels the front-ends raise a clear error instead
// of the dispatcher's generic "could not run ... with arguments from the 'CUDA' backend".
TORCH_LIBRARY_IMPL(sslkernels, CUDA, m) {
  m.impl("masked_ce", &masked_ce_impl);
  m.impl("masked_ce_backward", &masked_ce_backward_impl);
  m.impl("class_confidence", &class_confidence_impl);
  m.impl("fd_pseudo_label", &fd_pseudo_label_impl);
}

TORCH_LIBRARY_IMPL(sslkernels, Autograd, m) {
  m.impl("masked_ce", &masked_ce_autograd);
  m.impl("masked_ce_backward", &masked_ce_backward_autograd);
  m.impl("class_confidence", &class_confidence_autograd);
  m.impl("fd_pseudo_label", &fd_pseudo_label_autograd);
}

}  // namespace sslkernels
