"""Behaviour of algorithms/fixmatch.py, the template of every algorithm file (CPU, seconds)."""

import ctypes
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, error_of, load_algorithm, signal_in_step

try:
    import sslkernels
except ImportError:
    sslkernels = None


def tiny(tmp_path, *extra, name="run"):
    """Flags of a few-step run on the generated dataset."""
    return ["--dataset", "synthetic", "--labels", "8", "--batch-size", "8", "--uratio", "2",
            "--total-steps", "4", "--eval-every", "2", "--log-every", "2", "--workers", "0",
            "--output-dir", str(tmp_path / name), *extra]


@pytest.mark.parametrize("extra", [
    [],
    ["--labeled-only"],
    ["--val-labels", "8", "--exclude-labeled"],
    ["--n1", "12", "--m1", "30", "--gamma-l", "4", "--gamma-u", "4"],
    ["--workers", "2", "--tensorboard"],
    ["--no-channels-last", "--net", "wrn28_2", "--total-steps", "2"],
    ["--compile", "--total-steps", "2"],
])
def test_code_paths_run_and_write_outputs(fixmatch, tmp_path, extra):
    summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *extra)))
    out = tmp_path / "run"
    assert summary["finished"] and summary["steps"] == summary["args"]["total_steps"]
    assert 0.0 <= summary["top1"] <= 1.0 and summary["seconds_per_step"] > 0
    assert summary["fused_kernels"] == (sslkernels is not None)
    assert json.loads((out / "summary.json").read_text())["best_top1"] == summary["best_top1"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    train = [r for r in records if r["kind"] == "train"]
    if "--labeled-only" in extra:
        assert "mask_rate" not in train[0]
    else:
        assert 0.0 <= train[0]["mask_rate"] <= 1.0 and "pseudo_label_acc_all" in train[0]
    if "--val-labels" in extra:
        assert "val_top1" in records[-1]
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.tmp").exists()


def test_fixmatch_learns_the_generated_data(fixmatch, tmp_path):
    """Not a smoke test: 60 steps on the easy generated data must beat chance (25%) by far."""
    summary = fixmatch.train(fixmatch.parse_args(tiny(
        tmp_path, "--total-steps", "60", "--eval-every", "60", "--log-every", "30", "--ema", "0.9")))
    assert summary["top1"] >= 0.9
    last = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["mask_rate"] > 0.5 and last["pseudo_label_acc"] > 0.9


def split(fixmatch, y, classes, *flags, seed=0):
    args = fixmatch.parse_args(["--dataset", "synthetic", *flags])
    return fixmatch.split_labeled(y, classes, args, np.random.default_rng(seed))


def test_balanced_split_counts(fixmatch):
    y = np.repeat(np.arange(5), 30)
    labeled, unlabeled, val = split(fixmatch, y, 5, "--labels", "20", "--val-labels", "10")
    assert np.bincount(y[labeled]).tolist() == [4] * 5 and np.bincount(y[val]).tolist() == [2] * 5
    assert len(set(labeled) | set(val) | set(unlabeled)) == 150  # labeled samples are also unlabeled
    assert not set(val) & set(unlabeled) and set(labeled) <= set(unlabeled)
    _, unl_ex, _ = split(fixmatch, y, 5, "--labels", "20", "--exclude-labeled")
    assert len(unl_ex) == 130 and not set(labeled) & set(unl_ex)
    again = split(fixmatch, y, 5, "--labels", "20", "--val-labels", "10")
    other = split(fixmatch, y, 5, "--labels", "20", "--val-labels", "10", seed=1)
    assert np.array_equal(again[0], labeled) and not np.array_equal(other[0], labeled)


def test_imbalanced_split_follows_meta_t_formula(fixmatch):
    """N_c = N_1 * gamma_l^(-(c-1)/(C-1)), M_c = M_1 * gamma_u^(-(c-1)/(C-1)) (Meta-T Sec. 5.3): two disjoint
    sets, so the unlabeled one holds exactly M_c samples of class c, without --exclude-labeled too."""
    y = np.repeat(np.arange(10), 500)
    labeled, unlabeled, _ = split(fixmatch, y, 10, "--n1", "150", "--m1", "300", "--gamma-l", "100",
                                  "--gamma-u", "10")
    n = np.bincount(y[labeled], minlength=10)
    m = np.bincount(y[unlabeled], minlength=10)
    assert n.tolist() == [int(150 * 100 ** (-c / 9)) for c in range(10)] and n[0] == 150 and n[-1] == 1
    assert m.tolist() == [int(300 * 10 ** (-c / 9)) for c in range(10)] and m[-1] == 30
    assert not set(labeled) & set(unlabeled)


def test_batches_are_a_function_of_seed_and_step(fixmatch, tmp_path):
    x, y, *_ = fixmatch.make_synthetic()
    args = fixmatch.parse_args(tiny(tmp_path, "--total-steps", "10"))
    lab, unl = np.arange(8), np.arange(len(x))
    a = fixmatch.TrainBatches(x, y, lab, unl, args, True, 0)
    b = fixmatch.TrainBatches(x, y, lab, unl, args, True, 5)  # a resumed run starting at step 5
    for key in ("x_l", "y_l", "x_uw", "x_us", "idx_u"):
        assert torch.equal(a[7][key], b[2][key])
    assert not torch.equal(a[7]["x_us"], a[8]["x_us"])
    # the labeled batch cycles through epochs: every labeled sample appears once per epoch
    assert sorted(fixmatch.sample_indices(8, 8, 3, 0, 0).tolist()) == list(range(8))


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_augmentation_streams_are_distinct_across_seeds_and_steps(name):
    import random
    draw = load_algorithm(name).augmentation_rng  # every algorithm file has its own copy
    # earlier runs keep their augmentations: below step 1_000_003 the key is what it always was
    assert draw(3, 17).random() == random.Random(3 * 1_000_003 + 17).random()
    # that key gave seed 0's step 1_000_003 the stream of seed 1's step 0 (and so on up to the default T = 2^20)
    assert draw(0, 1_000_003).random() != draw(1, 0).random()
    pairs = [(s, t) for s in (0, 1, 2, 2**32 - 1) for t in (0, 1, 1_000_002, 1_000_003, 1_000_004, 2**20, 2_000_006)]
    assert len({draw(s, t).random() for s, t in pairs}) == len(pairs)


def test_augmentations_keep_shape_and_dtype(fixmatch):
    import random
    rng = random.Random(0)
    for shape in [(8, 8, 1), (32, 32, 3)]:
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for _ in range(20):
            for aug in (fixmatch.weak_augment, fixmatch.strong_augment):
                out = aug(img, rng, True)
                assert out.shape == shape and out.dtype == np.uint8


def test_weak_crop_equals_a_crop_of_the_reflect_padded_image(fixmatch):
    import random
    for shape in [(8, 8, 1), (32, 32, 3), (12, 20, 3)]:
        img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
        pad = max(1, int(0.125 * shape[1]))
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
        seen = set()
        for seed in range(60):
            rng, twin = random.Random(seed), random.Random(seed)
            i, j = twin.randint(0, 2 * pad), twin.randint(0, 2 * pad)
            seen.add((i, j))
            expected = padded[i:i + shape[0], j:j + shape[1]]
            assert np.array_equal(fixmatch.weak_augment(img, rng, False), expected)
        assert len(seen) > 4  # the offsets did vary


def test_randaugment_ops_equal_torchvision_on_pil_images(fixmatch):
    """The colour operations are computed in numpy for speed; every operation must give the pixels
    torchvision's function of the same name gives on the PIL image (the geometric ones: USB's PIL
    call), at every magnitude."""
    import torchvision.transforms.functional as TF
    affine = lambda img, *coefficients: img.transform(img.size, Image.Transform.AFFINE, coefficients)
    reference = [
        lambda img, v: img, lambda img, v: TF.autocontrast(img), lambda img, v: TF.equalize(img),
        TF.adjust_brightness, TF.adjust_saturation, TF.adjust_contrast, TF.adjust_sharpness,
        lambda img, v: TF.posterize(img, int(v)), TF.solarize, lambda img, v: img.rotate(v),
        lambda img, v: affine(img, 1, v, 0, 0, 1, 0), lambda img, v: affine(img, 1, 0, 0, v, 1, 0),
        lambda img, v: affine(img, 1, 0, v * img.size[0], 0, 1, 0),
        lambda img, v: affine(img, 1, 0, 0, 0, 1, v * img.size[1])]
    assert len(reference) == len(fixmatch.RANDAUGMENT_OPS)
    gen = np.random.default_rng(0)
    images = [gen.integers(lo, hi, shape, dtype=np.uint8)  # random ranges: means with every fraction
              for lo, hi in [(0, 256), (30, 200), (0, 90), (150, 256)] for shape in [(8, 8, 1), (12, 12, 3)]]
    images += [gen.integers(0, 256, (32, 32, 3), dtype=np.uint8),
              (gen.random((16, 16, 3)) ** 4 * 255).astype(np.uint8),  # skewed histogram
              gen.integers(100, 103, (12, 12, 1), dtype=np.uint8),  # three grey levels
              np.full((8, 8, 3), 77, np.uint8)]  # constant: autocontrast and equalize leave it
    for ref, (op, low, high) in zip(reference, fixmatch.RANDAUGMENT_OPS):
        for img in images:
            h, w, c = img.shape
            for v in np.linspace(low, high, 9):
                expected = np.asarray(ref(Image.fromarray(img.reshape(h, w) if c == 1 else img), float(v)))
                assert np.array_equal(op(img, float(v)), expected.reshape(h, w, c)), (ref, img.shape, v)


def test_randaugment_shears_pivot_on_the_top_left_corner(fixmatch):
    """FixMatch's and USB's shear keeps the first row (column) in place and moves the last by ~0.3 of the
    side; torchvision's affine would pivot on the centre, a milder augmentation that moves both."""
    img = np.random.default_rng(0).integers(1, 256, (32, 32, 1), dtype=np.uint8)  # no black pixel
    shear_x, shear_y = (op for op, low, high in fixmatch.RANDAUGMENT_OPS[10:12])
    for out in (shear_x(img, 0.3), shear_y(img.transpose(1, 0, 2), 0.3).transpose(1, 0, 2)):
        assert np.array_equal(out[0], img[0])
        # output pixel (x, 31) reads input x + 0.3 * 31.5 (pixel centres), rounded down: x + 9
        assert np.array_equal(out[31, :23], img[31, 9:]) and not out[31, 23:].any()
    posterize = fixmatch.RANDAUGMENT_OPS[7]
    assert posterize[1:] == (4, 8)  # USB's range: int(v) keeps 4 to 7 bits, never the identity 8


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return os.nice(0), signal.getsignal(signal.SIGINT)


def test_data_workers_run_below_the_training_process_and_leave_it_ctrl_c(fixmatch):
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                         worker_init_fn=fixmatch.worker_init)
    assert next(iter(loader)) == [min(19, os.nice(0) + 19), signal.SIG_IGN]  # the collate makes a list


