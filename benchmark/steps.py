"""Seconds per training step of each algorithm script on the same data, network and batch, and the ratio to
FixMatch (the Meta-T paper's Sec. 4.5: Meta-T costs about 3x FixMatch, Green Meta-T (k+2)/k; FreeMatch and LayerMatch about 1x).

    python benchmark/steps.py                        # digits, cnn_small, B = 64, mu = 7, 60 steps each
    python benchmark/steps.py --dataset fashion_mnist --data-dir /usr/share/datasets/fashion-mnist --net cnn_small_s2
    python benchmark/steps.py --quick                # a smoke check: 20 small steps each
    python benchmark/steps.py --batch-size 128 --uratio 1 --only FixMatch,MetaSemi   # MetaSemi needs mu = 1 (mixup)
    python benchmark/steps.py --own-batches --augment --only FixMatch,MetaSemi      # each at its defaults
    python benchmark/steps.py --dataset text --data-dir data/finefood --pretrained <MiniLM folder> --batch-size 8 \
        --uratio 1 --labels 20 --steps 16 --warmup 4 --extra="--max-length 64"             # a pretrained text encoder

Each variant is its own subprocess, run one after another (never in parallel: they would compete for
the cores), with the same flags and --workers 0. A run's time per step is the median over its windows
of 4 steps after --warmup (the `steps_per_second` of its metrics.jsonl, logged every 4 steps): a window
holds one whole cycle of Green Meta-T with k = 4 (one meta step, three plain ones), which the median
step of summary.json's `seconds_per_step` would miss, and the median window shrugs off bursts of other
jobs on the machine. The variants run round-robin --repeat times and each keeps its fastest run; the
table also gives, per variant, the median and range over rounds of its ratio to the FixMatch run of the
same round, which pairs runs made close together when the background load moves. By default the views
are not augmented (identity): on CPU, RandAugment of the 7 * 64 strong views costs more than the small
network's step and is the same for every method, so it would dilute the ratios; --augment keeps it.
Algorithm files that do not exist yet are skipped. The runs keep freed memory blocks of up to 32 MiB in glibc's
malloc (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_), as the README advises for CPU training, unless the caller
set those variables otherwise.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (label, script, flags, the paper's cost estimate relative to FixMatch)
VARIANTS = [
    ("FixMatch", "fixmatch", [], 1.0),
    ("Meta-T, exact", "meta_t", ["--meta-grad", "exact"], 3.0),
    ("Meta-T, exact by forward mode (jvp)", "meta_t", ["--meta-grad", "jvp"], 3.0),
    ("Meta-T, first-order, v at w", "meta_t", ["--meta-grad", "fd", "--fd-direction-at", "w"], None),
    ("Meta-T, first-order, v at w_hat", "meta_t", ["--meta-grad", "fd", "--fd-direction-at", "w_hat"], None),
    ("Green Meta-T k=4, first-order, v at w", "meta_t",
     ["--meta-grad", "fd", "--fd-direction-at", "w", "--meta-interval", "4"], None),
    ("Green Meta-T k=4, exact", "meta_t", ["--meta-grad", "exact", "--meta-interval", "4"], 6 / 4),
    ("Green Meta-T k=4, exact by forward mode (jvp)", "meta_t", ["--meta-grad", "jvp", "--meta-interval", "4"], 6 / 4),
    # mixup pairs the batches one to one: these run with mu = 1 or --own-batches only
    ("MetaSemi", "meta_semi", [], None),
    ("MetaSemi without the meta step (--no-meta)", "meta_semi", ["--no-meta"], None),
    # FreeMatch's thresholds and fairness term and LayerMatch's second head add no network pass
    ("FreeMatch", "freematch", [], 1.0),
    ("LayerMatch", "layermatch", [], 1.0),
]

# Loads the script by path (as the tests do) and runs its main(); optionally with identity augmentations
# and a given number of threads.
RUNNER = """
import importlib.util, sys, torch
if int(sys.argv[3]) > 0:
    torch.set_num_threads(int(sys.argv[3]))
spec = importlib.util.spec_from_file_location("algorithm", sys.argv[1])
algorithm = importlib.util.module_from_spec(spec)
spec.loader.exec_module(algorithm)
if sys.argv[2] == "identity":
    algorithm.weak_augment = algorithm.strong_augment = lambda x, rng, flip: x
    algorithm.strong_text = lambda x, rng, **kw: x[0]
