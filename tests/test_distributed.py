"""torchrun: N ranks train what one process trains; checkpoints and resume under several ranks; a signal stops every
rank after the same step; a rank that dies ends the others. On the CPU: gloo, 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, error_of, load_algorithm, records, tiny, write_text_data, write_tiny_bert

# each method's flags for a few steps in which its unlabeled terms act (FixMatch's 0.95 would mask every sample)
METHOD_FLAGS = {"fixmatch": ["--tau", "0.5"], "meta_t": [], "meta_t exact": ["--meta-grad", "exact"],
                "meta_semi": ["--uratio", "1"], "freematch": [], "layermatch": []}
# what a method's checkpoint holds besides the model, optimiser and RNGs
METHOD_STATE = ["ema_model", "tgn", "prob_bank", "tau_bank", "time_p", "p_model", "label_hist", "avg_head"]


def torchrun(name, argv, ranks=2, wait=True):
    """algorithms/<name>.py under torchrun with `ranks` processes on this machine (a free port of its own), in a
    process group of its own, as a job in a terminal."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(ROOT / "algorithms" / f"{name}.py"), *argv]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    if not wait:
        return process
    output = process.communicate(timeout=600)[0]
    assert process.returncode == 0, output[-8000:]
    return output


def tensors(ckpt):
    """{name: tensor} of what a run learned and holds: the model, its EMA and the method's state."""
    out = {f"model.{k}": v for k, v in ckpt["model"].items()}
    for key in METHOD_STATE:
        value = ckpt.get(key)
        out.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value} if value is not None else {})
    return out


def largest_difference(a, b):
    a, b = tensors(a), tensors(b)
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).nan_to_num().abs().max().item() for k in a)


def checkpoint(out):
    return torch.load(Path(out) / "checkpoint.pt", weights_only=False)


# Float32 sums in another order (each rank's share, then the all-reduce) round differently: a few 1e-7 after 4 steps
# here. 1e-5 leaves room for that and is far below what training otherwise changes: 2 ranks without --sync-bn move
# the same weights by about 1e-2 (the test below).
TOLERANCE = 1e-5


@pytest.mark.parametrize("name", ["fixmatch", "meta_semi"])
def test_the_ranks_shares_make_up_the_batch_of_one_process(name, tmp_path):
    """Rank r of N draws the r-th of N slices of the global batch, augmentations and mixup's lambdas included."""
    algorithm = load_algorithm(name)
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    args = algorithm.parse_args(tiny(tmp_path, "--uratio", "1", "--batch-size", "8"))
    views = algorithm.augmentations(args, None)
    batch = lambda shard: algorithm.make_batch(7, x, np.arange(40) % 4, np.arange(8), np.arange(40), args,
                                               *(views if isinstance(views, tuple) else (views,)), shard=shard)
    whole, shares = batch((0, 1)), [batch((rank, 4)) for rank in range(4)]
    assert {"lam", "x_u"} <= whole.keys() if name == "meta_semi" else {"x_us", "idx_u"} <= whole.keys()
    for key in whole.keys() - {"idx_u"}:
        assert torch.equal(torch.cat([share[key] for share in shares]), whole[key]), key
    for share in shares if "idx_u" in whole else ():  # the global batch's unlabeled samples, for Meta-T's memory bank
        assert torch.equal(share["idx_u"], whole["idx_u"])


@pytest.mark.parametrize("method", METHOD_FLAGS)
def test_two_ranks_with_sync_bn_train_what_one_process_trains(method, tmp_path):
    name, flags = method.split()[0], METHOD_FLAGS[method]
    algorithm = load_algorithm(name)
    algorithm.train(algorithm.parse_args(tiny(tmp_path, *flags, name="one")))
    torchrun(name, tiny(tmp_path, *flags, "--sync-bn", name="two"))
    one, two = checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")
    assert largest_difference(one, two) < TOLERANCE
    assert len(two["rng_other_ranks"]) == 1 and "rng_other_ranks" not in one
    # the logs are the global batch's: losses, mask rates, pseudo-label accuracies, thresholds, test accuracy
    for r1, r2 in zip(records(tmp_path / "one"), records(tmp_path / "two"), strict=True):
        assert r1.keys() == r2.keys()
        for key in r1.keys() - {"steps_per_second"}:
            if isinstance(r1[key], float):
                assert r2[key] == pytest.approx(r1[key], rel=TOLERANCE, abs=TOLERANCE), (r1["step"], key)
            else:
                assert r2[key] == r1[key] or key == "tau_class_mean", (r1["step"], key)


def test_without_sync_bn_each_rank_normalises_its_own_share(tmp_path):
    """What --sync-bn changes: without it, BatchNorm's statistics are each rank's, and the weights differ."""
    fixmatch = load_algorithm("fixmatch")
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--tau", "0.5", name="one")))
    torchrun("fixmatch", tiny(tmp_path, "--tau", "0.5", name="two"))
    assert largest_difference(checkpoint(tmp_path / "one"), checkpoint(tmp_path / "two")) > 100 * TOLERANCE


def test_sync_bn_changes_nothing_in_one_process(tmp_path):
    fixmatch = load_algorithm("fixmatch")
    for name, extra in (("plain", []), ("sync", ["--sync-bn"])):
        fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *extra, name=name)))
    plain, sync = checkpoint(tmp_path / "plain"), checkpoint(tmp_path / "sync")
    assert all(torch.equal(plain["model"][k], sync["model"][k]) for k in plain["model"])


@pytest.fixture(scope="module")
def text_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    return {"bert": write_tiny_bert(root / "bert"), "text": write_text_data(root / "text")}


