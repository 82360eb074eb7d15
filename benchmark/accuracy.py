"""Accuracy of the algorithm files on one budget: runs each configuration for each seed (--parallel
runs at a time, one by default) and prints a markdown table of the final EMA top-1 (mean and std
over seeds), then, with two configurations or more, each one's per-seed difference to the first (same seed,
so the same labeled split). Each run's console output goes to <out-dir>/<run>.log.

    python benchmark/accuracy.py                      # digits, 40 labels, 3000 steps, seeds 0 1 2
    python benchmark/accuracy.py --configs fixmatch supervised --seeds 0

A configuration is a name from CONFIGS (script and extra flags). Runs already finished in
--out-dir are read back, not rerun, and an unfinished run that left a checkpoint is resumed from it,
so an interrupted benchmark continues where it stopped. A run folder there of the same name but run with
other flags (another --extra) stops the benchmark with an error instead.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

# name: (algorithm file, extra flags). Meta-T runs with FixMatch's batch (64 + 448) so that every row has
# the same budget, except the _table6 rows: its own defaults, the paper's Table 6 (32 + 192).
# The _cosine rows also take FixMatch's lr schedule (the paper's Fig. 4, Setting 2), the others Table 6's step decay.
# jvp computes the same meta-gradient as exact (a test checks it), in forward mode: 1.4-1.8x faster in benchmark/steps.py.
SAME_BATCH = ["--batch-size", "64", "--uratio", "7"]
COSINE = [*SAME_BATCH, "--lr-schedule", "cosine"]
FIRST_ORDER = ["--meta-grad", "fd", "--fd-direction-at", "w"]
CONFIGS = {
    "fixmatch": ("fixmatch", []),
    "supervised": ("fixmatch", ["--labeled-only"]),
    # FixMatch with a fixed threshold near the ones Meta-T learns on digits (means 0.465-0.584 at step 3000):
    # does the learned, per-sample threshold do better than a constant one as low?
    "fixmatch_tau05": ("fixmatch", ["--tau", "0.5"]),
    "meta_t": ("meta_t", [*SAME_BATCH, "--meta-grad", "exact"]),
    "meta_t_jvp": ("meta_t", [*SAME_BATCH, "--meta-grad", "jvp"]),
    "meta_t_fd": ("meta_t", [*SAME_BATCH, *FIRST_ORDER]),
    "green_meta_t_fd_k4": ("meta_t", [*SAME_BATCH, *FIRST_ORDER, "--meta-interval", "4"]),
    "meta_t_jvp_cosine": ("meta_t", [*COSINE, "--meta-grad", "jvp"]),
    "meta_t_fd_cosine": ("meta_t", [*COSINE, *FIRST_ORDER]),
    "green_meta_t_fd_k4_cosine": ("meta_t", [*COSINE, *FIRST_ORDER, "--meta-interval", "4"]),
    # Meta-T at its own defaults (Table 6's batch, 32 + 192, and step decay), with the row's meta-gradient.
    "meta_t_fd_table6": ("meta_t", FIRST_ORDER),
    "meta_t_jvp_table6": ("meta_t", ["--meta-grad", "jvp"]),
    # at all its own defaults: with --pretrained, USB's fine-tuning batch and optimiser (the text table)
    "meta_t_defaults": ("meta_t", []),
    "green_meta_t_fd_k4_table6": ("meta_t", [*FIRST_ORDER, "--meta-interval", "4"]),
    # Their control: FixMatch (and tau = 0.5) with that smaller batch, so the batch and the method can be told apart.
    "fixmatch_batch32": ("fixmatch", ["--batch-size", "32", "--uratio", "6"]),
    "fixmatch_tau05_batch32": ("fixmatch", ["--batch-size", "32", "--uratio", "6", "--tau", "0.5"]),
    # MetaSemi at its own defaults (128 + 128, its lr schedule, the raw weights evaluated), and its slides' ablation
    "meta_semi": ("meta_semi", []),
    "meta_semi_no_meta": ("meta_semi", ["--no-meta"]),
    "meta_semi_no_mixup": ("meta_semi", ["--no-mixup"]),
    "meta_semi_neither": ("meta_semi", ["--no-meta", "--no-mixup"]),
    "meta_semi_supervised": ("meta_semi", ["--labeled-only"]),
    # FreeMatch and LayerMatch at their defaults (FixMatch's batch and schedule), and LayerMatch's ablation (its Table 4)
    "freematch": ("freematch", []),
    "layermatch": ("layermatch", []),
    "layermatch_grad_relu_only": ("layermatch", ["--no-avg-clustering"]),
    "layermatch_avg_clustering_only": ("layermatch", ["--no-grad-relu"]),
    # a diagnosis of the run length, not a setting of the paper: N = 30 is 1% of a 3,000-step run, as the paper's
    # 2048 is of its 204,800 fine-tuning steps (with N = 2048 a 3,000-step run resets the averaged head once)
    "layermatch_n30": ("layermatch", ["--ac-reset-every", "30"]),
}


# Flags that change where a run's files go and how it is run, not what it computes.
NOT_COMPARED = ("workers", "output_dir", "eval_every", "log_every", "stop_after", "resume", "overwrite")


def given_flags(cmd):
    """{flag: value} of a run's command line after the interpreter and the script, as argparse reads it: a flag
    without a value is a boolean (--x true, --no-x false for x), and of a flag given twice (by a configuration and
    by --extra) the last counts."""
    given, tokens = {}, cmd[2:]
    for i, token in enumerate(tokens):
        if token.startswith("--"):
            has_value = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            name, value = token[2:], tokens[i + 1] if has_value else None
            if value is None:
                name, value = (name[3:], False) if name.startswith("no-") else (name, True)
            given[name] = value
    return given


def defining_flags(cmd):
    """A run's script and flags without the NOT_COMPARED ones: what defines its result. The benchmark saves them in
    the run's folder, to tell a run of other flags (--extra) by what they leave out too."""
    kept = {name: value for name, value in given_flags(cmd).items() if name.replace("-", "_") not in NOT_COMPARED}
    return {"script": Path(cmd[1]).name, "flags": kept}


