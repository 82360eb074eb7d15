"""Behaviour of algorithms/meta_t.py: Meta-T, Green Meta-T and the first-order meta-gradient (CPU, seconds)."""

import contextlib
import math
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from conftest import ROOT, error_of, load_algorithm, records, signal_in_step, tiny, top_level_definitions


@pytest.fixture(scope="session")
def meta_t():
    return load_algorithm("meta_t")

def test_definitions_shared_with_fixmatch_are_verbatim_copies():
    # The template's rule: meta_t.py is fixmatch.py plus Meta-T, so that diffing the two shows only the method. A fix
    # made in one copy of a shared function and not in the other would break it silently.
    fixmatch = top_level_definitions(ROOT / "algorithms" / "fixmatch.py")
    meta_t = top_level_definitions(ROOT / "algorithms" / "meta_t.py")
    changed = sorted(name for name in fixmatch.keys() & meta_t.keys() if fixmatch[name] != meta_t[name])
    assert changed == ["Args", "make_optimizer", "parse_args", "train"]  # Meta-T's flags, lr schedule and step
    assert sorted(fixmatch.keys() - meta_t.keys()) == ["fixmatch_loss"]

@pytest.mark.parametrize("extra", [
    [],  # --meta-grad jvp
    ["--meta-grad", "exact"],
    ["--meta-grad", "jvp", "--lr-schedule", "cosine"],
    ["--meta-grad", "fd", "--plots"],
    ["--meta-grad", "fd", "--fd-direction-at", "w", "--meta-interval", "2", "--hard-mask"],
    ["--n1", "12", "--m1", "30", "--gamma-l", "4", "--gamma-u", "4", "--exclude-labeled"],
    ["--labeled-only"],
])
def test_modes_run_and_log_the_diagnostics(meta_t, tmp_path, extra):
    summary = meta_t.train(meta_t.parse_args(tiny(tmp_path, *extra)))
    out = tmp_path / "run"
    assert summary["finished"] and 0.0 <= summary["top1"] <= 1.0
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"tgn", "meta_optimizer", "prob_bank", "tau_bank"} <= set(ckpt)
    train = [r for r in records(out) if r["kind"] == "train"]
    if "--labeled-only" in extra:
        assert "tau_hist" not in train[0]
        return
    unlabeled = len(ckpt["tau_bank"])
    for r in train:
        assert 0 < r["tau_mean"] < 1 and len(r["tau_class_mean"]) == 4 and len(r["tau_hist"]) == 20
        assert 0 < sum(r["tau_hist"]) <= unlabeled  # samples thresholded so far
        assert r["selected_correct"] + r["selected_wrong"] <= 2 * 16  # two steps of mu * B unlabeled samples
        assert r["meta_steps"] == (1 if "--meta-interval" in extra else 2) and math.isfinite(r["loss_meta"])
        assert r["tgn_grad_norm"] > 0 and 0 <= r["mask_undecided"] <= 1
    if "--plots" in extra:
        for png in ("thresholds_hist.png", "thresholds_per_class.png", "pseudo_labels.png"):
            assert (out / png).stat().st_size > 1000


