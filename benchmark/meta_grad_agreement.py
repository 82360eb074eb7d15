"""How close the cheaper Meta-T meta-gradients are to the exact one on a real training run: trains
algorithms/meta_t.py (--meta-grad jvp) and, on each of the last --measure meta steps, also computes the
TGN gradient with the double backward (exact) and the first-order variants (fd, v at w_hat and at w) on the
same state and batch, then prints their cosine similarity to the jvp gradient (median and minimum over steps).

    python benchmark/meta_grad_agreement.py                          # digits, 40 labels, steps 61-72
    python benchmark/meta_grad_agreement.py --steps 500 --measure 20
    python benchmark/meta_grad_agreement.py --net wrn28_2 --steps 8 --measure 4

The unit test checks agreement on a tiny model; this shows it with BatchNorm, augmentation and the real
batch composition, where the first-order forwards see a different batch than the step's forward. To tell that
part of the approximation from the rest, one more row takes fd's central difference over the step's whole
concatenated batch (so BatchNorm sees what the step's forward saw), with v at w_hat: it differs from the exact
gradient by the finite difference alone.
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
OTHERS = {"exact (double backward)": ("exact", "w_hat"), "first-order, v at w_hat": ("fd", "w_hat"),
          "first-order, v at w": ("fd", "w")}
WHOLE_BATCH = "fd's central difference over the step's whole batch, v at w_hat"


def central_difference_over_whole_batch(model, params, buffers, v, inputs, pseudo_label, forward_values=None):
    """meta_t.py's fd directional derivative (eps = 0.01 / ||v||, forwards in float32 on cloned buffers), but
    through the step's whole concatenated batch, as the forward-mode pass goes, instead of the strong batch alone.
    It stands in for that pass (same arguments), so meta_gradient gives it jvp's v at w_hat, its cloned buffers, and
    runs it from the generator state of the step's forward."""
    eps = 0.01 / torch.nn.utils.get_total_norm(v).clamp_min(1e-12)

    def ce_at(sign):  # forked: both forwards draw the same dropout masks, those of the step's forward
        w = {k: p.detach() + sign * eps * vk for (k, p), vk in zip(params.items(), v)}
        fork = torch.random.fork_rng(devices=[inputs.device] if inputs.device.type == "cuda" else [])
        with fork, torch.autocast(inputs.device.type, enabled=False):
            logits = torch.func.functional_call(model, {**w, **buffers}, (inputs,))
        return F.cross_entropy(logits[-len(pseudo_label):].float(), pseudo_label, reduction="none")

    with torch.no_grad():
        return (ce_at(1) - ce_at(-1)) / (2 * eps)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="digits")
    p.add_argument("--labels", type=int, default=40)
    p.add_argument("--net", default="", help="network (meta_t.py's --net); empty = the dataset's default")
    p.add_argument("--device", default="", help="meta_t.py's --device; empty = its default (cuda when available)")
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

    meta_gradient, calls, ref_norms = meta_t.meta_gradient, [0], []
    cosines = {row: [] for row in [*OTHERS, WHOLE_BATCH]}

    def comparing(*call):  # meta_gradient(model, tgn, ..., alpha, args, autocast, ...): same state, every mode
        out = meta_gradient(*call)  # the run's own: jvp
        calls[0] += 1
        if calls[0] > a.steps - a.measure:
            ref = torch.cat([g.flatten() for g in out[0]])
            ref_norms.append(ref.norm().item())
            grads = {}
            for row, mode in OTHERS.items():
                args = copy.copy(call[9])
                args.meta_grad, args.fd_direction_at = mode
                grads[row] = meta_gradient(*call[:9], args, *call[10:])[0]
            # in the place of the forward-mode pass: its v (at w_hat), autocast and dropout masks; no reused values
            grads[WHOLE_BATCH] = meta_gradient(*call[:11], central_difference_over_whole_batch, call[12], None)[0]
            for row, g in grads.items():
                cosines[row].append(F.cosine_similarity(torch.cat([x.flatten() for x in g]), ref, dim=0).item())
        return out

    meta_t.meta_gradient = comparing
    with tempfile.TemporaryDirectory() as out:
        meta_t.main(["--dataset", a.dataset, "--labels", str(a.labels), "--total-steps", str(a.steps),
                     "--batch-size", "64", "--uratio", "7", "--meta-grad", "jvp", "--lr-schedule", "cosine",
                     "--workers", "0", "--eval-every", str(a.steps), "--log-every", str(a.steps), "--output-dir", out,
                     *(["--net", a.net] if a.net else []), *(["--device", a.device] if a.device else [])])
    net = a.net or "the dataset's default network"
    print(f"\ncosine similarity to the jvp TGN gradient, {a.dataset}, {net}, steps {a.steps - a.measure + 1}-{a.steps}")
    # where no mask responds to tau, the gradients are rounding noise (e.g. 1e-15) and their directions mean nothing
    print(f"median norm of the jvp TGN gradient over these steps: {statistics.median(ref_norms):.2e}")
    print("| meta-gradient | median | min |\n| --- | --- | --- |")
    for row, cos in cosines.items():
        print(f"| {row} | {statistics.median(cos):.3f} | {min(cos):.3f} |")


if __name__ == "__main__":
    main()
