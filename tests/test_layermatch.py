"""LayerMatch (algorithms/layermatch.py): Grad-ReLU's gradients, Avg-Clustering's head against a hand computation,
the ablations, and the run's state through a resume."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, error_of, full_and_resumed, load_algorithm, records, tiny, top_level_definitions


@pytest.fixture(scope="session")
def layermatch():
    return load_algorithm("layermatch")


def hyper(**kw):
    return types.SimpleNamespace(**{"ema_p": 0.999, "clip_thresh": 1.0, "batch_size": 4, "uratio": 2, "lambda_u": 1.0,
                                    "lambda_e": 0.001, "grad_relu": True, "avg_clustering": True, "ac_reset_every": 3,
                                    "ac_momentum": 0.9, "ac_lr": 0.5, "ac_weight": 1.0, **kw})


def tiny_problem(layermatch, classes=3):
    """A features/head network in float64 and one step's inputs; the state passes every sample (time_p 0)."""
    torch.manual_seed(0)
    model = layermatch.features_and_head(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh()),
                                         torch.nn.Linear(8, classes)).double()
    avg_head = copy.deepcopy(model.head)
    with torch.no_grad():
        for p in avg_head.parameters():
            p.add_(0.3 * torch.randn_like(p))  # beta_bar away from the live head, as between resets
    inputs, y_l = torch.randn(4 + 2 * 8, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    sat = {k: v.double() for k, v in layermatch.threshold_state(classes, "cpu").items()}
    sat["time_p"].fill_(0.0)
    return model, avg_head, inputs, y_l, sat


def gradients(layermatch, args, part="all"):
    model, avg_head, inputs, y_l, sat = tiny_problem(layermatch)
    loss, stats, mask, _ = layermatch.layermatch_loss(model.features(inputs), model.head, avg_head, y_l, sat, args)
    assert mask.sum() > 0
    loss = stats["loss_s"] if part == "supervised" else loss
    loss.backward()
    return {n: p.grad.clone() if p.grad is not None else None for n, p in [*model.named_parameters(),
            *(("avg_head." + n, p) for n, p in avg_head.named_parameters())]}


def test_definitions_shared_with_freematch_are_verbatim_copies():
    freematch = top_level_definitions(ROOT / "algorithms" / "freematch.py")
    layermatch = top_level_definitions(ROOT / "algorithms" / "layermatch.py")
    changed = sorted(name for name in freematch.keys() & layermatch.keys() if freematch[name] != layermatch[name])
    assert changed == ["Args", "train"]  # flags; one forward of the extractor, the heads, the averaged head's update
    assert sorted(layermatch.keys() - freematch.keys()) == ["layermatch_loss", "update_avg_head"]
    assert not freematch.keys() - layermatch.keys()


@pytest.mark.parametrize("avg_clustering", [True, False])
def test_grad_relu_gives_the_head_the_supervised_gradient_and_the_extractor_the_full_one(layermatch, avg_clustering):
    full = gradients(layermatch, hyper(avg_clustering=avg_clustering))
    supervised = gradients(layermatch, hyper(avg_clustering=avg_clustering), part="supervised")
    without = gradients(layermatch, hyper(avg_clustering=avg_clustering, grad_relu=False))
    for n in ("head.weight", "head.bias"):
        assert torch.equal(full[n], supervised[n]), n  # exactly: no unsupervised term reaches the head
        assert not torch.allclose(without[n], supervised[n]), n  # without Grad-ReLU they do
    for n in ("features.0.weight", "features.0.bias"):
        torch.testing.assert_close(full[n], without[n], rtol=1e-12, atol=1e-14)  # the full loss's gradient
        assert not torch.allclose(full[n], supervised[n]), n


def test_avg_clustering_trains_the_extractor_and_its_own_head_never_the_live_one(layermatch):
    on, off = gradients(layermatch, hyper(grad_relu=False)), gradients(layermatch, hyper(grad_relu=False, avg_clustering=False))
    assert torch.equal(on["head.weight"], off["head.weight"]) and torch.equal(on["head.bias"], off["head.bias"])
    assert not torch.allclose(on["features.0.weight"], off["features.0.weight"])
    assert on["avg_head.weight"].abs().sum() > 0 and off["avg_head.weight"] is None


@pytest.mark.parametrize("weight", [0.0, 3.0])
def test_w_ac_weighs_the_extractors_share_not_the_averaged_heads_own_step(layermatch, weight):
    one, other, off = (gradients(layermatch, hyper(ac_weight=w)) for w in (1.0, weight, 0.0))
    torch.testing.assert_close(other["avg_head.weight"], one["avg_head.weight"])  # the gradient of L_AC itself
    assert one["avg_head.weight"].abs().sum() > 0
    # the extractor takes w_ac times L_AC's gradient: linear in w_ac
    torch.testing.assert_close(other["features.0.weight"] - off["features.0.weight"],
                               weight * (one["features.0.weight"] - off["features.0.weight"]))


def test_avg_clustering_loss_is_the_averaged_heads_masked_cross_entropy(layermatch):
    args = hyper()
    model, avg_head, inputs, y_l, sat = tiny_problem(layermatch)
    sat["time_p"].fill_(0.42)  # some samples pass, some do not (confidences 0.36-0.50)
    features = model.features(inputs)
    _, stats, mask, pseudo_label = layermatch.layermatch_loss(features, model.head, avg_head, y_l, sat, args)
    assert 0 < mask.sum() < 8
    probs_w = torch.softmax(model.head(features[4:12]), 1)
    assert torch.equal(pseudo_label, probs_w.argmax(1))
    expected = (mask * F.cross_entropy(features[12:] @ avg_head.weight.T + avg_head.bias, pseudo_label, reduction="none")).sum() / 8
    torch.testing.assert_close(stats["loss_ac"], expected)


def test_averaged_head_resets_to_the_live_head_every_n_steps_and_otherwise_follows_its_update(layermatch):
    args = hyper(ac_reset_every=3, ac_momentum=0.9, ac_lr=0.5)
    head, avg_head = torch.nn.Linear(4, 3).double(), torch.nn.Linear(4, 3).double()
    for step in range(1, 8):
        grads = [torch.randn_like(p) for p in avg_head.parameters()]
        for p, g in zip(avg_head.parameters(), grads):
            p.grad = g.clone()
        before, live = [p.detach().clone() for p in avg_head.parameters()], [p.detach().clone() for p in head.parameters()]
        layermatch.update_avg_head(avg_head, head, step, args)
        for bar, b, g, h in zip(avg_head.parameters(), before, grads, live):
            if step % 3 == 0:
                assert torch.equal(bar, h)
            else:  # beta_tilde = beta_bar - alpha * grad; beta_bar <- m * beta_bar + (1 - m) * beta_tilde
                torch.testing.assert_close(bar.detach(), 0.9 * b + 0.1 * (b - 0.5 * g))
            assert bar.grad is None
        for p, h in zip(head.parameters(), live):
            assert torch.equal(p, h)  # the live head is never changed
        with torch.no_grad():
            for p in head.parameters():
                p.add_(1.0)  # the optimiser's step, between two of Avg-Clustering's


def test_training_starts_steps_1_n_plus_1_from_the_live_head(layermatch, tmp_path, monkeypatch):
    """In a run: the averaged head that step s's loss uses is the live head where s - 1 is a multiple of N, and the
    hand-computed update of the previous step's everywhere else."""
    seen, real = [], layermatch.layermatch_loss

    def recording(features, head, avg_head, *a):
        seen.append(([p.detach().clone() for p in head.parameters()], [p.detach().clone() for p in avg_head.parameters()]))
        return real(features, head, avg_head, *a)

    grads, real_update = [], layermatch.update_avg_head

    def update(avg_head, head, step, args):
        grads.append([p.grad.clone() for p in avg_head.parameters()])
        real_update(avg_head, head, step, args)

    monkeypatch.setattr(layermatch, "layermatch_loss", recording)
    monkeypatch.setattr(layermatch, "update_avg_head", update)
    layermatch.train(layermatch.parse_args(tiny(tmp_path, "--total-steps", "6", "--ac-reset-every", "2", "--ac-lr", "100",
                                                "--ac-momentum", "0.5")))
    for s in range(1, 7):
        live, bar = seen[s - 1]
        if (s - 1) % 2 == 0:
            assert all(torch.equal(a, b) for a, b in zip(live, bar)), s
        else:
            previous = seen[s - 2][1]
            for b, p, g in zip(bar, previous, grads[s - 2]):
                torch.testing.assert_close(b, 0.5 * p + 0.5 * (p - 100 * g))
            assert not all(torch.equal(a, b) for a, b in zip(live, bar)), s


def test_without_both_strategies_it_trains_what_freematch_trains(layermatch, tmp_path):
    freematch = load_algorithm("freematch")
    freematch.train(freematch.parse_args(tiny(tmp_path, "--total-steps", "3", name="free")))
    layermatch.train(layermatch.parse_args(tiny(tmp_path, "--total-steps", "3", "--no-grad-relu", "--no-avg-clustering",
                                                name="layer")))
    a = torch.load(tmp_path / "free" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "layer" / "checkpoint.pt", weights_only=False)
    for k in a["model"]:  # equal up to rounding: the head multiplies the labeled and unlabeled features apart here
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=1e-5, atol=1e-6)
    for k in ("time_p", "p_model", "label_hist"):
        torch.testing.assert_close(a[k], b[k])


