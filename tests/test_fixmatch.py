"""Behaviour of algorithms/fixmatch.py, the template of every algorithm file (CPU, seconds)."""

import copy
import gzip
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, data_flags, error_of, load_algorithm, records, signal_in_step, tiny, write_image_folder

try:
    import sslkernels
except ImportError:
    sslkernels = None

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
    assert 0.0 <= summary["top1"] <= 1.0 and summary["seconds"] > 0
    assert summary["fused_kernels"] == (sslkernels is not None)
    assert json.loads((out / "summary.json").read_text())["best_top1"] == summary["best_top1"]
    assert {r["kind"] for r in records(out)} == {"train", "eval"}
    train = [r for r in records(out) if r["kind"] == "train"]
    if "--labeled-only" in extra:
        assert "mask_rate" not in train[0]
    else:
        assert 0.0 <= train[0]["mask_rate"] <= 1.0 and "pseudo_label_acc_all" in train[0]
    assert (out / "checkpoint.pt").exists() and not (out / "checkpoint.pt.tmp").exists()


def test_fixmatch_learns_the_generated_data(fixmatch, tmp_path):
    """Not a smoke test: 60 steps on the easy generated data must beat chance (25%) by far."""
    summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "60", "--eval-every", "60",
                                                      "--log-every", "30")))
    assert summary["top1"] >= 0.9
    last = records(tmp_path / "run")[-2]
    assert last["mask_rate"] > 0.5 and last["pseudo_label_acc"] > 0.9


def split(fixmatch, y, classes, *flags, seed=0):
    args = fixmatch.parse_args([*data_flags(), *flags])
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
    # samples of unknown label (STL-10's unlabeled split) are unlabeled samples, never labeled or validation ones
    y_with_unknown = np.concatenate([y, np.full(7, -1)])
    labeled, unlabeled, val = split(fixmatch, y_with_unknown, 5, "--labels", "20", "--val-labels", "10")
    assert set(range(150, 157)) <= set(unlabeled) and len(unlabeled) == 147 and y_with_unknown[labeled].min() >= 0


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
    x = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    y = np.arange(40) % 4
    args = fixmatch.parse_args(tiny(tmp_path, "--total-steps", "10"))
    weak, strong = fixmatch.augmentations(args, None)
    batch = lambda step: fixmatch.make_batch(step, x, y, np.arange(8), np.arange(40), args, weak, strong)
    first, again = batch(7), batch(7)  # another worker, or a resumed run
    for key in ("x_l", "y_l", "x_uw", "x_us", "idx_u"):
        assert torch.equal(first[key], again[key])
    assert not torch.equal(first["x_us"], batch(8)["x_us"])
    # the labeled batch cycles through epochs: every labeled sample appears once per epoch
    assert sorted(fixmatch.sample_indices(8, 8, 3, 0, 0).tolist()) == list(range(8))


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_augmentation_streams_are_distinct_across_seeds_steps_views_and_positions(name):
    draw = load_algorithm(name).sample_rng  # every algorithm file has its own copy
    keys = [(s, t, v, p) for s in (0, 1, 2**32 - 1) for t in (0, 1, 10, 2**20) for v in (0, 1, 2) for p in (0, 1, 11)]
    assert len({draw(*key).random() for key in keys}) == len(keys)
    assert draw(3, 17, 1, 5).random() == draw(3, 17, 1, 5).random()


def test_augmentations_keep_shape_and_dtype(fixmatch):
    rng = random.Random(0)
    for shape in [(8, 8, 1), (28, 28, 1), (32, 32, 3)]:
        img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        for _ in range(30):
            for aug in (fixmatch.weak_augment, fixmatch.strong_augment):
                out = aug(img, rng, True)
                assert out.shape == shape and out.dtype == np.uint8


def test_weak_crop_equals_a_crop_of_the_reflect_padded_image(fixmatch):
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