def test_threads_flag(fixmatch, tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--threads", "1", "--total-steps", "1")))
        assert summary["args"]["threads"] == 1 == torch.get_num_threads()
        assert "--threads must be 0" in error_of(fixmatch, tiny(tmp_path, "--threads", "-1"))
    finally:
        torch.set_num_threads(threads)


def test_torch_deterministic_flag_sets_cudnn(fixmatch, tmp_path):
    before = torch.backends.cudnn.deterministic
    try:
        for flag, expected in (("--no-torch-deterministic", False), ("--torch-deterministic", True)):
            fixmatch.train(fixmatch.parse_args(tiny(tmp_path, flag, "--total-steps", "1", "--overwrite")))
            assert torch.backends.cudnn.deterministic is expected
    finally:
        torch.backends.cudnn.deterministic = before


def state_tensors(ckpt):
    yield from ckpt["model"].items()
    yield from ckpt["ema_model"].items()
    for i, s in ckpt["optimizer"]["state"].items():
        yield f"momentum{i}", s["momentum_buffer"]


def same_end(full_dir, resumed_dir):
    """The step of two runs' checkpoints, after checking that they hold it both, with bitwise the same weights, EMA
    weights and momentum."""
    a = torch.load(full_dir / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed_dir / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"]
    for (name, ta), (_, tb) in zip(state_tensors(a), state_tensors(b), strict=True):
        assert torch.equal(ta, tb), name
    return a["step"]


def test_resume_is_bitwise_equal_to_an_uninterrupted_run(fixmatch, tmp_path):
    common = ["--total-steps", "7", "--eval-every", "3"]
    full = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, name="full")))
    # interrupted after 4 steps (loaded with workers this time), then resumed from its checkpoint
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, "--stop-after", "4", "--workers", "2", name="cut")))
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 4
    with (tmp_path / "cut" / "metrics.jsonl").open("a") as f:  # a log line the interruption cut short
        f.write('{"step": 5, "kind": "tra')
    # moved, then resumed by its folder alone: the flags left out are the checkpoint's (--workers is this
    # invocation's: 0, not the default 4), the output goes where the folder is now
    (tmp_path / "cut").rename(tmp_path / "moved")
    resumed = fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "moved"), "--workers", "0"]))
    assert not (tmp_path / "cut").exists() and resumed["args"]["output_dir"] == str(tmp_path / "moved")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "moved" / "checkpoint.pt", weights_only=False)
    assert a["step"] == b["step"] == 7 and sorted(a) == sorted(fixmatch.CHECKPOINT_KEYS)
    for (name, ta), (_, tb) in zip(state_tensors(a), state_tensors(b), strict=True):
        assert torch.equal(ta, tb), name
    assert resumed["top1"] == full["top1"]
    steps = [json.loads(l)["step"] for l in (tmp_path / "moved" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [json.loads(l)["step"] for l in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    # a finished run has nothing to continue: refused, its summary left as it was
    summary = (tmp_path / "moved" / "summary.json").read_text()
    assert error_of(fixmatch, ["--resume", str(tmp_path / "moved")]).endswith("that run has finished all its 7 steps")
    assert (tmp_path / "moved" / "summary.json").read_text() == summary


def test_ctrl_c_ends_the_step_with_a_checkpoint_that_resumes_exactly(fixmatch, tmp_path, monkeypatch):
    common = ["--total-steps", "7", "--eval-every", "5"]
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, name="full")))
    handler = signal.getsignal(signal.SIGINT)
    signal_in_step(fixmatch, monkeypatch, signal.SIGINT, 3)  # Ctrl-C in step 3
    with pytest.raises(SystemExit) as stop:
        fixmatch.main(tiny(tmp_path, *common, name="cut"))
    monkeypatch.undo()
    assert stop.value.code == 128 + signal.SIGINT and signal.getsignal(signal.SIGINT) is handler
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGINT" and summary["steps"] == 3 and not summary["finished"]
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] == 3
    fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "cut"), "--workers", "0"]))
    assert same_end(tmp_path / "full", tmp_path / "cut") == 7
    received = []  # a second Ctrl-C does not wait for the step
    with pytest.raises(KeyboardInterrupt), fixmatch.deferred_stop_signals(received):
        os.kill(os.getpid(), signal.SIGINT)
        assert received == ["SIGINT"]
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # not reached
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_batch_lost_to_sigterm_ends_the_run_before_its_step(fixmatch, tmp_path, monkeypatch):
    # the job's SIGTERM ended the data workers while the training process waited for a batch
    common = ["--total-steps", "7", "--eval-every", "5"]
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, name="full")))
    real_getitem = fixmatch.TrainBatches.__getitem__

    def lose_batch(lost, signum=signal.SIGTERM):  # item i is the batch of step i + 1
        def getitem(self, i):
            if i == lost:
                if signum:
                    os.kill(os.getpid(), signum)
                raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
            return real_getitem(self, i)
        return getitem

    monkeypatch.setattr(fixmatch.TrainBatches, "__getitem__", lose_batch(3))
    with pytest.raises(SystemExit) as stop:
        fixmatch.main(tiny(tmp_path, *common, name="cut"))
    assert stop.value.code == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 3
    # the first batch lost: no step ran, and still a checkpoint to resume from
    monkeypatch.setattr(fixmatch.TrainBatches, "__getitem__", lose_batch(0))
    with pytest.raises(SystemExit):
        fixmatch.main(tiny(tmp_path, *common, name="none"))
    assert torch.load(tmp_path / "none" / "checkpoint.pt", weights_only=False)["step"] == 0
    # without a signal, a lost batch is an error of its own
    monkeypatch.setattr(fixmatch.TrainBatches, "__getitem__", lose_batch(3, signum=None))
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, name="failed")))
    monkeypatch.undo()
    for cut in ("cut", "none"):
        fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / cut), "--workers", "0"]))
        assert same_end(tmp_path / "full", tmp_path / cut) == 7


