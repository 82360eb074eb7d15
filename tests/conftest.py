"""Shared test helpers: the algorithm files are standalone scripts, so tests load them by path."""

import ast
import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


def load_algorithm(name):
    """Import algorithms/<name>.py as a module (cached, like a normal import)."""
    key = f"algorithm_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "algorithms" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def top_level_definitions(path):
    """{name: source} of the functions and classes a file defines at its top level."""
    source = Path(path).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def records(out):
    """The records of a run's metrics.jsonl."""
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def full_and_resumed(algorithm, argv, stop_after):
    """Train `argv(name, *extra)` straight through ("full") and stopped after `stop_after` steps then resumed ("cut");
    the two summaries and the two final checkpoints."""
    out = lambda name: Path(argv(name)[argv(name).index("--output-dir") + 1])
    full = algorithm.train(algorithm.parse_args(argv("full")))
    algorithm.train(algorithm.parse_args(argv("cut", "--stop-after", str(stop_after))))
    resumed = algorithm.train(algorithm.parse_args(argv("cut", "--resume", str(out("cut")))))
    return full, resumed, *(torch.load(out(name) / "checkpoint.pt", weights_only=False) for name in ("full", "cut"))


def write_image_folder(root, classes=4, per_class=64, size=8, seed=0):
    """A learnable generated dataset as `--dataset folder` reads it: class c is a bright colour in quadrant c of noisy
    size x size images; every 4th image of a class goes to test/ (192 train and 64 test images by default)."""
    rng = np.random.default_rng(seed)
    half = size // 2
    for c in range(classes):
        for i in range(per_class):
            x = rng.normal(100, 20, (size, size, 3))
            x[(c // 2 % 2) * half:(c // 2 % 2 + 1) * half, (c % 2) * half:(c % 2 + 1) * half, c % 3] += 120
            folder = Path(root) / ("test" if i % 4 == 0 else "train") / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(x, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return Path(root)


SYNTHETIC = None  # the generated dataset's folder, written once per test session


@pytest.fixture(scope="session", autouse=True)
def synthetic_data(tmp_path_factory):
    global SYNTHETIC
    SYNTHETIC = write_image_folder(tmp_path_factory.mktemp("synthetic"))
    return SYNTHETIC


def data_flags(root=None):
    """Flags that train on the generated dataset (4 classes of 8x8 images) with the small network."""
    return ["--dataset", "folder", "--data-dir", str(root or SYNTHETIC), "--image-size", "8", "--net", "cnn_small"]


def tiny(tmp_path, *extra, name="run"):
    """Flags of a few-step run on the generated dataset."""
    return [*data_flags(), "--labels", "8", "--batch-size", "8", "--uratio", "2", "--total-steps", "4", "--eval-every", "2",
            "--log-every", "2", "--workers", "0", "--output-dir", str(tmp_path / name), *extra]


def error_of(algorithm, argv):
    """The one-line message that algorithm.main(argv) exits with (no traceback)."""
    with pytest.raises(SystemExit) as e:
        algorithm.main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"{algorithm.ALGORITHM}.py: error: ") and "\n" not in msg
    return msg


def signal_in_step(algorithm, monkeypatch, signum, step):
    """Make the training loop send itself `signum` in step `step` (at its EMA update, the step's last op)."""
    real_ema_update, calls = algorithm.ema_update, []

    def ema_update_then_signal(*a):
        real_ema_update(*a)
        calls.append(None)
        if len(calls) == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(algorithm, "ema_update", ema_update_then_signal)


@pytest.fixture(scope="session")
def fixmatch():
    return load_algorithm("fixmatch")


WORDS = {0: "good great nice fine happy tasty", 1: "bad awful poor sad stale bland"}
NEUTRAL = "the a food taste dog cat it was is very this my our box bag".split()


def write_text_data(root, per_class=48, test_per_class=16, seed=0, usb=False, label=lambda c: ["great", "other"][c]):
    """A learnable two-class text dataset as `--dataset text` reads it: a few class words among neutral ones.
    usb: USB's format (ori, aug_0, aug_1 per entry; the augmentations other sentences of the same class)."""
    rng = np.random.default_rng(seed)
    sentence = lambda c: " ".join(rng.permutation([*rng.choice(WORDS[c].split(), 2), *rng.choice(NEUTRAL, rng.integers(3, 9))]))
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", per_class), ("test", test_per_class)):
        entries = []
        for i in range(n):
            for c in (0, 1):
                entries.append({"ori": sentence(c), "aug_0": sentence(c), "aug_1": sentence(c), "label": label(c)} if usb
                               else {"text": sentence(c), "label": label(c)})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))
    return root


def write_tiny_bert(root, seed=0):
    """A randomly initialised 2-layer BERT with a word-level tokenizer of the text data's words, saved as a Hugging Face
    folder (config, weights, tokenizer): what --pretrained loads, without a download."""
    import transformers

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted({*" ".join(WORDS.values()).split(), *NEUTRAL})]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(str(root / "vocab.txt")).save_pretrained(root)  # the vocabulary file, as v4 and v5 take it
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(root)
    return root


def write_tiny_vit(root, image_size=16, seed=0):
    """A randomly initialised 2-layer ViT (patch 4) with its image processor, saved as a Hugging Face folder."""
    import transformers

    root = Path(root)
    torch.manual_seed(seed)
    config = transformers.ViTConfig(image_size=image_size, patch_size=4, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32)
    transformers.ViTModel(config).save_pretrained(root)
    transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3]).save_pretrained(root)
    return root