def test_forward_mode_run_prints_no_torch_jit_deprecation_warning(tmp_path):
    """Forward-mode AD loads its decompositions through torch.jit.script, which recent torch reports as deprecated;
    a --meta-grad jvp run keeps that out of the user's console. Fresh processes: the load happens once per process."""
    jit_warning = "`torch.jit.script` is deprecated"
    probe = subprocess.run([sys.executable, "-c", "import torch.autograd.forward_ad as f; f._maybe_load_decompositions()"],
                           capture_output=True, text=True, timeout=120)
    if jit_warning not in probe.stderr:
        pytest.skip("this torch does not warn when forward-mode AD loads its decompositions")
    run = subprocess.run([sys.executable, str(ROOT / "algorithms" / "meta_t.py"), *tiny(tmp_path, "--meta-grad", "jvp")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert jit_warning not in run.stderr


def test_pbar_averages_only_the_samples_seen_so_far(meta_t, tmp_path, monkeypatch):
    """Eq. 5 averages the predictions of the unlabeled samples. The bank's uniform rows of samples not seen yet would
    all count as class 0 (argmax of a uniform row), so they are left out until every sample has been seen."""
    rows, real = [], meta_t.class_confidence

    def recording(probs):
        uniform = (probs == 1 / probs.shape[1]).all(dim=1)
        rows.append((len(probs), bool(uniform.any())))
        return real(probs)

    monkeypatch.setattr(meta_t, "class_confidence", recording)
    meta_t.train(meta_t.parse_args(tiny(tmp_path, "--total-steps", "14", "--meta-grad", "fd")))
    counts = [n for n, _ in rows]
    assert len(rows) == 14 and not any(uniform for _, uniform in rows)
    assert 0 < counts[0] <= 16 and counts == sorted(counts) and counts[-1] == 192  # 16 unlabeled per step, 192 in all


def test_steps_with_frozen_tgn_and_hard_mask_equal_fixmatch_steps(meta_t, tmp_path, monkeypatch):
    """TGN frozen to 0.95, indicator mask, no meta update: Meta-T steps are FixMatch steps (same lr for both)."""
    fixmatch = load_algorithm("fixmatch")
    monkeypatch.setattr(meta_t, "tgn_thresholds", lambda tgn, probs_w, pbar: torch.full_like(probs_w[:, 0], 0.95))
    monkeypatch.setattr(meta_t, "meta_gradient", lambda model, tgn, *rest, **kw: (
        [torch.zeros_like(p) for p in tgn.parameters()], next(tgn.parameters()).new_zeros(())))
    for module in (fixmatch, meta_t):  # the schedules differ (cosine, step decay): hold the lr constant
        make = module.make_optimizer
        monkeypatch.setattr(module, "make_optimizer", lambda model, args, make=make: (
            lambda opt: (opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)))(make(model, args)[0]))
    flags = ["--total-steps", "16", "--eval-every", "16", "--log-every", "4", "--ema", "0.9"]
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *flags, "--tau", "0.95", name="fixmatch")))
    meta_t.train(meta_t.parse_args(tiny(tmp_path, *flags, "--hard-mask", name="meta_t")))
    a = torch.load(tmp_path / "fixmatch" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "meta_t" / "checkpoint.pt", weights_only=False)
    for part in ("model", "ema_model"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    ra, rb = records(tmp_path / "fixmatch"), records(tmp_path / "meta_t")
    assert ra[-2]["mask_rate"] > 0.5  # the threshold did select pseudo-labels
    for x, y in zip(ra, rb, strict=True):
        for k in ("loss", "loss_s", "loss_u", "mask_rate", "top1"):
            assert x.get(k) == y.get(k), (x["step"], k)


def bilevel_problem(meta_t, batchnorm, dtype=torch.float32, dropout=False):
    """A tiny classifier, a TGN, and one step's batch: labeled, weak and strong views, mu = 3."""
    torch.manual_seed(0)
    classes, b, mu = 3, 4, 3
    if dropout:
        model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.LeakyReLU(0.1),
                                    torch.nn.Dropout2d(0.3), torch.nn.Flatten(), torch.nn.Linear(4 * 64, classes)).to(dtype)
        x = torch.randn(b * (1 + 2 * mu), 1, 8, 8, dtype=dtype)
    elif batchnorm:
        model = meta_t.NETS["cnn_small"](1, classes).to(dtype)
        x = torch.randn(b * (1 + 2 * mu), 1, 8, 8, dtype=dtype)
    else:
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, classes)).double()
        x = torch.randn(b * (1 + 2 * mu), 3, 2, 2, dtype=torch.float64)
    tgn = meta_t.make_tgn(classes, 16).to(x.dtype)
    args = meta_t.parse_args(["--batch-size", str(b), "--uratio", str(mu)])
    forward_rng = meta_t.rng_state(x.device)  # as train() saves it before the step's forward
    recorded = meta_t.RecordForward()  # as train() records the forward of a jvp meta step
    with recorded:
        logits = model(x)
    probs_w = logits[b:-b * mu].detach().softmax(1)
    bank = torch.softmax(3 * torch.randn(20, classes, dtype=x.dtype), 1)
    pbar = meta_t.class_confidence(bank)[0]
    y_l = torch.randint(0, classes, (b,))
    return model, tgn, args, dict(logits_us=logits[-b * mu:], probs_w=probs_w, pbar=pbar, x_l=x[:b], y_l=y_l,
                                  inputs=x, alpha=0.3, forward_rng=forward_rng, forward_values=recorded.values)