def test_checkpoint_write_is_atomic(fixmatch, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    fixmatch.save_checkpoint(path, {"model": {"w": torch.ones(2)}})

    def crash(obj, f):
        with open(f, "wb") as partial:
            partial.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    assert torch.equal(torch.load(path)["model"]["w"], torch.ones(2))


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_rewritten_text_files_are_atomic(name, tmp_path, monkeypatch):
    algorithm = load_algorithm(name)
    path = tmp_path / "summary.json"
    algorithm.write_text_atomically(path, "the earlier summary")
    real_write_text = type(path).write_text

    def crash(self, text, *a, **kw):
        real_write_text(self, text[:3])
        raise KeyboardInterrupt

    monkeypatch.setattr(type(path), "write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        algorithm.write_text_atomically(path, "the new summary")
    assert path.read_text() == "the earlier summary"


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_checkpoints_hold_the_cuda_generator_of_the_runs_device_only(name, monkeypatch):
    algorithm, restored = load_algorithm(name), []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, str(device))))
    cuda1 = torch.device("cuda:1")
    saved = algorithm.rng_states(cuda1)
    assert saved["cuda"] == "state of cuda:1" and algorithm.rng_states(torch.device("cpu"))["cuda"] is None
    algorithm.set_rng_states(saved, cuda1)
    # older checkpoints held one state per visible GPU: the run's device's is restored where it is in the list;
    # resumed where fewer GPUs are visible (this used to fail inside torch), the CUDA generator stays as seeded
    algorithm.set_rng_states({**saved, "cuda": ["of gpu 0", "of gpu 1"]}, cuda1)
    algorithm.set_rng_states({**saved, "cuda": ["of gpu 0"]}, cuda1)
    algorithm.set_rng_states({**saved, "cuda": []}, torch.device("cpu"))
    assert restored == [("state of cuda:1", "cuda:1"), ("of gpu 1", "cuda:1")]


