"""Meta-T: Learning Sample-Aware Threshold for Semi-Supervised Learning.

Wei, Feng, Sun, Wang, He and Yin, with its Green Meta-T. FixMatch's fixed threshold becomes
a per-sample threshold tau_m produced by a threshold generation network (TGN) from the weak-view
prediction p_m and the class-average confidence pbar[argmax p_m]; the TGN is meta-learned on the
labeled batch through a virtual SGD step of the classifier (bi-level optimisation, the paper's
Eqs. 8-10, restated as Eqs. 12-18 in its Appendix B). Green Meta-T runs the meta step every k-th
step only. Options: the same exact meta-gradient computed in forward mode (--meta-grad jvp, one
forward with dual numbers instead of the double backward, taking the convolutions' and BatchNorms'
values from the step's own forward: faster), and a first-order meta-gradient (two extra forwards,
the paper's future work). Defaults follow the paper's Table 6.

    python algorithms/meta_t.py --dataset cifar10 --labels 40
    python algorithms/meta_t.py --dataset cifar10 --labels 40 --meta-interval 2          # Green Meta-T
    python algorithms/meta_t.py --dataset digits --labels 40 --total-steps 3000 --meta-grad fd   # offline, CPU

The losses use the fused `sslkernels.masked_ce` and `sslkernels.class_confidence` when the project's
extension is built and a few lines of plain PyTorch otherwise (same values, slower).
"""

import argparse
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.autograd.forward_ad as fwAD
import torchvision.transforms.functional as TF
from PIL import Image

try:
    import sslkernels  # the project's fused kernels (csrc/); optional
except ImportError:
    sslkernels = None

ALGORITHM = "meta_t"


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class Args:
    # data
    dataset: str = arg("cifar10", "cifar10 | cifar100 | svhn | stl10 | digits | folder | synthetic")
    data_dir: str = arg("./data", "torchvision download dir; for `folder`: holds train/<class>/ and test/<class>/ (images at any depth)")
    labels: int = arg(40, "labeled samples, spread evenly over the classes")
    val_labels: int = arg(0, "labeled samples held out (evenly over classes) as a validation split; 0 = none")
    exclude_labeled: bool = arg(False, "keep labeled samples out of the unlabeled set (FixMatch and USB keep them in; --n1 always does)")
    n1: int = arg(0, "class-imbalanced split (Meta-T Sec. 5.3): labeled samples of class 0, N_c = N_1 * gamma_l^(-c/(C-1)); 0 = balanced")
    m1: int = arg(0, "class-imbalanced split: unlabeled samples of class 0, M_c = M_1 * gamma_u^(-c/(C-1)), apart from the labeled ones")
    gamma_l: float = arg(100.0, "imbalance ratio of the labeled split (with --n1)")
    gamma_u: float = arg(100.0, "imbalance ratio of the unlabeled split (with --n1)")
    image_size: int = arg(32, "`folder` images are resized to this square size")
    # model and optimisation
    net: str = arg("", "wrn28_2 | wrn28_8 | wrn37_2 | convlarge | cnn_small; empty = the dataset's default")
    batch_size: int = arg(32, "labeled batch size B (also the meta-data batch)")
    uratio: int = arg(0, "mu: the unlabeled batch holds mu * B samples; 0 = Table 6's: 6 (192), 4 (128) for stl10")
    lr: float = arg(0.03, "SGD learning rate")
    lr_schedule: str = arg("step", "step: lr / 10 at each of --lr-milestones (Table 6) | cosine: FixMatch's (the paper's Fig. 4, Setting 2)")
    lr_milestones: str = arg("1/3,2/3", "fractions of --total-steps where the step schedule divides the lr by 10 (Table 6: epochs 100 and 200 of 300)")
    momentum: float = arg(0.9, "SGD Nesterov momentum")
    weight_decay: float = arg(-1.0, "weight decay, not applied to BN and biases; -1 = 5e-4 (1e-3 for cifar100)")
    ema: float = arg(0.999, "decay of the evaluated EMA weights, which start as the initial weights (lower it for short runs)")
    total_steps: int = arg(300 * 1024, "training steps T (Table 6: 300 epochs of 1024 steps)")
    # method
    meta_lr: float = arg(1e-3, "Adam learning rate of the TGN, the method's one extra hyperparameter")
    tgn_hidden: int = arg(100, "hidden units of the TGN, an MLP 2C -> hidden -> 1")
    beta: float = arg(100.0, "sharpness of the surrogate mask sigmoid(beta * (conf - tau))")
    hard_mask: bool = arg(False, "classifier update with the indicator 1[conf >= tau] (the meta step keeps the surrogate)")
    meta_interval: int = arg(1, "Green Meta-T's k: meta step on the iterations t = step - 1 that k divides (Algorithm 2); 1 = Meta-T")
    meta_grad: str = arg("exact", "exact: virtual step with a double backward | jvp: the same gradient by forward mode (Eq. 17) | fd: first-order, two finite-difference forwards")
    fd_direction_at: str = arg("w_hat", "with --meta-grad fd, take the meta-loss gradient v at w_hat (virtual step) or w (cheaper)")
    jvp_reuse_forward: bool = arg(True, "with --meta-grad jvp (eager), take the convolutions' and BatchNorms' values from the step's forward instead of computing them again")
    plots: bool = arg(False, "draw the threshold and pseudo-label diagnostics as PNGs into the output dir at the end")
    lambda_u: float = arg(1.0, "weight of the unlabeled loss")
    labeled_only: bool = arg(False, "supervised baseline: labeled loss only, same pipeline")
    # run
    seed: int = arg(0, "seed of every RNG (split, data order, augmentation, init)")
    device: str = arg("", "cuda | cpu; empty = cuda when available")
    torch_deterministic: bool = arg(True, "cuDNN uses deterministic convolution algorithms only (CUDA; as CleanRL)")
    workers: int = arg(4, "data-loading worker processes (0 = load in the main process)")
    threads: int = arg(0, "CPU threads of the training process; 0 = torch's default (all cores)")
    eval_every: int = arg(5000, "evaluate (and checkpoint) every this many steps")
    log_every: int = arg(100, "log losses and pseudo-label diagnostics every this many steps")
    eval_batch_size: int = arg(1024, "batch size of evaluation")
    output_dir: str = arg("", "where metrics, summary and checkpoints go; empty = runs/<algorithm>_<dataset>_<labels>_seed<seed>")
    resume: str = arg("", "checkpoint file (or output dir holding checkpoint.pt) to resume from; flags left out are its own")
    overwrite: bool = arg(False, "start afresh in an --output-dir that holds an earlier run's checkpoint, replacing it")
    stop_after: int = arg(0, "stop after this many steps of this invocation (a planned interruption; resume later); 0 = never")
    channels_last: bool = arg(True, "channels_last memory format (faster convolutions on CUDA and CPU)")
    bf16: bool = arg(True, "bfloat16 autocast for the forward passes (CUDA only)")
    compile: bool = arg(False, "torch.compile the training forward (and the forward-mode pass of --meta-grad jvp, but not under bf16 on CUDA)")
    tensorboard: bool = arg(False, "also write TensorBoard logs to the output dir")


class UserError(Exception):
    """Bad input: reported as one line, no traceback."""


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        flag, help = "--" + f.name.replace("_", "-"), f.metadata["help"]
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default, help=help)
    resume = parser.parse_known_args(argv)[0].resume
    if resume:  # `--resume <dir>` alone continues a run: the flags left out are the checkpoint's, except
        # those that belong to this machine and invocation
        per_invocation = ("device", "workers", "threads", "resume", "overwrite", "stop_after", "output_dir")
        saved = load_checkpoint(resume, mmap=True)["args"]  # train() loads the tensors
        parser.set_defaults(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__ and k not in per_invocation})
    return Args(**vars(parser.parse_args(argv)))


# ---------------------------------------------------------------------------------------------
# Data: every dataset becomes uint8 arrays (N, H, W, channels) plus int64 labels (-1 = unknown)
# ---------------------------------------------------------------------------------------------
# name: (classes, mean, std, default net, weight decay, horizontal flip in the weak view)
DATASETS = {
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "wrn28_2", 5e-4, True),
    "cifar100": (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "wrn28_8", 1e-3, True),
    "svhn": (10, (0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744), "wrn28_2", 5e-4, False),
    "stl10": (10, (0.4409, 0.4279, 0.3868), (0.2683, 0.2610, 0.2687), "wrn37_2", 5e-4, True),
    "digits": (10, (0.5,), (0.5,), "cnn_small", 5e-4, False),  # digits are not mirror-symmetric
    "folder": (0, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "wrn28_2", 5e-4, True),
    "synthetic": (4, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "cnn_small", 5e-4, True),
}
# Table 6's unlabeled batch is 6 * 32 = 192, except STL-10's 4 * 32 = 128: the default --uratio
TABLE6_URATIO = {"stl10": 4}


