"""Fused kernels shared by the SSL algorithm files (docs/methods.md, "The fused kernels", says what each computes).

* :func:`masked_ce` -- per-sample ``mask * CE(logits_s, argmax probs_w)`` with the sigmoid
  surrogate (or hard) confidence mask; differentiable twice w.r.t. ``logits_s`` and ``tau``.
* :func:`class_confidence` -- C x C class-conditional mean soft labels and per-class counts.
* :func:`fd_pseudo_label` -- MetaSemi's finite-difference pseudo-label update.

:mod:`sslkernels.reference` holds the plain-PyTorch definitions of the same three functions.

The ops are PyTorch custom operators (``torch.ops.sslkernels.*``) with CPU and CUDA kernels,
autograd and fake implementations, so they work under ``torch.compile`` and pass
``torch.library.opcheck``. Importing this package raises ImportError when the compiled extension
is missing, which is what the algorithm files test to fall back to the reference.
"""

import math

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loading the library registers the operators)
except ImportError as exc:  # keep ImportError so that `try: import sslkernels` falls back cleanly
    raise ImportError(
        f"sslkernels: the compiled extension sslkernels._C could not be loaded ({exc}); build it from "
        "the repository root with `pip install --no-build-isolation -e .`"
    ) from exc

from . import reference

__all__ = [
    "masked_ce",
    "class_confidence",
    "fd_pseudo_label",
    "cuda_kernels_available",
    "CUDA_COMPILED",
    "reference",
]

#: True when this build contains the CUDA kernels (independent of whether a GPU is present).
CUDA_COMPILED: bool = bool(_C.CUDA_COMPILED)


def cuda_kernels_available() -> bool:
    """Whether the CUDA kernels were compiled into this build.

    Says nothing about a GPU being present: combine with ``torch.cuda.is_available()`` to know
    whether CUDA tensors can be processed.
    """
    return CUDA_COMPILED


_ops = torch.ops.sslkernels
_masked_ce = _ops.masked_ce.default
_class_confidence = _ops.class_confidence.default
_fd_pseudo_label = _ops.fd_pseudo_label.default


def masked_ce(logits_s: Tensor, probs_w: Tensor, tau, beta: float = math.inf):
    """Per-sample surrogate-masked cross-entropy, fused in one pass over each row.

    With ``conf, pseudo_label = probs_w.max(1)`` (first index on ties) and
    ``mask = sigmoid(beta * (conf - tau))`` -- or the hard mask ``conf >= tau`` when
    ``beta = math.inf`` (FixMatch) -- returns, per sample,

    ``loss = mask * CE(logits_s, pseudo_label)``, ``mask`` and ``pseudo_label``.

    Args:
        logits_s: (N, C) strong-view logits; float16, bfloat16, float32 or float64.
        probs_w: (N, C) weak-view probabilities, same dtype and device; a constant (no gradient).
        tau: threshold: a float, a 0-dim tensor or a tensor of N per-sample thresholds. A tensor
            tau receives gradients (zero for the hard mask).
        beta: sigmoid sharpness, >= 0; ``math.inf`` for the hard mask.

    Returns:
        ``(loss, mask, pseudo_label)``: loss and mask of shape (N,) in the dtype of ``logits_s``,
        pseudo_label int64. Internally float32 (float64 for float64 inputs), stable for large
        logits. Gradients reach ``logits_s`` and ``tau`` through both ``loss`` and ``mask``, and
        the backward is itself differentiable (``create_graph=True``) w.r.t. both.
    """
    if isinstance(tau, Tensor):
        loss, mask, pseudo_label, _, _ = _masked_ce(logits_s, probs_w, tau, 0.0, beta)
    elif isinstance(tau, (float, int)):
        loss, mask, pseudo_label, _, _ = _masked_ce(logits_s, probs_w, None, tau, beta)
    else:
        raise TypeError(f"sslkernels.masked_ce: tau must be a float or a tensor, got {type(tau).__name__}")
    return loss, mask, pseudo_label


def class_confidence(probs: Tensor):
    """Class-conditional mean soft labels of an (M, C) probability matrix (Meta-T's ``pbar``).

    Row c of the (C, C) ``mean`` is the average of the rows of ``probs`` whose argmax is c (first
    index on ties); a class that no row predicts gets the uniform row 1/C. ``counts`` (int64, (C,))
    holds the number of rows per class. Sums run in float32 (float64 for float64 input) in a fixed
    order, so the result is deterministic on CPU and CUDA alike (no float atomics).

    Forward only: the output carries no gradient (callers pass detached predictions).
    """
    return _class_confidence(probs)


