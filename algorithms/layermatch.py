"""LayerMatch: Do Pseudo-labels Benefit All Layers? (Liang et al., arXiv 2024).

FreeMatch (freematch.py) plus two layer-wise pseudo-label strategies. Grad-ReLU: the linear head learns from the labeled
loss alone, while every unsupervised term still trains the feature extractor. Avg-Clustering: an averaged copy of the
head, reset to the live head every N steps, scores the strong views against the pseudo-labels, pulling the features
towards stable class centres. Defaults: the paper's training-from-scratch setting (USB's classic CV with FreeMatch's
thresholds; N = 2048, m = 0.999, alpha = 5e-4, w_ac = 1); docs/methods.md gives the equations and the choices made.

    python algorithms/layermatch.py --dataset cifar10 --labels 10
    python algorithms/layermatch.py --dataset digits --labels 10 --total-steps 3000   # offline, CPU, minutes
    python algorithms/layermatch.py --dataset text --data-dir reviews/ --labels 20 --pretrained all-MiniLM-L6-v2/
"""

import argparse
import collections
import contextlib
import copy
import dataclasses
import functools
import gzip
import importlib.util
import json
import math
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps

try:
    import sslkernels  # the project's fused kernels (csrc/); without them, their plain-PyTorch definitions run
except ImportError:
    sslkernels = None

ALGORITHM = "layermatch"
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def arg(default, help, valid=None):  # valid: (test, what the error line says the flag must be)
    return field(default=default, metadata={"help": help, "valid": valid})


POSITIVE, NON_NEGATIVE = (lambda v: v > 0, "positive"), (lambda v: v >= 0, "0 or positive")  # NaN fails both
FINITE, FRACTION = (lambda v: 0 <= v < math.inf, "0 or a positive finite number"), (lambda v: 0 <= v <= 1, "in [0, 1]")


@dataclass
class Args:
    # data
    dataset: str = arg("cifar10", "cifar10 | cifar100 | svhn | stl10 | mnist | fashion_mnist | digits | folder | text")
    data_dir: str = arg("./data", "where the datasets are (or get downloaded); folder: train/<class>/ and test/<class>/; text: train.jsonl and test.jsonl")
    labels: int = arg(40, "labeled samples, spread evenly over the classes")
    val_labels: int = arg(0, "labeled samples held out (evenly over classes) as a validation split; 0 = none")
    exclude_labeled: bool = arg(False, "keep labeled samples out of the unlabeled set (FixMatch and USB keep them in; --n1 always does)")
    n1: int = arg(0, "class-imbalanced split (Meta-T Sec. 5.3): labeled samples of class 0, N_c = N_1 * gamma_l^(-c/(C-1)); 0 = balanced")
    m1: int = arg(0, "class-imbalanced split: unlabeled samples of class 0, M_c = M_1 * gamma_u^(-c/(C-1)), apart from the labeled ones")
    gamma_l: float = arg(100.0, "imbalance ratio of the labeled split (with --n1)")
    gamma_u: float = arg(100.0, "imbalance ratio of the unlabeled split (with --n1)")
    image_size: int = arg(32, "`folder` images are resized to this square size", POSITIVE)
    max_length: int = arg(512, "text: tokens kept of each text (a batch is padded to its longest)", (lambda v: v >= 2, "at least 2"))
    # model and optimisation
    net: str = arg("", "wrn28_2 | wrn28_8 | wrn37_2 | convlarge | cnn_small | cnn_small_s2; empty = the dataset's default")
    pretrained: str = arg("", "a Hugging Face model folder to fine-tune instead of --net: a text (BERT...) or image (ViT, DINOv2...) encoder; it sets USB's fine-tuning defaults")
    batch_size: int = arg(64, "labeled batch size B", POSITIVE)
    uratio: int = arg(7, "mu: the unlabeled batch holds mu * B samples", POSITIVE)
    lr: float = arg(0.03, "SGD learning rate, decayed as lr * cos(7 pi t / 16 T)", FINITE)
    momentum: float = arg(0.9, "SGD Nesterov momentum", (lambda v: 0 < v < 1, "in (0, 1) (Nesterov SGD needs some)"))
    weight_decay: float = arg(-1.0, "weight decay, not applied to BN and biases; -1 = 5e-4 (1e-3 for cifar100)",
                              (lambda v: v == -1 or 0 <= v < math.inf, "-1 (the dataset's default), 0 or a positive finite number"))
    ema: float = arg(0.999, "decay of the EMA of the weights that is evaluated; at step t: min(ema, (1+t)/(10+t))", FRACTION)
    total_steps: int = arg(2**20, "training steps T", POSITIVE)
    optimizer: str = arg("sgd", "sgd: the method's own optimiser and schedule | adamw: AdamW, --layer-decay, --lr-warmup then cosine (the default with --pretrained)",
                         (lambda v: v in ("sgd", "adamw"), "sgd or adamw"))
    layer_decay: float = arg(1.0, "adamw: the lr of encoder layer l of L is lr * layer_decay^(L + 1 - l) (0: embeddings; the head has lr)",
                             (lambda v: 0 < v <= 1, "in (0, 1]"))
    lr_warmup: int = arg(0, "adamw: steps of linear lr warm-up from 0, then cosine decay lr * cos(7 pi t / 16 T) over the rest", NON_NEGATIVE)
    # method
    ema_p: float = arg(0.999, "momentum of the threshold state: time_p, p_model and label_hist", FRACTION)
    lambda_u: float = arg(1.0, "weight of the unlabeled loss", FINITE)
    lambda_e: float = arg(0.001, "weight of the self-adaptive fairness term (USB's configs; its argparse default is 0.01)", FINITE)
    clip_thresh: float = arg(-1.0, "upper bound of the global threshold time_p; -1 = the dataset's: 0.95 on svhn (USB's SVHN "
                             "configs), else 1 (none)", (lambda v: v == -1 or 0 < v <= 1, "-1 (the dataset's) or in (0, 1]"))
    grad_relu: bool = arg(True, "Grad-ReLU: the head takes no gradient from the unsupervised terms (--no-grad-relu: it does)")
    avg_clustering: bool = arg(True, "Avg-Clustering: the averaged head's loss L_AC on the masked strong views trains the extractor")
    ac_reset_every: int = arg(2048, "N: the averaged head is reset to the live head every N steps (1 = always the live head)", POSITIVE)
    ac_momentum: float = arg(0.999, "m: momentum of the averaged head between resets", FRACTION)
    ac_lr: float = arg(5e-4, "alpha: step size of the averaged head's own gradient step on L_AC", FINITE)
    ac_weight: float = arg(1.0, "w_ac: weight of L_AC in the loss", FINITE)
    labeled_only: bool = arg(False, "supervised baseline: labeled loss only, same pipeline")
    # run
    seed: int = arg(0, "seed of every RNG (split, data order, augmentation, init)", (lambda v: 0 <= v < 2**32, "in [0, 2^32)"))
    device: str = arg("", "cuda | cuda:<index> | cpu; empty = cuda when available (under torchrun: cuda or cpu, each rank on the GPU of its local rank)")
    sync_bn: bool = arg(False, "under torchrun, BatchNorm normalises with the statistics of the global batch, not of each rank's share (off: USB's default); no effect in one process")
    torch_deterministic: bool = arg(True, "cuDNN uses deterministic convolution algorithms only (CUDA; as CleanRL)")
    workers: int = arg(min(4, CORES), "data-loading processes (0 = none); the default is this machine's cores, at most 4", NON_NEGATIVE)
    threads: int = arg(0, "CPU threads of the training process; 0 = torch's default (all cores)", NON_NEGATIVE)
    eval_every: int = arg(5000, "evaluate (and checkpoint) every this many steps", POSITIVE)
    log_every: int = arg(100, "log losses and pseudo-label diagnostics every this many steps", POSITIVE)
    eval_batch_size: int = arg(1024, "batch size of evaluation", POSITIVE)
    output_dir: str = arg("", "where metrics, summary and checkpoints go; empty = runs/<algorithm>_<dataset>_<labels>_seed<seed>")
    resume: str = arg("", "checkpoint file (or output dir holding checkpoint.pt) to resume from; flags left out are its own")
    overwrite: bool = arg(False, "start afresh in an --output-dir that holds an earlier run's checkpoint, replacing it")
    stop_after: int = arg(0, "stop after this many steps of this call, with a checkpoint (resume later); 0 = never", NON_NEGATIVE)
    channels_last: bool = arg(True, "channels_last memory format (faster convolutions on CUDA and CPU)")
    bf16: bool = arg(True, "bfloat16 autocast for the forward passes (CUDA only)")
    compile: bool = arg(False, "torch.compile the training forward")
    tensorboard: bool = arg(False, "also write TensorBoard logs to the output dir")


class UserError(Exception):
    """Bad input: main() prints it as one line, without a traceback."""


def check(ok, message):
    if not ok:
        raise UserError(message)


def flag(name):
    return "--" + name.replace("_", "-")