def test_exact_tgn_gradient_matches_direct_autograd_and_first_order_agrees(meta_t):
    model, tgn, args, step = bilevel_problem(meta_t, batchnorm=False)
    exact, _ = meta_t.meta_gradient(model, tgn, **step, args=args)
    exact = torch.cat([g.flatten() for g in exact])

    # L_meta(Theta) = CE(f(x_l; w - alpha * grad_w L_u(w, Theta)), y_l), written out and differentiated
    w = {k: p.detach() for k, p in model.named_parameters()}
    conf, yhat = step["probs_w"].max(1)
    tgn_input = torch.cat([step["probs_w"], step["pbar"][yhat]], 1)

    def meta_loss(theta):
        def loss_u(w):
            tau = functional_call(tgn, theta, (tgn_input,)).squeeze(1)
            ce = F.cross_entropy(functional_call(model, w, (step["inputs"][-len(yhat):],)), yhat, reduction="none")
            return (torch.sigmoid(args.beta * (conf - tau)) * ce).mean()
        g = grad(loss_u)(w)
        w_hat = {k: w[k] - step["alpha"] * g[k] for k in w}
        return F.cross_entropy(functional_call(model, w_hat, (step["x_l"],)), step["y_l"])

    direct = torch.cat([g.flatten() for g in grad(meta_loss)(dict(tgn.named_parameters())).values()])
    assert exact.abs().max() > 1e-3 and torch.allclose(exact, direct, rtol=0, atol=1e-10)
    args.meta_grad = "jvp"
    forward_mode, _ = meta_t.meta_gradient(model, tgn, **step, args=args)
    assert torch.allclose(torch.cat([g.flatten() for g in forward_mode]), exact, rtol=0, atol=1e-10)
    for where in ("w_hat", "w"):
        args.meta_grad, args.fd_direction_at = "fd", where
        first_order, _ = meta_t.meta_gradient(model, tgn, **step, args=args)
        assert F.cosine_similarity(torch.cat([g.flatten() for g in first_order]), exact, dim=0) >= 0.99, where


@pytest.mark.parametrize("reuse_forward", [True, False])
def test_forward_mode_gradient_equals_the_double_backward_through_batchnorm(meta_t, reuse_forward):
    model, tgn, args, step = bilevel_problem(meta_t, batchnorm=True, dtype=torch.float64)
    exact, loss_exact = meta_t.meta_gradient(model, tgn, **step, args=args)
    args.meta_grad = "jvp"
    if not reuse_forward:
        step["forward_values"] = None
    forward_mode, loss_forward_mode = meta_t.meta_gradient(model, tgn, **step, args=args)
    exact, forward_mode = (torch.cat([g.flatten() for g in grads]) for grads in (exact, forward_mode))
    assert exact.abs().max() > 1e-6 and torch.allclose(forward_mode, exact, rtol=1e-7, atol=1e-12)
    assert torch.allclose(loss_forward_mode, loss_exact, rtol=1e-12, atol=0)