def test_resume_under_two_ranks_is_bitwise(text_folders, tmp_path):
    """A text encoder: DistributedDataParallel with parameters a forward may leave unused, and dropout, whose masks
    come from each rank's own generator, restored from the checkpoint."""
    argv = lambda name, *extra: ["--dataset", "text", "--data-dir", str(text_folders["text"]), "--pretrained",
                                 str(text_folders["bert"]), "--labels", "8", "--batch-size", "4", "--total-steps", "4",
                                 "--lr-warmup", "1", "--eval-every", "2", "--log-every", "1", "--workers", "0",
                                 "--output-dir", str(tmp_path / name), *extra]
    torchrun("fixmatch", argv("full"))
    torchrun("fixmatch", argv("cut", "--stop-after", "3"))
    assert checkpoint(tmp_path / "cut")["step"] == 3
    torchrun("fixmatch", ["--resume", str(tmp_path / "cut"), "--workers", "0"])
    full, cut = checkpoint(tmp_path / "full"), checkpoint(tmp_path / "cut")
    for key in ("model", "ema_model"):
        assert all(torch.equal(full[key][k], cut[key][k]) for k in full[key]), key
    assert records(tmp_path / "full") == [{**r, "steps_per_second": f["steps_per_second"]} if "steps_per_second" in r else r
                                          for r, f in zip(records(tmp_path / "cut"), records(tmp_path / "full"))]


def test_resume_on_another_number_of_ranks_continues_the_run(tmp_path):
    """One process stops, two ranks resume it (rank 1's generators then seeded from the step): the same run, up to
    rounding, as with --sync-bn the ranks share the global batch exactly."""
    fixmatch = load_algorithm("fixmatch")
    flags = lambda name, *extra: tiny(tmp_path, "--tau", "0.5", "--sync-bn", *extra, name=name)
    fixmatch.train(fixmatch.parse_args(flags("full")))
    fixmatch.train(fixmatch.parse_args(flags("cut", "--stop-after", "2")))
    output = torchrun("fixmatch", ["--resume", str(tmp_path / "cut"), "--workers", "0"])
    assert "x 2 ranks" in output
    resumed = checkpoint(tmp_path / "cut")
    assert resumed["step"] == 4 and len(resumed["rng_other_ranks"]) == 1
    assert largest_difference(checkpoint(tmp_path / "full"), resumed) < TOLERANCE


def wait_for_training(process, out, timeout=120):
    """Until rank 0 has logged a training step."""
    deadline = time.time() + timeout
    while not ((out / "metrics.jsonl").exists() and '"kind": "train"' in (out / "metrics.jsonl").read_text()):
        assert process.poll() is None and time.time() < deadline, "the run ended or never started"
        time.sleep(0.2)


def long_run(tmp_path, *extra):
    return tiny(tmp_path, "--total-steps", "100000", "--log-every", "5", "--eval-every", "1000", *extra)


@pytest.mark.parametrize("signum, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_stops_every_rank_after_the_same_step_with_one_checkpoint(signum, to_group, tmp_path):
    """A scheduler's SIGTERM to torchrun, which passes it on to every rank; Ctrl-C in a terminal, which reaches every
    process of the job (ranks and data workers), and torchrun passes it on once more. The ranks agree on the step,
    rank 0 saves."""
    out = tmp_path / "run"
    process = torchrun("fixmatch", long_run(tmp_path, "--workers", "1"), wait=False)
    wait_for_training(process, out)
    if to_group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0  # torchrun reports the signal
    summary = json.loads((out / "summary.json").read_text())
    ckpt = checkpoint(out)
    assert summary["stopped_by"] == signum.name and ckpt["step"] == summary["steps"] > 0
    assert len(ckpt["rng_other_ranks"]) == 1  # both ranks reached the checkpoint
    assert output.count("stopped after step") == 1, output[-3000:]  # rank 0 says so, once
    torchrun("fixmatch", ["--resume", str(out), "--stop-after", "2", "--workers", "0"])
    assert checkpoint(out)["step"] == summary["steps"] + 2


def rank_process(torchrun_process, rank):
    """The pid of the rank `rank` that torchrun started (its child with RANK=rank in the environment)."""
    for child in Path(f"/proc/{torchrun_process.pid}/task/{torchrun_process.pid}/children").read_text().split():
        if f"RANK={rank}".encode() in Path(f"/proc/{child}/environ").read_bytes().split(b"\0"):
            return int(child)
    raise AssertionError(f"no rank {rank} among torchrun's processes")


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' processes in /proc (Linux)")
def test_a_rank_that_dies_ends_the_others_with_an_error(tmp_path):
    out = tmp_path / "run"
    process = torchrun("fixmatch", long_run(tmp_path), wait=False)
    wait_for_training(process, out)
    rank_0, rank_1 = rank_process(process, 0), rank_process(process, 1)
    os.kill(rank_1, signal.SIGKILL)
    started = time.time()
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0 and time.time() - started < 60, output[-3000:]
    assert not Path(f"/proc/{rank_0}").exists() or "zombie" in Path(f"/proc/{rank_0}/status").read_text()
    assert "FAILED" in output  # torchrun's report, which names the rank that died


def test_bad_torchrun_settings_get_one_clear_line(tmp_path, monkeypatch):
    fixmatch = load_algorithm("fixmatch")
    for key, value in (("LOCAL_RANK", "1"), ("RANK", "1"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    assert "--batch-size 3 must be a multiple of the 2 ranks" in error_of(fixmatch, tiny(tmp_path, "--batch-size", "3"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "under torchrun each rank runs on the GPU of its local rank: --device cuda or cpu, not cuda:1" in error_of(
        fixmatch, tiny(tmp_path, "--device", "cuda:1"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "local rank 1, but this machine has 1 CUDA device(s)" in error_of(fixmatch, tiny(tmp_path, "--device", "cuda"))