def parse_args(argv=None) -> Args:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Args):
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {"type": type(f.default)}
        parser.add_argument(flag(f.name), default=f.default, help=f.metadata["help"], **kind)
    given = parser.parse_known_args(argv)[0]
    if given.pretrained:  # USB's fine-tuning settings (its usb_nlp and usb_cv configs), each overridable by its flag
        parser.set_defaults(**PRETRAINED_DEFAULTS["text" if given.dataset == "text" else "image"])
    if resume := given.resume:  # a flag left out takes the checkpoint's value, but these
        per_invocation = ("device", "workers", "resume", "overwrite", "stop_after", "output_dir")
        saved = load_checkpoint(resume, mmap=True)["args"]  # Run loads the tensors
        parser.set_defaults(**{k: v for k, v in saved.items() if k in Args.__dataclass_fields__ and k not in per_invocation})
    args = Args(**vars(parser.parse_args(argv)))
    # the defaults that depend on the dataset and the machine; a bad flag stops the run here, in one line
    check(args.dataset in DATASETS, f"unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    check(args.pretrained or args.dataset != "text", "--dataset text needs --pretrained: the folder of a text encoder (BERT and the like)")
    check(not (args.pretrained and args.net), f"--net {args.net} or --pretrained {args.pretrained}: choose one network")
    args.net = args.net or ("" if args.pretrained else DATASETS[args.dataset][3])
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    check(re.fullmatch(r"cpu|cuda(:\d+)?", args.device), f"--device must be cpu, cuda or cuda:<index>, got {args.device!r}")
    cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check(args.device == "cpu" or (torch.device(args.device).index or 0) < cuda_devices,
          f"--device {args.device}: this machine has {cuda_devices} CUDA device(s)")
    check(args.pretrained or args.net in NETS, f"unknown --net {args.net!r}; choose one of {', '.join(NETS)}")
    for f in dataclasses.fields(args):
        if f.metadata["valid"]:
            ok, rule = f.metadata["valid"]
            check(ok(getattr(args, f.name)), f"{flag(f.name)} must be {rule}, got {getattr(args, f.name)}")
    args.weight_decay = DATASETS[args.dataset][4] if args.weight_decay == -1 else args.weight_decay
    args.clip_thresh = (0.95 if args.dataset == "svhn" else 1.0) if args.clip_thresh == -1 else args.clip_thresh
    check(not args.tensorboard or importlib.util.find_spec("tensorboard"), "--tensorboard needs tensorboard: pip install tensorboard")
    return args


# --- Data: every dataset becomes uint8 arrays (N, H, W, channels) plus int64 labels (-1 = unknown) ---
# name: (classes, mean, std (None: the training images'), default net, weight decay, horizontal flip in the weak view)
DATASETS = {
    "cifar10": (10, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), "wrn28_2", 5e-4, True),
    "cifar100": (100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "wrn28_8", 1e-3, True),
    "svhn": (10, (0.4380, 0.4440, 0.4730), (0.1751, 0.1771, 0.1744), "wrn28_2", 5e-4, False),
    "stl10": (10, (0.4409, 0.4279, 0.3868), (0.2683, 0.2610, 0.2687), "wrn37_2", 5e-4, True),
    "mnist": (10, (0.1307,), (0.3081,), "cnn_small_s2", 5e-4, False),  # digits are not mirror-symmetric
    "fashion_mnist": (10, (0.2860,), (0.3530,), "cnn_small_s2", 5e-4, True),
    "digits": (10, (0.5,), (0.5,), "cnn_small", 5e-4, False),
    "folder": (0, None, None, "wrn28_2", 5e-4, True),
    "text": (0, None, None, "", 5e-4, False),  # classes from the files; a --pretrained text encoder
}
# The defaults with --pretrained: USB's usb_nlp (BERT) and usb_cv (ViT) settings. B = 8, mu = 1, no EMA; AdamW with
# layer-wise lr decay (0.75 for BERT; 0.5 and 0.65 for USB's ViTs on CIFAR-100 and STL-10), warm-up then cosine.
PRETRAINED_DEFAULTS = {
    "text": dict(batch_size=8, uratio=1, ema=0.0, optimizer="adamw", lr=5e-5, layer_decay=0.75, weight_decay=5e-4,
                 lr_warmup=5120, total_steps=102_400),
    "image": dict(batch_size=8, uratio=1, ema=0.0, optimizer="adamw", lr=5e-4, layer_decay=0.5, weight_decay=5e-4,
                  lr_warmup=5120, total_steps=204_800),
}


def load_torchvision(name, root):
    """Train images and labels (-1: unknown, STL-10's unlabeled split), test images and labels."""
    import torchvision.datasets as tvd

    def get(cls, **kw):
        with contextlib.suppress(Exception):  # never touch the network when the files are already there
            return cls(root, download=False, **kw)
        try:
            return cls(root, download=True, **kw)
        except Exception as e:
            raise UserError(f"could not load {name} from {root!r} nor download it ({type(e).__name__}: {' '.join(str(e).split())})."
                            f" Offline, put the files torchvision expects for {cls.__name__} in --data-dir (for mnist and "
                            "fashion_mnist the four IDX files, gzipped or not: Debian's dataset-fashion-mnist puts Fashion-MNIST's"
                            " in /usr/share/datasets/fashion-mnist), or use --dataset digits or --dataset folder.") from None

    def read_idx(path):  # MNIST's format: 0 0 8 <dims>, each dimension a big-endian uint32, then the bytes
        try:
            with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
                data = bytearray(f.read())  # writable, for torch.from_numpy
            dims = data[3] if data[:3] == b"\0\0\x08" else None
            return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(np.frombuffer(data, ">u4", dims, 4))
        except (OSError, EOFError, TypeError, IndexError, ValueError):
            raise UserError(f"{path} is not an IDX file of bytes, or is cut short") from None

    def idx_files(cls):  # in --data-dir itself, or where torchvision downloads them
        for d in (Path(root), Path(root) / cls.__name__ / "raw"):
            if all(found := [next((d / (f + gz) for gz in ("", ".gz") if (d / (f + gz)).is_file()), None) for f in (
                    "train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")]):
                return found

    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        x_train, y_train, x_test, y_test = map(read_idx, idx_files(cls) or get(cls, train=True) and idx_files(cls))
        return x_train[..., None], y_train, x_test[..., None], y_test
    if name in ("cifar10", "cifar100"):
        tr, te = (get(tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100, train=train) for train in (True, False))
        return tr.data, np.array(tr.targets), te.data, np.array(te.targets)
    nhwc = lambda d: d.data.transpose(0, 2, 3, 1)
    if name == "svhn":
        tr, te = get(tvd.SVHN, split="train"), get(tvd.SVHN, split="test")
        return nhwc(tr), tr.labels, nhwc(te), te.labels
    tr, te, un = (get(tvd.STL10, split=split) for split in ("train", "test", "unlabeled"))  # un: labels unknown (-1)
    return np.concatenate([nhwc(tr), nhwc(un)]), np.concatenate([tr.labels, un.labels]), nhwc(te), te.labels


def load_folder(root, size):
    """`root/train/<class>/**` and `root/test/<class>/**`, found as torchvision's ImageFolder finds them (image files at
    any depth) but for hidden ones (._* copies), resized to size x size RGB, held in memory."""
    from torchvision.datasets import ImageFolder, folder

    splits = []
    for split in ("train", "test"):
        d = Path(root) / split
        visible = lambda p: p.lower().endswith(folder.IMG_EXTENSIONS) and "/." not in "/" + Path(p).relative_to(d).as_posix()
        try:
            found = ImageFolder(d, is_valid_file=visible, allow_empty=True)
            images = [np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)) for f, _ in found.samples]
        except Exception as e:
            raise UserError(f"--dataset folder: cannot read {d}: {e}") from None
        check(images, f"--dataset folder: the class folders in {d} hold no images")
        check(not splits or found.classes == splits[0][2], f"{d} has classes {found.classes}, but train has {splits and splits[0][2]}")
        splits.append((np.stack(images), np.array(found.targets), found.classes))
    return splits[0][0], splits[0][1], splits[1][0], splits[1][1], len(splits[0][2])


def load_digits():
    """scikit-learn's 8x8 digits, real data offline: 1300 train and a fixed stratified test split of 497 images."""
    from sklearn.datasets import load_digits as sk_digits

    d, order, test = sk_digits(), np.random.default_rng(0).permutation(1797), np.zeros(1797, bool)
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[..., None]
    for c in range(10):
        idx = order[d.target[order] == c]
        test[idx[: round(len(idx) * 497 / 1797)]] = True
    return x[~test], d.target[~test], x[test], d.target[test]


def load_text(root, tokenizer, max_length):
    """`root/train.jsonl` and `root/test.jsonl`, one {"text": ..., "label": ...} per line, or entries in USB's format,
    {"ori": ..., "aug_0": ..., "aug_1": ..., "label": ...} (a text and two back-translations), per line or as USB ships
    them (`train.json` / `test.json`: an object of entries). Labels are class names (sorted) or integers 0, 1, ...
    Each text is tokenised once by the encoder's tokenizer: int32 token ids, -1 after the text's end, shaped
    (texts, views, length); a training text's views are the original, then its back-translations if given."""
    def read(split):
        for path in (Path(root) / f"{split}.jsonl", Path(root) / f"{split}.json"):
            if path.is_file():
                try:
                    with open(path, encoding="utf-8") as f:
                        entries = [json.loads(l) for l in f if l.strip()] if path.suffix == ".jsonl" else list(json.load(f).values())
                except (ValueError, AttributeError, UnicodeDecodeError) as e:
                    raise UserError(f"--dataset text: {path} is not {'JSON lines' if path.suffix == '.jsonl' else 'a JSON object of entries'} ({e})") from None
                check(entries and all(isinstance(e, dict) and isinstance(e.get("label"), (str, int)) and
                                      isinstance(e.get("text", e.get("ori")), str) for e in entries), f"--dataset text: every "
                      f"entry of {path} needs a \"text\" (or USB's \"ori\") string and a \"label\", a name or an integer")
                return path, entries
        raise UserError(f"--dataset text: no {split}.jsonl (or USB's {split}.json) in --data-dir {root}")

    (train_path, train), (test_path, test) = read("train"), read("test")
    names = sorted({e["label"] for e in train + test}, key=str)
    if all(type(n) is int or isinstance(n, str) and n.isdigit() for n in names):  # USB writes its integers as strings
        for e in train + test:
            e["label"] = int(e["label"])
        check(min(e["label"] for e in train + test) >= 0, "--dataset text: integer labels count from 0")
        names = list(range(max(e["label"] for e in train + test) + 1))
    else:
        check(all(isinstance(n, str) for n in names), f"--dataset text: labels must be all names or all integers >= 0, found {names[:6]}")
    unseen = {e["label"] for e in test} - {e["label"] for e in train}
    check(not unseen, f"--dataset text: {test_path} has labels that no training text has: {sorted(unseen, key=str)[:6]}")
    augmented = [all(isinstance(e.get(k), str) for k in ("aug_0", "aug_1")) for e in train]
    check(all(augmented) or not any(augmented), f"--dataset text: in {train_path}, some entries have \"aug_0\" and \"aug_1\" and "
          "others not: give every text its back-translations, or none")
    views = ("ori", "aug_0", "aug_1") if augmented[0] else ("ori",)

    def tokenize(entries, keys):
        texts = [e.get("text", e.get("ori")) if k == "ori" else e[k] for e in entries for k in keys]
        ids = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        out = np.full((len(texts), max(map(len, ids))), -1, np.int32)
        for row, t in zip(out, ids):
            row[:len(t)] = t
        return out.reshape(len(entries), len(keys), -1)

    label = {n: i for i, n in enumerate(names)}
    return (tokenize(train, views), np.array([label[e["label"]] for e in train]), tokenize(test, ("ori",)),
            np.array([label[e["label"]] for e in test]), len(names))


