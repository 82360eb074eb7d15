"""How much of what a run's weights know its reported top-1 shows: for each finished run folder, the test top-1 of

  evaluated     the weights and BatchNorm statistics the run evaluates (its EMA model), as summary.json reports it
  raw           the trained weights with their own running BatchNorm statistics
  raw, BN       the trained weights with BatchNorm statistics recomputed on the training images
  EMA, BN       the evaluated weights with BatchNorm statistics recomputed on the training images

Recomputed statistics average each BatchNorm's batch statistics over all training images, in equal batches of about
1,000 without augmentation, the network otherwise in eval mode (no dropout): what the running averages estimate. A run
whose `evaluated` sits far below `raw, BN` reports less than its weights know.

    python benchmark/evaluation.py runs/accuracy/*_seed*         # run folders of any algorithm file
"""

import argparse
import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_algorithm(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "algorithms" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def recompute_batchnorm(model, images, prepare, batch_size=1000):
    """A copy of the model whose BatchNorms hold the average of their batch means and (unbiased) variances over
    `images`, in equal batches of about batch_size (momentum None: torch's cumulative average), so that the mean is
    the exact mean of their input."""
    model = copy.deepcopy(model).eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    batches = math.ceil(len(images) / batch_size)
    size = len(images) // batches  # leaves out fewer than `batches` images
    for i in range(batches):
        model(prepare(images[i * size:(i + 1) * size]))
    return model.eval()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (output dirs of finished runs)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rows, modules = [], {}
    for folder in map(Path, a.runs):
        if not (folder / "summary.json").is_file():
            sys.exit(f"evaluation.py: error: {folder} holds no summary.json (not a finished run)")
        summary = json.loads((folder / "summary.json").read_text())
        algorithm = modules.setdefault(summary["algorithm"], load_algorithm(summary["algorithm"]))
        args = algorithm.Args(**summary["args"])
        args.device, args.bf16 = "cpu", False
        train_x, _, test_x, test_y, classes, mean, std = algorithm.load_data(args)
        mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in (mean, std))
        prepare = lambda x: (torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
        ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=False)
        models = {}
        for part in ("model", "ema_model"):
            models[part] = algorithm.NETS[args.net](train_x.shape[-1], classes)
            models[part].load_state_dict(ckpt[part])
        images, labels = torch.from_numpy(test_x), torch.from_numpy(test_y)
        top1 = lambda model: 100 * algorithm.evaluate(model, images, labels, classes, args, prepare, torch.no_grad)["top1"]
        row = {"run": str(folder), "steps": ckpt["step"], "evaluated": top1(models["ema_model"]),
               "raw": top1(models["model"]), "raw, BN": top1(recompute_batchnorm(models["model"], train_x, prepare)),
               "EMA, BN": top1(recompute_batchnorm(models["ema_model"], train_x, prepare))}
        if summary["top1"] is not None and abs(row["evaluated"] - 100 * summary["top1"]) > 0.3:
            print(f"note: {folder}: evaluated here {row['evaluated']:.2f}, summary.json {100 * summary['top1']:.2f}")
        rows.append(row)
        print(" | ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in row.values()), flush=True)
    keys = ["evaluated", "raw", "raw, BN", "EMA, BN"]
    print("\n| run | steps | " + " | ".join(keys) + " | raw, BN minus evaluated |\n|" + " --- |" * (len(keys) + 3))
    for r in rows:
        print(f"| {r['run']} | {r['steps']} | " + " | ".join(f"{r[k]:.2f}" for k in keys)
              + f" | {r['raw, BN'] - r['evaluated']:+.2f} |")
    if len(rows) > 1:
        gap = np.array([r["raw, BN"] - r["evaluated"] for r in rows])
        print(f"| mean over {len(rows)} runs | | " + " | ".join(f"{np.mean([r[k] for r in rows]):.2f}" for k in keys)
              + f" | {gap.mean():+.2f} ± {gap.std(ddof=1) / np.sqrt(len(gap)):.2f} |")


if __name__ == "__main__":
    main()
