"""Behaviour of algorithms/meta_semi.py: MetaSemi's meta step on the pseudo-labels, its loss, schedule and runs (CPU)."""

import math
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, error_of, full_and_resumed, load_algorithm, records, signal_in_step, tiny, top_level_definitions

try:
    import sslkernels
except ImportError:
    sslkernels = None


@pytest.fixture(scope="session")
def meta_semi():
    return load_algorithm("meta_semi")


def small(tmp_path, *extra, name="run"):
    """A few-step run of the generated dataset; mixup pairs the batches one to one."""
    return tiny(tmp_path, "--uratio", "1", *extra, name=name)
def test_definitions_shared_with_fixmatch_are_verbatim_copies():
    fixmatch = top_level_definitions(ROOT / "algorithms" / "fixmatch.py")
    meta_semi = top_level_definitions(ROOT / "algorithms" / "meta_semi.py")
    changed = sorted(name for name in fixmatch.keys() & meta_semi.keys() if fixmatch[name] != meta_semi[name])
    assert changed == ["Args", "augmentations", "make_batch", "make_optimizer", "parse_args", "train"]  # flags, no strong view, schedule, step
    assert sorted(fixmatch.keys() - meta_semi.keys()) == ["fixmatch_loss", "masked_ce_reference", "strong_augment", "strong_text"]


def tiny_problem(dtype=torch.float64, batchnorm=False):
    """A small classifier (tanh MLP, or with BatchNorm and dropout) and a labeled and an unlabeled batch."""
    torch.manual_seed(0)
    classes, d = 4, 6
    layers = [torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, classes)]
    if batchnorm:
        layers[1:1] = [torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.3)]
    model = torch.nn.Sequential(*layers).to(dtype)
    x_l, x_u = torch.randn(8, d, dtype=dtype), torch.randn(12, d, dtype=dtype)
    return model, x_l, torch.randint(0, classes, (8,)), x_u


def test_finite_difference_is_the_gradient_of_the_labeled_loss_after_a_virtual_step(meta_semi):
    """Eqs. 4-5 and 12-16: the labeled loss after one SGD step on the consistency loss sum_c (p - y)^2, differentiated
    by autograd with respect to the pseudo-labels y, points where the finite difference does (a positive factor,
    alpha / B_u, apart). The finite difference is read off y_hat with a step so small that no row is clipped."""
    model, x_l, y_l, x_u = tiny_problem()
    params = dict(model.named_parameters())
    alpha = 0.05
    y = torch.softmax(model(x_u), 1).detach().requires_grad_(True)
    loss_u = (torch.softmax(model(x_u), 1) - y).square().sum(1).mean()
    virtual = {k: p - alpha * g for (k, p), g in zip(params.items(), torch.autograd.grad(loss_u, list(params.values()),
                                                                                           create_graph=True))}
    exact = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, virtual, (x_l,)), y_l), y)[0]
    step = 1e-6
    y_tilde, y_hat = meta_semi.meta_pseudo_labels(model, x_l, y_l, x_u, step, SimpleNamespace(meta=True, fd_eps=0.01))
    fd = (y_tilde - y_hat) / step
    assert torch.allclose(y_tilde, y.detach())
    assert F.cosine_similarity(fd.flatten(), exact.flatten(), dim=0) >= 0.99
    assert torch.allclose(fd.sum(1), torch.zeros(12, dtype=fd.dtype), atol=1e-6)  # a difference of two softmaxes


def test_meta_step_leaves_weights_batchnorm_statistics_and_rng_as_they_were(meta_semi):
    model, x_l, y_l, x_u = tiny_problem(torch.float32, batchnorm=True)
    model.train()(torch.randn(32, 6))  # running statistics away from their initial values
    before, rng = {k: t.clone() for k, t in model.state_dict().items()}, torch.get_rng_state()
    y_tilde, y_hat = meta_semi.meta_pseudo_labels(model, x_l, y_l, x_u, 0.1, SimpleNamespace(meta=True, fd_eps=0.01))
    assert model.training and not torch.equal(y_hat, y_tilde)
    assert all(p.grad is None for p in model.parameters())
    for k, t in model.state_dict().items():
        assert torch.equal(t, before[k]), k
    assert torch.equal(torch.get_rng_state(), rng)  # eval mode: no dropout mask drawn


def test_zero_step_and_no_meta_leave_the_pseudo_labels_as_they_are(meta_semi):
    model, x_l, y_l, x_u = tiny_problem(torch.float32)
    y_tilde, y_hat = meta_semi.meta_pseudo_labels(model, x_l, y_l, x_u, 0.0, SimpleNamespace(meta=True, fd_eps=0.01))
    assert torch.equal(y_hat, y_tilde / y_tilde.sum(1, keepdim=True))
    y_tilde, y_hat = meta_semi.meta_pseudo_labels(model, x_l, y_l, x_u, 0.1, SimpleNamespace(meta=False, fd_eps=0.01))
    assert y_hat is y_tilde and torch.allclose(y_tilde, torch.softmax(model(x_u), 1))


