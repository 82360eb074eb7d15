"""Benchmark of the `sslkernels` ops against their plain-PyTorch reference.

One row per op x shape x dtype x provider, where the providers are

* ``eager``    the reference in `sslkernels.reference`, run eagerly,
* ``compile``  ``torch.compile`` of the same reference (inductor),
* ``sslkernels`` the compiled extension,

on CPU always and on CUDA when a GPU and the CUDA kernels are present, and for masked_ce's
fwd+bwd rows

* ``floor``    the autograd floor: one ``torch.addmv`` node from the same logits (and tau) to an
               (N,) loss, whose backward writes the (N, C) gradient: about the least that any
               differentiable masked_ce has to do, so eager / floor approximates the largest
               speedup over eager that the row can show on the machine at hand.

Columns: median time per
call, effective bandwidth (the minimum number of bytes the op must move divided by the time),
the speedups over eager and over compile, and on CUDA the number of kernels one call launches.

Providers are timed in interleaved rounds (eager, compile, extension, eager, ...) so that a busy
machine slows them alike; the median over rounds is reported. "fwd+bwd" is the forward plus
``torch.autograd.grad`` of the per-sample loss, so it includes autograd's fixed cost per backward
call, the same for every provider. A summary of the CPU goals ends the output.

    python benchmark/kernels.py                # all shapes, float32 and bfloat16
    python benchmark/kernels.py --quick        # SSL shapes, the bank shape and one large shape
    python benchmark/kernels.py --threads 1    # on a shared machine: OpenMP teams of ATen ops
                                               # wait for descheduled threads, which swamps
                                               # small eager ops with noise
"""

import argparse
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sslkernels  # noqa: E402
from sslkernels import reference  # noqa: E402

warnings.filterwarnings("ignore")


@dataclass
class Case:
    op: str  # label of the row
    shape: tuple
    dtype: torch.dtype
    device: str
    make: callable  # (provider functions) -> {provider: zero-argument callable}
    min_bytes: int


def _elt(dtype):
    return torch.empty((), dtype=dtype).element_size()


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def masked_ce_case(n, c, dtype, device, backward, hard, hard_tau=0.95):
    """hard_tau: FixMatch's 0.95 keeps few rows of these random probabilities (2% at C = 100), and
    the CPU kernels skip most of the work for a dropped row; 0 keeps every row, as late in training."""
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(n, c, generator=gen) * 3).to(dtype).to(device)
    probs = torch.softmax(torch.randn(n, c, generator=gen) * 3, dim=1).to(dtype).to(device)
    if hard:  # FixMatch: a fixed threshold, hard mask
        tau, beta = hard_tau, math.inf
    else:  # Meta-T: one learned threshold per sample, sigmoid surrogate
        tau, beta = (torch.rand(n, generator=gen) * 0.5 + 0.4).to(device), 100.0
    grad = torch.full((n,), 1.0 / max(n, 1), dtype=dtype, device=device)
    s = _elt(dtype)
    fwd_bytes = 2 * n * c * s + n * (2 * s + 8) + (0 if hard else 4 * n)

    # The autograd floor of a fwd+bwd row: about the least any differentiable masked_ce has to do,
    # one autograd node from logits_s (and tau) to an (N,) loss whose backward writes an (N, C)
    # gradient. addmv is such a node: loss = tau + logits_s[:, 0] (0 for the hard mask).
    first_column = torch.zeros(c, dtype=dtype, device=device)
    first_column[:1] = 1
    zero = torch.zeros(n, dtype=dtype, device=device)

    def floor(z, probs, t, beta):
        bias = t.to(z.dtype) if isinstance(t, torch.Tensor) else zero  # no-op for float32
        return torch.addmv(bias, z, first_column), None, None

    def make(fns):
        calls = {}
        if backward:
            fns = {**fns, "floor": floor}
        for name, fn in fns.items():
            if backward:
                z = logits.clone().requires_grad_()
                t = tau.clone().requires_grad_() if isinstance(tau, torch.Tensor) else tau
                inputs = [z] + ([t] if isinstance(t, torch.Tensor) else [])

                def call(fn=fn, z=z, t=t, inputs=inputs):
                    loss, _, _ = fn(z, probs, t, beta)
                    return torch.autograd.grad(loss, inputs, grad)

            else:

                def call(fn=fn):
                    with torch.no_grad():
                        return fn(logits, probs, tau, beta)

            calls[name] = call
        return calls

    # Backward: read the logits again and the upstream gradient, write the gradient of the logits.
    bwd_bytes = 2 * n * c * s + n * s + (0 if hard else 4 * n)
    if hard:
        kept = (probs.float().max(dim=1).values >= tau).float().mean().item() if n else 0.0
        variant = f"hard, tau={tau:g}, {kept:.0%} kept"
    else:
        variant = "beta=100, tau[N]"
    label = f"masked_ce {'fwd+bwd' if backward else 'fwd'} ({variant})"
    return Case(label, (n, c), dtype, device, make, fwd_bytes + (bwd_bytes if backward else 0))


