"""Where the time of Meta-T's exact meta step goes (--meta-grad jvp), measured in one process: the
classifier's forward and backward that FixMatch also runs, and the parts that the exact meta-gradient adds
on top of them (Eq. 17):

* the virtual step's gradient g = grad_w L_u: a second backward through the step's concatenated forward;
* the meta loss and its gradient v at w_hat: a forward and backward of the labeled batch alone;
* v . grad_w CE_j for every strong view: one forward-mode pass through the concatenated batch (BatchNorm
  couples the rows, so all of them), which carries a tangent alongside the forward's values: those of the
  convolutions and BatchNorms taken from the step's forward (recorded as train() does), the others
  computed again.

It times each part on its own and the real `meta_gradient` of algorithms/meta_t.py, interleaved round by
round, and prints the medians and the lowest ratio to FixMatch that these parts allow.

    python benchmark/meta_step_breakdown.py --threads 1          # generated 8x8 data, cnn_small, B = 64, mu = 7
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", default="cnn_small", help="network (a name in meta_t.NETS)")
    p.add_argument("--size", type=int, default=8, help="side of the generated square images")
    p.add_argument("--batch-size", type=int, default=64, help="labeled batch B")
    p.add_argument("--uratio", type=int, default=7, help="mu")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds (after 3 untimed ones)")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last memory format, as the training scripts use by default")
    a = p.parse_args()
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:  # glibc reads these at start: keep freed blocks of up to 32 MiB,
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "MALLOC_MMAP_THRESHOLD_": "33554432",
                                                                 "MALLOC_TRIM_THRESHOLD_": "1073741824"})  # as on CPU runs
    if a.threads < 0:
        p.error("--threads must be 0 or positive")
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = importlib.util.spec_from_file_location("meta_t", ROOT / "algorithms" / "meta_t.py")
    meta_t = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(meta_t)
    args = meta_t.parse_args(["--batch-size", str(a.batch_size), "--uratio", str(a.uratio), "--meta-grad", "jvp"])

    torch.manual_seed(0)
    classes, n_l, n_u = 10, a.batch_size, a.batch_size * a.uratio
    memory_format = torch.channels_last if a.channels_last else torch.contiguous_format
    model = meta_t.NETS[a.net](3, classes).to(memory_format=memory_format)
    tgn = meta_t.make_tgn(classes, args.tgn_hidden)
    params = dict(model.named_parameters())
    inputs = torch.randn(n_l + 2 * n_u, 3, a.size, a.size).contiguous(memory_format=memory_format)
    y_l, x_l = torch.randint(0, classes, (n_l,)), inputs[:n_l]
    pbar = torch.full((classes, classes), 1.0 / classes)
    v = [torch.randn_like(w) for w in params.values()]  # a direction for the forward-mode pass

    def forward():
        logits = model(inputs)
        probs_w = torch.softmax(logits[n_l:-n_u].detach(), dim=1)
        tau = meta_t.tgn_thresholds(tgn, probs_w, pbar).detach()
        loss = meta_t.meta_t_loss(logits, y_l, probs_w, tau, args)[0]
        return logits, probs_w, loss

    state = {}

    def part_forward():  # recording the values that the forward-mode pass reuses, as train() does
        state["recorded"] = meta_t.RecordForward()
        with state["recorded"]:
            state["logits"], state["probs_w"], state["loss"] = forward()

    def part_backward():  # FixMatch's backward (the graph is kept for the parts below)
        torch.autograd.grad(state["loss"], list(params.values()), retain_graph=True)

    def part_virtual_gradient():  # g = grad_w L_u: the same graph, another backward
        tau = meta_t.tgn_thresholds(tgn, state["probs_w"], pbar).detach()
        loss_u = meta_t.masked_ce(state["logits"][-n_u:], state["probs_w"], tau, args.beta)[0].mean()
        torch.autograd.grad(loss_u, list(params.values()), retain_graph=True)

    def part_labeled():  # the meta loss at w_hat and its gradient v: the labeled batch alone
        torch.autograd.grad(F.cross_entropy(model(x_l), y_l), list(params.values()))

    def part_forward_mode():  # every strong view's derivative along v: one pass with dual numbers
        buffers = {k: b.clone() for k, b in model.named_buffers()}
        meta_t.strong_view_directional_derivative(model, params, buffers, v, inputs, state["probs_w"].argmax(dim=1),
                                                  state["recorded"].values)

    def whole_meta_step():  # the real thing, on the graph of part_forward
        meta_t.meta_gradient(model, tgn, state["logits"][-n_u:], state["probs_w"], pbar, x_l, y_l, inputs,
                             0.03, args, forward_values=state["recorded"].values)

    parts = {"forward (FixMatch)": part_forward, "backward (FixMatch)": part_backward,
             "+ backward for g": part_virtual_gradient, "+ labeled forward+backward": part_labeled,
             "+ forward-mode pass": part_forward_mode, "meta_gradient (jvp), whole": whole_meta_step}
    times = {name: [] for name in parts}
    for rnd in range(3 + a.rounds):
        for name, fn in parts.items():
            start = time.perf_counter()
            fn()
            if rnd >= 3:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    fixmatch = med["forward (FixMatch)"] + med["backward (FixMatch)"]
    added = sum(t for name, t in med.items() if name.startswith("+"))
    print(f"{a.net}, {a.size}x{a.size}, B = {n_l}, mu = {a.uratio}, {torch.get_num_threads()} threads, "
          f"median of {a.rounds} rounds\n\n| part | ms | / FixMatch's forward+backward |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.1f} | {t / fixmatch:.2f} |")
    print(f"\nFixMatch forward+backward {fixmatch:.1f} ms; the parts the exact meta step adds sum to {added:.1f} ms, "
          f"so exact Meta-T costs at least {(fixmatch + added) / fixmatch:.2f}x FixMatch's forward+backward "
          f"(measured whole meta step: {(fixmatch + med['meta_gradient (jvp), whole']) / fixmatch:.2f}x)")


if __name__ == "__main__":
    main()