def test_fallback_clips_and_renormalises(meta_semi):
    y_tilde = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.2, 0.6]])
    plus, minus = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.zeros(2, 3)
    y_hat = meta_semi.fd_pseudo_label_reference(plus, minus, y_tilde, 0.5, 0.6)
    raw = torch.relu(y_tilde - 0.6 * (torch.softmax(plus, 1) - torch.softmax(minus, 1)) / 0.5)
    assert raw[0, 0] == 0 and torch.allclose(y_hat, raw / raw.sum(1, keepdim=True))
    assert torch.equal(meta_semi.fd_pseudo_label_reference(plus, minus, torch.zeros(2, 3), 1.0, 10.0)[1], torch.zeros(3))


@pytest.mark.skipif(sslkernels is None, reason="sslkernels extension not built")
def test_kernel_and_fallback_agree(meta_semi):
    torch.manual_seed(1)
    plus, minus, y_tilde = torch.randn(64, 10), torch.randn(64, 10), torch.softmax(torch.randn(64, 10), 1)
    for step in (0.0, 0.01, 0.1, 5.0):  # 5: many entries clipped
        assert torch.allclose(meta_semi.fd_pseudo_label(plus, minus, y_tilde, 0.01, step),
                              meta_semi.fd_pseudo_label_reference(plus, minus, y_tilde, 0.01, step), atol=1e-6)


def test_loss_with_and_without_mixup(meta_semi):
    torch.manual_seed(2)
    logits_l, logits_u, y_l = torch.randn(5, 3), torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    y_hat, lam = torch.softmax(torch.randn(5, 3), 1), torch.rand(5)
    consistency = sum(((torch.softmax(logits_u[i], 0) - y_hat[i]) ** 2).sum() for i in range(5)) / 5
    loss, stats = meta_semi.metasemi_loss(logits_l, y_l, logits_u, y_hat, None, 0.5)
    assert torch.allclose(loss, F.cross_entropy(logits_l, y_l) + 0.5 * consistency)
    loss, stats = meta_semi.metasemi_loss(logits_l, y_l, logits_u, y_hat, lam, 0.5)
    target = lam[:, None] * F.one_hot(y_l, 3) + (1 - lam[:, None]) * y_hat
    kl = sum((target[i] * (target[i].log() - torch.log_softmax(logits_l[i], 0))).sum() for i in range(5)) / 5
    assert torch.allclose(stats["loss_s"], kl) and torch.allclose(loss, kl + 0.5 * consistency)


def test_mixup_pairs_labeled_sample_i_with_unlabeled_sample_i(meta_semi, tmp_path, monkeypatch):
    """A step has two forwards in train mode: with lambda = 1 the first sees the labeled images, with 0 the unlabeled
    ones; the second sees the unlabeled ones."""
    seen = {}
    for lam in (1.0, 0.0):
        inputs = []
        real_batch = meta_semi.make_batch  # mixup's lambdas come with the batch
        monkeypatch.setattr(meta_semi, "make_batch", lambda *a, **kw: {**(b := real_batch(*a, **kw)), "lam": torch.full_like(b["lam"], lam)})
        real = meta_semi.metasemi_loss
        monkeypatch.setattr(meta_semi, "metasemi_loss", lambda *a: real(*a))
        module_call = torch.nn.Module.__call__

        def record(self, *a, **kw):
            if isinstance(self, torch.nn.Sequential) and hasattr(self, "head") and self.training:
                inputs.append(a[0].clone())
            return module_call(self, *a, **kw)

        monkeypatch.setattr(torch.nn.Module, "__call__", record)
        meta_semi.train(meta_semi.parse_args(small(tmp_path, "--total-steps", "1", "--overwrite", name="mix")))
        monkeypatch.undo()
        assert len(inputs) == 2  # the mixed and the unlabeled batch; the meta step's forwards ran in eval mode
        seen[lam] = inputs
    assert torch.equal(seen[1.0][1], seen[0.0][1])  # the unlabeled batch
    assert torch.equal(seen[0.0][0], seen[0.0][1]) and not torch.equal(seen[1.0][0], seen[1.0][1])


@pytest.mark.parametrize("extra", [[], ["--no-meta"], ["--no-mixup", "--uratio", "2"], ["--no-meta", "--no-mixup"],
                                   ["--labeled-only"], ["--plots"]])
