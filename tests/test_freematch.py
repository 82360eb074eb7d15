"""FreeMatch (algorithms/freematch.py): self-adaptive thresholds and the fairness term against direct computations,
written here as USB writes them, and the run's state through a resume."""

import importlib.util
import math
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, error_of, full_and_resumed, load_algorithm, records, tiny, top_level_definitions


@pytest.fixture(scope="session")
def freematch():
    return load_algorithm("freematch")


def hyper(**kw):
    return types.SimpleNamespace(**{"ema_p": 0.9, "clip_thresh": 1.0, "batch_size": 2, "uratio": 3, "lambda_u": 1.0,
                                    "lambda_e": 0.5, **kw})


def usb_fairness(mask, logits_s, p_model, label_hist):
    """USB's entropy_loss, transcribed: the masked rows selected by indexing, 1/0 read as 0."""
    logits_s = logits_s[mask.bool()]
    prob_s = logits_s.softmax(dim=-1)
    hist_s = torch.bincount(prob_s.argmax(dim=-1), minlength=logits_s.shape[1]).to(logits_s.dtype)
    hist_s = hist_s / hist_s.sum()
    inf_to_zero = lambda v: torch.where(torch.isinf(v), torch.zeros_like(v), v)
    mod_prob_model = p_model * inf_to_zero(1 / label_hist)
    mod_prob_model = mod_prob_model / mod_prob_model.sum()
    mod_mean_prob_s = prob_s.mean(dim=0) * inf_to_zero(1 / hist_s)
    mod_mean_prob_s = mod_mean_prob_s / mod_mean_prob_s.sum()
    return (mod_prob_model * torch.log(mod_mean_prob_s + 1e-12)).sum()


def test_definitions_shared_with_fixmatch_are_verbatim_copies():
    fixmatch = top_level_definitions(ROOT / "algorithms" / "fixmatch.py")
    freematch = top_level_definitions(ROOT / "algorithms" / "freematch.py")
    changed = sorted(name for name in fixmatch.keys() & freematch.keys() if fixmatch[name] != freematch[name])
    assert changed == ["Args", "parse_args", "train"]  # flags and their dataset default; the step, its checkpointed state
    assert sorted(fixmatch.keys() - freematch.keys()) == ["fixmatch_loss"]
    assert sorted(freematch.keys() - fixmatch.keys()) == ["fairness_loss", "freematch_loss", "threshold_state",
                                                          "update_threshold_state"]


@pytest.mark.parametrize("clip", [1.0, 0.95])
def test_state_update_is_three_emas_of_the_weak_predictions(freematch, clip):
    classes = 4
    sat = freematch.threshold_state(classes, "cpu")
    assert sat["time_p"].item() == pytest.approx(0.25) and torch.equal(sat["p_model"], torch.full((4,), 0.25))
    sat["time_p"].fill_(0.99)  # above the clip
    sat["label_hist"].copy_(torch.tensor([0.4, 0.3, 0.2, 0.1]))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.05, 0.05, 0.8, 0.1]])  # class 3: nobody's
    freematch.update_threshold_state(sat, probs, hyper(clip_thresh=clip))
    time_p = 0.9 * 0.99 + 0.1 * (0.7 + 0.5 + 0.8) / 3
    assert sat["time_p"].item() == pytest.approx(min(time_p, clip))
    torch.testing.assert_close(sat["p_model"], 0.9 * torch.full((4,), 0.25) + 0.1 * probs.mean(0))
    torch.testing.assert_close(sat["label_hist"], 0.9 * torch.tensor([0.4, 0.3, 0.2, 0.1]) + 0.1 * torch.tensor([1, 1, 1, 0]) / 3)


def fairness_case(seed, classes=5, n=12):
    g = torch.Generator().manual_seed(seed)
    logits_s = (3 * torch.randn(n, classes, generator=g, dtype=torch.float64)).requires_grad_()
    p_model = torch.softmax(torch.randn(classes, generator=g, dtype=torch.float64), 0)
    label_hist = torch.softmax(torch.randn(classes, generator=g, dtype=torch.float64), 0)
    return logits_s, p_model, label_hist


@pytest.mark.parametrize("seed", range(4))
def test_fairness_term_is_usbs_with_its_gradient(freematch, seed):
    logits_s, p_model, label_hist = fairness_case(seed)
    mask = (torch.arange(12) % 3 != 0).double()
    label_hist[1] = 0.0  # a class that the histogram never saw: its 1/0 counts as 0
    ours = freematch.fairness_loss(logits_s, mask, p_model, label_hist)
    (g_ours,) = torch.autograd.grad(ours, logits_s)
    usb = usb_fairness(mask, logits_s, p_model, label_hist)
    (g_usb,) = torch.autograd.grad(usb, logits_s)
    torch.testing.assert_close(ours, usb)
    torch.testing.assert_close(g_ours, g_usb)
    assert ours.item() < 0  # -H(a, b): negative by design
    assert g_ours[mask == 0].abs().max() == 0  # unmasked samples take no part


def test_fairness_term_with_a_class_no_masked_sample_predicts(freematch):
    logits_s, p_model, label_hist = fairness_case(0)
    with torch.no_grad():
        logits_s[:, 2] -= 100  # nobody predicts class 2
    mask = torch.ones(12, dtype=torch.float64)
    ours = freematch.fairness_loss(logits_s, mask, p_model, label_hist)
    torch.testing.assert_close(ours, usb_fairness(mask, logits_s, p_model, label_hist))
    assert torch.isfinite(torch.autograd.grad(ours, logits_s)[0]).all()