def test_randaugment_table_is_usbs(fixmatch):
    """The 14 operations with USB's magnitude ranges; posterize keeps 4 to 7 bits (int(v) of [4, 8)), never all 8."""
    ranges = [(low, high) for _, low, high in fixmatch.RANDAUGMENT_OPS]
    assert ranges == [(0, 1)] * 3 + [(0.05, 0.95)] * 4 + [(4, 8), (0, 256), (-30, 30)] + [(-0.3, 0.3)] * 4
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    posterize, solarize = fixmatch.RANDAUGMENT_OPS[7][0], fixmatch.RANDAUGMENT_OPS[8][0]
    assert np.array_equal(np.asarray(posterize(img, 4.99)), np.asarray(img) & 0xF0)
    assert np.array_equal(np.asarray(solarize(img, 100)), np.where(np.asarray(img) < 100, img, 255 - np.asarray(img)))


def test_randaugment_shears_pivot_on_the_top_left_corner(fixmatch):
    """FixMatch's and USB's shear keeps the first row (column) in place and moves the last by ~0.3 of the
    side; torchvision's affine would pivot on the centre, a milder augmentation that moves both."""
    img = np.random.default_rng(0).integers(1, 256, (32, 32), dtype=np.uint8)  # no black pixel
    shear_x, shear_y = (op for op, low, high in fixmatch.RANDAUGMENT_OPS[10:12])
    for out in (np.asarray(shear_x(Image.fromarray(img), 0.3)), np.asarray(shear_y(Image.fromarray(img.T), 0.3)).T):
        assert np.array_equal(out[0], img[0])
        # output pixel (x, 31) reads input x + 0.3 * 31.5 (pixel centres), rounded down: x + 9
        assert np.array_equal(out[31, :23], img[31, 9:]) and not out[31, 23:].any()


class _Niceness(torch.utils.data.Dataset):
    def __len__(self):
        return 1

    def __getitem__(self, i):
        return os.nice(0), signal.getsignal(signal.SIGINT)


def test_data_workers_run_below_the_training_process_and_leave_it_ctrl_c(fixmatch):
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=None, num_workers=1,
                                         worker_init_fn=fixmatch.worker_init)
    assert next(iter(loader)) == [min(19, os.nice(0) + 19), signal.SIG_IGN]  # the collate makes a list


def test_default_workers_fit_the_machine_and_the_loader_does_not_warn(fixmatch, tmp_path):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    args = fixmatch.parse_args([*data_flags(), "--output-dir", str(tmp_path / "run")])
    assert args.workers == min(4, cores) > 0
    flags = tiny(tmp_path)
    del flags[flags.index("--workers"):flags.index("--workers") + 2]  # the default number of workers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fixmatch.train(fixmatch.parse_args(flags))
    assert not [w for w in caught if "worker" in str(w.message)], [str(w.message) for w in caught]


def test_threads_flag(fixmatch, tmp_path):
    threads = torch.get_num_threads()
    try:
        summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--threads", "1", "--total-steps", "1")))
        assert summary["args"]["threads"] == 1 == torch.get_num_threads()
        assert "--threads must be 0 or positive" in error_of(fixmatch, tiny(tmp_path, "--threads", "-1"))
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


def recording_forward_inputs(algorithm, monkeypatch):
    """What the training forward of the network sees: (dtype of its first convolution's output, memory format of its
    input, whether autocast is on), one entry per forward in train mode."""
    seen, make = [], algorithm.NETS["cnn_small"]

    def recorded(*a, **kw):
        model = make(*a, **kw)
        conv = model.features[0]
        conv.register_forward_hook(lambda m, inputs, out: seen.append((
            out.dtype, inputs[0].is_contiguous(memory_format=torch.channels_last),
            torch.is_autocast_enabled(inputs[0].device.type))) if m.training else None)
        return model

    monkeypatch.setitem(algorithm.NETS, "cnn_small", recorded)
    return seen


