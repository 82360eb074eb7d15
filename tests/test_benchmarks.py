"""The Meta-T benchmarks reach into algorithms/meta_t.py (its functions, flags and metrics.jsonl), so a change
there can break them without any algorithm test failing: run each at a tiny size and check what it prints."""

import re
import subprocess
import sys

from conftest import ROOT


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


def test_steps_benchmark_reports_ratios_to_fixmatch():
    out = run_benchmark("steps.py", "--quick", "--only", "FixMatch,jvp")
    rows = table_rows(out)
    assert set(rows) == {"method", "FixMatch", "Meta-T, exact by forward mode (jvp)",
                         "Green Meta-T k=4, exact by forward mode (jvp)"}, out
    assert rows["FixMatch"][1] == "1.00"
    assert float(rows["Meta-T, exact by forward mode (jvp)"][1]) > 0