def test_device_errors_get_one_clear_line(fixmatch, tmp_path, monkeypatch):
    for device in ("foo", "mps", "cuda:-1"):  # mps: this file handles the RNGs of the CPU and CUDA only
        assert "--device must be cpu, cuda or cuda:<index>" in error_of(fixmatch, tiny(tmp_path, "--device", device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert error_of(fixmatch, tiny(tmp_path, "--device", "cuda")).endswith("--device cuda: no CUDA device is available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert error_of(fixmatch, tiny(tmp_path, "--device", "cuda:1")).endswith(
        "--device cuda:1: this machine has 1 CUDA device(s), from cuda:0")


def test_bad_input_gets_one_clear_line(fixmatch, tmp_path):
    for flags, message in [
        (("--dataset", "mnist"), "unknown --dataset 'mnist'"),
        (("--labels", "10"), "multiple of the 4 classes"),
        (("--labels", "400"), "fewer than the 100 labeled"),
        (("--net", "resnet"), "unknown --net"),
        (("--batch-size", "0"), "--batch-size must be positive"),
        (("--workers", "-1"), "--workers must be 0 or positive"),
        (("--seed", "-1"), "--seed must be in [0, 2^32)"),
        (("--ema", "1.5"), "--ema is a decay in [0, 1]"),
        (("--stop-after", "-1"), "--stop-after must be 0 or positive"),
        (("--image-size", "0"), "--image-size must be positive"),  # was blamed on the first image of a folder
        # NaN passes a `<= 0` test; these trained on with NaN weights or failed inside torch.optim
        (("--lr", "nan"), "--lr must be 0 or a positive finite number"),
        (("--lr", "-1"), "--lr must be 0 or a positive finite number"),
        (("--lambda-u", "inf"), "--lambda-u must be 0 or a positive finite number"),
        (("--momentum", "0"), "--momentum must be in (0, 1)"),
        (("--weight-decay", "nan"), "--weight-decay must be -1 (the dataset's default), 0 or a positive finite"),
        (("--weight-decay", "-0.5"), "--weight-decay must be -1 (the dataset's default), 0 or a positive finite"),
        (("--tau", "nan"), "--tau must be a number"),
        (("--val-labels", "-4"), "0 or a positive multiple"),
        # the imbalanced split needs both sizes: --n1 alone used to leave no unlabeled data beyond the labeled
        (("--n1", "12"), "needs --m1 > 0"),
        (("--m1", "30"), "needs both --n1 > 0 and --m1 > 0"),
        (("--n1", "12", "--m1", "30", "--gamma-l", "nan"), "positive finite --gamma-l and --gamma-u"),
        (("--n1", "1", "--m1", "30", "--gamma-l", "100"), "leaves class 1 without a labeled sample"),
        (("--labels", "192", "--exclude-labeled"), "no training sample is left for the unlabeled set"),
        # ConvLarge's unpadded 3x3 convolution needs more than the 2x2 maps left of 8x8 images
        (("--net", "convlarge"), "--net convlarge does not fit the 8x8 images"),
    ]:
        assert message in error_of(fixmatch, tiny(tmp_path, *flags)), flags
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "corrupt or not a checkpoint" in error_of(fixmatch, tiny(tmp_path, "--resume", str(bad)))
    torch.save({"model": {}, "step": 3}, bad)  # someone else's checkpoint, or one of an older version
    assert error_of(fixmatch, tiny(tmp_path, "--resume", str(bad))).endswith(
        "not a checkpoint of fixmatch.py (no algorithm, ema_model, optimizer, scheduler, rng, best_top1, seconds, args)")
    assert "no checkpoint file" in error_of(fixmatch, tiny(tmp_path, "--resume", str(tmp_path / "none")))
    assert f"cannot write to --output-dir {bad}" in error_of(fixmatch, tiny(tmp_path, "--output-dir", str(bad)))
    assert "needs class folders" in error_of(fixmatch, tiny(tmp_path, "--dataset", "folder", "--data-dir",
                                                          str(tmp_path)))
    # resuming with flags that define another run is refused
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2", name="r")))
    msg = error_of(fixmatch, tiny(tmp_path, "--seed", "3", "--resume", str(tmp_path / "r"), name="r"))
    assert msg.endswith("differ from the checkpoint's: --total-steps 4 (checkpoint: 2), --seed 3 (checkpoint: 0)")
    # including the ones the optimizer's saved state would silently override (lr) and the method's own (tau)
    for flag, value, saved in (("--lr", "0.1", "0.03"), ("--tau", "0.5", "0.95"), ("--gamma-u", "3.0", "100.0")):
        msg = error_of(fixmatch, tiny(tmp_path, flag, value, "--total-steps", "2", "--resume", str(tmp_path / "r"),
                                      name="r"))
        assert msg.endswith(f"differ from the checkpoint's: {flag} {value} (checkpoint: {saved})")


def test_logged_lr_is_the_one_the_step_used(fixmatch, tmp_path):
    """Cosine decay lr * cos(7 pi t / 16 T) with t = step - 1 counted from 0 (FixMatch, USB)."""
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "6", "--log-every", "3")))
    train = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(l)["kind"] == "train"]
    assert [r["step"] for r in train] == [3, 6]
    for r in train:
        assert r["lr"] == pytest.approx(0.03 * math.cos(7 * math.pi * (r["step"] - 1) / (16 * 6)))