def test_meta_gradients_with_dropout(meta_t):
    """The forward-mode pass replays the dropout masks of the step's forward, so jvp stays equal to the double
    backward (which differentiates the recorded forward, masks included); fd's two forwards share their masks."""
    model, tgn, args, step = bilevel_problem(meta_t, batchnorm=True, dtype=torch.float64, dropout=True)
    after_forward = torch.get_rng_state()

    def tgn_gradient(mode, **kw):
        args.meta_grad = mode
        torch.set_rng_state(after_forward)  # the meta loss's own forward then draws the same masks in every mode
        return torch.cat([g.flatten() for g in meta_t.meta_gradient(model, tgn, **{**step, **kw}, args=args)[0]])

    exact = tgn_gradient("exact")
    assert exact.abs().max() > 1e-6 and torch.allclose(tgn_gradient("jvp"), exact, rtol=1e-7, atol=1e-12)
    assert not torch.allclose(tgn_gradient("jvp", forward_rng=None), exact, rtol=1e-3, atol=0)  # fresh masks
    # fd sees the strong batch alone, with masks of its own: an approximation, but one of the right size and sign.
    # With different masks in its two forwards (as before), their difference / (2 eps) was mostly the masks':
    # 25x the exact gradient's norm here, cosine -0.26.
    first_order = tgn_gradient("fd")
    assert first_order.norm() < 3 * exact.norm() and F.cosine_similarity(first_order, exact, dim=0) > 0.5


def test_first_order_gradient_keeps_its_size_under_bf16_autocast(meta_t):
    """fd perturbs each weight by eps * v, mostly far below bfloat16's resolution: its two forwards run in float32 even
    under --bf16 (the default on CUDA), or autocast rounds most of the perturbation away. When they ran under autocast,
    the gradient here came out at 0.81 of its norm without autocast."""
    torch.manual_seed(0)
    classes, b, mu = 10, 8, 3
    model = meta_t.NETS["wrn28_2"](3, classes)
    x = torch.randn(b * (1 + 2 * mu), 3, 32, 32)
    tgn = meta_t.make_tgn(classes, 100)
    args = meta_t.parse_args(["--batch-size", str(b), "--uratio", str(mu), "--meta-grad", "fd"])
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    with torch.no_grad():  # thresholds around the confidences, so that the masks respond to them
        probs_w = model(x)[b:-b * mu].softmax(1)
        pbar = meta_t.class_confidence(probs_w)[0]
        tgn[-2].bias += torch.logit(probs_w.max(1).values.median()) - torch.logit(
            meta_t.tgn_thresholds(tgn, probs_w, pbar).median())

    def tgn_gradient(autocast):
        logits = model(x)  # float32: only the meta step's own forwards differ between the two calls
        step = dict(logits_us=logits[-b * mu:], probs_w=probs_w, pbar=pbar, x_l=x[:b], y_l=torch.arange(b) % classes,
                    inputs=x, alpha=0.03)
        return torch.cat([g.flatten() for g in meta_t.meta_gradient(model, tgn, **step, args=args, autocast=autocast)[0]])

    full, mixed = tgn_gradient(contextlib.nullcontext), tgn_gradient(bf16)
    assert full.abs().max() > 0 and 0.9 < mixed.norm() / full.norm() < 1.1
    assert F.cosine_similarity(mixed, full, dim=0) > 0.99


@pytest.mark.parametrize("net", ["cnn_small", "wrn28_2", "convlarge"])
def test_forward_mode_pass_reusing_the_forward_equals_the_whole_pass(meta_t, net):
    """The values of the recorded forward with the tangents of conv2d_tangent and batch_norm_tangent give the
    directional derivatives of forward AD through the whole network: plain layers, residual blocks with projection
    shortcuts (wrn28_2), unpadded and 1x1 convolutions and replayed dropout (convlarge), channels_last."""
    torch.manual_seed(0)
    model = meta_t.NETS[net](3, 5).double().to(memory_format=torch.channels_last)
    size = 8 if net == "cnn_small" else 32
    x = torch.randn(12, 3, size, size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    v = [torch.randn_like(p) for p in params.values()]
    pseudo_label = torch.randint(0, 5, (4,))
    forward_rng = meta_t.rng_state(x.device)
    recorded = meta_t.RecordForward()
    with recorded:
        model(x)
    layers = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)) for m in model.modules())
    assert len(recorded.values) == layers

    def directional_derivative(forward_values):
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        with meta_t.replayed_rng(forward_rng, x.device):
            return meta_t.strong_view_directional_derivative(model, params, buffers, v, x, pseudo_label, forward_values)

    whole, reused = directional_derivative(None), directional_derivative(recorded.values)
    assert whole.abs().max() > 1e-3 and torch.allclose(reused, whole, rtol=1e-9, atol=1e-10)
    with pytest.raises(RuntimeError, match="does not follow the recorded forward"):
        meta_t.strong_view_directional_derivative(model, params, dict(model.named_buffers()), v, x[:6],
                                                  pseudo_label, recorded.values)
    with pytest.raises(RuntimeError, match="skipped ops of the recorded forward"):
        meta_t.strong_view_directional_derivative(model, params, dict(model.named_buffers()), v, x, pseudo_label,
                                                  recorded.values + recorded.values[:1])
    assert torch.equal(directional_derivative(None), whole)  # the errors left no mode behind