@pytest.mark.parametrize("channels_last", [True, False])
def test_cpu_forward_is_float32_in_the_chosen_memory_format(fixmatch, tmp_path, monkeypatch, channels_last):
    """bf16 autocast is for CUDA only: on the CPU the forward stays float32; --channels-last decides the layout."""
    seen = recording_forward_inputs(fixmatch, monkeypatch)
    flag = "--channels-last" if channels_last else "--no-channels-last"
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, flag, "--bf16", "--device", "cpu")))
    assert len(seen) == 4 and all(entry == (torch.float32, channels_last, False) for entry in seen), seen


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_forward_runs_under_bf16_autocast(fixmatch, tmp_path, monkeypatch):
    seen = recording_forward_inputs(fixmatch, monkeypatch)
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--device", "cuda")))
    assert seen and all(entry == (torch.bfloat16, True, True) for entry in seen), seen


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
    # invocation's: 0, not the default), the output goes where the folder is now
    (tmp_path / "cut").rename(tmp_path / "moved")
    resumed = fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "moved"), "--workers", "0"]))
    assert not (tmp_path / "cut").exists() and resumed["args"]["output_dir"] == str(tmp_path / "moved")
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    assert sorted(a) == ["algorithm", "args", "best_top1", "ema_model", "model", "optimizer", "rng", "scheduler", "seconds",
                         "step"]
    assert same_end(tmp_path / "full", tmp_path / "moved") == 7 and resumed["top1"] == full["top1"]
    steps = [r["step"] for r in records(tmp_path / "moved")]
    assert steps == [r["step"] for r in records(tmp_path / "full")]
    # a finished run has nothing to continue: refused, its summary left as it was
    summary = (tmp_path / "moved" / "summary.json").read_text()
    assert error_of(fixmatch, ["--resume", str(tmp_path / "moved")]).endswith("that run has finished all its 7 steps")
    assert (tmp_path / "moved" / "summary.json").read_text() == summary


def test_resume_restores_the_random_stream_of_dropout(fixmatch, tmp_path):
    """ConvLarge draws dropout masks while training: a resumed run matches an uninterrupted one only if the checkpoint
    restores the generator they come from."""
    data = write_image_folder(tmp_path / "data", per_class=16, size=12)
    common = [*data_flags(data), "--image-size", "12", "--net", "convlarge", "--labels", "8", "--batch-size", "4",
              "--uratio", "1", "--total-steps", "4", "--eval-every", "4", "--workers", "0"]
    fixmatch.train(fixmatch.parse_args([*common, "--output-dir", str(tmp_path / "full")]))
    fixmatch.train(fixmatch.parse_args([*common, "--output-dir", str(tmp_path / "cut"), "--stop-after", "2"]))
    torch.manual_seed(123)  # the resumed run must not depend on the state of the generator it starts with
    fixmatch.train(fixmatch.parse_args([*common, "--resume", str(tmp_path / "cut")]))
    assert same_end(tmp_path / "full", tmp_path / "cut") == 4


def test_resume_refuses_another_output_dir(fixmatch, tmp_path):
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--stop-after", "2", name="a")))
    msg = error_of(fixmatch, ["--resume", str(tmp_path / "a"), "--output-dir", str(tmp_path / "b")])
    assert msg.endswith(f"--resume {tmp_path / 'a'} continues the run in its own folder, not in --output-dir "
                        f"{tmp_path / 'b'} (copy the folder there first)")
    assert not (tmp_path / "b").exists()
    assert fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "a"), "--output-dir", str(tmp_path / "a"),
                                               "--workers", "0"]))["finished"]