def test_outputs_are_strict_json(fixmatch, tmp_path):
    """No pseudo-label passes tau = 1.1, so their accuracy is undefined: written as null, not as NaN (not JSON)."""
    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON output"))

    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--tau", "1.1")))
    train = [strict(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert train[0]["mask_rate"] == 0 and train[0]["pseudo_label_acc"] is None
    strict((tmp_path / "run" / "summary.json").read_text())


def test_command_line_error_has_no_traceback():
    p = subprocess.run([sys.executable, str(ROOT / "algorithms" / "fixmatch.py"), "--dataset", "mnist"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines() == [p.stderr.strip()] and "unknown --dataset" in p.stderr


def test_sigterm_to_the_process_group_stops_with_a_checkpoint_and_one_line(tmp_path):
    # a scheduler's preemption or a cancelled job signals every process of the job, the data workers too
    run = subprocess.Popen([sys.executable, str(ROOT / "algorithms" / "fixmatch.py"), *tiny(tmp_path, "--total-steps",
                            "100000", "--log-every", "1", "--eval-every", "100000", "--workers", "2")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "metrics.jsonl").is_file() or not (tmp_path / "run" / "metrics.jsonl").read_text():
            assert run.poll() is None and time.time() < deadline, "the run did not start"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 128 + signal.SIGTERM, stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM"
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == summary["steps"]
    assert stderr == "" and stdout.splitlines()[-1] == (f"[fixmatch] SIGTERM: stopped after step {summary['steps']} "
                                                        f"with a checkpoint; --resume {tmp_path / 'run'} continues the run")


def test_missing_torchvision_data_offline_says_where_to_put_it(fixmatch, tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def offline(*a, **kw):
        raise RuntimeError("Dataset not found" if not kw.get("download") else "URLError: no network")

    monkeypatch.setattr(tvd, "CIFAR10", offline)
    msg = error_of(fixmatch, tiny(tmp_path, "--dataset", "cifar10", "--data-dir", str(tmp_path / "d")))
    assert "could not load cifar10" in msg and str(tmp_path / "d") in msg and "--dataset digits" in msg


def test_folder_dataset(fixmatch, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for c, colour in enumerate(["red", "blue"]):
            d = tmp_path / "data" / split / colour
            d.mkdir(parents=True)
            for i in range(n):
                arr = rng.integers(0, 80, (12, 10, 3), dtype=np.uint8)
                arr[..., 0 if c == 0 else 2] += 150
                Image.fromarray(arr).save(d / f"{i}.png")
    (tmp_path / "data" / "train" / "red" / "broken.png").write_bytes(b"nope")
    argv = tiny(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--labels", "4",
                "--image-size", "8")
    assert "cannot read image" in error_of(fixmatch, argv)
    (tmp_path / "data" / "train" / "red" / "broken.png").unlink()
    # as torchvision's ImageFolder: images at any depth, other files and hidden ones left out
    (tmp_path / "data" / "train" / "red" / ".DS_Store").write_bytes(b"a file manager's, not an image")
    (tmp_path / "data" / "train" / "red" / "notes.txt").write_text("where the images came from")
    (tmp_path / "data" / "train" / "blue" / "more").mkdir()
    shutil.copy(tmp_path / "data" / "train" / "blue" / "0.png", tmp_path / "data" / "train" / "blue" / "more" / "0.PNG")
    summary = fixmatch.train(fixmatch.parse_args(argv))
    assert summary["finished"] and len(summary["per_class_acc"]) == 2
    assert json.loads((tmp_path / "run" / "split.json").read_text())["unlabeled_count"] == 13  # 6 + 6 + 1


def test_folder_dataset_errors(fixmatch, tmp_path, monkeypatch):
    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
    argv = tiny(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--labels", "2")
    assert error_of(fixmatch, argv).endswith(f"the class folders in {tmp_path / 'data' / 'train'} hold no images")
    real_iterdir = type(tmp_path).iterdir

    def unreadable(path):
        if path.name == "cat":
            raise PermissionError(13, "Permission denied", str(path))
        return real_iterdir(path)

    monkeypatch.setattr(type(tmp_path), "iterdir", unreadable)
    assert f"cannot list {tmp_path / 'data' / 'train' / 'cat'}: [Errno 13] Permission denied" in error_of(fixmatch, argv)


def test_a_fresh_run_never_replaces_another_runs_checkpoint_unasked(fixmatch, tmp_path, monkeypatch):
    first = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2")))
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    msg = error_of(fixmatch, tiny(tmp_path, "--seed", "1"))
    assert msg.endswith(f"{tmp_path / 'run'} holds an earlier run's checkpoint: --resume {tmp_path / 'run'} "
                        "continues it, --overwrite replaces it with this run, or choose another --output-dir")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved
    second = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--seed", "1", "--stop-after", "1", "--overwrite")))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert first["steps"] == 2 and second["steps"] == ckpt["step"] == 1 and ckpt["args"]["seed"] == 1
    assert [json.loads(l)["step"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()] == [1]
    # the replaced run's checkpoint and summary go at the start: a run interrupted before its first checkpoint leaves
    # neither, rather than the earlier run's beside its own records
    def interrupted(path, state):
        raise KeyboardInterrupt

    monkeypatch.setattr(fixmatch, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--seed", "2", "--stop-after", "1", "--overwrite")))
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_resuming_into_another_runs_folder_needs_overwrite(fixmatch, tmp_path):
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--stop-after", "2", name="a")))
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--seed", "5", "--stop-after", "3", name="b")))
    saved, a_records = (tmp_path / "b" / "checkpoint.pt").read_bytes(), (tmp_path / "a" / "metrics.jsonl").read_text()
    continue_a = ["--resume", str(tmp_path / "a"), "--workers", "0", "--output-dir"]
    msg = error_of(fixmatch, continue_a + [str(tmp_path / "b")])
    assert msg.endswith(f"--output-dir {tmp_path / 'b'} holds another run's checkpoint, which continuing --resume "
                        f"{tmp_path / 'a'} there would replace: --overwrite replaces it, or choose another --output-dir")
    assert (tmp_path / "b" / "checkpoint.pt").read_bytes() == saved
    # into a new folder, and with --overwrite into b: each becomes a's continuation, with a's records up to its
    # checkpoint and none of b's; a itself stays as it was
    fixmatch.train(fixmatch.parse_args(continue_a + [str(tmp_path / "c")]))
    summary = fixmatch.train(fixmatch.parse_args(continue_a + [str(tmp_path / "b"), "--overwrite"]))
    records = (tmp_path / "b" / "metrics.jsonl").read_text()
    untimed = lambda text: [{k: v for k, v in json.loads(l).items() if k != "steps_per_second"} for l in text.splitlines()]
    assert untimed(records) == untimed((tmp_path / "c" / "metrics.jsonl").read_text()) and records.startswith(a_records)
    assert [json.loads(l)["step"] for l in records.splitlines()] == [2, 2, 4, 4]  # train and eval records
    assert summary["args"]["seed"] == json.loads((tmp_path / "b" / "summary.json").read_text())["args"]["seed"] == 0
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["step"] == 4
    assert (tmp_path / "a" / "metrics.jsonl").read_text() == a_records


def test_resuming_on_changed_data_is_refused(fixmatch, tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for colour in ("red", "blue"):
            (tmp_path / "data" / split / colour).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(
                    tmp_path / "data" / split / colour / f"{i}.png")
    argv = tiny(tmp_path, "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--labels", "4")
    fixmatch.train(fixmatch.parse_args([*argv, "--stop-after", "2"]))
    shutil.copy(tmp_path / "data" / "train" / "red" / "0.png", tmp_path / "data" / "train" / "red" / "6.png")
    msg = error_of(fixmatch, [*argv, "--resume", str(tmp_path / "run")])
    assert msg.endswith(f"--resume {tmp_path / 'run'}: the data has changed since that run began (its labeled, "
                        f"validation or unlabeled set differs from {tmp_path / 'run' / 'split.json'}); resume it on "
                        "the same data")
    (tmp_path / "data" / "train" / "red" / "6.png").unlink()
    assert fixmatch.train(fixmatch.parse_args([*argv, "--resume", str(tmp_path / "run")]))["finished"]


def test_summary_has_no_best_top1_before_any_evaluation(fixmatch, tmp_path):
    summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--stop-after", "1", "--eval-every", "3")))
    assert summary["top1"] is None and summary["best_top1"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_top1"] is None


def test_eval_line_notes_an_ema_still_mostly_initial_weights(fixmatch, tmp_path, capsys):
    # --ema 0.7: the initial weights hold 0.7 ** 2 = 49% of the EMA at step 2 and 24% at step 4
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--ema", "0.7")))
    evals = [line for line in capsys.readouterr().out.splitlines() if " eval step " in line]
    assert len(evals) == 2
    assert evals[0].endswith("(the EMA weights are still 49% initial weights: --ema 0.7 scores low this early)")
    assert "EMA" not in evals[1]


def test_digits_is_offline_with_a_fixed_test_split(fixmatch):
    train_x, train_y, test_x, test_y, _ = fixmatch.load_digits()
    assert train_x.shape == (1300, 8, 8, 1) and test_x.shape == (497, 8, 8, 1) and train_x.dtype == np.uint8
    assert np.bincount(test_y).min() >= 48 and train_x.max() == 255
    assert np.array_equal(fixmatch.load_digits()[3], test_y)


@pytest.mark.parametrize("net,size,channels", [("wrn28_2", 32, 3), ("wrn37_2", 32, 3), ("convlarge", 32, 3),
                                               ("cnn_small", 8, 1)])
def test_networks_expose_features_and_head(fixmatch, net, size, channels):
    model = fixmatch.NETS[net](channels, 7).eval()
    x = torch.randn(2, channels, size, size)
    feats = model.features(x)
    assert feats.ndim == 2 and isinstance(model.head, torch.nn.Linear)
    assert torch.allclose(model.head(feats), model(x))
    if net.startswith("wrn"):
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(m.momentum == 0.001 for m in bns)
        assert all(isinstance(m, torch.nn.LeakyReLU) and m.negative_slope == 0.1
                   for m in model.modules() if isinstance(m, torch.nn.LeakyReLU))


def test_weight_decay_skips_batchnorm_and_bias(fixmatch):
    args = fixmatch.parse_args(["--weight-decay", "5e-4", "--total-steps", "100"])
    model = fixmatch.SmallCNN(1, 10)
    opt, sched = fixmatch.make_optimizer(model, args)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    layers = (torch.nn.Conv2d, torch.nn.Linear)
    expected = {id(m.weight) for m in model.modules() if isinstance(m, layers)}
    assert decayed == expected and len(opt.param_groups[1]["params"]) == len(list(model.parameters())) - len(expected)
    assert opt.param_groups[1]["weight_decay"] == 0 and opt.defaults["nesterov"]
    for _ in range(50):
        opt.step()
        sched.step()
    assert math.isclose(sched.get_last_lr()[0], 0.03 * math.cos(7 * math.pi * 50 / 1600))


def test_ema_update(fixmatch):
    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.running_mean.fill_(5.0)
    fixmatch.ema_update(ema, model, 0.9)
    assert torch.allclose(ema.weight, torch.full((3,), 1.1)) and torch.equal(ema.running_mean, model.running_mean)


def test_evaluate_reports_per_class_and_balanced_accuracy(fixmatch):
    class Fixed(torch.nn.Module):  # predicts class 0 for everything
        def forward(self, x):
            return torch.stack([torch.ones(len(x)), torch.zeros(len(x))], 1)
    labels = torch.tensor([0, 0, 0, 1])
    images = torch.zeros(4, 2, 2, 1, dtype=torch.uint8)
    args = fixmatch.parse_args(["--eval-batch-size", "3"])
    res = fixmatch.evaluate(Fixed(), images, labels, 2, args, lambda x: x.float(), torch.no_grad)
    assert res["top1"] == 0.75 and res["per_class_acc"] == [1.0, 0.0] and res["balanced_acc"] == 0.5


# --- the fused loss and its pure-PyTorch fallback -------------------------------------------
needs_extension = pytest.mark.skipif(sslkernels is None, reason="sslkernels extension not built")


@needs_extension
@pytest.mark.parametrize("beta,tau", [(math.inf, 0.6), (100.0, 0.6), (100.0, "per-sample")])
def test_extension_and_fallback_give_the_same_loss_and_gradients(fixmatch, beta, tau):
    assert fixmatch.masked_ce is sslkernels.masked_ce
    torch.manual_seed(0)
    logits_s = torch.randn(64, 10, dtype=torch.float64) * 3
    probs_w = torch.softmax(torch.randn(64, 10, dtype=torch.float64) * 3, 1)
    tau = torch.rand(64, dtype=torch.float64) if tau == "per-sample" else tau
    results = []
    for fn in (sslkernels.masked_ce, fixmatch.masked_ce_reference):
        z = logits_s.clone().requires_grad_()
        t = tau.clone().requires_grad_() if torch.is_tensor(tau) else tau
        loss, mask, pseudo = fn(z, probs_w, t, beta)
        loss.sum().backward()
        results.append((loss, mask, pseudo, z.grad, t.grad if torch.is_tensor(t) else None))
    for a, b in zip(*results):
        assert (a is None and b is None) or torch.allclose(a, b, atol=1e-10), (a, b)


@needs_extension
def test_training_with_the_fallback_matches_the_extension(fixmatch, tmp_path, monkeypatch):
    a = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, name="ext")))
    monkeypatch.setattr(fixmatch, "masked_ce", fixmatch.masked_ce_reference)
    b = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, name="ref")))
    wa = torch.load(tmp_path / "ext" / "checkpoint.pt", weights_only=False)["model"]
    wb = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)["model"]
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5), k
    assert a["top1"] == b["top1"]


MALLOC_STATE_AROUND_ACTIVATIONS = """
import ctypes, importlib.util, sys, torch
class MallInfo2(ctypes.Structure):  # glibc's struct mallinfo2
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
spec = importlib.util.spec_from_file_location("fixmatch", sys.argv[1])
fixmatch = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fixmatch)
if sys.argv[2] == "reuse":
    assert fixmatch.reuse_freed_memory()
before = libc.mallinfo2()
buffers = [torch.ones(1 << 21) for _ in range(16)]  # 16 activations of 8 MiB
during = libc.mallinfo2()
del buffers
after = libc.mallinfo2()
print(during.hblkhd - before.hblkhd, during.arena - after.arena)
"""


def glibc_has_mallinfo2():
    try:
        return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")  # glibc >= 2.33
    except OSError:
        return False


@pytest.mark.skipif(not glibc_has_mallinfo2(), reason="glibc's malloc only (>= 2.33, for mallinfo2)")
@pytest.mark.parametrize("mode", ["reuse", "default"])
def test_freed_activations_stay_with_the_process(mode):
    """After reuse_freed_memory (which train() calls on the CPU), buffers of 8 MiB come from malloc's heap and stay
    there when freed, ready for the next step, instead of being mapped for each and handed back when freed."""
    out = subprocess.run([sys.executable, "-c", MALLOC_STATE_AROUND_ACTIVATIONS, str(ROOT / "algorithms" / "fixmatch.py"),
                          mode], capture_output=True, text=True, check=True).stdout
    mapped, released = (int(x) for x in out.split()[-2:])
    if mode == "reuse":
        assert mapped == 0 and released == 0
    else:  # what glibc does by default, which the function exists to change
        assert mapped >= 128 << 20 or released >= 8 << 20