def class_confidence_case(m, c, dtype, device):
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(m, c, generator=gen) * 3, dim=1).to(dtype).to(device)

    def make(fns):
        return {name: (lambda fn=fn: fn(probs)) for name, fn in fns.items()}

    return Case("class_confidence", (m, c), dtype, device, make, m * c * _elt(dtype) + c * c * _elt(dtype) + 8 * c)


def fd_pseudo_label_case(n, c, dtype, device):
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(n, c, generator=gen) * 3
    plus = (base + 0.01 * torch.randn(n, c, generator=gen)).to(dtype).to(device)
    minus = (base - 0.01 * torch.randn(n, c, generator=gen)).to(dtype).to(device)
    y_tilde = torch.softmax(torch.randn(n, c, generator=gen), dim=1).to(dtype).to(device)

    def make(fns):
        return {name: (lambda fn=fn: fn(plus, minus, y_tilde, 0.01, 0.1)) for name, fn in fns.items()}

    return Case("fd_pseudo_label", (n, c), dtype, device, make, 4 * n * c * _elt(dtype))


PROVIDERS = {
    "masked_ce": (reference.masked_ce, sslkernels.masked_ce),
    "class_confidence": (reference.class_confidence, sslkernels.class_confidence),
    "fd_pseudo_label": (reference.fd_pseudo_label, sslkernels.fd_pseudo_label),
}


def build_cases(device, quick):
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    large = [(16384, 1000)] if quick and device == "cpu" else [(65536, 1000)]
    cases = []
    for dtype in dtypes:
        for n, c in [(448, 10), (448, 100)] + large:
            for hard, hard_tau in ((False, None), (True, 0.95), (True, 0.0)):
                if quick and hard and (n, c) in large:
                    continue
                cases.append(masked_ce_case(n, c, dtype, device, backward=False, hard=hard, hard_tau=hard_tau))
                cases.append(masked_ce_case(n, c, dtype, device, backward=True, hard=hard, hard_tau=hard_tau))
        for m, c in [(50000, 100)] + large:
            cases.append(class_confidence_case(m, c, dtype, device))
        for n, c in [(448, 10)] + large:
            cases.append(fd_pseudo_label_case(n, c, dtype, device))
    return cases