def load_data(args, encoder=None):
    """The dataset's arrays, its number of classes, and the per-channel mean and std that normalise it (None for text)."""
    classes, mean, std = DATASETS[args.dataset][:3]
    if args.dataset == "text":
        check(encoder["kind"] == "text", f"--dataset text needs a text encoder; --pretrained {args.pretrained} holds an image encoder")
        train_x, train_y, test_x, test_y, classes = load_text(args.data_dir, encoder["tokenizer"], args.max_length)
        return train_x, train_y, test_x, test_y, classes, None, None
    check(not encoder or encoder["kind"] == "image", f"--pretrained {args.pretrained} holds a text encoder; it reads --dataset text")
    if args.dataset == "folder":  # its own mean and std per channel, summed in float64 over slices (np.std copies all)
        train_x, train_y, test_x, test_y, classes = load_folder(args.data_dir, args.image_size)
        m1, m2 = sum(np.stack([(p := part.reshape(-1, part.shape[-1]).astype(np.float64)).sum(0), (p * p).sum(0)])
                     for part in np.array_split(train_x, -(-len(train_x) // 1000))) / train_x[..., 0].size
        mean, std = tuple(m1 / 255), tuple(np.sqrt(np.maximum(m2 - m1 * m1, 1)) / 255)  # std >= 1/255: never divide by 0
    else:
        train_x, train_y, test_x, test_y = load_digits() if args.dataset == "digits" else load_torchvision(args.dataset, args.data_dir)
    check(train_x.ndim == test_x.ndim == 4 and train_y.ndim == test_y.ndim == 1 and len(train_x) == len(train_y) > 0 and
          len(test_x) == len(test_y) > 0 and train_y.max() < classes and 0 <= test_y.min() <= test_y.max() < classes,
          f"--dataset {args.dataset}: the images and labels in {args.data_dir} do not match (their counts, shapes or classes)")
    return train_x, train_y.astype(np.int64), test_x, test_y.astype(np.int64), classes, mean, std


def split_labeled(y, classes, args, rng):
    """Indices of the labeled, unlabeled and validation sets (Meta-T's imbalanced split with --n1); samples of unknown
    label (-1) are unlabeled."""
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in range(classes)]
    check(args.n1 == args.m1 == 0 or (args.n1 > 0 and args.m1 > 0 and classes > 1 and 0 < args.gamma_l < math.inf and
          0 < args.gamma_u < math.inf), f"the imbalanced split needs --n1 > 0 and --m1 > 0, at least 2 classes and positive "
          f"finite --gamma-l and --gamma-u, got --n1 {args.n1}, --m1 {args.m1}, --gamma-l {args.gamma_l}, --gamma-u {args.gamma_u}")
    if args.n1 > 0:
        n_lab = [int(args.n1 * args.gamma_l ** (-c / (classes - 1))) for c in range(classes)]
        n_unl = [int(args.m1 * args.gamma_u ** (-c / (classes - 1))) for c in range(classes)]
        check(min(n_lab) > 0, f"--n1 {args.n1} with --gamma-l {args.gamma_l} leaves class {n_lab.index(min(n_lab))} "
              "without a labeled sample (N_c rounds down to 0): raise --n1 or lower --gamma-l")
    else:
        check(args.labels > 0 and args.labels % classes == 0, f"--labels {args.labels} must be a positive multiple of the {classes} classes")
        n_lab, n_unl = [args.labels // classes] * classes, [None] * classes
    check(args.val_labels >= 0 and args.val_labels % classes == 0,
          f"--val-labels {args.val_labels} must be 0 or a positive multiple of the {classes} classes")
    n_val, labeled, unlabeled, val = args.val_labels // classes, [], [], []
    for c, idx in enumerate(by_class):
        check(n_lab[c] + n_val + (n_unl[c] or 0) <= len(idx), f"class {c} has {len(idx)} training samples, fewer than the "
              f"{n_lab[c]} labeled + {n_val} validation + {n_unl[c] or 0} unlabeled asked for (--labels/--n1/--m1)")
        labeled.append(idx[:n_lab[c]])
        val.append(idx[n_lab[c]:n_lab[c] + n_val])
        unlabeled.append(idx[n_lab[c] + n_val:][:n_unl[c]])  # [:None]: all the rest
        if not args.exclude_labeled and args.n1 <= 0:  # Sec. 5.3 sizes two disjoint sets: N_c labeled, M_c unlabeled
            unlabeled.append(idx[:n_lab[c]])
    return np.concatenate(labeled), np.concatenate([*unlabeled, np.flatnonzero(y < 0)]), np.concatenate(val)


# --- Augmentation: each function draws from an explicit random.Random, so that a batch is a pure function of
# (seed, step), and resume restores the data exactly, whatever the number of workers and ranks ---
@functools.lru_cache(maxsize=None)
def _reflect(start, size):
    """Indices start, start+1, ... (size of them) into an axis of length `size`, mirrored at its ends as np.pad's reflect."""
    i = np.abs(np.arange(start, start + size))
    return np.where(i > size - 1, 2 * (size - 1) - i, i)


def weak_augment(x, rng, flip):
    """uint8 (H, W, C) -> random horizontal flip (where DATASETS allows it), then a random crop of the image reflect-padded by
    12.5% of its side, gathered from the image directly (np.pad first costs 10x more)."""
    if flip and rng.random() < 0.5:
        x = x[:, ::-1]
    h, w = x.shape[:2]
    pad = max(1, int(0.125 * w))
    i, j = rng.randint(0, 2 * pad), rng.randint(0, 2 * pad)
    return x[_reflect(i - pad, h)[:, None], _reflect(j - pad, w)]


# (operation on a PIL image, lowest magnitude, highest magnitude): the FixMatch paper's RandAugment table, computed as
# USB's RandAugment computes it, with its ranges and PIL's operations. PIL's affine transform reads output pixel (x, y)
# from input (a x + b y + c, d x + e y + f), nearest neighbour, black outside: so a shear pivots on the top-left corner
# (and shifts the image), not on the centre as torchvision's affine does.
AFFINE = Image.Transform.AFFINE
RANDAUGMENT_OPS = [
    (lambda img, v: img, 0, 1),  # identity
    (lambda img, v: ImageOps.autocontrast(img), 0, 1),
    (lambda img, v: ImageOps.equalize(img), 0, 1),
    (lambda img, v: ImageEnhance.Brightness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Color(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Contrast(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageEnhance.Sharpness(img).enhance(v), 0.05, 0.95),
    (lambda img, v: ImageOps.posterize(img, int(v)), 4, 8),  # to 4-7 bits
    (lambda img, v: ImageOps.solarize(img, v), 0, 256),
    (lambda img, v: img.rotate(v), -30, 30),  # about the centre, black corners
    (lambda img, v: img.transform(img.size, AFFINE, (1, v, 0, 0, 1, 0)), -0.3, 0.3),  # shear x
    (lambda img, v: img.transform(img.size, AFFINE, (1, 0, 0, v, 1, 0)), -0.3, 0.3),  # shear y
    (lambda img, v: img.transform(img.size, AFFINE, (1, 0, v * img.size[0], 0, 1, 0)), -0.3, 0.3),  # translate x
    (lambda img, v: img.transform(img.size, AFFINE, (1, 0, 0, 0, 1, v * img.size[1])), -0.3, 0.3),  # translate y
]


def strong_augment(x, rng, flip):
    """The weak view, then RandAugment (2 random ops at random magnitudes, as the common FixMatch reproduction
    RandAugmentMC(n=2); USB draws 3), then Cutout (FixMatch): a grey square of up to half the image side."""
    (h, w, channels), x = x.shape, weak_augment(x, rng, flip)
    img = Image.fromarray(x[..., 0] if channels == 1 else x)
    for op, low, high in rng.choices(RANDAUGMENT_OPS, k=2):
        img = op(img, low + (high - low) * rng.random())
    x, side = np.array(img).reshape(h, w, channels), int(rng.uniform(0, 0.5) * w)
    if side > 0:
        r, q = rng.randint(0, h - 1), rng.randint(0, w - 1)
        x[max(0, r - side // 2): r + side - side // 2, max(0, q - side // 2): q + side - side // 2] = 127
    return x


def weak_text(x, rng):
    """A text's weak view: the original (x: the text's stored views, token ids and -1 after the end)."""
    return x[0]


def strong_text(x, rng, special_ids, mask_id):
    """A text's strong view: one of its back-translations at random (USB's choice), where the data gives them. Else,
    offline, 2 operations drawn at random from deletion, swap and masking (as RandAugment draws 2 image operations), each
    on a random fraction U(0.05, 0.3) of the text's tokens (at least one): deletion and swap with another random
    position as EDA's word operations, masking with the encoder's mask token, its pretraining's corruption. Special
    tokens ([CLS], [SEP]) stay; a deletion never empties the text."""
    if len(x) > 1:
        return x[rng.randint(1, len(x) - 1)]
    ids = x[0][x[0] >= 0].tolist()
    for op in rng.choices(["delete", "swap"] + (["mask"] if mask_id is not None else []), k=2):
        inner = [i for i, t in enumerate(ids) if t not in special_ids]
        chosen = rng.sample(inner, max(1, round(rng.uniform(0.05, 0.3) * len(inner)))) if inner else []
        if op == "delete" and len(chosen) < len(inner):
            dropped = set(chosen)
            ids = [t for i, t in enumerate(ids) if i not in dropped]
        for i in chosen if op != "delete" else ():
            if op == "swap":
                j = rng.choice(inner)
                ids[i], ids[j] = ids[j], ids[i]
            else:
                ids[i] = mask_id
    out = np.full(x.shape[1], -1, x.dtype)
    out[:len(ids)] = ids
    return out


def augmentations(args, encoder):
    """The weak and the strong view, functions (sample, rng) -> view: of images, or of the texts of --dataset text."""
    if args.dataset == "text":
        tokenizer = encoder["tokenizer"]
        return weak_text, functools.partial(strong_text, special_ids=frozenset(tokenizer.all_special_ids), mask_id=tokenizer.mask_token_id)
    flip = DATASETS[args.dataset][5]
    return functools.partial(weak_augment, flip=flip), functools.partial(strong_augment, flip=flip)


def sample_indices(n, count, step, seed, stream):
    """Positions [step*count, (step+1)*count) of an endless stream of epochs, permutations drawn from (seed, stream, epoch)."""
    pos, out = np.arange(step * count, (step + 1) * count), np.empty(count, np.int64)
    for epoch in np.unique(pos // n):
        sel = pos // n == epoch
        out[sel] = np.random.default_rng([seed, stream, int(epoch)]).permutation(n)[pos[sel] % n]
    return out


def sample_rng(seed, step, view, position):
    """The random.Random of one view of one sample of step `step`'s global batch (view 0: labeled, 1: unlabeled weak,
    2: unlabeled strong; position: in the global batch), keyed by these alone: a batch is the same whichever worker,
    and however many ranks, draw it."""
    return random.Random(f"{seed}/{step}/{view}/{position}")


def make_batch(step, images, labels, labeled_idx, unlabeled_idx, args, weak, strong, shard=(0, 1)):
    """Step `step`'s batch (labeled weak view, unlabeled weak and strong views: uint8 images or token ids), from (seed,
    step) alone; shard (rank, ranks): rank r of N takes the r-th of N equal slices of the batch one process draws.
    idx_u: the unlabeled samples of the whole global batch."""
    rank, ranks = shard
    share = lambda n: np.arange(rank * n // ranks, (rank + 1) * n // ranks)  # positions in the global batch
    views = lambda idx, positions, view, augment: torch.from_numpy(np.stack(
        [augment(images[i], sample_rng(args.seed, step, view, p)) for i, p in zip(idx, positions)]))
    at_l = share(args.batch_size)
    lab = labeled_idx[sample_indices(len(labeled_idx), args.batch_size, step, args.seed, 0)[at_l]]
    batch = {"x_l": views(lab, at_l, 0, weak), "y_l": torch.from_numpy(labels[lab])}
    if not args.labeled_only:
        u, at_u = sample_indices(len(unlabeled_idx), args.batch_size * args.uratio, step, args.seed, 1), share(args.batch_size * args.uratio)
        unl = unlabeled_idx[u[at_u]]
        batch.update(x_uw=views(unl, at_u, 1, weak), x_us=views(unl, at_u, 2, strong), y_u=torch.from_numpy(labels[unl]),
                     idx_u=torch.from_numpy(u))
    return batch


def worker_init(_):
    torch.set_num_threads(1)  # workers only stack small arrays; leave the cores to the model
    if hasattr(os, "nice"):  # at equal priority, workers preempt the training threads, which then wait for each other
        os.nice(19)
    # Ctrl-C and SIGTERM may reach the whole process group: the trainer ends its step and shuts the workers down
    signal.signal(signal.SIGINT, signal.SIG_IGN), signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


# --- Networks: `features(x) -> (N, D)`, then the linear `head`, so that methods which treat the extractor and the
# classifier differently (LayerMatch) change the loss, not the network ---
def features_and_head(features, head):
    return nn.Sequential(collections.OrderedDict(features=features, head=head))


def conv_bn(cin, cout, k=3, pad=1, momentum=0.1, stride=1, bias=False):  # a bias before BatchNorm cancels out
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=bias), nn.BatchNorm2d(cout, momentum=momentum), nn.LeakyReLU(0.1)]


class WRNBlock(nn.Module):
    """Pre-activation residual block of USB's WideResNet (BN momentum 0.001, eps 0.001, LeakyReLU 0.1); where the width
    changes, the first activation also feeds the projection shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(cin, momentum=0.001, eps=0.001), nn.BatchNorm2d(cout, momentum=0.001, eps=0.001)
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, stride, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.shortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0)

    def forward(self, x):
        out = F.leaky_relu(self.bn1(x), 0.1)
        shortcut = x if self.shortcut is None else self.shortcut(out)
        return shortcut + self.conv2(F.leaky_relu(self.bn2(self.conv1(out)), 0.1))


def wide_resnet(in_channels, classes, width, groups=3, first_stride=1):
    """WRN-28-k (3 groups of 4 blocks) and USB's WRN-37-2 for STL-10 (4 groups, first stride 2), USB's initialisation."""
    chans, layers = [16] + [16 * width * 2**g for g in range(groups)], [nn.Conv2d(in_channels, 16, 3, 1, 1)]
    for g in range(groups):  # the first block of a group changes the width (and the resolution: first_stride in group 0)
        layers += [WRNBlock(chans[g + (b > 0)], chans[g + 1], 1 if b else first_stride if g == 0 else 2) for b in range(4)]
    net = features_and_head(nn.Sequential(*layers, nn.BatchNorm2d(chans[-1], momentum=0.001, eps=0.001), nn.LeakyReLU(0.1),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(chans[-1], classes))
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
        elif isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def conv_large(in_channels, classes):
    """MetaSemi's 13-layer CNN (Laine & Aila) as its code has it: LeakyReLU 0.1, Dropout2d 0.5, BN momentum 0.1, no bias."""
    return features_and_head(nn.Sequential(
        *conv_bn(in_channels, 128), *conv_bn(128, 128), *conv_bn(128, 128), nn.MaxPool2d(2), nn.Dropout2d(0.5),
        *conv_bn(128, 256), *conv_bn(256, 256), *conv_bn(256, 256), nn.MaxPool2d(2), nn.Dropout2d(0.5),
        *conv_bn(256, 512, pad=0), *conv_bn(512, 256, 1, 0), *conv_bn(256, 128, 1, 0), nn.AdaptiveAvgPool2d(1),
        nn.Flatten()), nn.Linear(128, classes))


def small_cnn(in_channels, classes, stride=1):
    """3 convolutions that train in minutes on a CPU, for 8x8 images (digits, tests) or, with a stride-2 first
    convolution, 28x28 ones (MNIST, Fashion-MNIST). BN momentum 0.01: their runs are short."""
    block = functools.partial(conv_bn, momentum=0.01, bias=True)
    return features_and_head(nn.Sequential(*block(in_channels, 32, stride=stride), nn.MaxPool2d(2), *block(32, 64),
                             nn.MaxPool2d(2), *block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(128, classes))


NETS = {"wrn28_2": functools.partial(wide_resnet, width=2), "wrn28_8": functools.partial(wide_resnet, width=8),
        "wrn37_2": functools.partial(wide_resnet, width=2, groups=4, first_stride=2), "convlarge": conv_large,
        "cnn_small": small_cnn, "cnn_small_s2": functools.partial(small_cnn, stride=2)}


def load_encoder(folder):
    """The pretrained encoder in a Hugging Face folder, read from disk alone (never from a hub), and what it reads: its
    tokenizer (a text encoder), or the input size, channels and normalisation of its image processor (an image one)."""
    check(importlib.util.find_spec("transformers"), "--pretrained needs transformers: pip install transformers")
    import transformers

    path = Path(folder)
    check((path / "config.json").is_file(), f"--pretrained {folder}: no config.json there; it takes a Hugging Face model "
          "folder (config.json, the weights, and the tokenizer's or image processor's files)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the data workers fork after the tokenizer ran
    transformers.logging.set_verbosity_error()  # e.g. "weights not used": the pretraining heads, left out on purpose
    transformers.logging.disable_progress_bar()
    first_line = lambda e: (str(e).strip().splitlines() or [""])[0]
    try:
        encoder = transformers.AutoModel.from_pretrained(path, local_files_only=True).float()
    except Exception as e:
        raise UserError(f"--pretrained {folder}: cannot load the model ({type(e).__name__}: {first_line(e)})") from None
    kind = {"input_ids": "text", "pixel_values": "image"}.get(encoder.main_input_name)
    check(kind and hasattr(encoder.config, "hidden_size"), f"--pretrained {folder}: a {encoder.config.model_type} model, "
          f"which reads {encoder.main_input_name}; supported are the encoders of text (BERT...) and images (ViT, DINOv2...)")
    if getattr(encoder, "pooler", None) is not None:  # unused: the features pool the last layer's tokens themselves
        encoder.pooler = None
    if kind == "text":
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise UserError(f"--pretrained {folder}: cannot load its tokenizer ({type(e).__name__}: {first_line(e)})") from None
        return {"kind": kind, "model": encoder, "tokenizer": tokenizer, "pad_id": tokenizer.pad_token_id or 0}
    try:  # the image processor's settings, read as saved (they decide the input size and the normalisation)
        processor = json.loads((path / "preprocessor_config.json").read_text())
        size = processor["crop_size"] if processor.get("do_center_crop") else processor["size"]  # what it feeds the model
        side = lambda key: int(size.get(key) or size["shortest_edge"] if isinstance(size, dict) else size)
        spec = {"size": (side("height"), side("width")), "mean": list(processor["image_mean"]), "std": list(processor["image_std"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"--pretrained {folder}: no readable preprocessor_config.json with the input size, image_mean and "
                        f"image_std ({type(e).__name__}: {first_line(e)})") from None
    return {"kind": kind, "model": encoder, "channels": encoder.config.num_channels, **spec}


class PretrainedFeatures(nn.Module):
    """A pretrained encoder's features for the linear head: the mean of its last layer over a text's tokens (USB's BERT
    wrapper averages all positions, padding included; here the padding is left out, so a text's features do not depend
    on the batch it is padded with), or an image's first token (CLS, after the final norm); then dropout 0.1 (USB)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.kind, self.pad_id, self.dropout = encoder["model"], encoder["kind"], encoder.get("pad_id"), nn.Dropout(0.1)

    def forward(self, x):
        if self.kind == "image":
            return self.dropout(self.encoder(pixel_values=x).last_hidden_state[:, 0])
        mask = x >= 0  # token ids, -1 after a text's end
        hidden = self.encoder(input_ids=torch.where(mask, x, self.pad_id), attention_mask=mask.long()).last_hidden_state
        mask = mask.unsqueeze(-1).to(hidden.dtype)
        return self.dropout((hidden * mask).sum(1) / mask.sum(1))


def make_model(args, encoder, in_channels, classes):
    """--net from scratch, or the --pretrained encoder's features under a new linear head."""
    if not encoder:
        return NETS[args.net](in_channels, classes)
    return features_and_head(PretrainedFeatures(encoder), nn.Linear(encoder["model"].config.hidden_size, classes))


def input_pipeline(args, mean, std, encoder, device):
    """The batches' form on the device: uint8 images (N, H, W, C) -> normalised float (N, C, H, W), resized to a
    pretrained encoder's input with its normalisation and channels; token ids (N, L), or a text's stored views
    (N, views, L) read as their original, -> int64 ids cut to the longest text of the batch."""
    if args.dataset == "text":
        def prepare(x):
            x = x[:, 0] if x.ndim == 3 else x
            longest = max(1, int((x >= 0).sum(1).max()))  # counted on the host; cut on the device (a pinned copy)
            return x.to(device, non_blocking=True)[:, :longest].long()
        return prepare
    if encoder:
        mean, std = encoder["mean"], encoder["std"]
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    mean, std = (torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in (mean, std))

    def prepare(x):
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float() / 255
        if encoder:  # grey images feed every channel of a colour model
            x = x.expand(-1, encoder["channels"], -1, -1) if x.shape[1] == 1 else x
            x = F.interpolate(x, size=encoder["size"], mode="bilinear", antialias=True) if x.shape[2:] != encoder["size"] else x
        return ((x - mean) / std).contiguous(memory_format=memory_format)
    return prepare


def join(inputs):
    """The batches of one forward as one: images concatenated; texts padded (with -1) to the longest first."""
    longest = max(x.shape[-1] for x in inputs)
    return torch.cat([F.pad(x, (0, longest - x.shape[-1]), value=-1) if x.dtype == torch.long else x for x in inputs])


# --- The FreeMatch loss: FixMatch's masked cross-entropy, with a threshold per sample ---
def masked_ce_reference(logits_s, probs_w, tau, beta):
    """The definition of `sslkernels.masked_ce`: mask * CE(logits_s, argmax probs_w), mask = 1[conf >= tau] (beta = inf)
    or sigmoid(beta * (conf - tau)), per sample; used when the extension is absent."""
    conf, pseudo_label = probs_w.detach().max(dim=1)
    mask = (conf >= tau).to(logits_s.dtype) if math.isinf(beta) else torch.sigmoid(beta * (conf - tau))
    return mask * F.cross_entropy(logits_s, pseudo_label, reduction="none"), mask, pseudo_label


masked_ce = sslkernels.masked_ce if sslkernels is not None else masked_ce_reference


def threshold_state(classes, device):
    """Self-adaptive thresholding's state, all three starting uniform (USB): the global threshold time_p, the class
    marginal p_model, the histogram of pseudo-labels label_hist."""
    uniform = torch.full((classes,), 1 / classes, device=device)
    return {"time_p": uniform.mean(), "p_model": uniform, "label_hist": uniform.clone()}


@torch.no_grad()
def update_threshold_state(sat, probs_w, args):
    """The self-adaptive global threshold (EMA of the confidence), the class marginal (EMA of the probabilities) and the
    fairness term's histogram of pseudo-labels, updated in place from the weak-view predictions of the global batch
    (under torchrun gathered from the ranks, as USB does), so that every rank holds the same state."""
    probs_w = all_ranks_cat(probs_w)
    m, (conf, pseudo_label) = args.ema_p, probs_w.max(dim=1)
    sat["time_p"].mul_(m).add_(conf.mean(), alpha=1 - m)
    if args.clip_thresh < 1:
        sat["time_p"].clamp_(0.0, args.clip_thresh)
    sat["p_model"].mul_(m).add_(probs_w.mean(dim=0), alpha=1 - m)
    hist = torch.bincount(pseudo_label, minlength=probs_w.shape[1]).to(probs_w.dtype)
    sat["label_hist"].mul_(m).add_(hist / hist.sum(), alpha=1 - m)


def fairness_loss(logits_us, mask, p_model, label_hist):
    """Self-adaptive fairness over the masked samples only (0 when none is), as USB: L_f = sum_c a_c log b_c, with
    a = p_model / label_hist and b = (mean strong-view probability / histogram of strong-view argmaxes), each normalised
    to sum 1, 1/0 read as 0. L_f = -H(a, b) is negative by design: minimising it raises the cross-entropy H(a, b), which
    keeps the masked predictions from collapsing onto the classes the model already favours. The mask serves as weights
    (no boolean indexing), so the step never waits on the device. Under torchrun the means are the global batch's (USB
    takes each rank's): every rank computes the same L_f, and the sums' gradients reach each rank's own samples."""
    inverse = lambda v: torch.where(v > 0, 1 / v, torch.zeros_like(v))
    probs_s = torch.softmax(logits_us, dim=1)
    hist = (F.one_hot(probs_s.detach().argmax(dim=1), probs_s.shape[1]).to(probs_s.dtype) * mask[:, None]).sum(dim=0)
    sums = sum_over_ranks(torch.cat([mask.sum().view(1), hist, (probs_s * mask[:, None]).sum(dim=0)]))  # one all-reduce
    count = sums[0]
    hist_s, mean_s = (sums[1:] / count.clamp(min=1)).view(2, -1)
    a = p_model * inverse(label_hist)
    b = mean_s * inverse(hist_s)
    # nothing masked: b is 0, and the clamp keeps its gradient finite before the loss is set to 0
    loss = (a / a.sum() * torch.log(b / b.sum().clamp(min=torch.finfo(b.dtype).tiny) + 1e-12)).sum()
    return torch.where(count > 0, loss, torch.zeros_like(loss))


def freematch_loss(logits, y_l, sat, args):
    """L = CE(labeled) + lambda_u * L_u + lambda_e * L_f, L_u = mean over mu*B of 1[conf >= tau(yhat)] * CE(strong, yhat)
    with the self-adaptive local threshold tau(c) = time_p * p_model(c) / max p_model. The state takes this batch's
    predictions first, as USB's does: step t's mask already uses batch t."""
    n_u = (len(logits) - len(y_l)) // 2  # this rank's share of mu * B (all of it in one process)
    logits_l, logits_uw, logits_us = torch.split(logits, [len(y_l), n_u, n_u])
    loss_s = F.cross_entropy(logits_l, y_l)
    probs_w = torch.softmax(logits_uw.detach(), dim=1)
    update_threshold_state(sat, probs_w, args)
    pseudo_label = probs_w.argmax(dim=1)
    tau = sat["time_p"] * (sat["p_model"] / sat["p_model"].max())[pseudo_label]
    loss_u, mask, pseudo_label = masked_ce(logits_us, probs_w, tau, math.inf)
    loss_u = loss_u.mean()
    loss_f = fairness_loss(logits_us, mask, sat["p_model"], sat["label_hist"])
    loss = loss_s + args.lambda_u * loss_u + args.lambda_e * loss_f
    return loss, {"loss_s": loss_s, "loss_u": loss_u, "loss_fair": loss_f, "time_p": sat["time_p"]}, mask, pseudo_label


# --- The LayerMatch loss: the FreeMatch loss on logits that Grad-ReLU routes, plus Avg-Clustering ---
def layermatch_loss(features, head, avg_head, y_l, sat, args):
    """L = Grad-ReLU(L_s + w_u L_u + w_ac L_AC) (the paper's Eq. 9; FreeMatch's fairness term joins L_u) on one forward
    of the feature extractor. Grad-ReLU computes the unlabeled logits with the head's parameters detached: the head
    learns from the labeled loss alone, and every unsupervised term still trains the extractor. L_AC (Eq. 8) is the
    averaged head's cross-entropy on the strong views' features against the pseudo-labels, over the masked samples and
    averaged as L_u is (over mu*B: the paper writes both as means over the set of pseudo-labels D_tau)."""
    feats_l, feats_u = features[:len(y_l)], features[len(y_l):]
    n_u = len(feats_u) // 2  # this rank's share of mu * B (all of it in one process)
    detached = {name: p.detach() for name, p in head.named_parameters()}
    logits_u = torch.func.functional_call(head, detached, (feats_u,)) if args.grad_relu else head(feats_u)
    loss, stats, mask, pseudo_label = freematch_loss(torch.cat([head(feats_l), logits_u]), y_l, sat, args)
    if args.avg_clustering:
        masked_ce_of = lambda logits: (mask * F.cross_entropy(logits, pseudo_label, reduction="none")).mean()
        feats_us, bar = feats_u[n_u:], {name: p.detach() for name, p in avg_head.named_parameters()}
        loss_ac = masked_ce_of(torch.func.functional_call(avg_head, bar, (feats_us,)))  # trains the extractor, w_ac-weighted
        # beta_bar's own gradient is that of L_AC unweighted: a term worth 0 whose gradient reaches beta_bar alone
        own = masked_ce_of(avg_head(feats_us.detach()))
        loss = loss + args.ac_weight * loss_ac + (own - own.detach())
        with torch.no_grad():
            flat = lambda params: torch.cat([p.flatten() for p in params])
            gap = torch.linalg.vector_norm(flat(avg_head.parameters()) - flat(head.parameters())) / torch.linalg.vector_norm(
                flat(head.parameters()))
        stats.update(loss_ac=loss_ac, avg_head_gap=gap)
    return loss, stats, mask, pseudo_label


@torch.no_grad()
def update_avg_head(avg_head, head, step, args):
    """Avg-Clustering's head for the next step, after the optimiser's step: the live head when N divides `step` (so
    steps 1, N+1, 2N+1, ... start from the live head), otherwise beta_bar <- m * beta_bar + (1 - m) * beta_tilde with
    beta_tilde = beta_bar - alpha * grad L_AC, the gradient of this step's L_AC. Its gradients are then cleared."""
    m, alpha = args.ac_momentum, args.ac_lr
    for bar, live in zip(avg_head.parameters(), head.parameters()):
        if step % args.ac_reset_every == 0:
            bar.copy_(live)
        elif bar.grad is not None:
            bar.copy_(m * bar + (1 - m) * (bar - alpha * bar.grad))
        bar.grad = None


# --- Several processes (torchrun): each rank trains on its share of the global batch; DistributedDataParallel averages
# the gradients, and what a method computes over the batch is summed over the ranks, so N ranks train what one does ---
def init_distributed(args):
    """Under torchrun (which sets RANK, LOCAL_RANK and WORLD_SIZE): join its process group, NCCL between GPUs and gloo on
    the CPU, each rank on the GPU of its local rank. Returns the device, and a gloo group for the ranks' decisions (stop
    or go), which then wait for no GPU; a plain run: --device, no group."""
    if "LOCAL_RANK" not in os.environ:
        return torch.device(args.device), None
    local_rank, ranks = int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    check(args.device in ("cpu", "cuda"), f"under torchrun each rank runs on the GPU of its local rank: --device cuda or cpu, not {args.device}")
    check(args.batch_size % ranks == 0, f"--batch-size {args.batch_size} must be a multiple of the {ranks} ranks, which share the "
          "global batch evenly (the labeled batch, and so the unlabeled one, mu times larger)")
    device = torch.device("cpu" if args.device == "cpu" else f"cuda:{local_rank}")
    if device.type == "cuda":
        check(local_rank < torch.cuda.device_count(), f"local rank {local_rank}, but this machine has "
              f"{torch.cuda.device_count()} CUDA device(s): --nproc-per-node at most that")
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device, dist.new_group(backend="gloo") if device.type == "cuda" else None


def rank_and_ranks():
    """(this process's rank, the number of ranks): (0, 1) in a plain run."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


class SumOverRanks(torch.autograd.Function):
    """x summed over the ranks, with its gradients: the sum is linear, so its gradient (also the second, through the
    backward) is the ranks' gradients summed, and its tangent in forward mode the ranks' tangents summed."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        return SumOverRanks.apply(grad)

    @staticmethod
    def jvp(ctx, tangent):
        return SumOverRanks.apply(tangent)


def sum_over_ranks(x):
    """x summed over the ranks, differentiably (x on the device: NCCL sums GPU tensors); x itself in one process."""
    return SumOverRanks.apply(x) if dist.is_initialized() else x


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """--sync-bn: BatchNorm whose training-mode statistics are the global batch's, the ranks' sums added up by
    differentiable all-reduces (so that the meta steps' second and forward-mode derivatives pass too; torch's
    SyncBatchNorm runs on GPUs only); eval mode, and one process: BatchNorm. The same parameters and buffers."""

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"BatchNorm expects (N, C, ...) inputs, got {tuple(x.shape)}")

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        dims, shape = [0, *range(2, x.dim())], [1, -1] + [1] * (x.dim() - 2)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 under autocast: sums in float32
        sums = sum_over_ranks(torch.cat([x32.sum(dims), x32.new_full((1,), x.numel() / x.shape[1])]))
        mean, count = sums[:-1] / sums[-1], sums[-1]
        centred = x32 - mean.view(shape)
        var = sum_over_ranks(centred.square().sum(dims)) / count  # two passes, as exact as one process's
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1 / self.num_batches_tracked.item()
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1), momentum)  # unbiased, as BatchNorm
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        return (y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y).to(x.dtype)


def with_global_batch_norm(module):
    """module with its BatchNorms replaced by GlobalBatchNorms of the same settings, parameters and statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            bn = GlobalBatchNorm(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            with_global_batch_norm(child)
    return module


def mean_over_ranks(tensors):
    """The tensors (no gradient: parameters' gradients, say) averaged over the ranks in place, in one all-reduce."""
    if dist.is_initialized() and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        for t, mean in zip(tensors, flat.div_(dist.get_world_size()).split([t.numel() for t in tensors])):
            t.copy_(mean.view_as(t))
    return tensors


def all_ranks_cat(t):
    """The ranks' t (no gradient) concatenated in rank order: the global batch's rows; t itself in one process."""
    if not dist.is_initialized():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def any_rank(flag, group):
    """Whether the flag is set on some rank: the same answer on every rank, so that the ranks stop together."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor(int(flag))
    dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
    return bool(t)


def from_rank_0(tensors):
    """The tensors set to rank 0's values on every rank (in one process: unchanged)."""
    for t in tensors if dist.is_initialized() else ():
        dist.broadcast(t, 0)


def seed_rank(seed, rank, step):
    """The RNGs of rank > 0 (dropout's, and so on), distinct from rank 0's, which continue a plain run's stream; also the
    way a run resumed on another number of ranks seeds them, from its step."""
    key = [int(k) for k in np.random.SeedSequence([seed, rank, step]).generate_state(3)]
    random.seed(key[0]), np.random.seed(key[1]), torch.manual_seed(key[2])


# --- Optimisation, evaluation, the run's folder ---
def make_adamw(model, args):
    """--optimizer adamw (USB's fine-tuning): AdamW without weight decay on biases and norms (the 1-D tensors); a layer-
    wise lr decay, layer_decay^(L + 1 - depth) with depth 0 the embeddings, l + 1 the encoder's block l of L, and
    L + 1 the rest (the final norm, the head: lr itself); lr warmed up linearly from 0 over --lr-warmup steps, then
    decayed as cos(7 pi t / 16 T') over the T' steps left (USB). A network from scratch has no blocks: one lr."""
    depth = {n: (0 if ".embeddings." in n else int(m[1]) + 1 if (m := re.search(r"\.layers?\.(\d+)\.", n)) else None)
             for n, _ in model.named_parameters()}
    top = max([d for d in depth.values() if d is not None], default=-1) + 1
    groups = {}
    for n, p in model.named_parameters():
        d, decay = top if depth[n] is None else depth[n], p.ndim > 1
        groups.setdefault((-d, not decay), {"params": [], "lr": args.lr * args.layer_decay ** (top - d),
                                            "weight_decay": args.weight_decay if decay else 0.0})["params"].append(p)
    optimizer = torch.optim.AdamW([groups[k] for k in sorted(groups)], lr=args.lr)  # the head's group first: its lr is logged
    rest = max(1, args.total_steps - args.lr_warmup)
    schedule = lambda t: t / args.lr_warmup if t < args.lr_warmup else math.cos(7 * math.pi * (t - args.lr_warmup) / (16 * rest))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def make_optimizer(model, args):
    """SGD Nesterov; no weight decay on BatchNorm parameters and biases (all the 1-D tensors)."""
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
    cosine = lambda t: math.cos(7 * math.pi * t / (16 * args.total_steps))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)


@torch.no_grad()
def ema_update(ema_model, model, decay, step):
    """The evaluated model after step t: an EMA of the weights with TensorFlow's warm-up, min(decay, (1 + t) / (10 + t)),
    and the model's BatchNorm statistics (USB) less the share (1 - momentum)^n that their initial values 0 and 1 keep
    after n updates (Adam's bias correction): short runs are judged by neither, long ones end as USB's."""
    torch._foreach_lerp_(list(ema_model.parameters()), list(model.parameters()), 1 - min(decay, (1 + step) / (10 + step)))
    for e, b in zip(ema_model.buffers(), model.buffers()):
        e.copy_(b)
    for bn in ema_model.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.track_running_stats and bn.momentum:
            initial_share = (1 - bn.momentum) ** bn.num_batches_tracked.clamp(min=1)  # a tensor: no host sync
            bn.running_mean.div_(1 - initial_share)
            bn.running_var.sub_(initial_share).div_(1 - initial_share).clamp_(min=0)  # float32's rounding, in early steps


@torch.no_grad()
def evaluate(model, images, labels, classes, args, prepare, autocast):
    """Top-1, balanced accuracy (mean of per-class recalls) and per-class accuracy. Under torchrun each rank predicts
    its share of the images, and the ranks add up their counts."""
    rank, ranks = rank_and_ranks()
    first, end = rank * len(images) // ranks, (rank + 1) * len(images) // ranks
    model.eval()
    with autocast():
        preds = [model(prepare(images[i:min(i + args.eval_batch_size, end)])).argmax(1).cpu() for i in range(first, end, args.eval_batch_size)]
    model.train()
    labels = labels[first:end]
    correct = torch.cat(preds) == labels if preds else torch.zeros(0, dtype=torch.bool)
    counts = torch.stack([torch.bincount(labels[correct], minlength=classes), torch.bincount(labels, minlength=classes)])
    if dist.is_initialized():  # on the model's device: NCCL sums GPU tensors
        counts = sum_over_ranks(counts.to(next(model.parameters()).device)).cpu()
    per_class = [(c / n).item() if n else float("nan") for c, n in counts.double().T]
    return {"top1": (counts[0].sum() / counts[1].sum()).item(), "balanced_acc": float(np.nanmean(per_class)), "per_class_acc": per_class}


def json_safe(x):  # NaN (e.g. a pseudo-label accuracy when nothing was selected) and infinities as null: JSON has neither
    return json.loads(json.dumps(x), parse_constant=lambda constant: None)


def write_atomically(path, write):
    """write(a temporary file), flushed to disk, renamed over path: a crash leaves the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(where, mmap=False):
    path = Path(where) / "checkpoint.pt" if Path(where).is_dir() else Path(where)
    check(path.is_file(), f"--resume {where!r}: no checkpoint file there")
    try:  # weights_only=False: our own file, which also holds the RNG states; mmap: tensors read only when used
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        ours = isinstance(ckpt, dict) and isinstance(ckpt.get("args"), dict) and "algorithm" in ckpt
        written_by = f"written by {ckpt['algorithm']}.py" if ours else "not one of this project"
    except Exception as e:
        written_by = f"unreadable, cut short or not written by torch.save: {type(e).__name__}"
    check(written_by == f"written by {ALGORITHM}.py", f"cannot resume from {path}: not a checkpoint of {ALGORITHM}.py ({written_by})")
    return ckpt


# What --resume lets change: where, how fast, what a run writes (bitwise equal: same device, --threads, bf16, compile...)
RESUME_MAY_DIFFER = ("data_dir", "device", "workers", "threads", "eval_every", "log_every", "eval_batch_size", "output_dir",
                     "resume", "overwrite", "stop_after", "channels_last", "bf16", "compile", "tensorboard", "torch_deterministic")


class Run:
    """The run's folder (split.json, metrics.jsonl, TensorBoard's events, checkpoint.pt, summary.json) and its state:
    the objects in `state` (modules, optimizers, schedulers, tensors: a method adds its own), the RNGs, the best top-1.
    A fresh run never replaces another's checkpoint unless --overwrite; --resume continues the run in its folder,
    wherever that was moved, with its records up to the checkpoint, once the flags and the data are found the same.
    Under torchrun every rank checks and loads the checkpoint (with several nodes, the run's folder must be one that
    every node sees), and rank 0 alone writes."""

    def __init__(self, args, split, state, device):
        self.args, self.state, self.device, self.saved_step = args, state, device, None
        self.rank, ranks = rank_and_ranks()
        ckpt = load_checkpoint(args.resume) if args.resume else None
        if ckpt:
            run_dir = Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent
            differ = [f"{flag(k)} {v} (checkpoint: {ckpt['args'].get(k)})" for k, v in dataclasses.asdict(args).items()
                      if k not in RESUME_MAY_DIFFER and ckpt["args"].get(k) != v]
            check(not differ, f"--resume: this run's flags differ from the checkpoint's: {', '.join(differ)}")
            # a finished run has nothing left to run (and going on would overwrite its summary.json)
            check(ckpt["step"] < args.total_steps, f"--resume {args.resume}: that run has finished all its {args.total_steps} steps")
            check(not (run_dir / "split.json").is_file() or json.loads((run_dir / "split.json").read_text()) == split,
                  f"--resume {args.resume}: the data has changed since that run began (its labeled, validation or "
                  f"unlabeled set differs from {run_dir / 'split.json'}); resume it on the same data")
            check(Path(args.resume).is_dir() or Path(args.resume).name == "checkpoint.pt" or args.overwrite or not (run_dir /
                  "checkpoint.pt").exists(), f"--resume {args.resume} would replace {run_dir}/checkpoint.pt; --overwrite allows it")
            check(not args.output_dir or Path(args.output_dir).resolve() == run_dir.resolve(), f"--resume {args.resume} "
                  f"continues the run in its own folder, not in --output-dir {args.output_dir} (copy the folder there first)")
            missing = [k for k in state if k not in ckpt]
            check(not missing, f"cannot resume from {args.resume}: not a checkpoint of this {ALGORITHM}.py (no {', '.join(missing)})")
            args.output_dir = str(run_dir)
        self.out = out = Path(args.output_dir or f"runs/{ALGORITHM}_{args.dataset}_{args.labels}_seed{args.seed}")
        args.output_dir = str(out)
        check(ckpt or args.overwrite or not (out / "checkpoint.pt").exists(), f"{out} holds an earlier run's checkpoint: "
              f"--resume {out} continues it, --overwrite replaces it with this run, or choose another --output-dir")
        try:
            if self.rank == 0:
                out.mkdir(parents=True, exist_ok=True)
                write_atomically(out / "split.json", lambda f: f.write_text(json.dumps(split)))
        except OSError as e:
            raise UserError(f"cannot write to --output-dir {out}: {e.strerror or e}") from None
        # the run's records up to its checkpoint (not the later or cut-short lines of a stopped run); none beside a fresh run
        logged = (out / "metrics.jsonl").read_text().splitlines() if ckpt and (out / "metrics.jsonl").exists() else []
        kept = "".join(l + "\n" for l in logged if (m := re.fullmatch(r'{"step": (\d+), .*}', l)) and int(m[1]) <= ckpt["step"])
        for earlier in ("checkpoint.pt", "summary.json") if not ckpt and self.rank == 0 else ():
            (out / earlier).unlink(missing_ok=True)
        if self.rank == 0:
            write_atomically(out / "metrics.jsonl", lambda f: f.write_text(kept))
        self.writer = importlib.import_module("torch.utils.tensorboard").SummaryWriter(str(out)) if args.tensorboard and self.rank == 0 else None
        for k, obj in state.items() if ckpt else ():
            obj.load_state_dict(ckpt[k]) if hasattr(obj, "load_state_dict") else obj.copy_(ckpt[k])
        # last: building the model and the method's state drew from the RNGs. Rank r > 0 continues its own stream on the
        # same number of ranks; on another, or in a fresh run, it is seeded apart from rank 0
        rng = ckpt and ([ckpt["rng"], *ckpt.get("rng_other_ranks", [])] if len(ckpt.get("rng_other_ranks", [])) == ranks - 1 else [ckpt["rng"]])
        if rng and self.rank < len(rng):
            rng = rng[self.rank]
            random.setstate(rng["python"]), np.random.set_state(rng["numpy"]), torch.set_rng_state(rng["torch"])
            if rng["cuda"] is not None and device.type == "cuda":  # a CPU run resumed on a GPU keeps the seeded one
                torch.cuda.set_rng_state(rng["cuda"], device)
        elif self.rank:
            seed_rank(args.seed, self.rank, ckpt["step"] if ckpt else 0)
        self.first_step, self.best_top1, self.seconds_before = (ckpt["step"], ckpt["best_top1"], ckpt["seconds"]) if ckpt else (0, None, 0.0)
        self.start_time = time.perf_counter()

    def seconds(self):
        return self.seconds_before + time.perf_counter() - self.start_time

    def log(self, record, note=""):  # to metrics.jsonl, TensorBoard, and the console (numbers only); by rank 0
        if self.rank:
            return
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(json_safe(record)) + "\n")
        print(f"[{ALGORITHM}] {record['kind']} step {record['step']}/{self.args.total_steps}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float)) + (f" | {note}" if note else ""), flush=True)
        for k, v in record.items() if self.writer else ():
            if isinstance(v, (int, float)) and k != "step":
                self.writer.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def save(self, step, group=None):  # by rank 0, with every rank's RNGs (group: where they are gathered)
        self.saved_step = step
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),  # the
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}  # run's GPU's
        ranks_rng = [None] * rank_and_ranks()[1]
        if dist.is_initialized():
            dist.all_gather_object(ranks_rng, rng, group=group)
        if self.rank:
            return
        checkpoint = {
            **{k: obj.state_dict() if hasattr(obj, "state_dict") else obj for k, obj in self.state.items()},
            "rng": rng, **({"rng_other_ranks": ranks_rng[1:]} if dist.is_initialized() else {}),
            "algorithm": ALGORITHM, "step": step, "best_top1": self.best_top1,
            "seconds": self.seconds(), "args": dataclasses.asdict(self.args)}
        write_atomically(self.out / "checkpoint.pt", lambda f: torch.save(checkpoint, f))

    def finish(self, summary):
        if self.rank:
            return
        write_atomically(self.out / "summary.json", lambda f: f.write_text(json.dumps(json_safe(summary), indent=2)))
        if self.writer:
            self.writer.close()


@contextlib.contextmanager
def deferred_stop_signals(received):
    """Ctrl-C or SIGTERM appends its name to `received`: the loop ends its step, checkpoints, stops. A second stops now,
    but under torchrun, which passes each signal it gets on to the ranks (so that a rank may get Ctrl-C twice) and kills
    them itself 30 s later."""
    def handler(signum, frame):
        if received and "LOCAL_RANK" not in os.environ:
            raise KeyboardInterrupt
        received.append(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# --- Training ---
def train(args):
    # --- seeds, data ---
    device, control = init_distributed(args)  # torchrun's ranks, or one process
    rank, ranks = rank_and_ranks()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    random.seed(args.seed), np.random.seed(args.seed), torch.manual_seed(args.seed)
    torch.backends.cudnn.deterministic = args.torch_deterministic  # else cuDNN may pick algorithms whose atomics vary
    encoder = load_encoder(args.pretrained) if args.pretrained else None
    train_x, train_y, test_x, test_y, classes, mean, std = load_data(args, encoder)
    labeled_idx, unlabeled_idx, val_idx = split_labeled(train_y, classes, args, np.random.default_rng(args.seed))
    check(len(unlabeled_idx) or args.labeled_only, "no training sample is left for the unlabeled set: use fewer "
          "--labels / --val-labels, no --exclude-labeled, or --labeled-only")
    prepare = input_pipeline(args, mean, std, encoder, device)  # a batch as the network reads it, on the device
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda" and args.bf16)
    test_images, test_labels = torch.from_numpy(test_x), torch.from_numpy(test_y)
    val_images, val_labels = torch.from_numpy(train_x[val_idx]), torch.from_numpy(train_y[val_idx])

    # --- model, EMA, optimiser: the run's state, and its folder ---
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = make_model(args, encoder, train_x.shape[-1], classes)
    model = (with_global_batch_norm(model) if args.sync_bn and ranks > 1 else model).to(device, memory_format=memory_format)
    try:  # a network too deep for the images fails here, in one line (eval mode: BatchNorm's statistics stay untouched)
        with torch.no_grad():
            model.eval()(prepare(torch.from_numpy(train_x[:2])))
    except RuntimeError as e:
        raise UserError(f"{flag('pretrained') if args.pretrained else flag('net')} {args.pretrained or args.net} does not fit "
                        f"the {'texts' if args.dataset == 'text' else 'images'} of --dataset {args.dataset}: {(str(e).strip().splitlines() or [''])[0]}") from None
    model.train()
    ema_model = copy.deepcopy(model).requires_grad_(False)
    optimizer, scheduler = make_adamw(model, args) if args.optimizer == "adamw" else make_optimizer(model, args)
    forward = model.features
    if dist.is_initialized():  # DDP averages the extractor's gradients over the ranks; the heads' are averaged below
        forward = nn.parallel.DistributedDataParallel(model.features, device_ids=[device.index] if device.type == "cuda" else None,
                                                      find_unused_parameters=bool(args.pretrained))
    forward = torch.compile(forward) if args.compile else forward
    avg_head = copy.deepcopy(model.head)  # Avg-Clustering's beta_bar: the live head at step 0; not the optimiser's
    sat = threshold_state(classes, device)  # FreeMatch's state, in the checkpoint with the model's
    state = {"model": model, "ema_model": ema_model, "optimizer": optimizer, "scheduler": scheduler, **sat, "avg_head": avg_head}
    run = Run(args, {"labeled": labeled_idx.tolist(), "validation": val_idx.tolist(), "unlabeled_count": len(unlabeled_idx)},
              state, device)
    weak, strong = augmentations(args, encoder)
    loader = torch.utils.data.DataLoader(  # own generator: creating the iterator must not consume the global RNG
        range(run.first_step, args.total_steps), batch_size=None, generator=torch.Generator(), worker_init_fn=worker_init,
        collate_fn=functools.partial(make_batch, images=train_x, labels=train_y, labeled_idx=labeled_idx,
                                     unlabeled_idx=unlabeled_idx, args=args, weak=weak, strong=strong, shard=(rank, ranks)),
        num_workers=args.workers, persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None,
        pin_memory=device.type == "cuda")

    # --- the training loop ---
    if rank == 0:
        print(f"[{ALGORITHM}] {args.dataset}: {len(labeled_idx)} labeled, {len(unlabeled_idx)} unlabeled, {len(test_y)} test | "
              f"net {args.net or Path(args.pretrained).name} on {device}{f' x {ranks} ranks' if ranks > 1 else ''} | "
              f"{'sslkernels' if sslkernels else 'no extension (pure PyTorch)'} | output {run.out}")
    last_step = args.total_steps if args.stop_after <= 0 else min(args.total_steps, run.first_step + args.stop_after)
    sums, n_logged, eval_result, stop_signals = None, 0, None, []
    batches, window_start = iter(loader), time.perf_counter()
    with deferred_stop_signals(stop_signals):
        for step in range(run.first_step + 1, last_step + 1):
            try:
                batch = next(batches)
            except Exception:
                if not stop_signals:
                    raise
                batch = None  # the workers ended with the signal
            if any_rank(batch is None, control):  # stop before this step, on every rank
                last_step = step - 1
                break
            x_l, y_l = prepare(batch["x_l"]), batch["y_l"].to(device, non_blocking=True)
            # labeled, weak and strong views in ONE forward: BatchNorm sees them together
            inputs = x_l if args.labeled_only else join([x_l, prepare(batch["x_uw"]), prepare(batch["x_us"])])
            with autocast():  # the heads then multiply float32 features: a few columns, no cost to speak of
                features = forward(inputs).float()
            if args.labeled_only:
                stats = {"loss_s": (loss := F.cross_entropy(model.head(features), y_l))}
            else:
                # ---- LayerMatch ----
                loss, stats, mask, pseudo_label = layermatch_loss(features, model.head, avg_head, y_l, sat, args)
                # pseudo-label diagnostics; y_u = -1 where the true label is unknown
                y_u = batch["y_u"].to(device, non_blocking=True)
                known, correct = (y_u >= 0).float(), (pseudo_label == y_u).float()
                stats.update(mask_rate=mask.mean(), selected=(mask * known).sum(), selected_correct=(mask * correct).sum(),
                             known=known.sum(), correct=correct.sum())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            mean_over_ranks([p.grad for p in (*model.head.parameters(), *avg_head.parameters()) if p.grad is not None])
            optimizer.step()
            if args.avg_clustering and not args.labeled_only:
                update_avg_head(avg_head, model.head, step, args)
            lr = scheduler.get_last_lr()[0]  # this step's, logged below
            scheduler.step()
            ema_update(ema_model, model, args.ema, step)

            # --- logging, evaluation, checkpoints ---
            # summed on the device and read once per log interval: no host sync on the hot path
            values = torch.stack([loss.detach(), *(v.detach().float() for v in stats.values())])
            sums, n_logged = values if sums is None else sums + values, n_logged + 1
            # read once, by all ranks alike: the step that sees a signal is logged, checkpointed, the last
            stopping = any_rank(bool(stop_signals), control)
            if step % args.log_every == 0 or step == last_step or stopping:
                mean_over_ranks([sums])  # means over the interval and the ranks
                w = {k: v / n_logged for k, v in zip(["loss", *stats], sums.tolist())}
                rec = {"step": step, "kind": "train", "lr": lr, **{k: w[k] for k in ("loss", "loss_s", "loss_u", "loss_fair", "loss_ac",
                                                                      "time_p", "mask_rate", "avg_head_gap") if k in w}}
                if "known" in w:  # accuracy of the selected pseudo-labels, and of all of them
                    rec["pseudo_label_acc"] = w["selected_correct"] / w["selected"] if w["selected"] else float("nan")
                    rec["pseudo_label_acc_all"] = w["correct"] / w["known"] if w["known"] else float("nan")
                rec["steps_per_second"] = rate = n_logged / (time.perf_counter() - window_start)
                run.log(rec, f"ETA {(last_step - step) / rate / 60:.1f} min")
                sums, n_logged, window_start = None, 0, time.perf_counter()
            if step % args.eval_every == 0 or step == args.total_steps:
                from_rank_0(ema_model.buffers())  # without --sync-bn each rank's BatchNorm statistics are its own
                eval_result = evaluate(ema_model, test_images, test_labels, classes, args, prepare, autocast)
                if len(val_idx):  # also in summary.json: a model chosen by it has not seen the test set
                    val = evaluate(ema_model, val_images, val_labels, classes, args, prepare, autocast)
                    eval_result.update(val_top1=val["top1"], val_balanced_acc=val["balanced_acc"])
                run.best_top1 = max(eval_result["top1"], run.best_top1 or 0.0)
                run.log({"step": step, "kind": "eval", **eval_result, "best_top1": run.best_top1})
                run.save(step, control)
            if stopping:
                last_step = step
                break
    if run.saved_step != last_step:  # a planned stop or a signal (also before any step): all needed to resume
        run.save(last_step, control)
    del batches

    summary = {"algorithm": ALGORITHM, "fused_kernels": sslkernels is not None,  # else the pure-PyTorch fallback
               "steps": last_step, "finished": last_step == args.total_steps,
               "stopped_by": stop_signals[0] if stop_signals and last_step < args.total_steps else None,
               **(eval_result or dict.fromkeys(("top1", "balanced_acc", "per_class_acc"))), "best_top1": run.best_top1,
               "seconds": run.seconds(), "args": dataclasses.asdict(args)}
    run.finish(summary)
    if dist.is_initialized():  # once every rank is done: a rank that leaves first can make another's gloo abort
        dist.barrier()
        dist.destroy_process_group()
    return summary


def main(argv=None):
    try:
        summary = train(parse_args(argv))
    except UserError as e:
        sys.exit(f"{ALGORITHM}.py: error: {e}")
    except (RuntimeError, dist.DistError) as e:  # under torchrun, another rank died: a collective failed (gloo) or timed out
        if not dist.is_initialized() or not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        sys.exit(f"{ALGORITHM}.py: error: rank {dist.get_rank()} lost touch with the other ranks ({(str(e).strip().splitlines() or [''])[0]}); "
                 "torchrun's report names the rank that failed first")
    if summary["stopped_by"] and os.environ.get("RANK", "0") == "0":
        print(f"[{ALGORITHM}] {summary['stopped_by']}: stopped after step {summary['steps']} with a checkpoint; "
              f"--resume {summary['args']['output_dir']} continues the run")
    if summary["stopped_by"]:
        sys.exit(128 + signal.Signals[summary["stopped_by"]])  # the shell's code for a process ended by that signal


if __name__ == "__main__":
    main()