def test_replayed_rng_repeats_the_dropout_masks_and_leaves_the_stream_alone(meta_t):
    cpu, ones = torch.device("cpu"), torch.ones(1000)
    state = meta_t.rng_state(cpu)
    with meta_t.replayed_rng(state, cpu):
        a = F.dropout(ones, 0.5)
    with meta_t.replayed_rng(state, cpu):
        b = F.dropout(ones, 0.5)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    assert torch.equal(F.dropout(ones, 0.5), a)  # the stream continues as if the blocks had not run


def test_compile_compiles_the_forward_mode_pass_and_keeps_the_gradient(meta_t, tmp_path, monkeypatch):
    model, tgn, args, step = bilevel_problem(meta_t, batchnorm=True)
    args.meta_grad = "jvp"
    eager, _ = meta_t.meta_gradient(model, tgn, **step, args=args)
    compiled_pass = torch.compile(meta_t.strong_view_directional_derivative)
    compiled, _ = meta_t.meta_gradient(model, tgn, **{**step, "forward_values": None}, args=args,
                                       directional_derivative=compiled_pass)  # as train() under --compile
    eager, compiled = (torch.cat([g.flatten() for g in grads]) for grads in (eager, compiled))
    assert eager.abs().max() > 1e-6 and torch.allclose(compiled, eager, rtol=1e-4, atol=1e-9)
    # --compile hands train()'s meta steps the compiled pass, and the meta step's second backward through the
    # compiled forward works (with 1 thread at this batch size, AOTAutograd donates buffers unless told not to)
    compiled_functions, real_compile, threads = [], torch.compile, torch.get_num_threads()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_functions.append(fn) or real_compile(fn, **kw))
    try:
        summary = meta_t.train(meta_t.parse_args(tiny(
            tmp_path, "--meta-grad", "jvp", "--compile", "--labels", "40", "--batch-size", "64", "--uratio", "7",
            "--total-steps", "2", "--threads", "1", "--device", "cpu")))
    finally:
        torch.set_num_threads(threads)
    assert meta_t.strong_view_directional_derivative in compiled_functions and summary["steps"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_compile_under_cuda_bf16_runs_the_forward_mode_pass_eagerly(meta_t, tmp_path, monkeypatch):
    # torch 2.11 traced the compiled pass under bf16 autocast into a float32 x bfloat16 matmul that failed
    compiled_functions, real_compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled_functions.append(fn) or real_compile(fn, **kw))
    summary = meta_t.train(meta_t.parse_args(tiny(
        tmp_path, "--meta-grad", "jvp", "--compile", "--labels", "40", "--batch-size", "64", "--uratio", "7",
        "--total-steps", "2", "--device", "cuda", "--bf16")))
    assert meta_t.strong_view_directional_derivative not in compiled_functions and summary["steps"] == 2