def flags_differing(cmd, saved_args):
    """The flags of a run's command line whose value differs from the args that the run already in its folder saved
    in summary.json (a run from before benchmark_flags.json): read back as it is, that run would stand in a table for
    another configuration."""
    differ = []
    for name, value in given_flags(cmd).items():
        key = name.replace("-", "_")
        if key in NOT_COMPARED or key not in saved_args:
            continue
        saved = saved_args[key]
        if isinstance(saved, bool) or isinstance(value, bool):
            same = saved is value
        elif isinstance(saved, (int, float)):
            try:
                same = float(value) == float(saved)
            except ValueError:
                same = False
        else:
            same = str(saved) == value
        if not same:
            differ.append(f"--{name} {value} (there: {saved})")
    return differ


def print_paired_differences(rows):
    """Each configuration minus the first, seed by seed: runs of one seed share the labeled split, whose draw
    moves a run's top-1 by points on digits, so the comparison is paired."""
    first, base, _ = rows[0]
    print(f"\n| top-1 minus {first}'s, same seed | mean ± standard error | per seed | ahead / even / behind |")
    print("| --- | --- | --- | --- |")
    for name, top1, _ in rows[1:]:
        # rounded to drop float noise, so that equal counts of images right read as even (and +0.00, not -0.00)
        diff = np.round(np.subtract(top1, base), 6) + 0.0
        ahead, behind = int((diff > 0).sum()), int((diff < 0).sum())
        stderr = f"{np.std(diff, ddof=1) / np.sqrt(len(diff)):.2f}" if len(diff) > 1 else "n/a"
        per_seed = ", ".join(f"{d:+.2f}" for d in diff)
        even = len(diff) - ahead - behind
        print(f"| {name} | {diff.mean():+.2f} ± {stderr} | {per_seed} | {ahead} / {even} / {behind} |")