def load_torchvision(name, root):
    """Train images/labels, test images/labels, and unlabeled-only images (STL-10's extra split)."""
    import torchvision.datasets as tvd

    def get(cls, **kw):
        try:  # never touch the network when the files are already there
            return cls(root, download=False, **kw)
        except Exception:
            pass
        try:
            return cls(root, download=True, **kw)
        except Exception as e:
            raise UserError(
                f"could not load {name} from {root!r} nor download it ({type(e).__name__}: {e}). Without a "
                f"network, put the archive torchvision expects for {cls.__name__} (or its extracted folder) in "
                f"--data-dir {root!r} and run again; for an offline run use --dataset digits, or --dataset folder "
                f"with your own images in {root}/train/<class>/ and {root}/test/<class>/.") from None

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = get(cls, train=True), get(cls, train=False)
        return tr.data, np.array(tr.targets), te.data, np.array(te.targets), None
    if name == "svhn":
        tr, te = get(tvd.SVHN, split="train"), get(tvd.SVHN, split="test")
        return tr.data.transpose(0, 2, 3, 1), tr.labels, te.data.transpose(0, 2, 3, 1), te.labels, None
    tr, te, un = get(tvd.STL10, split="train"), get(tvd.STL10, split="test"), get(tvd.STL10, split="unlabeled")
    nhwc = lambda d: d.data.transpose(0, 2, 3, 1)
    return nhwc(tr), tr.labels.astype(np.int64), nhwc(te), te.labels.astype(np.int64), nhwc(un)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


def image_files(folder):
    """The images anywhere under folder, as torchvision's ImageFolder finds them (by suffix, at any depth), without
    hidden files and folders (.DS_Store, ._* copies); sorted by path."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise UserError(f"cannot list {folder}: {e}") from None
    files = []
    for p in entries:
        if p.is_dir():
            files += image_files(p)
        elif p.suffix.lower() in IMAGE_SUFFIXES:
            files.append(p)
    return files


def load_folder(root, size):
    """`root/train/<class>/**` and `root/test/<class>/**`, resized to size x size RGB, held in memory."""
    splits = []
    for split in ("train", "test"):
        d = Path(root) / split
        try:
            classes = sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []
        except OSError as e:
            raise UserError(f"cannot list {d}: {e}") from None
        if not classes:
            raise UserError(f"--dataset folder needs class folders in {d} (e.g. {d}/cat/001.png); found none")
        if split == "test" and classes != splits[0][2]:
            raise UserError(f"{d} has classes {classes}, but train has {splits[0][2]}")
        images, labels = [], []
        for c, name in enumerate(classes):
            for f in image_files(d / name):
                try:
                    with Image.open(f) as im:
                        images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR)))
                except Exception as e:
                    raise UserError(f"cannot read image {f}: {e}") from None
                labels.append(c)
        if not images:
            raise UserError(f"the class folders in {d} hold no images")
        splits.append((np.stack(images), np.array(labels), classes))
    return splits[0][0], splits[0][1], splits[1][0], splits[1][1], None, len(splits[0][2])


def load_digits():
    """scikit-learn's bundled 8x8 digits (1797 images): a real dataset that works offline.
    Fixed, stratified held-out test split of 497 images (independent of --seed)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(x))
    test = np.zeros(len(x), bool)
    for c in range(10):  # every 3.6th image of each class goes to test: 497 in all
        idx = order[d.target[order] == c]
        test[idx[: round(len(idx) * 497 / 1797)]] = True
    return x[~test], d.target[~test], x[test], d.target[test], None