@pytest.mark.parametrize("mode", [("exact", "w_hat"), ("jvp", "w_hat"), ("fd", "w_hat"), ("fd", "w")])
def test_meta_step_changes_neither_batchnorm_statistics_nor_weights(meta_t, mode):
    model, tgn, args, step = bilevel_problem(meta_t, batchnorm=True)
    args.meta_grad, args.fd_direction_at = mode
    before = {k: t.clone() for k, t in model.state_dict().items()}  # after the step's forward
    theta_grads, loss_meta = meta_t.meta_gradient(model, tgn, **step, args=args)
    assert all(g.abs().sum() > 0 for g in theta_grads) and loss_meta > 0
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_green_meta_t_runs_the_meta_step_on_every_kth_iteration(meta_t, tmp_path):
    k = 3
    meta_t.train(meta_t.parse_args(tiny(tmp_path, "--meta-grad", "fd", "--fd-direction-at", "w", "--meta-interval",
                                        str(k), "--total-steps", "8", "--eval-every", "8", "--log-every", "1")))
    ran = {r["step"] for r in records(tmp_path / "run") if r["kind"] == "train" and r["meta_steps"]}
    assert ran == {step for step in range(1, 9) if (step - 1) % k == 0}  # iterations t = step - 1 = 0, 3, 6


def test_sigterm_ends_the_step_with_a_checkpoint(meta_t, tmp_path, monkeypatch):
    signal_in_step(meta_t, monkeypatch, signal.SIGTERM, 2)
    summary = meta_t.train(meta_t.parse_args(tiny(tmp_path, "--meta-grad", "fd")))
    monkeypatch.undo()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2 and not summary["finished"]
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2
    assert meta_t.train(meta_t.parse_args(["--resume", str(tmp_path / "run"), "--workers", "0"]))["finished"]


@pytest.mark.parametrize("meta_grad", ["jvp", "fd"])
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(meta_t, tmp_path, meta_grad):
    common = ["--total-steps", "7", "--eval-every", "3", "--meta-interval", "2", "--meta-grad", meta_grad]
    full = meta_t.train(meta_t.parse_args(tiny(tmp_path, *common, name="full")))
    meta_t.train(meta_t.parse_args(tiny(tmp_path, *common, "--stop-after", "4", name="cut")))
    resumed = meta_t.train(meta_t.parse_args(tiny(tmp_path, *common, "--resume", str(tmp_path / "cut"), name="cut")))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)
    assert sorted(a) == ["algorithm", "args", "best_top1", "ema_model", "meta_optimizer", "model", "optimizer", "prob_bank",
                         "rng", "scheduler", "seconds", "step", "tau_bank", "tgn"]

    def tensors(ckpt):
        yield from ckpt["model"].items()
        yield from ckpt["ema_model"].items()
        yield from ckpt["tgn"].items()
        yield "prob_bank", ckpt["prob_bank"]
        yield "tau_bank", ckpt["tau_bank"]
        for i, s in ckpt["optimizer"]["state"].items():
            yield f"momentum{i}", s["momentum_buffer"]
        for i, s in ckpt["meta_optimizer"]["state"].items():
            yield from ((f"adam{i}.{n}", t) for n, t in s.items())

    assert a["step"] == b["step"] == 7
    for (name, ta), (_, tb) in zip(tensors(a), tensors(b), strict=True):
        assert torch.equal(ta.nan_to_num(), tb.nan_to_num()) and torch.equal(ta.isnan(), tb.isnan()), name
    assert resumed["top1"] == full["top1"]
    assert [r["step"] for r in records(tmp_path / "cut")] == [r["step"] for r in records(tmp_path / "full")]


def test_lr_is_divided_by_10_at_one_and_two_thirds(meta_t):
    model = meta_t.NETS["cnn_small"](1, 10)
    _, sched = meta_t.make_optimizer(model, meta_t.parse_args([]))  # Table 6: 300 epochs of 1024 steps
    decay = sched.lr_lambdas[0]
    assert [decay(t) for t in (0, 102399, 102400, 204799)] == [1, 1, 0.1, 0.1] and math.isclose(decay(204800), 0.01)


@pytest.mark.parametrize("dataset, flags, mu", [("cifar10", [], 6), ("cifar100", [], 6), ("svhn", [], 6),
                                               ("stl10", [], 4), ("stl10", ["--uratio", "3"], 3)])
def test_default_unlabeled_batch_is_table_6s(meta_t, dataset, flags, mu):
    assert meta_t.parse_args(["--dataset", dataset, *flags]).uratio == mu