algorithm.main(sys.argv[4:])
"""


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", help="any --dataset of the scripts")
    p.add_argument("--data-dir", default="", help="--data-dir of every run (--dataset folder, the torchvision datasets)")
    p.add_argument("--net", default="cnn_small", help="network of every run")
    p.add_argument("--pretrained", default="", help="a Hugging Face folder every run fine-tunes instead of --net")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch size B of every run")
    p.add_argument("--uratio", type=int, default=7, help="mu of every run")
    p.add_argument("--own-batches", action="store_true", help="each script's default B and mu instead of the two above")
    p.add_argument("--labels", type=int, default=40, help="labeled samples")
    p.add_argument("--steps", type=int, default=60, help="training steps per run, a multiple of 4")
    p.add_argument("--warmup", type=int, default=12, help="first steps left out of the mean, a multiple of 4")
    p.add_argument("--augment", action="store_true", help="keep the real augmentations (timed inside the step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads of every run; 0 = torch's default")
    p.add_argument("--repeat", type=int, default=3, help="rounds over the variants; each keeps its fastest")
    p.add_argument("--quick", action="store_true", help="one round of 20 steps of batch 16: checks that it runs")
    p.add_argument("--compile", action="store_true",
                   help="pass --compile to every run (skips the double-backward variants, which it does not support)")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the variants whose label has one")
    p.add_argument("--extra", default="",
                   help="more flags for every run, as one string after '=': --extra=\"--no-bf16 --no-torch-deterministic\"")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup, a.batch_size, a.repeat = 20, 8, 16, 1
    if a.steps % 4 or a.warmup % 4 or not 0 <= a.warmup < a.steps:
        p.error("--steps and --warmup must be multiples of 4 (the log interval), with --warmup < --steps")
    if a.threads < 0:
        p.error("--threads must be 0 or positive")
    batches = [] if a.own_batches else ["--batch-size", str(a.batch_size), "--uratio", str(a.uratio)]
    network = ["--pretrained", a.pretrained] if a.pretrained else ["--net", a.net]
    common = ["--dataset", a.dataset, *network, *batches, "--labels", str(a.labels), "--total-steps", str(a.steps), "--eval-every", str(a.steps),
              "--log-every", "4", "--workers", "0", "--seed", "0"]
    if a.data_dir:
        common += ["--data-dir", a.data_dir]
    common += a.extra.split()
    batch_text = "each script's own B and mu" if a.own_batches else f"B = {a.batch_size}, mu = {a.uratio}"
    print(f"{a.dataset}, {Path(a.pretrained).name if a.pretrained else a.net}, {batch_text}, {a.steps} steps ({a.warmup} warm-up), "
          f"{'real' if a.augment else 'identity'} augmentations, {a.threads or 'default'} torch threads, "
          f"best of {a.repeat}")
    variants = [v for v in VARIANTS if (ROOT / "algorithms" / f"{v[1]}.py").exists()
                and (not a.only or any(s in v[0] for s in a.only.split(",")))
                and not (a.compile and "exact" in v[2]) and (v[1] != "meta_semi" or a.uratio == 1 or a.own_batches)]
    if not variants:
        p.error(f"--only {a.only!r} matches none of: {' | '.join(v[0] for v in VARIANTS)}")
    if a.compile:  # compiled in the first steps, which --warmup leaves out
        common.append("--compile")
    best, rounds, fallback = {}, [{} for _ in range(a.repeat)], set()
    # the repository's sslkernels first (built in place or installed), whatever the current directory
    env = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824", **os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        for rnd in range(a.repeat):
            for i, (label, script, flags, _) in enumerate(variants):
                out = Path(tmp) / f"round{rnd}_variant{i}"  # a fresh run refuses a folder holding a checkpoint
                cmd = [sys.executable, "-c", RUNNER, str(ROOT / "algorithms" / f"{script}.py"),
                       "real" if a.augment else "identity", str(a.threads), *common, *flags,
                       "--output-dir", str(out)]
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode:
                    sys.exit(f"{label} failed:\n{proc.stderr[-2000:]}")
                records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                if not json.loads((out / "summary.json").read_text())["fused_kernels"]:
                    fallback.add(label)
                rates = [r["steps_per_second"] for r in records if r["kind"] == "train" and r["step"] > a.warmup]
                seconds = statistics.median(1 / r for r in rates)
                best[label] = min(seconds, best.get(label, math.inf))
                rounds[rnd][label] = seconds
                print(f"  round {rnd + 1}, {label}: {seconds:.4f} s/step", flush=True)
    base = best.get(VARIANTS[0][0])
    print("\n| method | s/step | x FixMatch | x FixMatch of the same round: median (range) | paper |"
          "\n|---|---|---|---|---|")
    for label, _, _, paper in variants:
        ratio = f"{best[label] / base:.2f}" if base else "-"
        # the background load moves between rounds: a ratio within one round pairs runs made close together
        same_round = sorted(r[label] / r[VARIANTS[0][0]] for r in rounds) if base else []
        paired = f"{statistics.median(same_round):.2f} ({same_round[0]:.2f}-{same_round[-1]:.2f})" if same_round else "-"
        print(f"| {label} | {best[label]:.4f} | {ratio} | {paired} | {f'{paper:.2f}' if paper else '-'} |")
    if fallback:
        print(f"\nwithout the sslkernels extension (pure-PyTorch fallback): {', '.join(sorted(fallback))}")


if __name__ == "__main__":
    main()
