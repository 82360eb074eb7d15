"""Tests of the compiled ops in `sslkernels` against their plain-PyTorch definitions.

Every test runs on CPU and has a CUDA twin (``device`` parameter) that runs when a GPU and the
compiled CUDA kernels are both present and is skipped otherwise.
"""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sslkernels  # a missing build must fail the tests, not skip them
from sslkernels import reference

ROOT = Path(__file__).resolve().parent.parent

CUDA_OK = torch.cuda.is_available() and sslkernels.cuda_kernels_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and the compiled CUDA kernels")),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# (rtol, atol) for values that went through one rounding to the output dtype.
TOL = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LAYOUTS = ["contiguous", "transposed", "strided_columns", "strided_rows"]

# SSL_HYPOTHESIS_EXAMPLES=2000 for a longer search than CI's.
HYPOTHESIS = settings(
    max_examples=int(os.environ.get("SSL_HYPOTHESIS_EXAMPLES", "100")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def layout(t, kind):
    """The values of t (2-D) in the memory layout `kind`, on t's device."""
    n, c = t.shape
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":  # column-major: unit stride along the rows
        return t.t().contiguous().t()
    if kind == "strided_columns":  # stride 2 along the classes
        wide = torch.zeros(n, 2 * c, dtype=t.dtype, device=t.device)
        wide[:, ::2] = t
        return wide[:, ::2]
    if kind == "strided_rows":  # every other row of a larger buffer
        tall = torch.zeros(2 * n, c, dtype=t.dtype, device=t.device)
        tall[::2] = t
        return tall[::2]
    raise ValueError(kind)


def random_probs(n, c, gen, sharpness=3.0, ties=False):
    probs = torch.softmax(torch.randn(n, c, generator=gen) * sharpness, dim=1)
    if ties and n > 0:
        probs[::3] = 1.0 / c  # whole rows tied: argmax must be the first index
    return probs


def assert_close(actual, expected, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol * scale)


# ---------------------------------------------------------------------------------------------
# masked_ce


@st.composite
def masked_ce_cases(draw):
    return dict(
        n=draw(st.integers(0, 48)),
        c=draw(st.integers(1, 40)),
        dtype=draw(st.sampled_from(DTYPES)),
        layout_s=draw(st.sampled_from(LAYOUTS)),
        layout_w=draw(st.sampled_from(LAYOUTS)),
        logit_scale=draw(st.sampled_from([1.0, 30.0, 1e4])),
        beta=draw(st.sampled_from([math.inf, 0.0, 5.0, 100.0])),
        tau_kind=draw(st.sampled_from(["float", "scalar_tensor", "per_sample"])),
        tau_float32=draw(st.booleans()),
        ties=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_masked_ce_inputs(case, device, requires_grad=False):
    gen = torch.Generator().manual_seed(case["seed"])
    n, c, dtype = case["n"], case["c"], case["dtype"]
    logits = (torch.randn(n, c, generator=gen) * case["logit_scale"]).to(dtype).to(device)
    probs = random_probs(n, c, gen, ties=case["ties"]).to(dtype).to(device)
    tau_dtype = torch.float32 if case["tau_float32"] else dtype
    if case["tau_kind"] == "float":
        tau = float(torch.rand(1, generator=gen))
    elif case["tau_kind"] == "scalar_tensor":
        tau = torch.rand((), generator=gen).to(tau_dtype).to(device)
    else:
        tau = torch.rand(n, generator=gen).to(tau_dtype).to(device)
    logits = layout(logits, case["layout_s"])
    probs = layout(probs, case["layout_w"])
    if requires_grad:
        logits.requires_grad_(True)
        if isinstance(tau, torch.Tensor):
            tau.requires_grad_(True)
    return logits, probs, tau


@pytest.mark.parametrize("device", DEVICES)
@HYPOTHESIS
@given(case=masked_ce_cases())
def test_masked_ce_matches_reference(device, case):
    logits, probs, tau = make_masked_ce_inputs(case, device)
    loss, mask, pseudo = sslkernels.masked_ce(logits, probs, tau, case["beta"])
    ref_loss, ref_mask, ref_pseudo = reference.masked_ce(logits, probs, tau, case["beta"])
    assert loss.shape == mask.shape == pseudo.shape == (case["n"],)
    assert loss.dtype == mask.dtype == case["dtype"] and pseudo.dtype == torch.int64
    assert loss.device == logits.device
    torch.testing.assert_close(pseudo.cpu(), ref_pseudo.cpu(), rtol=0, atol=0)
    assert_close(mask, ref_mask, case["dtype"])
    # CE of logits of size s is O(s): the absolute tolerance scales with it.
    assert_close(loss, ref_loss, case["dtype"], scale=case["logit_scale"])


def reference_grads(fn, logits, probs, tau, beta, w_loss, w_mask):
    loss, mask, _ = fn(logits, probs, tau, beta)
    objective = (loss.double() * w_loss).sum() + (mask.double() * w_mask).sum()
    inputs = [logits] + ([tau] if isinstance(tau, torch.Tensor) else [])
    grads = torch.autograd.grad(objective, inputs, allow_unused=True)
    # The reference's hard mask does not depend on tau at all: its gradient is zero.
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]


@pytest.mark.parametrize("device", DEVICES)
@HYPOTHESIS
@given(case=masked_ce_cases(), use_mask=st.booleans())
def test_masked_ce_gradients_match_reference(device, case, use_mask):
    if case["n"] == 0:
        case["n"] = 3
    case["logit_scale"] = min(case["logit_scale"], 30.0)  # gradients of saturated softmaxes are 0/1
    logits, probs, tau = make_masked_ce_inputs(case, device, requires_grad=True)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    w_loss = torch.randn(case["n"], generator=gen, dtype=torch.float64).to(device)
    w_mask = (torch.randn(case["n"], generator=gen, dtype=torch.float64) if use_mask else torch.zeros(case["n"], dtype=torch.float64)).to(device)
    got = reference_grads(sslkernels.masked_ce, logits, probs, tau, case["beta"], w_loss, w_mask)
    want = reference_grads(reference.masked_ce, logits, probs, tau, case["beta"], w_loss, w_mask)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        # The tau gradient of a sharp sigmoid scales with beta; the logits' gradient, mask * (softmax - onehot) times
        # the upstream weights, does not.
        tau_grad = i == 1
        assert_close(g, w, case["dtype"], scale=max(1.0, case["beta"]) if tau_grad and math.isfinite(case["beta"]) else 1.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tau_shape", ["per_sample", "scalar"])
@pytest.mark.parametrize("beta", [7.0, 0.5])
def test_masked_ce_gradcheck_and_gradgradcheck(device, tau_shape, beta):
    gen = torch.Generator().manual_seed(0)
    n, c = 6, 5
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    probs = random_probs(n, c, gen).double().to(device)
    shape = (n,) if tau_shape == "per_sample" else ()
    tau = (torch.rand(shape, generator=gen, dtype=torch.float64) * 0.6 + 0.2).to(device).requires_grad_()

    def fn(logits, tau):
        loss, mask, _ = sslkernels.masked_ce(logits, probs, tau, beta)
        return loss, mask

    assert torch.autograd.gradcheck(fn, (logits, tau))
    assert torch.autograd.gradgradcheck(fn, (logits, tau))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_ce_hard_mask_gradcheck(device):
    gen = torch.Generator().manual_seed(1)
    n, c = 6, 5
    logits = torch.randn(n, c, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    probs = random_probs(n, c, gen).double().to(device)
    # Thresholds away from every conf: the hard mask is locally constant, d/dtau = 0.
    conf = probs.max(dim=1).values
    tau = torch.where(torch.arange(n, device=device) % 2 == 0, conf - 0.05, conf + 0.05).requires_grad_()

    def fn(logits, tau):
        loss, mask, _ = sslkernels.masked_ce(logits, probs, tau, math.inf)
        return loss, mask

    assert torch.autograd.gradcheck(fn, (logits, tau))
    assert torch.autograd.gradgradcheck(fn, (logits, tau))
    loss, mask, _ = sslkernels.masked_ce(logits, probs, tau, math.inf)
    assert torch.equal(mask, (conf >= tau).double())


@pytest.mark.parametrize("device", DEVICES)
def test_masked_ce_meta_gradient_matches_reference(device):
    """Meta-T's exact virtual step: tau's gradient through grad_w L_u(w, tau) (create_graph)."""
    gen = torch.Generator().manual_seed(2)
    n, d, c, alpha, beta = 12, 7, 4, 0.3, 50.0
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).to(device)
    w = torch.randn(d, c, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    probs = random_probs(n, c, gen).double().to(device)
    x_l = torch.randn(5, d, generator=gen, dtype=torch.float64).to(device)
    y_l = torch.randint(0, c, (5,), generator=gen).to(device)
    tau0 = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.5 + 0.25).to(device)

    def meta_grad(fn):
        tau = tau0.clone().requires_grad_()
        loss, _, _ = fn(x @ w, probs, tau, beta)
        (g,) = torch.autograd.grad(loss.mean(), w, create_graph=True)
        meta_loss = torch.nn.functional.cross_entropy(x_l @ (w - alpha * g), y_l)
        return torch.autograd.grad(meta_loss, tau)[0]

    torch.testing.assert_close(meta_grad(sslkernels.masked_ce), meta_grad(reference.masked_ce), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [3, 10, 17, 24, 100, 103])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [math.inf, 100.0])
def test_masked_ce_special_values_match_reference(device, c, dtype, beta):
    """Ties at scattered columns, NaN in probs_w, NaN / inf logits and rows of -inf logits only, in
    rows whose mask is 0 or 1, at class counts of each CPU path (rows in lanes, rows along vectors,
    with and without a tail)."""
    gen = torch.Generator().manual_seed(c)
    n = 40
    probs = random_probs(n, c, gen, sharpness=6.0)
    logits = torch.randn(n, c, generator=gen) * 3
    cols = torch.randint(0, c, (n, 2), generator=gen)
    for i in range(0, n, 4):  # the row maximum at two columns: the first one is the pseudo-label
        probs[i, cols[i]] = probs[i].max() + 0.01
    for i in range(1, n, 8):
        probs[i, cols[i, 0]] = float("nan")
    special = [float("nan"), float("inf"), -float("inf")]
    for i in range(2, n, 3):
        logits[i, cols[i, 1]] = special[(i // 3) % 3]
    for i in range(5, n, 12):  # log_softmax of a row of -inf is NaN
        logits[i] = -float("inf")
    tau = torch.where(torch.arange(n) % 2 == 0, torch.tensor(0.05), torch.tensor(1.5))  # mask ~1 / ~0
    logits, probs, tau = logits.to(dtype).to(device), probs.to(dtype).to(device), tau.to(device)
    loss, mask, pseudo = sslkernels.masked_ce(logits, probs, tau, beta)
    ref_loss, ref_mask, ref_pseudo = reference.masked_ce(logits, probs, tau, beta)
    torch.testing.assert_close(pseudo, ref_pseudo, rtol=0, atol=0)
    torch.testing.assert_close(mask, ref_mask, rtol=1e-6, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [3, 10, 17, 24, 100, 103])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("beta", [math.inf, 100.0])
def test_masked_ce_backward_from_saved_exps_equals_recomputed(device, c, dtype, beta):
    """On CPU the forward saves exp(logits_s - row max) for the backward when asked (the autograd
    kernel asks when logits_s requires grad); a backward from them equals one that recomputes
    them. On CUDA nothing is saved."""
    gen = torch.Generator().manual_seed(100 + c)
    n = 37
    logits = (torch.randn(n, c, generator=gen) * 3).to(dtype).to(device)
    probs = random_probs(n, c, gen).to(dtype).to(device)
    tau = (torch.rand(n, generator=gen) * 0.6 + 0.2).to(device)
    grad_loss, grad_mask = (torch.randn(n, generator=gen).to(dtype).to(device) for _ in range(2))
    ops = torch.ops.sslkernels
    assert ops.masked_ce.default(logits, probs, tau, 0.0, beta)[4].shape == (0, c)
    _, mask, pseudo, aux, exp_z = ops.masked_ce.default(logits, probs, tau, 0.0, beta, True)
    if device == "cuda":
        assert exp_z.shape == (0, c)
        return
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert exp_z.shape == (n, c) and exp_z.dtype == acc
    z = logits.to(acc)
    kept = mask != 0  # a row the hard mask drops may be skipped (zeros)
    assert_close(exp_z[kept], torch.exp(z - z.max(1, keepdim=True).values)[kept], acc)
    saved = ops.masked_ce_backward.default(grad_loss, grad_mask, logits, pseudo, aux, tau, 0.0, beta, exp_z)
    recomputed = ops.masked_ce_backward.default(grad_loss, grad_mask, logits, pseudo, aux, tau, 0.0, beta)
    for a, b in zip(saved, recomputed):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert_close(a, b, dtype, scale=max(1.0, beta if math.isfinite(beta) else 1.0))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n", [2097, 2098])
def test_masked_ce_gradients_on_both_sides_of_the_saved_exps_limit(device, n):
    """Through autograd, the CPU forward saves its exps for logits_s of up to 2^21 values and the
    backward recomputes them past that; both give the reference's gradients."""
    gen = torch.Generator().manual_seed(n)
    c = 1000  # 2097 x 1000 is below 2^21 values, 2098 x 1000 above
    logits = (torch.randn(n, c, generator=gen) * 3).to(device).requires_grad_()
    probs = random_probs(n, c, gen).to(device)
    tau = (torch.rand(n, generator=gen) * 0.6 + 0.2).to(device).requires_grad_()
    w_loss = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    w_mask = torch.randn(n, generator=gen, dtype=torch.float64).to(device)
    got = reference_grads(sslkernels.masked_ce, logits, probs, tau, 100.0, w_loss, w_mask)
    want = reference_grads(reference.masked_ce, logits, probs, tau, 100.0, w_loss, w_mask)
    for g, w in zip(got, want):
        assert_close(g, w, torch.float32, scale=100.0)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_ce_probs_w_gets_no_gradient(device):
    logits = torch.randn(4, 3, device=device, requires_grad=True)
    probs = torch.softmax(torch.randn(4, 3, device=device), 1).requires_grad_()
    loss, _, _ = sslkernels.masked_ce(logits, probs, 0.3, 10.0)
    loss.sum().backward()
    assert probs.grad is None and logits.grad is not None


# ---------------------------------------------------------------------------------------------
# class_confidence


@pytest.mark.parametrize("device", DEVICES)
@HYPOTHESIS
@given(
    m=st.sampled_from([0, 1, 2, 7, 64, 300, 2500, 5000]),
    c=st.one_of(st.integers(1, 24), st.sampled_from([40, 100, 103])),
    dtype=st.sampled_from(DTYPES),
    kind=st.sampled_from(LAYOUTS),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_class_confidence_matches_reference(device, m, c, dtype, kind, ties, seed):
    gen = torch.Generator().manual_seed(seed)
    probs = layout(random_probs(m, c, gen, ties=ties).to(dtype).to(device), kind)
    mean, counts = sslkernels.class_confidence(probs)
    ref_mean, ref_counts = reference.class_confidence(probs)
    assert mean.shape == (c, c) and mean.dtype == dtype and counts.dtype == torch.int64
    torch.testing.assert_close(counts.cpu(), ref_counts.cpu(), rtol=0, atol=0)
    assert_close(mean, ref_mean, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3, 8, 10, 17, 24, 100, 103])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_class_confidence_special_values_match_reference(device, c, dtype):
    """Ties at scattered columns and at columns 8 apart (the first one is the argmax), rows holding
    NaN or +inf, and rows of -inf only, at class counts with and without full vectors and a tail."""
    gen = torch.Generator().manual_seed(c)
    m = 64
    probs = random_probs(m, c, gen, sharpness=6.0)
    cols = torch.randint(0, c, (m, 2), generator=gen)
    for i in range(0, m, 4):
        probs[i, cols[i]] = probs[i].max() + 0.01
    for i in range(5, m, 16):
        probs[i, i % c :: 8] = probs[i].max() + 0.02
    for i in range(1, m, 8):
        probs[i, cols[i, 0]] = float("nan")
    for i in range(2, m, 8):
        probs[i, cols[i, 1]] = float("inf")
    for i in range(3, m, 16):
        probs[i] = -float("inf")
    probs = probs.to(dtype).to(device)
    mean, counts = sslkernels.class_confidence(probs)
    ref_mean, ref_counts = reference.class_confidence(probs)
    torch.testing.assert_close(counts, ref_counts, rtol=0, atol=0)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-6, atol=1e-7, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_class_confidence_empty_classes_and_empty_input(device):
    c = 5
    mean, counts = sslkernels.class_confidence(torch.empty(0, c, device=device))
    assert torch.equal(counts.cpu(), torch.zeros(c, dtype=torch.int64))
    torch.testing.assert_close(mean.cpu(), torch.full((c, c), 1.0 / c))
    probs = torch.tensor([[0.7, 0.2, 0.1, 0.0, 0.0], [0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.1, 0.8, 0.0, 0.0]], device=device)
    mean, counts = sslkernels.class_confidence(probs)
    assert counts.tolist() == [2, 0, 1, 0, 0]
    torch.testing.assert_close(mean[0].cpu(), torch.tensor([0.6, 0.25, 0.15, 0.0, 0.0]))
    torch.testing.assert_close(mean[2].cpu(), probs[2].cpu())
    for empty in (1, 3, 4):
        torch.testing.assert_close(mean[empty].cpu(), torch.full((c,), 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_class_confidence_is_deterministic(device):
    gen = torch.Generator().manual_seed(3)
    probs = random_probs(20000, 10, gen).to(device)
    first = sslkernels.class_confidence(probs)
    for _ in range(3):
        again = sslkernels.class_confidence(probs)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_class_confidence_does_not_depend_on_thread_count():
    gen = torch.Generator().manual_seed(4)
    probs = random_probs(30000, 10, gen)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = sslkernels.class_confidence(probs)[0]
        torch.set_num_threads(max(2, threads))
        many = sslkernels.class_confidence(probs)[0]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


# ---------------------------------------------------------------------------------------------
# fd_pseudo_label


@pytest.mark.parametrize("device", DEVICES)
@HYPOTHESIS
@given(
    n=st.integers(0, 40),
    c=st.sampled_from([1, 2, 3, 8, 9, 10, 16, 17, 33, 100, 130]),
    dtype=st.sampled_from(DTYPES),
    kinds=st.tuples(*[st.sampled_from(LAYOUTS)] * 3),
    logit_scale=st.sampled_from([1.0, 30.0, 1e4]),
    eps=st.sampled_from([1e-3, 0.01, 0.5]),
    step=st.sampled_from([0.0, 1e-3, 0.1, 3.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fd_pseudo_label_matches_reference(device, n, c, dtype, kinds, logit_scale, eps, step, seed):
    check_fd_pseudo_label(device, n, c, dtype, kinds, logit_scale, eps, step, seed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [2, 10, 100])
@pytest.mark.parametrize("logit_scale", [1.0, 30.0])
def test_fd_pseudo_label_matches_reference_where_the_update_amplifies_rounding_most(device, dtype, c, logit_scale):
    """step / eps = 3000, the largest of the search above, which may draw it in no dtype."""
    check_fd_pseudo_label(device, 40, c, dtype, ["contiguous"] * 3, logit_scale, 1e-3, 3.0, c)


def check_fd_pseudo_label(device, n, c, dtype, kinds, logit_scale, eps, step, seed):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, c, generator=gen) * logit_scale
    plus = layout((base + torch.randn(n, c, generator=gen) * 0.01).to(dtype).to(device), kinds[0])
    minus = layout((base - torch.randn(n, c, generator=gen) * 0.01).to(dtype).to(device), kinds[1])
    y_tilde = layout(random_probs(n, c, gen).to(dtype).to(device), kinds[2])
    y_hat = sslkernels.fd_pseudo_label(plus, minus, y_tilde, eps, step)
    expected = reference.fd_pseudo_label(plus, minus, y_tilde, eps, step)
    assert y_hat.shape == (n, c) and y_hat.dtype == dtype
    # One rounding to the output dtype, after the update has amplified the rounding of the softmaxes, computed in
    # float32 (float64 for float64 inputs), by step / eps.
    rtol, atol = TOL[dtype]
    amplified = 16 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps * step / eps
    torch.testing.assert_close(y_hat.double().cpu(), expected.double().cpu(), rtol=rtol, atol=atol + amplified)
    # Each row sums to 1 as the reference's does (an all-zero row stays zero): one rounding of each of its values.
    torch.testing.assert_close(y_hat.double().sum(1).cpu(), expected.double().sum(1).cpu(), rtol=0, atol=2 * rtol + amplified)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("c", [1, 3, 8, 10, 16, 17, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fd_pseudo_label_special_values_match_reference(device, c, dtype):
    """NaN and +-inf in either logits, NaN in y_tilde, rows of -inf logits only, and rows that stay all
    zero, at class counts of each CPU path (rows in lanes up to 16 classes, along vectors beyond)."""
    gen = torch.Generator().manual_seed(c)
    n = 48
    plus = torch.randn(n, c, generator=gen) * 3
    minus = plus + torch.randn(n, c, generator=gen) * 0.01
    y_tilde = random_probs(n, c, gen)
    cols = torch.randint(0, c, (n,), generator=gen)
    special = [float("nan"), float("inf"), -float("inf")]
    for i in range(0, n, 4):
        plus[i, cols[i]] = special[(i // 4) % 3]
    for i in range(1, n, 4):
        minus[i, cols[i]] = special[(i // 4) % 3]
    for i in range(2, n, 8):
        y_tilde[i, cols[i]] = float("nan")
    for i in range(3, n, 8):
        plus[i] = -float("inf")
    for i in range(6, n, 8):  # no gradient and no mass: the row stays zero
        minus[i], y_tilde[i] = plus[i], 0.0
    plus, minus, y_tilde = (t.to(dtype).to(device) for t in (plus, minus, y_tilde))
    y_hat = sslkernels.fd_pseudo_label(plus, minus, y_tilde, 0.01, 0.5)
    expected = reference.fd_pseudo_label(plus, minus, y_tilde, 0.01, 0.5)
    torch.testing.assert_close(y_hat, expected, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
def test_fd_pseudo_label_rows_sum_to_one_and_zero_rows_stay_zero(device):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 4, generator=gen).to(device)
    y_tilde = random_probs(6, 4, gen).to(device)
    y_tilde[2] = 0.0  # no gradient on this row (plus == minus): relu(0) stays all zero
    y_hat = sslkernels.fd_pseudo_label(logits, logits, y_tilde, 0.01, 0.5)
    assert torch.equal(y_hat[2].cpu(), torch.zeros(4))
    rows = torch.tensor([0, 1, 3, 4, 5])
    torch.testing.assert_close(y_hat[rows.to(device)].sum(1).cpu(), torch.ones(5))
    assert (y_hat >= 0).all()


# ---------------------------------------------------------------------------------------------
# Custom-operator machinery: opcheck and torch.compile


def opcheck_cases(device):
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(9, 5, generator=gen).to(device)
    probs = random_probs(9, 5, gen).to(device)
    tau = torch.rand(9, generator=gen).to(device)
    cases = [
        (torch.ops.sslkernels.masked_ce.default, (logits.requires_grad_(), probs, tau.requires_grad_(), 0.0, 20.0)),
        (torch.ops.sslkernels.masked_ce.default, (logits.detach().requires_grad_(), probs, None, 0.4, math.inf)),
        (torch.ops.sslkernels.masked_ce.default, (logits.detach().double(), probs.double(), torch.tensor(0.3, device=device), 0.0, 3.0)),
        (torch.ops.sslkernels.class_confidence.default, (probs,)),
        (torch.ops.sslkernels.class_confidence.default, (probs.half(),)),
        (torch.ops.sslkernels.fd_pseudo_label.default, (logits.detach(), logits.detach() + 0.01, probs, 0.01, 0.1)),
    ]
    _, _, pseudo, aux, exp_z = torch.ops.sslkernels.masked_ce.default(logits.detach(), probs, tau.detach(), 0.0, 20.0, True)
    cases.append(
        (
            torch.ops.sslkernels.masked_ce_backward.default,
            (torch.ones(9, device=device), None, logits.detach(), pseudo, aux, tau.detach(), 0.0, 20.0),
        )
    )
    cases.append(
        (
            torch.ops.sslkernels.masked_ce_backward.default,
            (torch.ones(9, device=device), None, logits.detach(), pseudo, aux, tau.detach(), 0.0, 20.0, exp_z),
        )
    )
    return cases


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(16, 6, generator=gen).to(device)
    probs = random_probs(16, 6, gen).to(device)
    tau0 = torch.rand(16, generator=gen).to(device)

    def step(ops, logits, tau):
        loss, mask, _ = ops.masked_ce(logits, probs, tau, 25.0)
        mean, counts = ops.class_confidence(probs)
        y_hat = ops.fd_pseudo_label(logits.detach(), logits.detach() * 1.01, probs, 0.01, 0.1)
        return loss.mean() + mask.mean(), mean, counts, y_hat

    compiled = torch.compile(lambda z, t: step(sslkernels, z, t), backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, lambda z, t: step(reference, z, t)):
        z, t = logits.clone().requires_grad_(), tau0.clone().requires_grad_()
        objective, *outputs = fn(z, t)
        objective.backward()
        results.append((objective.detach(), z.grad, t.grad, *outputs))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_clear_errors(device):
    z = torch.randn(4, 3, device=device)
    p = torch.softmax(torch.randn(4, 3, device=device), 1)
    with pytest.raises(ValueError, match=r"logits_s must be a 2-D \(N, C\) tensor, got shape \[3\]$"):
        sslkernels.masked_ce(z[0], p, 0.5, 10.0)
    with pytest.raises(ValueError, match=r"probs_w must have the shape of logits_s \[4, 3\], got \[3, 3\]$"):
        sslkernels.masked_ce(z, p[:3], 0.5, 10.0)
    with pytest.raises(TypeError, match="probs_w must have the dtype of logits_s"):
        sslkernels.masked_ce(z, p.double(), 0.5, 10.0)
    with pytest.raises(TypeError, match="logits_s must be float16, bfloat16, float32 or float64"):
        sslkernels.masked_ce(z.long(), p.long(), 0.5, 10.0)
    with pytest.raises(ValueError, match=r"tau must be .* length N = 4 .* got shape \[5\]$"):
        sslkernels.masked_ce(z, p, torch.rand(5, device=device), 10.0)
    with pytest.raises(ValueError, match=r"tau must be .* length N = 4"):
        sslkernels.masked_ce(z, p, torch.rand(4, 1, device=device), 10.0)
    with pytest.raises(TypeError, match="tau must be a float or a floating-point tensor"):
        sslkernels.masked_ce(z, p, torch.ones(4, dtype=torch.long, device=device), 10.0)
    with pytest.raises(TypeError, match="tau must be a float or a tensor"):
        sslkernels.masked_ce(z, p, [0.5] * 4, 10.0)
    with pytest.raises(ValueError, match=r"beta must be >= 0 .* got nan$"):
        sslkernels.masked_ce(z, p, 0.5, float("nan"))
    with pytest.raises(ValueError, match=r"beta must be >= 0 .* got -1$"):
        sslkernels.masked_ce(z, p, 0.5, -1.0)
    with pytest.raises(ValueError, match="tau is NaN"):
        sslkernels.masked_ce(z, p, float("nan"), 1.0)
    with pytest.raises(ValueError, match="at least one class"):
        sslkernels.masked_ce(torch.empty(4, 0, device=device), torch.empty(4, 0, device=device), 0.5, 1.0)

    with pytest.raises(ValueError, match="probs must be a 2-D"):
        sslkernels.class_confidence(p[0])
    with pytest.raises(TypeError, match="probs must be float16, bfloat16, float32 or float64"):
        sslkernels.class_confidence(p.long())
    with pytest.raises(ValueError, match="at least one class"):
        sslkernels.class_confidence(torch.empty(4, 0, device=device))

    with pytest.raises(ValueError, match=r"logits_minus must have the shape of y_tilde \[4, 3\], got \[2, 3\]$"):
        sslkernels.fd_pseudo_label(z, z[:2], p, 0.01, 0.1)
    with pytest.raises(TypeError, match="logits_plus must have the dtype of y_tilde"):
        sslkernels.fd_pseudo_label(z.half(), z, p, 0.01, 0.1)
    with pytest.raises(ValueError, match="y_tilde must be a 2-D"):
        sslkernels.fd_pseudo_label(z[0], z[0], p[0], 0.01, 0.1)
    with pytest.raises(ValueError, match=r"eps must be a finite number > 0, got 0$"):
        sslkernels.fd_pseudo_label(z, z, p, 0.0, 0.1)
    with pytest.raises(ValueError, match=r"step must be finite, got inf$"):
        sslkernels.fd_pseudo_label(z, z, p, 0.01, math.inf)


@pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and the compiled CUDA kernels")
def test_device_mismatch_raises_clear_errors():
    z = torch.randn(4, 3, device="cuda")
    p = torch.softmax(torch.randn(4, 3), 1)
    with pytest.raises(RuntimeError, match="probs_w must be on the device of logits_s"):
        sslkernels.masked_ce(z, p, 0.5, 10.0)
    with pytest.raises(RuntimeError, match="tau must be on the device of logits_s"):
        sslkernels.masked_ce(z, p.cuda(), torch.rand(4), 10.0)
    with pytest.raises(RuntimeError, match="logits_plus must be on the device of y_tilde"):
        sslkernels.fd_pseudo_label(z.cpu(), z, p.cuda(), 0.01, 0.1)
    # the backward op called directly: a kernel would otherwise read another device's memory
    _, _, pseudo, aux, _ = torch.ops.sslkernels.masked_ce.default(z, p.cuda(), None, 0.5, 10.0)
    backward = torch.ops.sslkernels.masked_ce_backward.default
    ones = torch.ones(4, device="cuda")
    for name, args in (("aux", (ones, None, z, pseudo, aux.cpu())), ("pseudo_label", (ones, None, z, pseudo.cpu(), aux)),
                       ("grad_loss", (ones.cpu(), None, z, pseudo, aux))):
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of logits_s"):
            backward(*args, None, 0.5, 10.0)


def test_device_mismatch_is_caught_while_tracing():
    # On a CPU-only machine the device check is exercised through the fake (meta) kernel.
    z = torch.randn(4, 3)
    p = torch.softmax(torch.randn(4, 3), 1)
    with pytest.raises(RuntimeError, match="probs_w must be on the device of logits_s"):
        sslkernels.masked_ce(z, p.to("meta"), 0.5, 10.0)
    _, _, pseudo, aux, _ = torch.ops.sslkernels.masked_ce.default(z, p, None, 0.5, 10.0)
    backward = torch.ops.sslkernels.masked_ce_backward.default
    ones = torch.ones(4)
    for name, args in (("aux", (ones, None, z, pseudo, aux.to("meta"))),
                       ("pseudo_label", (ones, None, z, pseudo.to("meta"), aux)),
                       ("grad_mask", (ones, ones.to("meta"), z, pseudo, aux))):
        with pytest.raises(RuntimeError, match=f"{name} must be on the device of logits_s"):
            backward(*args, None, 0.5, 10.0)


def test_masked_ce_backward_rejects_labels_outside_the_row():
    # A direct call of the backward op with labels that masked_ce cannot have produced: an error, not
    # a read outside the row (on CUDA the kernel asserts instead, which this test cannot catch).
    z = torch.randn(5, 3)
    p = torch.softmax(torch.randn(5, 3), 1)
    _, _, pseudo, aux, _ = torch.ops.sslkernels.masked_ce.default(z, p, None, 0.0, 10.0)
    backward = torch.ops.sslkernels.masked_ce_backward.default
    for bad in (3, -1, 2**40):
        labels = pseudo.clone()
        labels[2] = bad
        with pytest.raises(ValueError, match=rf"pseudo_label\[2\] = {bad} is not a class index in \[0, C = 3\)"):
            backward(torch.ones(5), None, z, labels, aux, None, 0.0, 10.0)
    grad_logits, _ = backward(torch.ones(5), None, z, pseudo, aux, None, 0.0, 10.0)  # its own labels pass
    assert grad_logits.shape == z.shape


def test_import_without_compiled_extension_raises_import_error(tmp_path):
    """The algorithm files rely on `import sslkernels` raising ImportError when _C is missing."""
    package = tmp_path / "sslkernels_without_build"
    package.mkdir()
    for name in ("__init__.py", "reference.py"):
        (package / name).write_text((ROOT / "sslkernels" / name).read_text())
    spec = importlib.util.spec_from_file_location(
        package.name, package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        spec.loader.exec_module(module)


def test_cuda_kernels_available_reports_the_build():
    assert sslkernels.cuda_kernels_available() is sslkernels.CUDA_COMPILED
    assert sslkernels.CUDA_COMPILED == bool(sslkernels._C.CUDA_COMPILED)