def count_launches(call, device):
    """Kernels launched by one call (CUDA only), from the profiler."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    call()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        _sync(device)
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def time_interleaved(calls, device, budget_s, max_rounds):
    """Median seconds per call of each provider, timed round-robin."""
    # Calibrate the number of calls per round from one warm call of the slowest provider.
    per_call = {}
    for name, call in calls.items():
        call()
        _sync(device)
        start = time.perf_counter()
        call()
        _sync(device)
        per_call[name] = max(time.perf_counter() - start, 1e-7)
    rounds = int(max(5, min(max_rounds, budget_s / sum(per_call.values()))))
    block_s = budget_s / rounds / len(calls)  # time given to one provider in one round
    inner = {name: max(1, int(block_s / t)) for name, t in per_call.items()}
    samples = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            _sync(device)
            start = time.perf_counter()
            for _ in range(inner[name]):
                call()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / inner[name])
    return {name: statistics.median(v) for name, v in samples.items()}


def run(cases, quick, results):
    header = f"{'op':<46} {'device':<6} {'shape':<13} {'dtype':<9} {'provider':<11} {'median':>10} {'GB/s':>8} {'vs eager':>9} {'vs compile':>11} {'launches':>8}"
    print(header)
    print("-" * len(header))
    budget = 0.6 if quick else 2.0
    compiled = {}
    for case in cases:
        key = case.op.split()[0]
        ref_fn, ext_fn = PROVIDERS[key]
        if key not in compiled:
            compiled[key] = torch.compile(ref_fn, dynamic=False)
        calls = case.make({"eager": ref_fn, "compile": compiled[key], "sslkernels": ext_fn})
        times = time_interleaved(calls, case.device, budget, max_rounds=40 if quick else 100)
        launches = count_launches(calls["sslkernels"], case.device)
        shape = "x".join(map(str, case.shape))
        dtype = str(case.dtype).replace("torch.", "")
        results.append((case, times))
        for name in times:  # eager, compile, sslkernels, and the autograd floor of fwd+bwd rows
            t = times[name]
            print(
                f"{case.op:<46} {case.device:<6} {shape:<13} {dtype:<9} {name:<11} {_fmt_time(t):>10} "
                f"{case.min_bytes / t / 1e9:>8.2f} {times['eager'] / t:>8.2f}x {times['compile'] / t:>10.2f}x "
                f"{(launches if name == 'sslkernels' and launches is not None else ''):>8}"
            )
        sys.stdout.flush()


def report_goals(results):
    """The CPU goals: >= 3x eager and no slower than compile at the SSL and bank shapes."""
    goal_shapes = {"masked_ce fwd+bwd": [(448, 10), (448, 100)], "class_confidence": [(50000, 100)]}
    lines = []
    for case, times in results:
        shapes = [v for k, v in goal_shapes.items() if case.op.startswith(k)]
        if case.device != "cpu" or case.dtype != torch.float32 or not shapes or case.shape not in shapes[0]:
            continue
        vs_eager = times["eager"] / times["sslkernels"]
        vs_compile = times["compile"] / times["sslkernels"]
        met = vs_eager >= 3.0 and vs_compile >= 1.0
        shape = "x".join(map(str, case.shape))
        ceiling = f"{times['eager'] / times['floor']:6.2f}x" if "floor" in times else ""
        lines.append(f"  {case.op:<46} {shape:<10} {vs_eager:6.2f}x eager {vs_compile:6.2f}x compile  {'met' if met else 'MISSED':<7} {ceiling}")
    if lines:
        print("\nCPU goals (>= 3x eager, >= 1x compile); last column, the ceiling: eager / autograd floor,")
        print("about the most that any implementation could show against eager in that row here:")
        print("\n".join(lines))


def _fmt_time(t):
    return f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms"


def main():
    # Every shape and dtype gets its own compiled graph (dynamic=False).
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and dtypes, shorter timing (CPU: about 2 minutes)")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (torch.set_num_threads); 0 keeps torch's default")
    args = parser.parse_args()
    if args.threads < 0:
        parser.error("--threads must be 0 or positive")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available() and sslkernels.cuda_kernels_available():
        devices.append("cuda")
    elif args.device == "cuda":
        sys.exit("CUDA requested but no GPU or no compiled CUDA kernels")
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA kernels compiled: "
        f"{sslkernels.cuda_kernels_available()}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}"
    )
    results = []
    for device in devices:
        run(build_cases(device, args.quick), args.quick, results)
    report_goals(results)


if __name__ == "__main__":
    main()