def test_ablations_run_and_log_the_diagnostics(meta_semi, tmp_path, extra):
    summary = meta_semi.train(meta_semi.parse_args(small(tmp_path, *extra)))
    out = tmp_path / "run"
    assert summary["finished"] and 0.0 <= summary["top1"] <= 1.0
    train = [r for r in records(out) if r["kind"] == "train"]
    if "--labeled-only" in extra:
        assert "pseudo_label_acc" not in train[0] and "loss_u" not in train[0]
        return
    for r in train:
        assert 0 <= r["pseudo_label_acc_tilde"] <= 1 and 0 <= r["pseudo_label_acc"] <= 1 and r["unlabeled_weight"] == 1
        assert math.isfinite(r["loss_u"]) and r["loss_s"] > 0
        if "--no-meta" in extra:
            assert r["meta_argmax_changed"] == 0 and r["meta_shift_l1"] == 0
            assert r["pseudo_label_acc"] == r["pseudo_label_acc_tilde"]
        else:
            assert 0 < r["meta_shift_l1"] <= 2
    if "--plots" in extra:
        assert (out / "pseudo_labels.png").stat().st_size > 1000


@pytest.mark.parametrize("flags, momentum", [([], 0.1), (["--bn-momentum", "0.05"], 0.05), (["--bn-momentum", "0"], 0.01)])
def test_batchnorm_momentum_is_the_official_codes_unless_asked(meta_semi, tmp_path, monkeypatch, flags, momentum):
    """The meta step reads BatchNorm's running statistics (eval mode); MetaSemi's code keeps torch's momentum 0.1 in
    them. cnn_small's own is 0.01 (flag 0)."""
    momenta, real = set(), meta_semi.meta_pseudo_labels
    monkeypatch.setattr(meta_semi, "meta_pseudo_labels", lambda model, *a: (momenta.update(
        m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)), real(model, *a))[1])
    meta_semi.train(meta_semi.parse_args(small(tmp_path, "--total-steps", "1", *flags)))
    assert momenta == {momentum}


def test_unlabeled_batch_has_one_weak_view_and_leaves_the_labeled_samples_out(meta_semi, tmp_path):
    args = meta_semi.parse_args(small(tmp_path))
    assert args.exclude_labeled
    train_x, train_y, *_ = meta_semi.load_data(args)
    labeled, unlabeled, _ = meta_semi.split_labeled(train_y, 4, args, np.random.default_rng(0))
    assert not set(labeled) & set(unlabeled) and len(labeled) + len(unlabeled) == len(train_y)
    batch = meta_semi.make_batch(3, train_x, train_y, labeled, unlabeled, args, meta_semi.augmentations(args, None))
    assert sorted(batch) == ["lam", "x_l", "x_u", "y_l", "y_u"] and batch["x_u"].shape == batch["x_l"].shape
    assert batch["lam"].shape == (args.batch_size,) and ((0 <= batch["lam"]) & (batch["lam"] <= 1)).all()


def test_schedule_and_ramp_follow_the_official_code_at_its_length(meta_semi):
    """compute_lr(step) of the official code: lr * step / 4000 below step 4000, then x0.1 for each milestone the step
    is past (300k, 350k); its ramp is step / 4000 up to 1. Our step t has t - 1 steps before it."""
    args = meta_semi.parse_args(["--dataset", "digits"])
    assert (args.total_steps, args.warmup_steps, args.batch_size, args.uratio, args.lr) == (400_000, 4000, 128, 1, 0.1)
    _, sched = meta_semi.make_optimizer(meta_semi.NETS["cnn_small"](1, 10), args)
    factor = sched.lr_lambdas[0]
    official = lambda k: k / 4000 if k < 4000 else 0.1 ** ((k > 300_000) + (k > 350_000))
    for k in (0, 1, 2000, 3999, 4000, 4001, 299_999, 300_000, 300_001, 350_000, 350_001, 399_999):
        assert math.isclose(factor(k), official(k), rel_tol=1e-12), k
    short = meta_semi.parse_args(["--dataset", "digits", "--total-steps", "3000"])
    assert short.warmup_steps == 30  # 1% of the run, as 4000 of 400k


def test_training_uses_the_warmed_up_lr_as_the_meta_step_and_ramps_the_consistency_loss(meta_semi, tmp_path, monkeypatch):
    sizes, weights = [], []
    real_meta, real_loss = meta_semi.meta_pseudo_labels, meta_semi.metasemi_loss
    monkeypatch.setattr(meta_semi, "meta_pseudo_labels", lambda *a: (sizes.append(a[4]), real_meta(*a))[1])
    monkeypatch.setattr(meta_semi, "metasemi_loss", lambda *a: (weights.append(a[5]), real_loss(*a))[1])
    meta_semi.train(meta_semi.parse_args(small(tmp_path, "--total-steps", "6", "--warmup-steps", "4", "--lr", "0.2",
                                               "--lr-milestones", "1", "--unlabeled-weight", "2")))
    assert sizes == pytest.approx([0, 0.05, 0.1, 0.15, 0.2, 0.2])
    assert weights == pytest.approx([0, 0.5, 1, 1.5, 2, 2])