def test_resume_keeps_the_threads_and_never_replaces_a_later_checkpoint(fixmatch, tmp_path):
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--threads", "1", "--stop-after", "1")))
    assert fixmatch.parse_args(["--resume", str(tmp_path / "run")]).threads == 1  # as the run's: the same rounding
    assert fixmatch.parse_args(["--resume", str(tmp_path / "run"), "--threads", "2"]).threads == 2
    shutil.copy(tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "step1.pt")
    fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "run"), "--stop-after", "1"]))
    msg = error_of(fixmatch, ["--resume", str(tmp_path / "run" / "step1.pt")])
    assert msg.endswith(f"--resume {tmp_path / 'run' / 'step1.pt'} would replace {tmp_path / 'run'}/checkpoint.pt; "
                        "--overwrite allows it")
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["step"] == 2
    summary = fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "run" / "step1.pt"), "--overwrite"]))
    assert summary["finished"] and [r["step"] for r in records(tmp_path / "run")] == [1, 2, 2, 4, 4]  # once each


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
    real_make_batch = fixmatch.make_batch

    def lose_batch(lost, signum=signal.SIGTERM):
        def make_batch(step, *a, **kw):
            if step == lost:
                if signum:
                    os.kill(os.getpid(), signum)
                raise RuntimeError("DataLoader worker (pid(s) 12345) exited unexpectedly")
            return real_make_batch(step, *a, **kw)
        return make_batch

    monkeypatch.setattr(fixmatch, "make_batch", lose_batch(3))  # the batch of step 4
    with pytest.raises(SystemExit) as stop:
        fixmatch.main(tiny(tmp_path, *common, name="cut"))
    assert stop.value.code == 128 + signal.SIGTERM
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["stopped_by"] == "SIGTERM" and summary["steps"] == 3
    # the first batch lost: no step ran, and still a checkpoint to resume from
    monkeypatch.setattr(fixmatch, "make_batch", lose_batch(0))
    with pytest.raises(SystemExit):
        fixmatch.main(tiny(tmp_path, *common, name="none"))
    assert torch.load(tmp_path / "none" / "checkpoint.pt", weights_only=False)["step"] == 0
    # without a signal, a lost batch is an error of its own
    monkeypatch.setattr(fixmatch, "make_batch", lose_batch(3, signum=None))
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        fixmatch.train(fixmatch.parse_args(tiny(tmp_path, *common, name="failed")))
    monkeypatch.undo()
    for cut in ("cut", "none"):
        fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / cut), "--workers", "0"]))
        assert same_end(tmp_path / "full", tmp_path / cut) == 7


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_rewritten_files_are_atomic(name, tmp_path, monkeypatch):
    algorithm = load_algorithm(name)
    path = tmp_path / "summary.json"
    algorithm.write_atomically(path, lambda f: f.write_text("the earlier summary"))

    def crash(f):
        f.write_text("the new sum")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        algorithm.write_atomically(path, crash)
    assert path.read_text() == "the earlier summary"


def test_an_interrupted_checkpoint_write_keeps_the_last_checkpoint(fixmatch, tmp_path, monkeypatch):
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--stop-after", "2")))
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()

    def crash(obj, f):
        with open(f, "wb") as partial:
            partial.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.train(fixmatch.parse_args(["--resume", str(tmp_path / "run"), "--workers", "0"]))
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved


@pytest.mark.parametrize("name", ["fixmatch", "meta_t"])
def test_checkpoints_hold_the_cuda_generator_of_the_runs_device_only(name, tmp_path, monkeypatch):
    """A checkpoint saves and restores the CUDA generator of the run's own device, so that it resumes where fewer GPUs
    are visible (torch's CUDA generator calls stubbed: the run itself is on the CPU)."""
    algorithm, restored = load_algorithm(name), []
    run = algorithm.train(algorithm.parse_args(tiny(tmp_path, "--stop-after", "1")))["args"]["output_dir"]
    ckpt = torch.load(f"{run}/checkpoint.pt", weights_only=False)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: f"state of {device}")
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, str(device))))
    cuda1 = torch.device("cuda:1")
    ckpt["step"], ckpt["rng"]["cuda"] = 0, "saved state"
    torch.save(ckpt, f"{run}/checkpoint.pt")
    args = algorithm.parse_args(["--resume", run, "--workers", "0"])
    args.device = "cuda:1"
    run_on_gpu1 = algorithm.Run(args, json.loads((tmp_path / "run" / "split.json").read_text()),
                                {"model": algorithm.NETS["cnn_small"](3, 4)}, cuda1)
    assert restored == [("saved state", "cuda:1")]
    run_on_gpu1.save(1)
    assert torch.load(f"{run}/checkpoint.pt", weights_only=False)["rng"]["cuda"] == "state of cuda:1"


