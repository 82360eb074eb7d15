"""Accuracy of the algorithm files on one budget: runs each configuration for each seed, one run
after another, and prints a markdown table of the final EMA top-1 (mean and std over seeds).

    python benchmark/accuracy.py                      # digits, 40 labels, 3000 steps, seeds 0 1 2
    python benchmark/accuracy.py --configs fixmatch supervised --seeds 0

A configuration is a name from CONFIGS (script and extra flags). Runs already finished in
--out-dir are read back, not rerun, so an interrupted benchmark continues where it stopped.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name: (algorithm file, extra flags)
CONFIGS = {
    "fixmatch": ("fixmatch", []),
    "supervised": ("fixmatch", ["--labeled-only"]),
    "meta_t": ("meta_t", []),
    "meta_t_fd": ("meta_t", ["--meta-grad", "fd", "--fd-direction-at", "w"]),
    "green_meta_t_fd_k4": ("meta_t", ["--meta-grad", "fd", "--fd-direction-at", "w", "--meta-interval", "4"]),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["fixmatch", "supervised"], choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--labels", type=int, default=40)
    p.add_argument("--total-steps", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out-dir", default="runs/accuracy")
    p.add_argument("--extra", default="", help="more flags for every run, e.g. \"--device cuda\"")
    a = p.parse_args()

    rows = []
    for name in a.configs:
        script, flags = CONFIGS[name]
        if not (ROOT / "algorithms" / f"{script}.py").exists():
            print(f"skipping {name}: algorithms/{script}.py does not exist", file=sys.stderr)
            continue
        top1, seconds = [], []
        for seed in a.seeds:
            out = Path(a.out_dir) / f"{name}_{a.dataset}_{a.labels}_seed{seed}"
            summary_path = out / "summary.json"
            done = summary_path.exists() and json.loads(summary_path.read_text())["finished"]
            if not done:
                cmd = [sys.executable, str(ROOT / "algorithms" / f"{script}.py"), "--dataset", a.dataset,
                       "--labels", str(a.labels), "--total-steps", str(a.total_steps), "--seed", str(seed),
                       "--eval-every", str(a.total_steps), "--log-every", "500", "--workers", str(a.workers),
                       "--output-dir", str(out), *flags, *a.extra.split()]
                print(" ".join(cmd[1:]), file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True)
            s = json.loads(summary_path.read_text())
            top1.append(100 * s["top1"])
            seconds.append(s["seconds"])
        rows.append((name, top1, seconds))

    print(f"\n{a.dataset}, {a.labels} labels, {a.total_steps} steps, seeds {' '.join(map(str, a.seeds))}\n")
    print("| method | top-1 % (mean ± std) | per seed | minutes per run |")
    print("| --- | --- | --- | --- |")
    for name, top1, seconds in rows:
        per_seed = ", ".join(f"{t:.2f}" for t in top1)
        print(f"| {name} | {np.mean(top1):.2f} ± {np.std(top1):.2f} | {per_seed} | {np.mean(seconds) / 60:.1f} |")


if __name__ == "__main__":
    main()