@pytest.mark.parametrize("dataset, net, decay, alpha", [("cifar10", "convlarge", 1e-4, 1.0), ("svhn", "convlarge", 5e-5, 0.1),
                                                        ("digits", "cnn_small", 1e-4, 1.0),
                                                        ("fashion_mnist", "cnn_small_s2", 1e-4, 1.0)])
def test_dataset_defaults(meta_semi, dataset, net, decay, alpha):
    args = meta_semi.parse_args(["--dataset", dataset])
    assert (args.net, args.weight_decay, args.mixup_alpha, args.ema) == (net, decay, alpha, 0.0)
    opt, _ = meta_semi.make_optimizer(meta_semi.NETS[net](3, 10), args)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == decay and not opt.defaults["nesterov"]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(meta_semi, tmp_path):
    """Mixup's lambdas and ConvLarge's dropout masks come from the RNGs that the checkpoint holds."""
    common = ["--total-steps", "7", "--eval-every", "3", "--net", "convlarge", "--image-size", "12", "--warmup-steps", "3"]
    full, resumed, a, b = full_and_resumed(meta_semi, lambda name, *extra: small(tmp_path, *common, *extra, name=name), stop_after=4)
    assert a["step"] == b["step"] == 7
    for part in ("model", "ema_model"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for i, s in a["optimizer"]["state"].items():
        assert torch.equal(s["momentum_buffer"], b["optimizer"]["state"][i]["momentum_buffer"])
    assert resumed["top1"] == full["top1"]
    assert [r["step"] for r in records(tmp_path / "cut")] == [r["step"] for r in records(tmp_path / "full")]


def test_sigterm_ends_the_step_with_a_checkpoint(meta_semi, tmp_path, monkeypatch):
    signal_in_step(meta_semi, monkeypatch, signal.SIGTERM, 2)
    summary = meta_semi.train(meta_semi.parse_args(small(tmp_path)))
    monkeypatch.undo()
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 2 and not summary["finished"]
    assert meta_semi.train(meta_semi.parse_args(["--resume", str(tmp_path / "run"), "--workers", "0"]))["finished"]


def test_a_diverged_run_stops_with_one_line(meta_semi, tmp_path, monkeypatch):
    real = F.cross_entropy
    monkeypatch.setattr(meta_semi.F, "cross_entropy", lambda *a, **kw: real(*a, **kw) * math.inf)
    assert error_of(meta_semi, small(tmp_path)).endswith("the labeled loss's gradient is nan: training diverged (a lower --lr may help)")


def test_bad_method_flags_get_one_clear_line(meta_semi, tmp_path):
    assert error_of(meta_semi, tiny(tmp_path)).endswith("it needs --uratio 1, got 2 (or --no-mixup)")
    assert "--warmup-steps must be -1 (1% of --total-steps), 0 or positive, got -2" in error_of(
        meta_semi, small(tmp_path, "--warmup-steps", "-2"))
    assert "--mixup-alpha must be -1 (the dataset's default) or positive, got 0.0" in error_of(
        meta_semi, small(tmp_path, "--mixup-alpha", "0"))
    assert "--fd-eps must be positive, got nan" in error_of(meta_semi, small(tmp_path, "--fd-eps", "nan"))
    assert "--momentum must be in [0, 1), got 1.0" in error_of(meta_semi, small(tmp_path, "--momentum", "1"))
    assert "--lr-milestones must be fractions in (0, 1] such as 3/4,7/8, got 3/4,2" in error_of(
        meta_semi, small(tmp_path, "--lr-milestones", "3/4,2"))
    meta_semi.train(meta_semi.parse_args(small(tmp_path, "--stop-after", "1", name="r")))
    assert error_of(meta_semi, small(tmp_path, "--no-mixup", "--resume", str(tmp_path / "r"), name="r")).endswith(
        "differ from the checkpoint's: --mixup False (checkpoint: True)")
    assert meta_semi.train(meta_semi.parse_args(small(tmp_path, "--plots", "--resume", str(tmp_path / "r"), name="r")))["finished"]
    assert (tmp_path / "r" / "pseudo_labels.png").exists()  # what a run draws may change on resume, not what it trains
    fixmatch = load_algorithm("fixmatch")
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2", name="f")))
    assert error_of(meta_semi, small(tmp_path, "--resume", str(tmp_path / "f"), name="f")).endswith(
        "not a checkpoint of meta_semi.py (written by fixmatch.py)")