def test_device_errors_get_one_clear_line(fixmatch, tmp_path, monkeypatch):
    for device in ("foo", "mps", "cuda:-1"):  # mps: this file handles the RNGs of the CPU and CUDA only
        assert "--device must be cpu, cuda or cuda:<index>" in error_of(fixmatch, tiny(tmp_path, "--device", device))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert error_of(fixmatch, tiny(tmp_path, "--device", "cuda")).endswith("--device cuda: this machine has 0 CUDA device(s)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert error_of(fixmatch, tiny(tmp_path, "--device", "cuda:1")).endswith("--device cuda:1: this machine has 1 CUDA device(s)")


def test_bad_input_gets_one_clear_line(fixmatch, tmp_path):
    for flags, message in [
        (("--dataset", "imagenet"), "unknown --dataset 'imagenet'"),
        (("--labels", "10"), "multiple of the 4 classes"),
        (("--labels", "400"), "fewer than the 100 labeled"),
        (("--net", "resnet"), "unknown --net"),
        (("--batch-size", "0"), "--batch-size must be positive"),
        (("--workers", "-1"), "--workers must be 0 or positive"),
        (("--seed", "-1"), "--seed must be in [0, 2^32)"),
        (("--ema", "1.5"), "--ema must be in [0, 1]"),
        (("--stop-after", "-1"), "--stop-after must be 0 or positive"),
        (("--image-size", "0"), "--image-size must be positive"),
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
        (("--n1", "12"), "the imbalanced split needs --n1 > 0 and --m1 > 0"),
        (("--m1", "30"), "the imbalanced split needs --n1 > 0 and --m1 > 0"),
        (("--n1", "12", "--m1", "30", "--gamma-l", "nan"), "positive finite --gamma-l and --gamma-u"),
        (("--n1", "1", "--m1", "30", "--gamma-l", "100"), "leaves class 1 without a labeled sample"),
        (("--labels", "192", "--exclude-labeled"), "no training sample is left for the unlabeled set"),
        # ConvLarge's unpadded 3x3 convolution needs more than the 2x2 maps left of 8x8 images
        (("--net", "convlarge"), "--net convlarge does not fit the images of --dataset folder"),
    ]:
        assert message in error_of(fixmatch, tiny(tmp_path, *flags)), flags
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert "not a checkpoint of fixmatch.py (unreadable, cut short or not written by torch.save: " in error_of(fixmatch, tiny(tmp_path, "--resume", str(bad)))
    torch.save({"model": {}, "step": 3}, bad)  # someone else's checkpoint
    assert error_of(fixmatch, tiny(tmp_path, "--resume", str(bad))).endswith(
        "not a checkpoint of fixmatch.py (not one of this project)")
    assert "no checkpoint file" in error_of(fixmatch, tiny(tmp_path, "--resume", str(tmp_path / "none")))
    assert f"cannot write to --output-dir {bad}" in error_of(fixmatch, tiny(tmp_path, "--output-dir", str(bad)))
    # resuming with flags that define another run is refused
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "2", name="r")))
    msg = error_of(fixmatch, tiny(tmp_path, "--seed", "3", "--resume", str(tmp_path / "r"), name="r"))
    assert msg.endswith("differ from the checkpoint's: --total-steps 4 (checkpoint: 2), --seed 3 (checkpoint: 0)")
    # including the ones the optimizer's saved state would silently override (lr) and the method's own (tau)
    for flag, value, saved in (("--lr", "0.1", "0.03"), ("--tau", "0.5", "0.95"), ("--gamma-u", "3.0", "100.0")):
        msg = error_of(fixmatch, tiny(tmp_path, flag, value, "--total-steps", "2", "--resume", str(tmp_path / "r"),
                                      name="r"))
        assert msg.endswith(f"differ from the checkpoint's: {flag} {value} (checkpoint: {saved})")
    # a checkpoint of this script that lacks some of the run's state (another version's) is refused in one line
    ckpt = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    ckpt["step"] = 1
    del ckpt["ema_model"]
    torch.save(ckpt, tmp_path / "r" / "checkpoint.pt")
    assert error_of(fixmatch, ["--resume", str(tmp_path / "r")]).endswith(
        f"cannot resume from {tmp_path / 'r'}: not a checkpoint of this fixmatch.py (no ema_model)")


def test_logged_lr_is_the_one_the_step_used(fixmatch, tmp_path):
    """Cosine decay lr * cos(7 pi t / 16 T) with t = step - 1 counted from 0 (FixMatch, USB)."""
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--total-steps", "6", "--log-every", "3")))
    train = [r for r in records(tmp_path / "run") if r["kind"] == "train"]
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