def fd_pseudo_label(logits_plus: Tensor, logits_minus: Tensor, y_tilde: Tensor, eps: float, step: float):
    """MetaSemi's finite-difference pseudo-label update (its items 2-3).

    ``y_hat = relu(y_tilde - step * (softmax(logits_plus) - softmax(logits_minus)) / eps)``,
    each row renormalised to sum 1 (an all-zero row is left as is). The three inputs are (N, C)
    with one dtype and device; ``eps > 0``. Returns (N, C) in the dtype of ``y_tilde``.

    Forward only: the output carries no gradient (MetaSemi treats y_hat as a target).
    """
    return _fd_pseudo_label(logits_plus, logits_minus, y_tilde, eps, step)


# ---------------------------------------------------------------------------------------------
# Fake (meta) implementations: output shapes and dtypes for torch.compile and FakeTensor tracing.
# They repeat the C++ checks so that a traced program fails with the same messages.

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_matrix(t, op, name):
    torch._check_value(t.dim() == 2, lambda: f"sslkernels.{op}: {name} must be a 2-D (N, C) tensor, got shape {list(t.shape)}")
    torch._check_type(t.dtype in _FLOATS, lambda: f"sslkernels.{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    torch._check_value(t.shape[1] >= 1, lambda: f"sslkernels.{op}: {name} must have at least one class (C >= 1), got shape {list(t.shape)}")


def _check_like(other, ref, op, name, ref_name):
    torch._check_value(
        other.dim() == 2 and other.shape == ref.shape,
        lambda: f"sslkernels.{op}: {name} must have the shape of {ref_name} {list(ref.shape)}, got {list(other.shape)}",
    )
    torch._check_type(other.dtype == ref.dtype, lambda: f"sslkernels.{op}: {name} must have the dtype of {ref_name} ({ref.dtype}), got {other.dtype}")
    torch._check(other.device == ref.device, lambda: f"sslkernels.{op}: {name} must be on the device of {ref_name} ({ref.device}), got {other.device}")


def _check_tau(tau, logits_s):
    if tau is None:
        return
    torch._check_type(tau.dtype in _FLOATS, lambda: f"sslkernels.masked_ce: tau must be a float or a floating-point tensor, got {tau.dtype}")
    torch._check(tau.device == logits_s.device, lambda: f"sslkernels.masked_ce: tau must be on the device of logits_s ({logits_s.device}), got {tau.device}")
    torch._check_value(
        tau.dim() == 0 or (tau.dim() == 1 and tau.shape[0] == logits_s.shape[0]),
        lambda: f"sslkernels.masked_ce: tau must be a float, a 0-dim tensor or a 1-D tensor of length N = {logits_s.shape[0]} "
        f"(one threshold per sample), got shape {list(tau.shape)}",
    )


@torch.library.register_fake("sslkernels::masked_ce")
def _masked_ce_fake(logits_s, probs_w, tau, tau_value, beta, save_exp=False):
    _check_matrix(logits_s, "masked_ce", "logits_s")
    _check_like(probs_w, logits_s, "masked_ce", "probs_w", "logits_s")
    _check_tau(tau, logits_s)
    n, c = logits_s.shape
    acc = _acc_dtype(logits_s.dtype)
    saved = save_exp and logits_s.device.type == "cpu"  # as the C++ front-end decides
    return (
        logits_s.new_empty(n),
        logits_s.new_empty(n),
        logits_s.new_empty(n, dtype=torch.int64),
        logits_s.new_empty((n, 3), dtype=acc),
        logits_s.new_empty((n if saved else 0, c), dtype=acc),
    )


@torch.library.register_fake("sslkernels::masked_ce_backward")
def _masked_ce_backward_fake(grad_loss, grad_mask, logits_s, pseudo_label, aux, tau, tau_value, beta, exp_z=None):
    _check_matrix(logits_s, "masked_ce_backward", "logits_s")
    for name, t in (("pseudo_label", pseudo_label), ("aux", aux), ("grad_loss", grad_loss), ("grad_mask", grad_mask)):
        torch._check(
            t is None or t.device == logits_s.device,
            lambda: f"sslkernels.masked_ce_backward: {name} must be on the device of logits_s ({logits_s.device}), got {t.device}",
        )
    return logits_s.new_empty(logits_s.shape), logits_s.new_empty(logits_s.shape[0], dtype=_acc_dtype(logits_s.dtype))


@torch.library.register_fake("sslkernels::class_confidence")
def _class_confidence_fake(probs):
    _check_matrix(probs, "class_confidence", "probs")
    c = probs.shape[1]
    return probs.new_empty((c, c)), probs.new_empty(c, dtype=torch.int64)


@torch.library.register_fake("sslkernels::fd_pseudo_label")
def _fd_pseudo_label_fake(logits_plus, logits_minus, y_tilde, eps, step):
    _check_matrix(y_tilde, "fd_pseudo_label", "y_tilde")
    _check_like(logits_plus, y_tilde, "fd_pseudo_label", "logits_plus", "y_tilde")
    _check_like(logits_minus, y_tilde, "fd_pseudo_label", "logits_minus", "y_tilde")
    return y_tilde.new_empty(y_tilde.shape)