def test_defaults_compute_the_exact_meta_gradient_the_fastest_way(meta_t):
    assert meta_t.parse_args([]).meta_grad == "jvp" and meta_t.parse_args([]).jvp_reuse_forward
    help_text = subprocess.run([sys.executable, str(ROOT / "algorithms" / "meta_t.py"), "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "(default: jvp)" in " ".join(help_text.split())


def test_cosine_schedule_is_fixmatchs(meta_t):
    fixmatch = load_algorithm("fixmatch")
    model, flags = meta_t.NETS["cnn_small"](1, 10), ["--total-steps", "3000"]
    _, cosine = meta_t.make_optimizer(model, meta_t.parse_args([*flags, "--lr-schedule", "cosine"]))
    _, reference = fixmatch.make_optimizer(model, fixmatch.parse_args(flags))
    assert [cosine.lr_lambdas[0](t) for t in (0, 1000, 2999)] == [reference.lr_lambdas[0](t) for t in (0, 1000, 2999)]
    assert cosine.lr_lambdas[0](1000) < 1


def test_bank_writes_each_sample_of_a_batch_once_and_keeps_its_last_row(meta_t):
    """A batch across two epochs of the unlabeled stream holds some samples twice. Written as they come, with two
    threads, the bank's rows of those samples differed from one repeat of the same write to the next."""
    torch.manual_seed(0)
    idx_u = torch.from_numpy(meta_t.sample_indices(1300, 448, 2, 0, 1))  # step 2 straddles the first epoch's end
    assert len(idx_u.unique()) < len(idx_u)
    probs_w = torch.randn(448, 100).softmax(1)
    last = torch.zeros(1300, 100)
    for i, row in zip(idx_u.tolist(), probs_w):  # one row after the other: the last one stays
        last[i] = row
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(20):
            idx, rows = meta_t.bank_rows(idx_u)
            bank = torch.zeros(1300, 100)
            bank[idx] = probs_w[rows]
            assert torch.equal(bank, last)
    finally:
        torch.set_num_threads(threads)
    assert sorted(idx.tolist()) == sorted(set(idx_u.tolist())) and rows.tolist() == sorted(rows.tolist())


def test_class_confidence_and_tgn(meta_t):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.4, 0.1], [0.1, 0.1, 0.8]])
    mean, counts = meta_t.class_confidence_reference(probs)
    assert counts.tolist() == [2, 0, 1]
    assert torch.allclose(mean, torch.tensor([[0.6, 0.3, 0.1], [1 / 3] * 3, [0.1, 0.1, 0.8]]))
    if meta_t.class_confidence is not meta_t.class_confidence_reference:  # the extension agrees
        for a, b in zip(meta_t.class_confidence(probs), (mean, counts)):
            assert torch.allclose(a, b)
    tau = meta_t.tgn_thresholds(meta_t.make_tgn(3, 100), probs, mean)
    assert tau.shape == (3,) and ((tau > 0.3) & (tau < 0.7)).all()  # a fresh TGN starts near 0.5


def test_torch_deterministic_flag_sets_cudnn(meta_t, tmp_path):
    before = torch.backends.cudnn.deterministic
    try:
        for flag, expected in (("--no-torch-deterministic", False), ("--torch-deterministic", True)):
            meta_t.train(meta_t.parse_args(tiny(tmp_path, flag, "--total-steps", "1", "--meta-grad", "fd", "--overwrite")))
            assert torch.backends.cudnn.deterministic is expected
    finally:
        torch.backends.cudnn.deterministic = before