def make_synthetic(classes=4, per_class=64, size=8, seed=0):
    """Learnable generated images for tests: each class is a coloured blob in its own quadrant."""
    rng = np.random.default_rng(seed)
    n = classes * per_class
    y = np.repeat(np.arange(classes), per_class)
    x = rng.normal(100, 20, (n, size, size, 3))
    half = size // 2
    for i, c in enumerate(y):
        r, q = (c // 2 % 2) * half, (c % 2) * half
        x[i, r:r + half, q:q + half, c % 3] += 120
    x = np.clip(x, 0, 255).astype(np.uint8)
    test = np.arange(n) % 4 == 0
    return x[~test], y[~test], x[test], y[test], None


def load_data(args):
    classes = DATASETS[args.dataset][0]
    if args.dataset == "digits":
        data = load_digits()
    elif args.dataset == "synthetic":
        data = make_synthetic()
    elif args.dataset == "folder":
        *data, classes = load_folder(args.data_dir, args.image_size)
    else:
        data = load_torchvision(args.dataset, args.data_dir)
    return (*data, classes)


def split_labeled(y, classes, args, rng):
    """Indices of the labeled, unlabeled and validation sets (Meta-T's imbalanced split with --n1)."""
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(classes)]
    if args.n1 > 0:
        if classes < 2:
            raise UserError("the imbalanced split (--n1) needs at least 2 classes")
        if args.m1 <= 0 or not 0 < args.gamma_l < math.inf or not 0 < args.gamma_u < math.inf:
            raise UserError(f"the imbalanced split (--n1) needs --m1 > 0 (unlabeled samples of class 0) and positive "
                            f"finite --gamma-l and --gamma-u, got --m1 {args.m1}, --gamma-l {args.gamma_l}, "
                            f"--gamma-u {args.gamma_u}")
        decay = lambda first, gamma, c: int(first * gamma ** (-c / (classes - 1)))
        n_lab = [decay(args.n1, args.gamma_l, c) for c in range(classes)]
        n_unl = [decay(args.m1, args.gamma_u, c) for c in range(classes)]
        if min(n_lab) == 0:
            raise UserError(f"--n1 {args.n1} with --gamma-l {args.gamma_l} leaves class {n_lab.index(0)} without a "
                            "labeled sample (N_c rounds down to 0): raise --n1 or lower --gamma-l")
    else:
        if args.n1 < 0 or args.m1 != 0:
            raise UserError(f"--n1 {args.n1}, --m1 {args.m1}: the imbalanced split needs both --n1 > 0 and --m1 > 0")
        if args.labels <= 0 or args.labels % classes:
            raise UserError(f"--labels {args.labels} must be a positive multiple of the {classes} classes")
        n_lab, n_unl = [args.labels // classes] * classes, [None] * classes
    if args.val_labels < 0 or args.val_labels % classes:
        raise UserError(f"--val-labels {args.val_labels} must be 0 or a positive multiple of the {classes} classes")
    n_val = args.val_labels // classes
    labeled, unlabeled, val = [], [], []
    for c, idx in enumerate(by_class):
        if n_lab[c] + n_val + (n_unl[c] or 0) > len(idx):
            raise UserError(f"class {c} has {len(idx)} training samples, fewer than the {n_lab[c]} labeled + "
                            f"{n_val} validation + {n_unl[c] or 0} unlabeled asked for (--labels/--n1/--m1)")
        labeled.append(idx[:n_lab[c]])
        val.append(idx[n_lab[c]:n_lab[c] + n_val])
        rest = idx[n_lab[c] + n_val:]
        unlabeled.append(rest if n_unl[c] is None else rest[:n_unl[c]])
        if not args.exclude_labeled and args.n1 <= 0:  # Sec. 5.3 sizes two disjoint sets: N_c labeled, M_c unlabeled
            unlabeled.append(idx[:n_lab[c]])
    return np.concatenate(labeled), np.concatenate(unlabeled), np.concatenate(val)


# Augmentation. Each function takes an explicit random.Random, so that a batch is a pure function
# of (seed, step): resume restores the data exactly, whatever the number of workers.
@functools.lru_cache(maxsize=None)
def _reflect(start, size):
    """Indices start, start+1, ... (size of them) into an axis of length `size`, mirrored at its
    ends without repeating the edge: numpy's (and torchvision's) "reflect" padding."""
    i = np.abs(np.arange(start, start + size))
    return np.where(i > size - 1, 2 * (size - 1) - i, i)


def weak_augment(x, rng, flip):
    """uint8 (H, W, C) -> random horizontal flip (not for digits / SVHN), then a random crop of the
    image padded by 12.5% of its side with reflection. The crop is gathered from the image directly:
    padding it first (np.pad, PIL) costs several times more on small images."""
    if flip and rng.random() < 0.5:
        x = x[:, ::-1]
    h, w = x.shape[:2]
    pad = max(1, int(0.125 * w))
    i, j = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return x[_reflect(i - pad, h)[:, None], _reflect(j - pad, w)]


# RandAugment's colour operations are lookup tables and blends of uint8 pixels. torchvision hands
# PIL images to PIL, which builds most tables in a Python loop (up to 200 us per image, most of the
# data-loading time of a step on small images); these numpy versions compute the same pixels
# (tests/test_fixmatch.py compares them with torchvision's at every magnitude) in 2-50 us.
def _grey(x):
    """PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point. (H, W, C) -> (H, W, 1)."""
    if x.shape[2] == 1:
        return x
    r, g, b = (x[..., k].astype(np.int32) for k in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)[..., None]


def _blend(degenerate, x, factor):
    """PIL's Image.blend(degenerate, x, factor): float32 arithmetic, truncated, clipped."""
    degenerate = np.asarray(degenerate, np.float32)
    out = degenerate + np.float32(factor) * (x.astype(np.float32) - degenerate)
    return np.clip(out, 0, 255).astype(np.uint8)


def _autocontrast(x):
    """PIL's ImageOps.autocontrast: stretch each channel to span 0..255."""
    out = x.copy()
    for c in range(x.shape[2]):
        lo, hi = int(x[..., c].min()), int(x[..., c].max())
        if hi > lo:
            scale = 255.0 / (hi - lo)
            lut = (np.arange(256) * scale - lo * scale).astype(np.int64)  # int(): truncation, as PIL
            out[..., c] = np.clip(lut, 0, 255).astype(np.uint8)[x[..., c]]
    return out


def _equalize(x):
    """PIL's ImageOps.equalize: per channel, map grey levels through the cumulative histogram."""
    out = x.copy()
    for c in range(x.shape[2]):
        hist = np.bincount(x[..., c].ravel(), minlength=256)
        used = hist[hist > 0]
        step = (int(used.sum()) - int(used[-1])) // 255
        if len(used) > 1 and step > 0:
            lut = (step // 2 + np.cumsum(hist) - hist) // step
            out[..., c] = np.minimum(lut, 255).astype(np.uint8)[x[..., c]]
    return out


def _contrast(x, v):
    """PIL's ImageEnhance.Contrast: blend with the image's mean grey level."""
    g = _grey(x)
    return _blend(int(g.sum(dtype=np.int64) / g.size + 0.5), x, v)


def _pil(op):
    """Run a PIL-image operation (torchvision's geometric ones and sharpness) on a uint8 (H, W, C) array."""
    def run(x, v):
        h, w, c = x.shape
        img = op(Image.fromarray(x.reshape(h, w) if c == 1 else x), v)
        return np.asarray(img).reshape(h, w, c)
    return run


def _affine(img, a, b, c, d, e, f):
    """PIL's affine transform, as FixMatch's and USB's RandAugment call it: output pixel (x, y) is read from
    input (a x + b y + c, d x + e y + f), nearest neighbour, black outside. So a shear pivots on the top-left
    corner (it also shifts the image by up to 0.3 of its side), not on the centre as torchvision's affine."""
    return img.transform(img.size, Image.Transform.AFFINE, (a, b, c, d, e, f))


# (operation on a uint8 (H, W, C) array, lowest magnitude, highest magnitude): the FixMatch paper's
# RandAugment table, computed as USB's RandAugment computes it (its ranges; PIL's geometric operations).
# Each colour operation is torchvision's operation of the same name (TF.*) on the PIL image.
RANDAUGMENT_OPS = [
    (lambda x, v: x, 0, 1),  # identity
    (lambda x, v: _autocontrast(x), 0, 1),
    (lambda x, v: _equalize(x), 0, 1),
    (lambda x, v: _blend(0, x, v), 0.05, 0.95),  # brightness: blend with black
    (lambda x, v: _blend(_grey(x), x, v), 0.05, 0.95),  # saturation ("Color" in PIL): blend with grey
    (_contrast, 0.05, 0.95),
    (_pil(TF.adjust_sharpness), 0.05, 0.95),
    (lambda x, v: x & np.uint8(~(2 ** (8 - int(v)) - 1) & 255), 4, 8),  # posterize to int(v) bits: 4 to 7
    (lambda x, v: np.where(x < v, x, 255 - x), 0, 256),  # solarize above v
    (_pil(lambda img, v: img.rotate(v)), -30, 30),  # about the centre, black corners
    (_pil(lambda img, v: _affine(img, 1, v, 0, 0, 1, 0)), -0.3, 0.3),  # shear x
    (_pil(lambda img, v: _affine(img, 1, 0, 0, v, 1, 0)), -0.3, 0.3),  # shear y
    (_pil(lambda img, v: _affine(img, 1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),  # translate x
    (_pil(lambda img, v: _affine(img, 1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),  # translate y
]


def strong_augment(x, rng, flip):
    """The weak view, then RandAugment (2 random ops at random magnitudes, as the common FixMatch reproduction
    RandAugmentMC(n=2); USB draws 3), then Cutout (FixMatch)."""
    h, w = x.shape[:2]
    x = weak_augment(x, rng, flip)
    for op, low, high in rng.choices(RANDAUGMENT_OPS, k=2):
        x = op(x, low + (high - low) * rng.random())
    x = np.array(x)  # a writable copy for Cutout
    side = int(rng.uniform(0, 0.5) * w)  # Cutout: a grey square of up to half the image side
    if side > 0:
        r, q = rng.randint(0, h - 1), rng.randint(0, w - 1)
        x[max(0, r - side // 2): r + side - side // 2, max(0, q - side // 2): q + side - side // 2] = 127
    return x


def sample_indices(n, count, step, seed, stream):
    """Positions [step*count, (step+1)*count) of an endless stream of epochs, each epoch a fresh
    permutation of range(n) drawn from (seed, stream, epoch)."""
    pos = np.arange(step * count, (step + 1) * count)
    out = np.empty(count, np.int64)
    for epoch in np.unique(pos // n):
        perm = np.random.default_rng([seed, stream, int(epoch)]).permutation(n)
        sel = pos // n == epoch
        out[sel] = perm[pos[sel] % n]
    return out


def augmentation_rng(seed, step):
    """The random.Random that augments step `step`'s batch: seeded from (seed, step) alone, with a key that no
    other (seed, step) shares (steps below 2^64). Before step 1_000_003 the key is seed * 1_000_003 + step, as
    it always was, so that earlier runs repeat; from there on (the default T = 2^20 gets there) that key would
    repeat seed + 1's first steps, so it is 2^96 + seed * 2^64 + step, above every key of the first kind."""
    key = seed * 1_000_003 + step if step < 1_000_003 else 2**96 + (seed << 64) + step
    return random.Random(key)


class TrainBatches(torch.utils.data.Dataset):
    """Item t is the whole training batch of step t (labeled weak view, unlabeled weak and strong
    views), computed from (seed, t) alone."""

    def __init__(self, images, labels, labeled_idx, unlabeled_idx, args, flip, first_step):
        self.images, self.labels, self.flip = images, labels, flip
        self.labeled_idx, self.unlabeled_idx = labeled_idx, unlabeled_idx
        self.args, self.first_step = args, first_step

    def __len__(self):
        return self.args.total_steps - self.first_step

    def _views(self, indices, rng, augment):
        """uint8 (N, H, W, C) views; normalisation happens on the device."""
        return torch.from_numpy(np.stack([augment(self.images[i], rng, self.flip) for i in indices]))

    def __getitem__(self, i):
        a, step = self.args, self.first_step + i
        rng = augmentation_rng(a.seed, step)
        lab = self.labeled_idx[sample_indices(len(self.labeled_idx), a.batch_size, step, a.seed, 0)]
        batch = {"x_l": self._views(lab, rng, weak_augment), "y_l": torch.from_numpy(self.labels[lab])}
        if not a.labeled_only:
            u = sample_indices(len(self.unlabeled_idx), a.batch_size * a.uratio, step, a.seed, 1)
            unl = self.unlabeled_idx[u]
            batch.update(x_uw=self._views(unl, rng, weak_augment), x_us=self._views(unl, rng, strong_augment),
                         y_u=torch.from_numpy(self.labels[unl]), idx_u=torch.from_numpy(u))
        return batch


def worker_init(_):
    torch.set_num_threads(1)  # workers only stack small arrays; leave the cores to the model
    # Lowest priority: workers fill the cores the training threads leave idle. At equal priority they
    # preempt those threads, which then wait for each other at every op (on 2 cores, CPU training:
    # 0.09-0.14 s per digits step instead of 0.20-0.25). os.nice is POSIX only.
    if hasattr(os, "nice"):
        os.nice(19)
    # Ctrl-C reaches the whole process group. The training process finishes its step and then shuts the workers
    # down; a worker that died first would fail a batch it waits for.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # A scheduler's SIGTERM may reach the whole job too. A worker killed by it made torch raise in the training process
    # (a traceback; once seen here before summary.json was written); it exits quietly instead, and the training
    # process stops before a step whose batch no worker delivered. (Ignored, it could not end a worker that hangs.)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


# ---------------------------------------------------------------------------------------------
# Networks: each exposes `features(x) -> (N, D)` and the linear `head`, so methods that treat
# the extractor and the classifier differently (LayerMatch) change the loss, not the network.
# ---------------------------------------------------------------------------------------------
def lrelu():
    return nn.LeakyReLU(0.1)


class WRNBlock(nn.Module):
    """Pre-activation residual block of USB's WideResNet (BN momentum 0.001, eps 0.001)."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.act1 = nn.BatchNorm2d(cin, momentum=0.001, eps=0.001), lrelu()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1)
        self.bn2, self.act2 = nn.BatchNorm2d(cout, momentum=0.001, eps=0.001), lrelu()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0)

    def forward(self, x):
        out = self.act1(self.bn1(x))
        if self.shortcut is not None:  # the activation then also feeds the projection shortcut
            x = out
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + (x if self.shortcut is None else self.shortcut(x))


class WideResNet(nn.Module):
    """WRN-28-k (3 groups) and USB's WRN-37-2 variant for STL-10 (4 groups, first stride 2)."""

    def __init__(self, in_channels, classes, width, groups=3, first_stride=1, blocks_per_group=4):
        super().__init__()
        chans = [16] + [16 * width * 2**g for g in range(groups)]
        layers = [nn.Conv2d(in_channels, 16, 3, 1, 1)]
        for g in range(groups):
            for b in range(blocks_per_group):
                stride = (first_stride if g == 0 else 2) if b == 0 else 1
                layers.append(WRNBlock(chans[g] if b == 0 else chans[g + 1], chans[g + 1], stride))
        layers += [nn.BatchNorm2d(chans[-1], momentum=0.001, eps=0.001), lrelu(),
                   nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(chans[-1], classes)
        for m in self.modules():  # USB's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.head(self.features(x))


def conv_bn(cin, cout, k=3, pad=1, momentum=0.001):
    return [nn.Conv2d(cin, cout, k, 1, pad), nn.BatchNorm2d(cout, momentum=momentum), lrelu()]


class ConvLarge(nn.Module):
    """The 13-layer CNN of Laine & Aila used by MetaSemi (LeakyReLU 0.1, Dropout2d 0.5)."""

    def __init__(self, in_channels, classes):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(in_channels, 128), *conv_bn(128, 128), *conv_bn(128, 128), nn.MaxPool2d(2), nn.Dropout2d(0.5),
            *conv_bn(128, 256), *conv_bn(256, 256), *conv_bn(256, 256), nn.MaxPool2d(2), nn.Dropout2d(0.5),
            *conv_bn(256, 512, pad=0), *conv_bn(512, 256, 1, 0), *conv_bn(256, 128, 1, 0),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """A 3-conv network for 8x8 inputs (digits, tests). BN momentum 0.01: its runs are short."""

    def __init__(self, in_channels, classes):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn(in_channels, 32, momentum=0.01), nn.MaxPool2d(2), *conv_bn(32, 64, momentum=0.01),
            nn.MaxPool2d(2), *conv_bn(64, 128, momentum=0.01), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x))


NETS = {
    "wrn28_2": lambda cin, k: WideResNet(cin, k, width=2),
    "wrn28_8": lambda cin, k: WideResNet(cin, k, width=8),
    "wrn37_2": lambda cin, k: WideResNet(cin, k, width=2, groups=4, first_stride=2),
    "convlarge": ConvLarge,
    "cnn_small": SmallCNN,
}


# ---------------------------------------------------------------------------------------------
# Meta-T: the loss, the threshold generation network and the meta step
# ---------------------------------------------------------------------------------------------
def masked_ce_reference(logits_s, probs_w, tau, beta):
    """Per-sample mask * CE(logits_s, argmax probs_w); mask = 1[conf >= tau] for beta = inf, else
    sigmoid(beta * (conf - tau)). The definition of `sslkernels.masked_ce`, used when it is absent."""
    conf, pseudo_label = probs_w.detach().max(dim=1)
    mask = (conf >= tau).to(logits_s.dtype) if math.isinf(beta) else torch.sigmoid(beta * (conf - tau))
    return mask * F.cross_entropy(logits_s, pseudo_label, reduction="none"), mask, pseudo_label


masked_ce = sslkernels.masked_ce if sslkernels is not None else masked_ce_reference


def class_confidence_reference(probs):
    """Eq. 5: row c of the C x C result averages the rows of probs whose argmax is c (1/C for a class that no
    row predicts), and the per-class counts. The definition of `sslkernels.class_confidence`."""
    classes = probs.shape[1]
    pseudo_label = probs.argmax(dim=1)
    counts = torch.zeros(classes, dtype=torch.long, device=probs.device)  # not bincount: it syncs on CUDA
    counts.index_add_(0, pseudo_label, torch.ones_like(pseudo_label))
    sums = torch.zeros(classes, classes, dtype=probs.dtype, device=probs.device).index_add_(0, pseudo_label, probs)
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], 1 / classes), counts


class_confidence = sslkernels.class_confidence if sslkernels is not None else class_confidence_reference


def make_tgn(classes, hidden):
    """The threshold generation network (Sec. 4.2): MLP 2C -> hidden -> 1. The sigmoid keeps tau in (0, 1),
    starting near 0.5 as in the paper's Fig. 5(c)."""
    return nn.Sequential(nn.Linear(2 * classes, hidden), nn.ReLU(), nn.Linear(hidden, 1), nn.Sigmoid())


def tgn_thresholds(tgn, probs_w, pbar):
    """Eq. 6: tau_m = V([p_m, pbar[argmax p_m]]; Theta). Both inputs are detached from the classifier."""
    return tgn(torch.cat([probs_w, pbar[probs_w.argmax(dim=1)]], dim=1)).squeeze(1)


def meta_t_loss(logits, y_l, probs_w, tau, args):
    """Eq. 10: L = CE(labeled) + lambda_u * mean over mu*B of S(max p_w - tau_m) * CE(strong, argmax p_w), with
    S the sigmoid of sharpness beta (Eq. 14), or the indicator 1[max p_w >= tau_m] with --hard-mask."""
    n_u = args.batch_size * args.uratio
    logits_l, _, logits_us = torch.split(logits, [args.batch_size, n_u, n_u])
    loss_s = F.cross_entropy(logits_l, y_l)
    loss_u, mask, pseudo_label = masked_ce(logits_us, probs_w, tau, math.inf if args.hard_mask else args.beta)
    loss_u = loss_u.mean()
    return loss_s + args.lambda_u * loss_u, {"loss_s": loss_s, "loss_u": loss_u}, mask, pseudo_label


def rng_state(device):
    """The state of the generator that dropout on `device` draws from, to replay the same masks later."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@contextlib.contextmanager
def replayed_rng(state, device):
    """Runs the block from a saved generator state (the same dropout masks as when it was saved), then restores the
    current one, so that the training's random stream is the same as without the block. None: a plain block."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if device.type == "cuda":
            torch.cuda.set_rng_state(state, device)
        else:
            torch.set_rng_state(state)
        yield


# The forward-mode pass computes every op's value again (the step's forward) beside its tangent. For the ops that
# carry the parameters, convolutions and training-mode BatchNorm, RecordForward keeps the values of the step's own
# forward, and ReuseForward hands them back in the same order to the pass, which then computes only their tangents;
# every other op runs in forward-mode AD as before. Measured on CPU (cnn_small, 960 rows, channels_last, 1 thread),
# the pass went from 62 to 41 ms: 3 of its 9 convolutions were the forward again, one convolved the input's zero
# tangent, and forward AD's BatchNorm rule makes about 15 elementwise passes over the activations, the one below 6.
def reused_from_forward(func, args, kwargs):
    if func is F.conv2d:
        return True
    return func is F.batch_norm and kwargs.get("training", len(args) > 5 and args[5])


class RecordForward(torch.overrides.TorchFunctionMode):
    """Keeps the outputs of the convolutions and training-mode BatchNorms of the forward that runs under it."""

    def __init__(self):
        super().__init__()
        self.values = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if reused_from_forward(func, args, kwargs):
            self.values.append(out.detach())
        return out


class ReuseForward(torch.overrides.TorchFunctionMode):
    """In a forward-mode pass through the recorded network and batch: the recorded values of the convolutions and
    BatchNorms, with tangents from their linearisations below."""

    def __init__(self, values):
        super().__init__()
        self.values = iter(values)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not reused_from_forward(func, args, kwargs):
            return func(*args, **kwargs)
        tangent = (conv2d_tangent if func is F.conv2d else batch_norm_tangent)(*args, **kwargs)
        value = next(self.values, None)
        if value is None or value.shape != tangent.shape:
            raise RuntimeError("the forward-mode pass does not follow the recorded forward (another network or batch)")
        return fwAD.make_dual(value, tangent.to(value.dtype))

    def __exit__(self, exc_type, exc, traceback):
        values_left = exc_type is None and next(self.values, None) is not None
        super().__exit__(exc_type, exc, traceback)  # leave the mode first, also when raising below
        if values_left:
            raise RuntimeError("the forward-mode pass skipped ops of the recorded forward")


def conv2d_tangent(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """conv(x, W) + b is linear in x and in (W, b): its tangent is conv(x, dW) + db + conv(dx, W), the last term
    left out where x has no tangent (the network's input), which forward AD would convolve as zeros."""
    xp, dx = fwAD.unpack_dual(x)
    wp, dw = fwAD.unpack_dual(weight)
    db = None if bias is None else fwAD.unpack_dual(bias).tangent
    tangent = F.conv2d(xp, torch.zeros_like(wp) if dw is None else dw, db, stride, padding, dilation, groups)
    if dx is not None:
        tangent = tangent + F.conv2d(dx, wp, None, stride, padding, dilation, groups)
    return tangent


def batch_norm_tangent(x, running_mean, running_var, weight=None, bias=None, training=True, momentum=0.1, eps=1e-5):
    """Training-mode BatchNorm y = g * xhat + b with xhat = (x - mean) / sqrt(var + eps) over all dims but the
    channels: dy = g * invstd * (dx - mean(dx) - xhat * mean(xhat * dx)) + dg * xhat + db."""
    xp, dx = fwAD.unpack_dual(x)
    xhat, _, invstd = torch.native_batch_norm(xp, None, None, None, None, True, 0.0, eps)  # no running stats
    dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
    g, dg = fwAD.unpack_dual(weight) if weight is not None else (None, None)
    db = fwAD.unpack_dual(bias).tangent if bias is not None else None
    scale = invstd if g is None else g * invstd
    dx = torch.zeros_like(xp) if dx is None else dx
    coef_xhat = -scale * (xhat * dx).mean(dims) + (0 if dg is None else dg)
    offset = -scale * dx.mean(dims) + (0 if db is None else db)
    return torch.addcmul(offset.view(shape), xhat, coef_xhat.view(shape)).addcmul_(dx, scale.view(shape))


def strong_view_directional_derivative(model, params, buffers, v, inputs, pseudo_label, forward_values=None):
    """v . grad_w CE_j(w) for every strong view j (the last rows of inputs), in forward mode through the step's whole
    concatenated forward, so that BatchNorm sees the same batch: exact, without a double backward. Dual numbers, not
    torch.func.jvp: BatchNorm updates the (cloned) buffers in place. forward_values: RecordForward's values of the
    step's forward, reused (above), or None. A function of its own so that --compile can compile it."""
    reuse = contextlib.nullcontext() if forward_values is None else ReuseForward(forward_values)
    with fwAD.dual_level(), reuse:
        duals = {k: fwAD.make_dual(p.detach(), vk) for (k, p), vk in zip(params.items(), v)}
        logits = torch.func.functional_call(model, {**duals, **buffers}, (inputs,))[-len(pseudo_label):]
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 under autocast -> float32
        return fwAD.unpack_dual(F.cross_entropy(logits, pseudo_label, reduction="none")).tangent


def load_forward_mode_ad_quietly():
    """Forward-mode AD loads its decompositions through torch.jit.script on first use, and recent torch warns that
    torch.jit.script is deprecated: torch's own call, which no user of this script can act on. Load them once, with
    that one warning ignored (filtering around every meta step would reset Python's once-per-location warnings)."""
    with warnings.catch_warnings(), fwAD.dual_level():
        warnings.filterwarnings("ignore", "`torch.jit.script` is deprecated", FutureWarning)
        fwAD.make_dual(torch.zeros(()), torch.zeros(()))


def meta_gradient(model, tgn, logits_us, probs_w, pbar, x_l, y_l, inputs, alpha, args, autocast=contextlib.nullcontext,
                  directional_derivative=strong_view_directional_derivative, forward_rng=None, forward_values=None):
    """grad_Theta of the meta loss L_meta = CE(f(x_l; w_hat), y_l) (Eq. 12) after the virtual SGD step
    w_hat = w - alpha * grad_w L_u(w, Theta) (Eq. 8), for the TGN update (Eq. 9 / 16); also returns L_meta (the
    labeled loss at w instead under fd with v at w, which computes no w_hat).
    inputs: the step's concatenated batch (labeled, weak, strong); logits_us: its strong-view logits, with their
    graph to w. The extra forwards run on cloned buffers, so the meta step never changes the BatchNorm running
    statistics. forward_rng: the generator state (rng_state) from just before the step's forward; with it, the
    forward-mode pass of jvp replays that forward's dropout masks and stays exact for a network with dropout (in eager
    mode: torch.compile draws a compiled graph's masks its own way). forward_values: RecordForward's values of that
    forward, which the forward-mode pass then reuses instead of computing them again, or None."""
    params = dict(model.named_parameters())
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    n_u = len(logits_us)

    def f(w, x, precision=autocast):
        with precision():
            return torch.func.functional_call(model, {**w, **buffers}, (x,)).to(logits_us.dtype)

    tau = tgn_thresholds(tgn, probs_w, pbar)  # with its graph to Theta
    loss_u, mask, pseudo_label = masked_ce(logits_us, probs_w, tau, args.beta)
    if args.meta_grad == "exact":  # differentiate through the virtual step: a double backward
        g = torch.autograd.grad(loss_u.mean(), list(params.values()), create_graph=True)
        w_hat = {k: p - alpha * gk for (k, p), gk in zip(params.items(), g)}  # Eq. 8
        loss_meta = F.cross_entropy(f(w_hat, x_l), y_l)
        return torch.autograd.grad(loss_meta, list(tgn.parameters())), loss_meta.detach()
    # Eq. 17: dL_meta/dS_j = -(alpha / (mu*B)) * v . grad_w CE_j(w) with v = grad L_meta(w_hat), exactly. The dot
    # product is the directional derivative of CE_j along v: jvp takes it in forward mode through the step's whole
    # concatenated forward (so BatchNorm sees the same batch: the exact gradient, without a double backward); fd
    # approximates it by a central difference of two forwards of the strong batch alone (first order).
    if args.meta_grad == "jvp" or args.fd_direction_at == "w_hat":
        g = torch.autograd.grad(loss_u.mean(), list(params.values()), retain_graph=True)
        at = {k: (p - alpha * gk).detach().requires_grad_() for (k, p), gk in zip(params.items(), g)}
    else:  # v = gradient of the labeled loss at w, from the labeled batch alone (BN sees that batch only)
        at = params
    loss_meta = F.cross_entropy(f(at, x_l), y_l)
    v = torch.autograd.grad(loss_meta, list(at.values()))
    if args.meta_grad == "jvp":
        with autocast(), replayed_rng(forward_rng, inputs.device):
            directional = directional_derivative(model, params, buffers, v, inputs, pseudo_label, forward_values)
    else:
        eps = 0.01 / torch.nn.utils.get_total_norm(v).clamp_min(1e-12)
        fd_rng = rng_state(inputs.device)  # both forwards draw the same dropout masks: only eps * v differs

        def ce_at(sign):  # without autocast: bfloat16 weights would round most of eps * v away
            w = {k: p + sign * eps * vk for (k, p), vk in zip(params.items(), v)}
            with replayed_rng(fd_rng, inputs.device):
                logits = f(w, inputs[-n_u:], precision=contextlib.nullcontext)
            return F.cross_entropy(logits, pseudo_label, reduction="none")

        with torch.no_grad():
            directional = (ce_at(1) - ce_at(-1)) / (2 * eps)
    # backpropagate dL_meta/dS_j through S_j(tau_j(Theta)) into the TGN (Eq. 16)
    dmeta_dmask = -(alpha / n_u) * directional
    return torch.autograd.grad(mask, list(tgn.parameters()), grad_outputs=dmeta_dmask), loss_meta.detach()


def bank_rows(idx_u):
    """The rows of a memory bank that a batch writes, and the batch positions written there: each sample's last
    occurrence. A batch that straddles two epochs of the unlabeled stream can hold a sample twice, and an indexed write
    of repeated rows keeps any one of them, or a mix, with several CPU threads or on CUDA (here, 2 threads: 28
    different results in 300 repeats of one 448 x 10 write). One thread wrote the last: that is kept."""
    idx = idx_u.numpy()
    _, last_in_reversed = np.unique(idx[::-1], return_index=True)
    positions = np.sort(len(idx) - 1 - last_in_reversed)
    return torch.from_numpy(idx[positions]), torch.from_numpy(positions)


@torch.no_grad()
def threshold_diagnostics(tau_bank, prob_bank, bins=20):
    """Fig. 5: histogram on [0, 1] of the latest threshold of every unlabeled sample seen so far, and their
    mean per class of the current pseudo-label (NaN for a class without any)."""
    seen = ~tau_bank.isnan()
    tau, pseudo_label = tau_bank[seen], prob_bank[seen].argmax(dim=1)
    classes = prob_bank.shape[1]
    sums = torch.zeros(classes, dtype=tau.dtype, device=tau.device).index_add_(0, pseudo_label, tau)
    return {"tau_hist": [int(c) for c in torch.histc(tau, bins, 0, 1).tolist()],
            "tau_class_mean": (sums / torch.bincount(pseudo_label, minlength=classes)).tolist()}


def plot_diagnostics(metrics_path, out):
    """PNGs of the paper's plots: the threshold distribution at the last log (Fig. 5a), the mean threshold per
    class over training (Fig. 5c), the correct and wrong selected pseudo-labels over training (Fig. 4)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [r for r in map(json.loads, metrics_path.read_text().splitlines()) if "tau_hist" in r]
    if not recs:
        return
    steps, hist = [r["step"] for r in recs], recs[-1]["tau_hist"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(np.linspace(0, 1, len(hist), endpoint=False), hist, width=1 / len(hist), align="edge", edgecolor="white")
    ax.set(xlabel="threshold tau", ylabel="unlabeled samples", xlim=(0, 1),
           title=f"Latest threshold of each unlabeled sample (step {steps[-1]})")
    fig.tight_layout()
    fig.savefig(out / "thresholds_hist.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for c, taus in enumerate(zip(*(r["tau_class_mean"] for r in recs))):
        ax.plot(steps, [math.nan if t is None else t for t in taus], label=f"class {c}")  # null: class not yet predicted
    ax.set(xlabel="step", ylabel="mean threshold", title="Mean threshold per pseudo-label class")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(out / "thresholds_per_class.png", dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, colour in (("selected_correct", "tab:green"), ("selected_wrong", "tab:red")):
        ax.plot(steps, [r[key] for r in recs], color=colour, label=key.replace("_", " "))
    ax.set(xlabel="step", ylabel="pseudo-labels per log interval", title="Selected pseudo-labels (true label known)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "pseudo_labels.png", dpi=120)
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Optimisation, EMA, evaluation, checkpoints
# ---------------------------------------------------------------------------------------------
def make_optimizer(model, args):
    """SGD Nesterov; no weight decay on BatchNorm parameters and biases (all the 1-D tensors).
    Step decay (Table 6): lr / 10 at each milestone, a fraction of the total steps (1/3 of 300 x 1024 = epoch 100);
    or FixMatch's cosine, the schedule of the paper's comparison at equal training procedure (Fig. 4, Setting 2)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    try:
        fractions = [Fraction(f) for f in args.lr_milestones.split(",") if f.strip()]
    except (ValueError, ZeroDivisionError):
        fractions = [-1]
    if not all(0 < f <= 1 for f in fractions):
        raise UserError(f"--lr-milestones {args.lr_milestones!r}: want fractions in (0, 1] such as 1/3,2/3")
    milestones = [math.ceil(f * args.total_steps) for f in fractions]
    step_decay = lambda t: 0.1 ** sum(t >= m for m in milestones)
    cosine = lambda t: math.cos(7 * math.pi * t / (16 * args.total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine if args.lr_schedule == "cosine" else step_decay)


@torch.no_grad()
def ema_update(ema_model, model, decay):
    """Exponential moving average of the weights; BatchNorm statistics are copied (USB)."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - decay)
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)


def early_ema_note(decay, step):
    """A console note while the EMA weights, which start as the initial weights, still hold more than a quarter of
    them (decay ** step): the evaluation is then far below the trained weights' (digits, FixMatch: chance up to step
    400 and 86% against 95% at step 1000 with --ema 0.999), which would otherwise read as a broken run."""
    left = decay ** step
    if left <= 0.25:
        return ""
    return f" (the EMA weights are still {left:.0%} initial weights: --ema {decay} scores low this early)"


def to_input(x_u8, device, mean, std, memory_format):
    """uint8 (N, H, W, C) -> normalised float (N, C, H, W) on the device."""
    x = x_u8.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return ((x - mean) / std).contiguous(memory_format=memory_format)


@torch.no_grad()
def evaluate(model, images, labels, classes, args, prepare, autocast):
    """Top-1, balanced accuracy (mean of per-class recalls) and per-class accuracy."""
    model.eval()
    preds = []
    for i in range(0, len(images), args.eval_batch_size):
        with autocast():
            preds.append(model(prepare(images[i:i + args.eval_batch_size])).argmax(1).cpu())
    model.train()
    correct = (torch.cat(preds) == labels).float()
    per_class = [correct[labels == c].mean().item() if (labels == c).any() else float("nan") for c in range(classes)]
    return {"top1": correct.mean().item(), "balanced_acc": float(np.nanmean(per_class)), "per_class_acc": per_class}


def json_safe(x):
    """NaN (e.g. a pseudo-label accuracy when nothing was selected) and infinities as null: JSON has neither."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


# what train() saves in a checkpoint; --resume refuses a file that lacks any of it
CHECKPOINT_KEYS = ("algorithm", "step", "model", "ema_model", "optimizer", "scheduler", "rng", "tgn", "meta_optimizer",
                   "prob_bank", "tau_bank", "best_top1", "seconds", "args")


def save_checkpoint(path, state):
    """Write to a temporary file, then rename: an interruption never leaves a broken checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    sync_and_rename(tmp, path)


def write_text_atomically(path, text):
    """The checkpoint's way for the text files that are rewritten: split.json, summary.json, metrics.jsonl on resume."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    sync_and_rename(tmp, path)


def sync_and_rename(tmp, path):
    with open(tmp, "rb+") as f:  # on disk before the rename: a machine that crashes keeps the old file or the new one
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(where, mmap=False):
    path = Path(where)
    path = path / "checkpoint.pt" if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"--resume {where!r}: no checkpoint file there")
    try:  # weights_only=False: our own file, which also holds the RNG states; mmap: tensors read only when used
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        if not isinstance(ckpt, dict):
            raise ValueError("not a dict")
        if ckpt.get("algorithm", ALGORITHM) != ALGORITHM:
            raise ValueError(f"written by {ckpt['algorithm']}.py")
        missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
        if missing or not isinstance(ckpt["args"], dict):
            raise ValueError(f"no {', '.join(missing) or 'args dict'}")
    except Exception as e:
        raise UserError(f"cannot resume from {path}: the file is corrupt or not a checkpoint of {ALGORITHM}.py ({e})") from None
    return ckpt


def logged_step(line):
    """The step of a metrics.jsonl line; a line cut short by an interrupted write counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def reuse_freed_memory():
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse (CPU training). PyTorch's CPU allocator
    caches nothing, and by default glibc maps large blocks afresh (from 128 KiB, a threshold it raises as such blocks
    are freed) and hands them back to the system when freed, so each new activation of that size is faulted in again
    page by page. Measured on cnn_small with 960 rows, one thread: a forward and backward 75 -> 68 ms, Meta-T's
    forward-mode pass 88 -> 66 ms. Returns False where there is no glibc (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from malloc.h; 32 MiB is the largest threshold glibc accepts
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


@contextlib.contextmanager
def deferred_stop_signals(received):
    """Within the block, Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption) only append their name to `received`,
    so that the training loop can finish its step and write a checkpoint before it stops; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def rng_states(device):
    """The RNGs a run draws from: the CUDA one of its own device only, so that it resumes on any machine."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_states(s, device):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    cuda = s["cuda"]
    if isinstance(cuda, list):  # an older checkpoint: one state per visible GPU, the run's at its device's index
        cuda = cuda[device.index or 0] if device.type == "cuda" and (device.index or 0) < len(cuda) else None
    if cuda is not None and device.type == "cuda":  # a CPU run resumed on a GPU keeps the seeded CUDA generator
        torch.cuda.set_rng_state(cuda, device)


# Flags that only say where and how fast a run goes. Every other flag defines what is trained: resuming with a
# different value would silently train something else (or be silently overridden by the optimizer's saved state).
RESUME_MAY_DIFFER = ("data_dir", "device", "workers", "threads", "eval_every", "log_every", "eval_batch_size", "output_dir",
                     "resume", "overwrite", "stop_after", "channels_last", "bf16", "compile", "tensorboard",
                     "torch_deterministic", "plots", "jvp_reuse_forward")


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
def check_flags(args):
    """Stops a run with bad flags here, each with one line (UserError), before anything is loaded or written."""
    try:
        device = torch.device(args.device)
    except RuntimeError:  # not a device string at all
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu, cuda or cuda:<index>, got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA device(s), from cuda:0")
    for name in ("batch_size", "uratio", "total_steps", "eval_every", "log_every", "eval_batch_size", "image_size",
                 "meta_interval", "tgn_hidden", "meta_lr", "beta"):
        if not getattr(args, name) > 0:  # not `<= 0`, which NaN passes
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("lr", "lambda_u"):  # 0 is allowed: no update, no unlabeled loss
        if not 0 <= getattr(args, name) < math.inf:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or a positive finite number, got {getattr(args, name)}")
    if not 0 < args.momentum < 1:
        raise UserError(f"--momentum must be in (0, 1) (Nesterov SGD needs some), got {args.momentum}")
    if not math.isfinite(args.meta_lr):
        raise UserError(f"--meta-lr must be finite, got {args.meta_lr}")
    if not math.isfinite(args.beta):
        raise UserError("--beta must be finite: the meta step differentiates the surrogate mask (see --hard-mask)")
    for name, choices in (("meta_grad", ("exact", "jvp", "fd")), ("fd_direction_at", ("w_hat", "w")),
                          ("lr_schedule", ("step", "cosine"))):
        if getattr(args, name) not in choices:
            raise UserError(f"unknown --{name.replace('_', '-')} {getattr(args, name)!r}; "
                            f"choose {', '.join(choices[:-1])} or {choices[-1]}")
    if args.compile and args.meta_grad == "exact" and not args.labeled_only:
        raise UserError("--compile has no double backward for --meta-grad exact; use --meta-grad jvp "
                        "(the same gradient) or fd, or no --compile")
    if args.plots and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plots needs matplotlib: pip install matplotlib")
    for name in ("threads", "workers", "stop_after"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be 0 or positive, got {getattr(args, name)}")
    if not 0 <= args.seed < 2**32:  # numpy's legacy seeding takes no more
        raise UserError(f"--seed must be in [0, 2^32), got {args.seed}")
    if not 0 <= args.ema <= 1:
        raise UserError(f"--ema is a decay in [0, 1], got {args.ema}")


def train(args):
    # --- validate and set up ---
    if args.device == "":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.uratio = args.uratio or TABLE6_URATIO.get(args.dataset, 6)
    check_flags(args)
    device = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if device.type == "cpu":
        reuse_freed_memory()
    if args.dataset not in DATASETS:
        raise UserError(f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    _, mean, std, default_net, default_wd, flip = DATASETS[args.dataset]
    args.net = args.net or default_net
    args.weight_decay = default_wd if args.weight_decay == -1 else args.weight_decay
    if not 0 <= args.weight_decay < math.inf:  # NaN included
        raise UserError(f"--weight-decay must be -1 (the dataset's default), 0 or a positive finite number, "
                        f"got {args.weight_decay}")
    if args.net not in NETS:
        raise UserError(f"unknown --net {args.net!r}; choose one of {', '.join(NETS)}")
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None:
        differ = [f"--{k.replace('_', '-')} {v} (checkpoint: {ckpt['args'].get(k)})"
                  for k, v in dataclasses.asdict(args).items() if k not in RESUME_MAY_DIFFER and ckpt["args"].get(k) != v]
        if differ:
            raise UserError(f"--resume: this run's flags differ from the checkpoint's: {', '.join(differ)}")
        if ckpt["step"] >= args.total_steps:  # nothing to run; going on would overwrite its summary.json
            raise UserError(f"--resume {args.resume}: that run has finished all its {args.total_steps} steps")
        run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
        args.output_dir = args.output_dir or str(run_dir)  # the run's folder, wherever it is now
    out = Path(args.output_dir or f"runs/{ALGORITHM}_{args.dataset}_{args.labels}_seed{args.seed}")
    args.output_dir = str(out)
    if not ckpt and not args.overwrite and (out / "checkpoint.pt").exists():  # never lose a run by accident
        raise UserError(f"{out} holds an earlier run's checkpoint: --resume {out} continues it, --overwrite replaces "
                        "it with this run, or choose another --output-dir")
    moved = ckpt is not None and out.resolve() != run_dir.resolve()  # resumed into another folder
    if moved and not args.overwrite and (out / "checkpoint.pt").exists():
        raise UserError(f"--output-dir {out} holds another run's checkpoint, which continuing --resume {args.resume} "
                        "there would replace: --overwrite replaces it, or choose another --output-dir")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic  # else cuDNN may pick algorithms whose float atomics vary per run

    # --- data ---
    train_x, train_y, test_x, test_y, extra_x, classes = load_data(args)
    labeled_idx, unlabeled_idx, val_idx = split_labeled(train_y, classes, args, np.random.default_rng(args.seed))
    images, labels = train_x, train_y.astype(np.int64)
    if extra_x is not None:  # STL-10's unlabeled split: true labels unknown (-1)
        unlabeled_idx = np.concatenate([unlabeled_idx, np.arange(len(extra_x)) + len(train_x)])
        images = np.concatenate([train_x, extra_x])
        labels = np.concatenate([labels, np.full(len(extra_x), -1)])
    if len(unlabeled_idx) == 0 and not args.labeled_only:
        raise UserError("no training sample is left for the unlabeled set: use fewer --labels / --val-labels, no "
                        "--exclude-labeled, or --labeled-only")
    split = {"labeled": labeled_idx.tolist(), "validation": val_idx.tolist(), "unlabeled_count": len(unlabeled_idx)}
    if ckpt and (run_dir / "split.json").is_file() and json.loads((run_dir / "split.json").read_text()) != split:
        raise UserError(f"--resume {args.resume}: the data has changed since that run began (its labeled, validation "
                        f"or unlabeled set differs from {run_dir / 'split.json'}); resume it on the same data")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomically(out / "split.json", json.dumps(split))
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {out}: {e.strerror or e}") from None

    first_step = ckpt["step"] if ckpt else 0
    loader = torch.utils.data.DataLoader(
        TrainBatches(images, labels, labeled_idx, unlabeled_idx, args, flip, first_step), batch_size=None,
        num_workers=args.workers, persistent_workers=args.workers > 0, worker_init_fn=worker_init,
        prefetch_factor=4 if args.workers > 0 else None, pin_memory=device.type == "cuda",
        generator=torch.Generator())  # own generator: creating the iterator must not consume the global RNG
    on_cuda = device.type == "cuda"
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1)
    prepare = lambda x: to_input(x, device, mean_t, std_t, memory_format)
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda and args.bf16)
    test_images, test_labels = torch.from_numpy(test_x), torch.from_numpy(test_y.astype(np.int64))

    # --- model, optimiser, EMA ---
    model = NETS[args.net](train_x.shape[-1], classes)
    try:  # a network too deep for the images fails here, in one line, not inside the first step (on the CPU: only
        with torch.no_grad():  # shapes can fail; eval mode: BatchNorm's statistics stay untouched)
            model.eval()(torch.zeros(2, train_x.shape[3], train_x.shape[1], train_x.shape[2]))
    except RuntimeError as e:
        raise UserError(f"--net {args.net} does not fit the {train_x.shape[1]}x{train_x.shape[2]} images of --dataset "
                        f"{args.dataset}: {str(e).splitlines()[0]}") from None
    model = model.train().to(device, memory_format=memory_format)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, args)
    if args.compile:
        # the meta step backpropagates through the compiled forward twice (retain_graph=True); AOTAutograd's donated
        # buffers, freed by the first backward, make the second one fail (seen on CPU, 1 thread, B = 64, mu = 7)
        torch._functorch.config.donated_buffer = False
    forward = torch.compile(model) if args.compile else model
    # --compile also compiles the forward-mode pass of --meta-grad jvp (measured on CPU, cnn_small, 960 rows:
    # 118 ms eager, 85 ms compiled), but not under bf16 autocast: torch 2.11 on CUDA traced it into a float32 x
    # bfloat16 matrix product that fails (inductor and aot_eager alike; seen on an H200), so there it runs eagerly
    compile_forward_mode = args.compile and not (on_cuda and args.bf16)
    directional_derivative = (torch.compile(strong_view_directional_derivative) if compile_forward_mode
                              else strong_view_directional_derivative)
    if args.meta_grad == "jvp":
        load_forward_mode_ad_quietly()
    # created after the classifier, whose initialisation then equals FixMatch's
    tgn = make_tgn(classes, args.tgn_hidden).to(device)
    meta_optimizer = torch.optim.Adam(tgn.parameters(), lr=args.meta_lr)
    # latest weak-view softmax of every unlabeled sample, for pbar (Eq. 5), and its latest threshold (NaN until seen)
    prob_bank = torch.full((len(unlabeled_idx), classes), 1 / classes, device=device)
    tau_bank = torch.full((len(unlabeled_idx),), math.nan, device=device)
    best_top1, seconds_before = None, 0.0  # None until a first evaluation
    if ckpt:
        model.load_state_dict(ckpt["model"])
        ema_model.load_state_dict(ckpt["ema_model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        tgn.load_state_dict(ckpt["tgn"])
        meta_optimizer.load_state_dict(ckpt["meta_optimizer"])
        prob_bank.copy_(ckpt["prob_bank"])
        tau_bank.copy_(ckpt["tau_bank"])
        set_rng_states(ckpt["rng"], device)
        best_top1, seconds_before = ckpt["best_top1"], ckpt["seconds"]
    seen = ~tau_bank.isnan()  # the samples with a prediction in the bank (every step sets the threshold of its own)
    bank_complete = bool(seen.all())
    metrics_path = out / "metrics.jsonl"
    if ckpt:  # the run's records up to its checkpoint (the interrupted run may have logged later steps)
        logged = run_dir / "metrics.jsonl"
        keep = [l for l in logged.read_text().splitlines() if logged_step(l) <= first_step] if logged.exists() else []
        write_text_atomically(metrics_path, "".join(l + "\n" for l in keep))
        if moved:  # with --overwrite: no summary of the replaced run beside this one's records
            (out / "summary.json").unlink(missing_ok=True)
    else:  # a fresh run (with --overwrite where an earlier one was): nothing of another run stays beside it
        metrics_path.write_text("")
        for earlier in ("checkpoint.pt", "summary.json"):
            (out / earlier).unlink(missing_ok=True)
    writer = None
    if args.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(str(out))

    def log(record):
        with metrics_path.open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        if writer:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def checkpoint(step):
        save_checkpoint(out / "checkpoint.pt", {
            "algorithm": ALGORITHM, "step": step, "model": model.state_dict(), "ema_model": ema_model.state_dict(),
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_states(device),
            "tgn": tgn.state_dict(), "meta_optimizer": meta_optimizer.state_dict(),
            "prob_bank": prob_bank, "tau_bank": tau_bank,
            "best_top1": best_top1, "seconds": seconds_before + time.perf_counter() - start_time,
            "args": dataclasses.asdict(args)})

    # --- the training loop ---
    print(f"[{ALGORITHM}] {args.dataset}: {len(labeled_idx)} labeled, {len(unlabeled_idx)} unlabeled, "
          f"{len(test_y)} test | net {args.net} on {device} | extension "
          f"{'sslkernels' if sslkernels is not None else 'absent (pure PyTorch fallback)'} | output {out}")
    start_time = time.perf_counter()
    step_seconds, window, window_steps, window_start, eval_result = [], None, 0, time.perf_counter(), None
    last_step = args.total_steps if args.stop_after <= 0 else min(args.total_steps, first_step + args.stop_after)
    batches = iter(loader)
    step_start = time.perf_counter()
    stop_signals, checkpointed_step = [], None
    with deferred_stop_signals(stop_signals):
        for step in range(first_step + 1, last_step + 1):
            try:
                batch = next(batches)
            except Exception:
                if not stop_signals:
                    raise
                last_step = step - 1  # the workers ended with the signal: stop before this step
                break
            x_l, y_l = prepare(batch["x_l"]), batch["y_l"].to(device, non_blocking=True)
            if args.labeled_only:
                with autocast():
                    logits = forward(x_l).float()
                loss = F.cross_entropy(logits, y_l)
                stats = {"loss_s": loss}
            else:
                # labeled, weak and strong views in ONE forward: BatchNorm sees them together
                x_us = prepare(batch["x_us"])
                inputs = torch.cat([x_l, prepare(batch["x_uw"]), x_us])
                meta = (step - 1) % args.meta_interval == 0  # Algorithm 2 counts iterations t = step - 1 from 0
                jvp = meta and args.meta_grad == "jvp"
                forward_rng = rng_state(device) if jvp else None  # dropout masks, for the jvp pass
                # the values the jvp pass can take from this forward (eager only: a compiled forward runs no Python ops)
                recorded = RecordForward() if jvp and args.jvp_reuse_forward and not args.compile else None
                with autocast(), recorded if recorded is not None else contextlib.nullcontext():
                    logits = forward(inputs).float()
                # ---- Meta-T (the part other methods change) ----
                n_u = len(x_us)
                idx_u, rows = (t.to(device, non_blocking=True) for t in bank_rows(batch["idx_u"]))  # rows: batch positions
                probs_w = torch.softmax(logits[args.batch_size:-n_u].detach(), dim=1)
                prob_bank[idx_u] = probs_w[rows]  # before Eq. 5: pbar then holds this batch's current predictions
                if not bank_complete:  # Eq. 5 averages the samples that have a prediction: leave out the unseen rows
                    seen[idx_u] = True
                    bank_complete = bool(seen.all())  # a host sync, only until every sample has been seen once
                pbar = class_confidence(prob_bank if bank_complete else prob_bank[seen])[0]
                if meta:  # bi-level step: Eqs. 8, 9 / 16; Green Meta-T skips it on the other steps
                    theta_grads, loss_meta = meta_gradient(model, tgn, logits[-n_u:], probs_w, pbar, x_l, y_l, inputs,
                                                           scheduler.get_last_lr()[0], args, autocast, directional_derivative,
                                                           forward_rng, recorded.values if recorded is not None else None)
                    for theta, g in zip(tgn.parameters(), theta_grads):
                        theta.grad = g
                    meta_optimizer.step()
                    tgn_grad_norm = torch.nn.utils.get_total_norm(theta_grads)
                with torch.no_grad():
                    tau = tgn_thresholds(tgn, probs_w, pbar)  # the updated TGN's thresholds, constants for Eq. 10
                tau_bank[idx_u] = tau[rows]
                loss, stats, mask, pseudo_label = meta_t_loss(logits, y_l, probs_w, tau, args)  # reuses the forward
                # pseudo-label diagnostics; y_u = -1 where the true label is unknown
                y_u = batch["y_u"].to(device, non_blocking=True)
                known, correct = (y_u >= 0).float(), (pseudo_label == y_u).float()
                selected = (mask >= 0.5).float()  # a surrogate mask selects a sample when above 1/2
                stats.update(mask_rate=mask.mean(), selected=(selected * known).sum(),  # mask_rate: the mean weight
                             selected_correct=(selected * correct).sum(), known=known.sum(), correct=correct.sum(),
                             tau_mean=tau.mean(), meta_steps=loss.new_ones(()) if meta else loss.new_zeros(()),
                             loss_meta=loss_meta if meta else loss.new_zeros(()),
                             tgn_grad_norm=tgn_grad_norm if meta else loss.new_zeros(()),
                             # samples whose surrogate mask still responds to tau: only they send the TGN a gradient
                             mask_undecided=((mask > 0.01) & (mask < 0.99)).float().mean())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's, logged below
            scheduler.step()
            ema_update(ema_model, model, args.ema)

            # --- logging, evaluation, checkpoints ---
            # summed on the device and read once per log interval: no host sync on the hot path
            keys = ["loss", *stats]
            stats = torch.stack([loss.detach(), *(v.detach().float() for v in stats.values())])
            window = stats if window is None else window + stats
            window_steps += 1
            now = time.perf_counter()
            step_seconds.append(now - step_start)
            stopping = bool(stop_signals)  # read once: the step that sees a signal is logged, checkpointed, the last
            if step % args.log_every == 0 or step == last_step or stopping:
                n, w = window_steps, dict(zip(keys, window.tolist()))
                rec = {"step": step, "kind": "train", "lr": lr}
                rec.update({k: w[k] / n for k in ("loss", "loss_s", "loss_u", "mask_rate", "tau_mean") if k in w})
                if "known" in w:  # accuracy of the selected pseudo-labels, and of all of them
                    rec["pseudo_label_acc"] = w["selected_correct"] / w["selected"] if w["selected"] else float("nan")
                    rec["pseudo_label_acc_all"] = w["correct"] / w["known"] if w["known"] else float("nan")
                    # Meta-T's diagnostics (Figs. 4, 5): selected pseudo-labels over the interval, thresholds now
                    rec.update(selected_correct=round(w["selected_correct"]),
                               selected_wrong=round(w["selected"] - w["selected_correct"]),
                               meta_steps=round(w["meta_steps"]),
                               loss_meta=w["loss_meta"] / w["meta_steps"] if w["meta_steps"] else float("nan"),
                               tgn_grad_norm=w["tgn_grad_norm"] / w["meta_steps"] if w["meta_steps"] else float("nan"),
                               mask_undecided=w["mask_undecided"] / n,
                               **threshold_diagnostics(tau_bank, prob_bank))
                rate = n / (now - window_start)
                rec["steps_per_second"] = rate
                log(rec)
                eta = (last_step - step) / rate
                print(f"[{ALGORITHM}] step {step}/{args.total_steps} loss {rec['loss']:.4f}"
                      + (f" mask {rec['mask_rate']:.3f} pl_acc {rec['pseudo_label_acc']:.3f} tau {rec['tau_mean']:.3f}"
                         if "known" in w else "")
                      + f" lr {rec['lr']:.4f} | {rate:.2f} steps/s | ETA {eta / 60:.1f} min", flush=True)
                window, window_steps, window_start = None, 0, time.perf_counter()
            if step % args.eval_every == 0 or step == args.total_steps:
                eval_result = evaluate(ema_model, test_images, test_labels, classes, args, prepare, autocast)
                best_top1 = eval_result["top1"] if best_top1 is None else max(best_top1, eval_result["top1"])
                rec = {"step": step, "kind": "eval", **eval_result, "best_top1": best_top1}
                if len(val_idx):
                    val = evaluate(ema_model, torch.from_numpy(train_x[val_idx]), torch.from_numpy(labels[val_idx]),
                                   classes, args, prepare, autocast)
                    rec.update(val_top1=val["top1"], val_balanced_acc=val["balanced_acc"])
                log(rec)
                print(f"[{ALGORITHM}] eval step {step}: top1 {eval_result['top1']:.4f} "
                      f"balanced {eval_result['balanced_acc']:.4f} best {best_top1:.4f}"
                      + early_ema_note(args.ema, step), flush=True)
                checkpoint(step)
                checkpointed_step = step
            step_start = time.perf_counter()
            if stopping:
                last_step = step
                break
    if checkpointed_step != last_step:  # a planned stop or a signal (also before any step): all needed to resume
        checkpoint(last_step)
    del batches

    warm = step_seconds[max(10, len(step_seconds) // 10):] or step_seconds
    summary = {"algorithm": ALGORITHM, "fused_kernels": sslkernels is not None,  # else the pure-PyTorch fallback
               "steps": last_step, "finished": last_step == args.total_steps,
               "stopped_by": stop_signals[0] if stop_signals and last_step < args.total_steps else None,
               "top1": eval_result["top1"] if eval_result else None, "best_top1": best_top1,
               "balanced_acc": eval_result["balanced_acc"] if eval_result else None,
               "per_class_acc": eval_result["per_class_acc"] if eval_result else None,
               "seconds": seconds_before + time.perf_counter() - start_time,
               "seconds_per_step": float(np.median(warm)) if warm else None, "args": dataclasses.asdict(args)}
    write_text_atomically(out / "summary.json", json.dumps(json_safe(summary), indent=2))
    if args.plots:
        plot_diagnostics(metrics_path, out)
    if writer:
        writer.close()
    return summary


def main(argv=None):
    try:
        summary = train(parse_args(argv))
    except UserError as e:
        sys.exit(f"{ALGORITHM}.py: error: {e}")
    if summary["top1"] is not None:
        print(f"[{ALGORITHM}] final top1 {summary['top1']:.4f}, best {summary['best_top1']:.4f}, "
              f"balanced {summary['balanced_acc']:.4f}, {summary['seconds_per_step']:.4f} s/step")
    if summary["stopped_by"]:
        print(f"[{ALGORITHM}] {summary['stopped_by']}: stopped after step {summary['steps']} with a checkpoint; "
              f"--resume {summary['args']['output_dir']} continues the run")
        sys.exit(128 + signal.Signals[summary["stopped_by"]])  # the shell's code for a process ended by that signal


if __name__ == "__main__":
    main()