@pytest.mark.parametrize("extra", [[], ["--no-grad-relu"], ["--no-avg-clustering"], ["--labeled-only"]])
def test_ablations_run_and_log_their_losses(layermatch, tmp_path, extra):
    summary = layermatch.train(layermatch.parse_args(tiny(tmp_path, *extra)))
    assert summary["finished"]
    train = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
    ac = "--no-avg-clustering" not in extra and "--labeled-only" not in extra
    assert all(("loss_ac" in r) == ac and ("avg_head_gap" in r) == ac for r in train), train


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(layermatch, tmp_path):
    common = ["--total-steps", "7", "--eval-every", "3", "--ac-reset-every", "3", "--ac-lr", "10"]
    full, resumed, a, b = full_and_resumed(layermatch, lambda name, *extra: tiny(tmp_path, *common, *extra, name=name), stop_after=5)
    for part in ("model", "ema_model", "avg_head"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert not torch.equal(a["avg_head"]["weight"], a["model"]["head.weight"])  # step 7 is not a reset
    for k in ("time_p", "p_model", "label_hist"):
        assert torch.equal(a[k], b[k]), k
    assert resumed["top1"] == full["top1"]


def test_bad_method_flags_get_one_clear_line(layermatch, tmp_path):
    assert "--ac-reset-every must be positive, got 0" in error_of(layermatch, tiny(tmp_path, "--ac-reset-every", "0"))
    assert "--ac-momentum must be in [0, 1], got 2.0" in error_of(layermatch, tiny(tmp_path, "--ac-momentum", "2"))
    assert "--ac-lr must be 0 or a positive finite number, got -1.0" in error_of(layermatch, tiny(tmp_path, "--ac-lr", "-1"))
    layermatch.train(layermatch.parse_args(tiny(tmp_path, "--stop-after", "1", name="r")))
    assert error_of(layermatch, tiny(tmp_path, "--no-grad-relu", "--resume", str(tmp_path / "r"), name="r")).endswith(
        "differ from the checkpoint's: --grad-relu False (checkpoint: True)")
    freematch = load_algorithm("freematch")
    freematch.train(freematch.parse_args(tiny(tmp_path, "--total-steps", "2", name="f")))
    assert error_of(layermatch, tiny(tmp_path, "--resume", str(tmp_path / "f"), name="f")).endswith(
        "not a checkpoint of layermatch.py (written by freematch.py)")