def test_bad_method_flags_get_one_clear_line(meta_t, tmp_path):
    assert "--meta-interval must be positive" in error_of(meta_t, tiny(tmp_path, "--meta-interval", "0"))
    assert "--meta-grad must be jvp, exact or fd, got second" in error_of(meta_t, tiny(tmp_path, "--meta-grad", "second"))
    assert "--fd-direction-at must be w_hat or w, got v" in error_of(meta_t, tiny(tmp_path, "--fd-direction-at", "v"))
    assert "--lr-schedule must be step or cosine, got linear" in error_of(meta_t, tiny(tmp_path, "--lr-schedule", "linear"))
    assert "--beta must be positive and finite, got inf" in error_of(meta_t, tiny(tmp_path, "--beta", "inf"))
    assert "--beta must be positive and finite, got nan" in error_of(meta_t, tiny(tmp_path, "--beta", "nan"))
    assert "--meta-lr must be positive and finite, got nan" in error_of(meta_t, tiny(tmp_path, "--meta-lr", "nan"))
    assert "--meta-lr must be positive and finite, got inf" in error_of(meta_t, tiny(tmp_path, "--meta-lr", "inf"))
    assert "--lr-milestones must be fractions in (0, 1] such as 1/3,2/3, got 1/3,x" in error_of(meta_t, tiny(tmp_path, "--lr-milestones", "1/3,x"))
    with pytest.raises(meta_t.UserError, match="--lr-milestones"):  # before any data is loaded
        meta_t.parse_args(tiny(tmp_path, "--lr-milestones", "0,1/2"))
    assert "--compile has no double backward" in error_of(meta_t, tiny(tmp_path, "--compile", "--meta-grad", "exact"))
    meta_t.train(meta_t.parse_args(tiny(tmp_path, "--stop-after", "1", name="r")))
    msg = error_of(meta_t, tiny(tmp_path, "--meta-grad", "fd", "--resume", str(tmp_path / "r"), name="r"))
    assert msg.endswith("differ from the checkpoint's: --meta-grad fd (checkpoint: jvp)")
    msg = error_of(meta_t, tiny(tmp_path, "--meta-lr", "0.01", "--resume", str(tmp_path / "r"), name="r"))
    assert msg.endswith("differ from the checkpoint's: --meta-lr 0.01 (checkpoint: 0.001)")
    # whether the jvp pass reuses the forward changes its speed (and rounding), not what is trained
    assert meta_t.train(meta_t.parse_args(tiny(tmp_path, "--no-jvp-reuse-forward", "--resume", str(tmp_path / "r"),
                                               name="r")))["finished"]
    # neither script continues the other's run (a Meta-T checkpoint holds every key of a FixMatch one); a fresh
    # Meta-T run does not replace a FixMatch run's checkpoint unasked
    fixmatch = load_algorithm("fixmatch")
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2", name="f")))
    assert error_of(meta_t, tiny(tmp_path, "--resume", str(tmp_path / "f"), name="f")).endswith(
        "not a checkpoint of meta_t.py (written by fixmatch.py)")
    assert error_of(fixmatch, ["--resume", str(tmp_path / "r")]).endswith(
        "not a checkpoint of fixmatch.py (written by meta_t.py)")
    assert "holds an earlier run's checkpoint" in error_of(meta_t, tiny(tmp_path, name="f"))
    assert "tgn" not in torch.load(tmp_path / "f" / "checkpoint.pt", weights_only=False)  # still FixMatch's


def test_a_meta_step_moves_the_tgn_by_adams_step_down_the_meta_gradient(meta_t, tmp_path, monkeypatch):
    """train() hands meta_gradient's output to Adam as the TGN's gradient: after the first step, each TGN parameter
    has moved by Adam's first step, -meta_lr * g / (|g| + eps), against its meta-gradient g."""
    grads, initial, real = [], [], meta_t.meta_gradient

    def recording(model, tgn, *a, **kw):
        initial.append([p.detach().clone() for p in tgn.parameters()])
        out = real(model, tgn, *a, **kw)
        grads.append([g.clone() for g in out[0]])
        return out

    monkeypatch.setattr(meta_t, "meta_gradient", recording)
    meta_t.train(meta_t.parse_args(tiny(tmp_path, "--total-steps", "1", "--eval-every", "1", "--meta-lr", "0.01")))
    after = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["tgn"].values()
    assert len(grads) == 1 and all(g.abs().max() > 0 for g in grads[0])
    for p0, g, p1 in zip(initial[0], grads[0], after, strict=True):
        assert torch.allclose(p1, p0 - 0.01 * g / (g.abs() + 1e-8), rtol=0, atol=1e-7)
