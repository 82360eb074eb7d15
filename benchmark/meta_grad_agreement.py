"""How close the cheaper Meta-T meta-gradients are to the exact one on a real training run: trains
algorithms/meta_t.py (--meta-grad jvp) and, on each of the last --measure meta steps, also computes the
TGN gradient with the double backward (exact) and the first-order variants (fd, v at w_hat and at w) on the
same state and batch, then prints their cosine similarity to the jvp gradient (median and minimum over steps).

    python benchmark/meta_grad_agreement.py                          # digits, 40 labels, steps 61-72
    python benchmark/meta_grad_agreement.py --steps 500 --measure 20

The unit test checks agreement on a tiny model; this shows it with BatchNorm, augmentation and the real
batch composition, where the first-order forwards see a different batch than the step's forward.
"""

import argparse
import copy
import importlib.util
import statistics
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
OTHERS = [("exact", "w_hat"), ("fd", "w_hat"), ("fd", "w")]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--labels", type=int, default=40)
    p.add_argument("--steps", type=int, default=72, help="training steps of the run")
    p.add_argument("--measure", type=int, default=12, help="compare on this many last steps")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    a = p.parse_args()
    if not 0 < a.measure <= a.steps:
        p.error("--measure must be in 1 .. --steps")
    if a.threads < 0:
        p.error("--threads must be 0 or positive")
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("meta_t", ROOT / "algorithms" / "meta_t.py")
    meta_t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta_t)

    meta_gradient, calls, cosines = meta_t.meta_gradient, [0], {m: [] for m in OTHERS}

    def comparing(*call):  # meta_gradient(model, tgn, ..., alpha, args, autocast): same state, every mode
        out = meta_gradient(*call)  # the run's own: jvp
        calls[0] += 1
        if calls[0] > a.steps - a.measure:
            ref = torch.cat([g.flatten() for g in out[0]])
            for mode in OTHERS:
                args = copy.copy(call[9])
                args.meta_grad, args.fd_direction_at = mode
                grads = torch.cat([g.flatten() for g in meta_gradient(*call[:9], args, *call[10:])[0]])
                cosines[mode].append(F.cosine_similarity(grads, ref, dim=0).item())
        return out

    meta_t.meta_gradient = comparing
    with tempfile.TemporaryDirectory() as out:
        meta_t.main(["--dataset", a.dataset, "--labels", str(a.labels), "--total-steps", str(a.steps),
                     "--batch-size", "64", "--uratio", "7", "--meta-grad", "jvp", "--lr-schedule", "cosine",
                     "--workers", "0", "--eval-every", str(a.steps), "--log-every", str(a.steps), "--output-dir", out])
    print(f"\ncosine similarity to the jvp TGN gradient, {a.dataset}, steps {a.steps - a.measure + 1}-{a.steps}")
    print("| meta-gradient | median | min |\n| --- | --- | --- |")
    for (mode, at), cos in cosines.items():
        label = "exact (double backward)" if mode == "exact" else f"first-order, v at {at}"
        print(f"| {label} | {statistics.median(cos):.3f} | {min(cos):.3f} |")


if __name__ == "__main__":
    main()