def print_per_class(rows, summaries, seeds):
    """Each configuration's top-1 per class, averaged over seeds: on a class-imbalanced split, where the rare
    classes' accuracy is what the overall top-1 hides."""
    table = {}
    for name, _, _ in rows:  # summary.json writes null for a class with no test image
        accs = [[math.nan if v is None else v for v in summaries[name, seed]["per_class_acc"]] for seed in seeds]
        table[name] = 100 * np.nanmean(np.array(accs, dtype=float), axis=0)
    classes = len(next(iter(table.values())))
    print("\n| top-1 % per class (mean over seeds) | " + " | ".join(f"class {c}" for c in range(classes)) + " |")
    print("| --- |" + " --- |" * classes)
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{acc:.1f}" for acc in accs) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["fixmatch", "supervised"], choices=list(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--labels", type=int, default=40)
    p.add_argument("--total-steps", type=int, default=3000)
    p.add_argument("--workers", type=int, default=1, help="data-loading workers of each run")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--threads", type=int, default=0, help="torch threads of each run (OMP_NUM_THREADS); 0 = default")
    p.add_argument("--out-dir", default="runs/accuracy")
    p.add_argument("--extra", default="", help="more flags for every run, e.g. \"--device cuda\"")
    p.add_argument("--per-class", action="store_true",
                   help="also print each configuration's top-1 per class, averaged over seeds (class-imbalanced splits)")
    a = p.parse_args()

    # glibc keeps freed blocks of up to 32 MiB for reuse (faster CPU steps; the README's performance note)
    env = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824", **os.environ,
           **({"OMP_NUM_THREADS": str(a.threads)} if a.threads else {})}
    # A script run by path puts its own folder first on sys.path, not the current directory: give it the
    # repository's sslkernels (built in place or installed), or an in-place build would go unused.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    runs = {}  # (config, seed) -> (command, summary path)
    for name in a.configs:
        script, flags = CONFIGS[name]
        if not (ROOT / "algorithms" / f"{script}.py").exists():
            print(f"skipping {name}: algorithms/{script}.py does not exist", file=sys.stderr)
            continue
        for seed in a.seeds:
            out = Path(a.out_dir) / f"{name}_{a.dataset}_{a.labels}_seed{seed}"
            cmd = [sys.executable, str(ROOT / "algorithms" / f"{script}.py"), "--dataset", a.dataset,
                   "--labels", str(a.labels), "--total-steps", str(a.total_steps), "--seed", str(seed),
                   "--eval-every", str(a.total_steps), "--log-every", "500", "--workers", str(a.workers),
                   "--output-dir", str(out), *flags, *a.extra.split()]
            runs[name, seed] = cmd, out / "summary.json"
    mismatched = []
    for cmd, summary_path in runs.values():
        saved_path = summary_path.parent / "benchmark_flags.json"
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
        if saved is not None and saved != defining_flags(cmd):
            flags = " ".join(f"--{name} {value}" for name, value in saved["flags"].items())
            mismatched.append(f"{summary_path.parent} (run as {saved['script']} {flags})")
        elif saved is None and summary_path.exists():  # a run from before benchmark_flags.json: the flags given
            differ = flags_differing(cmd, json.loads(summary_path.read_text())["args"])
            if differ:
                mismatched.append(f"{summary_path.parent} ({', '.join(differ)})")
    if mismatched:
        sys.exit(f"accuracy.py: error: --out-dir {a.out_dir} holds runs of the same names with other flags, which this "
                 f"command would read back or resume as its own: {'; '.join(mismatched)}. Choose another --out-dir.")

    def run(key):
        cmd, summary_path = runs[key]
        if not (summary_path.exists() and json.loads(summary_path.read_text())["finished"]):
            resume = (summary_path.parent / "checkpoint.pt").exists()  # an interrupted run: continue it
            if not resume:
                summary_path.parent.mkdir(parents=True, exist_ok=True)
                # written whole, then renamed: a benchmark killed here leaves no half file for the next one to read
                tmp = summary_path.parent / "benchmark_flags.json.tmp"
                tmp.write_text(json.dumps(defining_flags(cmd)))
                os.replace(tmp, summary_path.parent / "benchmark_flags.json")
            cmd = [*cmd, "--resume", str(summary_path.parent)] if resume else cmd
            # one write, so that the lines of runs started together do not interleave
            sys.stderr.write(" ".join(cmd[1:]) + "\n")
            sys.stderr.flush()
            with open(summary_path.parent.with_suffix(".log"), "a" if resume else "w") as log:
                subprocess.run(cmd, check=True, env=env, stdout=log, stderr=subprocess.STDOUT)
        return json.loads(summary_path.read_text())

    Path(a.out_dir).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(a.parallel) as pool:
        summaries = dict(zip(runs, pool.map(run, runs)))
    rows = []
    for name in dict.fromkeys(k[0] for k in runs):
        done = [summaries[name, seed] for seed in a.seeds]
        rows.append((name, [100 * s["top1"] for s in done], [s["seconds"] for s in done]))

    print(f"\n{a.dataset}, {a.labels} labels, {a.total_steps} steps, seeds {' '.join(map(str, a.seeds))}\n")
    print("| method | top-1 % (mean ± std) | per seed | minutes per run |")
    print("| --- | --- | --- | --- |")
    for name, top1, seconds in rows:
        per_seed = ", ".join(f"{t:.2f}" for t in top1)
        print(f"| {name} | {np.mean(top1):.2f} ± {np.std(top1):.2f} | {per_seed} | {np.mean(seconds) / 60:.1f} |")
    if len(rows) > 1:
        print_paired_differences(rows)
    if a.per_class:
        print_per_class(rows, summaries, a.seeds)
    # The fallback gives the same loss up to float rounding, which over thousands of steps moves single seeds
    fallback = [f"{name} seed {seed}" for (name, seed), s in summaries.items() if s.get("fused_kernels") is False]
    if fallback:
        print(f"\nwithout the sslkernels extension (pure-PyTorch fallback): {', '.join(fallback)}")


if __name__ == "__main__":
    main()