def test_fairness_term_is_zero_with_a_zero_gradient_when_nothing_is_masked(freematch):
    logits_s, p_model, label_hist = fairness_case(1)
    loss = freematch.fairness_loss(logits_s, torch.zeros(12, dtype=torch.float64), p_model, label_hist)
    (grad,) = torch.autograd.grad(loss, logits_s)
    assert loss.item() == 0 and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("nothing_passes", [False, True])
def test_loss_updates_the_state_first_then_masks_with_it(freematch, nothing_passes):
    """Mask, pseudo-label and loss against a direct computation; the mask already uses this batch's state (USB)."""
    args, classes = hyper(), 4
    g = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(2 + 6 + 6, classes, generator=g, dtype=torch.float64)).requires_grad_()
    y_l = torch.tensor([0, 3])
    sat = freematch.threshold_state(classes, "cpu")
    sat = {k: v.double() for k, v in sat.items()}
    if nothing_passes:
        sat["time_p"].fill_(20.0)  # 0.9 * 20 + ...: above every confidence
    before = {k: v.clone() for k, v in sat.items()}
    loss, stats, mask, pseudo_label = freematch.freematch_loss(logits, y_l, sat, args)

    probs_w = torch.softmax(logits[2:8].detach(), 1)
    conf, yhat = probs_w.max(1)
    time_p = 0.9 * before["time_p"] + 0.1 * conf.mean()
    p_model = 0.9 * before["p_model"] + 0.1 * probs_w.mean(0)
    label_hist = 0.9 * before["label_hist"] + 0.1 * torch.bincount(yhat, minlength=classes) / 6
    tau = time_p * (p_model / p_model.max())[yhat]
    expected_mask = (conf >= tau).double()
    assert torch.equal(mask, expected_mask) and torch.equal(pseudo_label, yhat)
    assert (expected_mask.sum() == 0) == nothing_passes
    ce_u = F.cross_entropy(logits[8:], yhat, reduction="none")
    fair = usb_fairness(expected_mask, logits[8:], p_model, label_hist) if expected_mask.sum() else 0.0
    expected = F.cross_entropy(logits[:2], y_l) + (expected_mask * ce_u).mean() + 0.5 * fair
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(expected, logits)[0])
    torch.testing.assert_close(stats["time_p"], time_p)
    torch.testing.assert_close(sat["label_hist"], label_hist)


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.skipif(importlib.util.find_spec("sslkernels") is None, reason="the extension is not built")
@pytest.mark.parametrize("device", devices())
def test_kernel_and_fallback_agree_with_a_threshold_per_sample(freematch, device):
    import sslkernels

    g = torch.Generator().manual_seed(0)
    logits_s = (3 * torch.randn(64, 10, generator=g)).to(device).requires_grad_()
    probs_w = torch.softmax(3 * torch.randn(64, 10, generator=g), 1).to(device)
    tau = torch.rand(64, generator=g).to(device)
    ours = sslkernels.masked_ce(logits_s, probs_w, tau, math.inf)
    ref = freematch.masked_ce_reference(logits_s, probs_w, tau, math.inf)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    assert 0 < ref[1].sum() < 64  # some pass, some do not
    torch.testing.assert_close(torch.autograd.grad(ours[0].sum(), logits_s)[0], torch.autograd.grad(ref[0].sum(), logits_s)[0])


def test_run_logs_the_threshold_and_resumes_bitwise(freematch, tmp_path):
    argv = lambda name, *extra: tiny(tmp_path, "--total-steps", "6", "--eval-every", "3", *extra, name=name)
    full, resumed, a, b = full_and_resumed(freematch, argv, stop_after=4)
    for k in ("time_p", "p_model", "label_hist"):
        assert torch.equal(a[k], b[k]), k
    assert a["time_p"].item() != pytest.approx(1 / 4)  # the state moved and was saved
    for part in ("model", "ema_model"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert resumed["top1"] == full["top1"]
    train = [r for r in records(tmp_path / "full") if r["kind"] == "train"]
    assert all(0 < r["time_p"] < 1 and r["loss_fair"] <= 0 for r in train), train


def test_labeled_only_runs(freematch, tmp_path):
    assert freematch.train(freematch.parse_args(tiny(tmp_path, "--labeled-only")))["finished"]


@pytest.mark.parametrize("dataset, clip", [("svhn", 0.95), ("cifar10", 1.0), ("digits", 1.0)])
def test_threshold_clip_follows_usbs_configs(freematch, dataset, clip):
    assert freematch.parse_args(["--dataset", dataset]).clip_thresh == clip
    assert freematch.parse_args(["--dataset", dataset, "--clip-thresh", "0.8"]).clip_thresh == 0.8


def test_bad_method_flags_get_one_clear_line(freematch, tmp_path):
    assert "--clip-thresh must be -1 (the dataset's) or in (0, 1], got 0.0" in error_of(freematch, tiny(tmp_path, "--clip-thresh", "0"))
    assert "--ema-p must be in [0, 1], got 1.5" in error_of(freematch, tiny(tmp_path, "--ema-p", "1.5"))
    assert "--lambda-e must be 0 or a positive finite number, got nan" in error_of(freematch, tiny(tmp_path, "--lambda-e", "nan"))
    freematch.train(freematch.parse_args(tiny(tmp_path, "--stop-after", "1", name="r")))
    assert error_of(freematch, tiny(tmp_path, "--clip-thresh", "0.9", "--resume", str(tmp_path / "r"), name="r")).endswith(
        "differ from the checkpoint's: --clip-thresh 0.9 (checkpoint: 1.0)")
    fixmatch = load_algorithm("fixmatch")
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2", name="f")))
    assert error_of(freematch, tiny(tmp_path, "--resume", str(tmp_path / "f"), name="f")).endswith(
        "not a checkpoint of freematch.py (written by fixmatch.py)")
