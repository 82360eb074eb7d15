"""Plain-PyTorch definitions of the three ops.

These few lines are the specification: the compiled kernels in ``sslkernels`` must agree with
them (up to floating-point rounding), the tests and the benchmark compare against them, and the
algorithm files fall back to them when the extension is not built.

All three compute in float32 for float16 / bfloat16 / float32 inputs and in float64 for float64
inputs, and return results in the input dtype.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["masked_ce", "class_confidence", "fd_pseudo_label"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def masked_ce(logits_s: Tensor, probs_w: Tensor, tau, beta: float):
    """Per-sample surrogate-masked cross-entropy (FixMatch / Meta-T unlabeled loss).

    ``conf, pseudo_label = probs_w.max(1)`` (first index on ties), ``mask = sigmoid(beta *
    (conf - tau))`` or, for ``beta = math.inf``, the hard mask ``conf >= tau``; returns
    ``(mask * CE(logits_s, pseudo_label), mask, pseudo_label)`` per sample. ``probs_w`` is a
    constant (detached); ``tau`` is a float or a tensor of shape () or (N,).
    """
    acc = _acc_dtype(logits_s.dtype)
    conf, pseudo_label = probs_w.detach().max(dim=1)
    # Compare in the accumulation dtype so that a half-precision conf and a float32 tau are
    # judged exactly as the kernels judge them.
    conf = conf.to(acc)
    if isinstance(tau, Tensor):
        tau = tau.to(acc)
    if math.isinf(beta):
        mask = (conf >= tau).to(acc)
    else:
        mask = torch.sigmoid(beta * (conf - tau))
    ce = F.cross_entropy(logits_s.to(acc), pseudo_label, reduction="none")
    return (mask * ce).to(logits_s.dtype), mask.to(logits_s.dtype), pseudo_label


def class_confidence(probs: Tensor):
    """Class-conditional mean soft label of an M x C probability matrix (Meta-T's ``pbar``).

    Row c of the C x C ``mean`` averages the rows of ``probs`` whose argmax is c (first index on
    ties); a class that no row predicts gets the uniform row 1/C. ``counts`` (int64, length C)
    is the number of rows per class.
    """
    num_classes = probs.shape[1]
    acc = _acc_dtype(probs.dtype)
    pseudo_label = probs.argmax(dim=1)
    counts = torch.bincount(pseudo_label, minlength=num_classes)
    sums = torch.zeros(num_classes, num_classes, dtype=acc, device=probs.device)
    sums.index_add_(0, pseudo_label, probs.to(acc))
    mean = torch.where(
        counts[:, None] > 0,
        sums / counts.clamp(min=1)[:, None].to(acc),
        torch.full_like(sums, 1.0 / num_classes),
    )
    return mean.to(probs.dtype), counts


def fd_pseudo_label(logits_plus: Tensor, logits_minus: Tensor, y_tilde: Tensor, eps: float, step: float):
    """MetaSemi's finite-difference pseudo-label update.

    ``grad_y = (softmax(logits_plus) - softmax(logits_minus)) / eps``, ``y_hat = relu(y_tilde -
    step * grad_y)``, each row renormalised to sum 1 (an all-zero row stays zero).
    """
    acc = _acc_dtype(y_tilde.dtype)
    grad_y = (torch.softmax(logits_plus.to(acc), dim=1) - torch.softmax(logits_minus.to(acc), dim=1)) / eps
    y_hat = torch.relu(y_tilde.to(acc) - step * grad_y)
    row_sum = y_hat.sum(dim=1, keepdim=True)
    y_hat = torch.where(row_sum > 0, y_hat / row_sum, y_hat)
    return y_hat.to(y_tilde.dtype)