def test_validation_split_is_scored_on_its_own_images(fixmatch, tmp_path, monkeypatch):
    calls, real_evaluate = [], fixmatch.evaluate

    def recording(model, images, labels, *rest):
        result = real_evaluate(model, images, labels, *rest)
        calls.append((images.clone(), labels.clone(), result["top1"]))
        return result

    monkeypatch.setattr(fixmatch, "evaluate", recording)
    summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--val-labels", "8", "--total-steps", "2")))
    val_idx = json.loads((tmp_path / "run" / "split.json").read_text())["validation"]
    train_x, train_y = fixmatch.load_data(fixmatch.parse_args(data_flags()))[:2]
    (test_images, _, test_top1), (val_images, val_labels, val_top1) = calls
    assert torch.equal(val_images, torch.from_numpy(train_x[val_idx])) and len(test_images) == 64
    assert torch.equal(val_labels, torch.from_numpy(train_y[val_idx])) and len(val_idx) == 8
    evaluated = [r for r in records(tmp_path / "run") if r["kind"] == "eval"][-1]
    assert evaluated["val_top1"] == val_top1 and evaluated["top1"] == test_top1
    assert summary["val_top1"] == val_top1 and summary["top1"] == test_top1  # to select a model without the test set


def test_tensorboard_holds_the_logged_scalars(fixmatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--tensorboard")))
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    for r in records(tmp_path / "run"):
        for key in ("loss", "mask_rate", "top1"):
            if key in r:
                logged = {e.step: e.value for e in events.Scalars(f"{r['kind']}/{key}")}
                assert logged[r["step"]] == pytest.approx(r[key], rel=1e-6), (r["kind"], key)


def test_command_line_error_has_no_traceback():
    p = subprocess.run([sys.executable, str(ROOT / "algorithms" / "fixmatch.py"), "--dataset", "imagenet"],
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
        raise RuntimeError("Dataset not found" if not kw.get("download") else "URLError:\n  no network")  # lines: one

    for name, cls in (("cifar10", "CIFAR10"), ("fashion_mnist", "FashionMNIST")):
        monkeypatch.setattr(tvd, cls, offline)
        msg = error_of(fixmatch, tiny(tmp_path, "--dataset", name, "--data-dir", str(tmp_path / "d"), "--net", ""))
        assert f"could not load {name} from {str(tmp_path / 'd')!r}" in msg and "--dataset digits" in msg
    assert "/usr/share/datasets/fashion-mnist" in msg


def write_idx(path, array, gz):
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    (gzip.open if gz else open)(path, "wb").write(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("layout", ["gzipped, in --data-dir", "plain, where torchvision puts them"])
def test_mnist_and_fashion_mnist_read_the_idx_files_offline(fixmatch, tmp_path, layout):
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (120, 28, 28)), "t10k": rng.integers(0, 256, (30, 28, 28))}
    labels = {"train": np.arange(120) % 10, "t10k": np.arange(30) % 10}
    gz = layout.startswith("gzipped")
    folder = tmp_path / "d" if gz else tmp_path / "d" / "FashionMNIST" / "raw"
    folder.mkdir(parents=True)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte{'.gz' if gz else ''}", images[split], gz)
        write_idx(folder / f"{split}-labels-idx1-ubyte{'.gz' if gz else ''}", labels[split], gz)
    args = fixmatch.parse_args(["--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "d")])
    train_x, train_y, test_x, test_y, classes, mean, std = fixmatch.load_data(args)
    assert train_x.shape == (120, 28, 28, 1) and test_x.shape == (30, 28, 28, 1) and classes == 10
    assert np.array_equal(train_x[..., 0], images["train"]) and np.array_equal(test_y, labels["t10k"])
    assert args.net == "cnn_small_s2" and mean == (0.2860,)
    summary = fixmatch.train(fixmatch.parse_args([
        "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "d"), "--labels", "20", "--batch-size", "4",
        "--uratio", "2", "--total-steps", "2", "--workers", "0", "--output-dir", str(tmp_path / "run")]))
    assert summary["finished"] and len(summary["per_class_acc"]) == 10
    write_idx(folder / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}", labels["t10k"][:29], gz)  # one label short
    assert "the images and labels in" in error_of(fixmatch, [
        "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "run2")])
    write_idx(folder / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}", images["t10k"], gz)  # images for labels
    assert "the images and labels in" in error_of(fixmatch, [
        "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "run2")])
    (folder / f"train-labels-idx1-ubyte{'.gz' if gz else ''}").write_bytes(b"\0\0\x08")  # cut short
    assert "is not an IDX file of bytes, or is cut short" in error_of(fixmatch, [
        "--dataset", "fashion_mnist", "--data-dir", str(tmp_path / "d"), "--output-dir", str(tmp_path / "run2")])


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
    argv = tiny(tmp_path, "--data-dir", str(tmp_path / "data"), "--labels", "4")
    assert "cannot identify image file" in error_of(fixmatch, argv)
    (tmp_path / "data" / "train" / "red" / "broken.png").unlink()
    # as torchvision's ImageFolder: images at any depth, other files left out; hidden files too
    (tmp_path / "data" / "train" / "red" / ".DS_Store").write_bytes(b"a file manager's, not an image")
    (tmp_path / "data" / "train" / "red" / "._0.png").write_bytes(b"a macOS resource fork, not an image")
    (tmp_path / "data" / "train" / "red" / "notes.txt").write_text("where the images came from")
    (tmp_path / "data" / "train" / "blue" / "more").mkdir()
    shutil.copy(tmp_path / "data" / "train" / "blue" / "0.png", tmp_path / "data" / "train" / "blue" / "more" / "0.PNG")
    summary = fixmatch.train(fixmatch.parse_args(argv))
    assert summary["finished"] and len(summary["per_class_acc"]) == 2
    assert json.loads((tmp_path / "run" / "split.json").read_text())["unlabeled_count"] == 13  # 6 + 6 + 1
    # normalised with its own training images' mean and std: the normalised training set has mean 0 and std 1
    train_x, _, _, _, classes, mean, std = fixmatch.load_data(fixmatch.parse_args(argv))
    normalised = (train_x / 255 - np.array(mean)) / np.array(std)
    assert classes == 2 and np.allclose(normalised.mean((0, 1, 2)), 0, atol=1e-9) and np.allclose(normalised.std((0, 1, 2)), 1)


def test_folder_dataset_errors(fixmatch, tmp_path):
    argv = tiny(tmp_path, "--data-dir", str(tmp_path / "data"), "--labels", "2")
    assert f"--dataset folder: cannot read {tmp_path / 'data' / 'train'}: [Errno 2]" in error_of(fixmatch, argv)
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert f"cannot read {tmp_path / 'data' / 'train'}: Couldn't find any class folder" in error_of(fixmatch, argv)
    for split in ("train", "test"):
        (tmp_path / "data" / split / "cat").mkdir(parents=True)
    assert error_of(fixmatch, argv).endswith(f"the class folders in {tmp_path / 'data' / 'train'} hold no images")
    write_image_folder(tmp_path / "other", classes=2)
    shutil.move(tmp_path / "other" / "test" / "class1", tmp_path / "other" / "test" / "dog")
    assert "has classes ['class0', 'dog'], but train has ['class0', 'class1']" in error_of(
        fixmatch, tiny(tmp_path, "--data-dir", str(tmp_path / "other"), "--labels", "2"))


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
    assert [r["step"] for r in records(tmp_path / "run")] == [1]
    # the replaced run's checkpoint and summary go at the start: a run interrupted before its first checkpoint leaves
    # neither, rather than the earlier run's beside its own records
    def interrupted(obj, f):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--seed", "2", "--stop-after", "1", "--overwrite")))
    assert not (tmp_path / "run" / "checkpoint.pt").exists() and not (tmp_path / "run" / "summary.json").exists()


def test_resuming_on_changed_data_is_refused(fixmatch, tmp_path):
    data = write_image_folder(tmp_path / "data", per_class=8)
    argv = tiny(tmp_path, "--data-dir", str(data))
    fixmatch.train(fixmatch.parse_args([*argv, "--stop-after", "2"]))
    shutil.copy(data / "train" / "class0" / "001.png", data / "train" / "class0" / "100.png")
    msg = error_of(fixmatch, [*argv, "--resume", str(tmp_path / "run")])
    assert msg.endswith(f"--resume {tmp_path / 'run'}: the data has changed since that run began (its labeled, "
                        f"validation or unlabeled set differs from {tmp_path / 'run' / 'split.json'}); resume it on "
                        "the same data")
    (data / "train" / "class0" / "100.png").unlink()
    assert fixmatch.train(fixmatch.parse_args([*argv, "--resume", str(tmp_path / "run")]))["finished"]


def test_summary_has_no_best_top1_before_any_evaluation(fixmatch, tmp_path):
    summary = fixmatch.train(fixmatch.parse_args(tiny(tmp_path, "--stop-after", "1", "--eval-every", "3")))
    assert summary["top1"] is None and summary["best_top1"] is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_top1"] is None


def test_digits_is_offline_with_a_fixed_test_split(fixmatch):
    train_x, train_y, test_x, test_y = fixmatch.load_digits()
    assert train_x.shape == (1300, 8, 8, 1) and test_x.shape == (497, 8, 8, 1) and train_x.dtype == np.uint8
    assert np.bincount(test_y).min() >= 48 and train_x.max() == 255
    assert np.array_equal(fixmatch.load_digits()[3], test_y)


@pytest.mark.parametrize("net,size,channels", [("wrn28_2", 32, 3), ("wrn37_2", 32, 3), ("convlarge", 32, 3),
                                               ("cnn_small", 8, 1), ("cnn_small_s2", 28, 1)])
def test_networks_expose_features_and_head(fixmatch, net, size, channels):
    model = fixmatch.NETS[net](channels, 7).eval()
    x = torch.randn(2, channels, size, size)
    feats = model.features(x)
    assert feats.ndim == 2 and isinstance(model.head, torch.nn.Linear)
    assert torch.allclose(model.head(feats), model(x))
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    if net.startswith("wrn"):  # USB's
        assert all(m.momentum == 0.001 and m.eps == 0.001 for m in bns)
    elif net == "convlarge":  # MetaSemi's code: torch's default BatchNorm, convolutions without bias, 3,121,802 parameters
        assert all(m.momentum == 0.1 and m.eps == 1e-5 for m in bns) and len(bns) == 9
        assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        assert sum(p.numel() for p in fixmatch.NETS[net](3, 10).parameters()) == 3_121_802


def test_weight_decay_skips_batchnorm_and_bias(fixmatch):
    args = fixmatch.parse_args(["--weight-decay", "5e-4", "--total-steps", "100"])
    model = fixmatch.NETS["cnn_small"](1, 10)
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


def test_ema_decay_is_warmed_up_and_batchnorm_statistics_lose_their_initial_values(fixmatch):
    """Step t lerps the EMA towards the weights by 1 - min(decay, (1 + t) / (10 + t)). A BatchNorm that has seen n
    batches with momentum m still holds (1 - m)^n of its initial statistics (0, 1); the evaluated model's are without
    them, so that after n equal batches they are those batches' statistics, however many batches a step ran."""
    model, ema = torch.nn.BatchNorm1d(3, momentum=0.01), torch.nn.BatchNorm1d(3, momentum=0.01)
    batch = torch.randn(64, 3) * 3 + 5
    for step in range(1, 6):
        model(batch)
        before = ema.weight.detach().clone()
        with torch.no_grad():
            model.weight.add_(1.0)
        fixmatch.ema_update(ema, model, 0.999, step)
        share = 1 - (1 + step) / (10 + step)
        assert torch.allclose(ema.weight, before + share * (model.weight - before))
    assert torch.allclose(ema.running_mean, batch.mean(0), atol=1e-5)
    assert torch.allclose(ema.running_var, batch.var(0), rtol=1e-5)
    assert not torch.allclose(model.running_mean, batch.mean(0), atol=0.1)  # the model's own stay as torch keeps them
    model(batch), model(batch)  # a step of two forwards (MetaSemi's): n counts the BatchNorm's updates, not the steps
    fixmatch.ema_update(ema, model, 0.999, 6)
    assert torch.allclose(ema.running_mean, batch.mean(0), atol=1e-5)
    assert torch.allclose(ema.running_var, batch.var(0), rtol=1e-5)
    # late in a run, the configured decay and the model's statistics as they are (USB)
    model.num_batches_tracked.fill_(10**6)
    fixmatch.ema_update(ema, model, 0.999, 10**6)
    assert torch.equal(ema.running_mean, model.running_mean) and torch.equal(ema.running_var, model.running_var)
    before = ema.weight.detach().clone()
    fixmatch.ema_update(ema, model, 0.999, 10**6)
    assert torch.allclose(ema.weight, before + 0.001 * (model.weight - before))
    # one batch of a near-constant channel: float32 rounds the share left of the initial variance, never below 0
    model = torch.nn.BatchNorm1d(1, momentum=0.001)
    model.running_var.fill_(0.999 - 1e-7)
    fixmatch.ema_update(ema := copy.deepcopy(model), model, 0.999, 1)
    assert ema.running_var.item() == 0


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
