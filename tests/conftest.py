"""Shared test helpers: the algorithm files are standalone scripts, so tests load them by path."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_algorithm(name):
    """Import algorithms/<name>.py as a module (cached, like a normal import)."""
    key = f"algorithm_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "algorithms" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


def error_of(algorithm, argv):
    """The one-line message that algorithm.main(argv) exits with (no traceback)."""
    with pytest.raises(SystemExit) as e:
        algorithm.main(argv)
    msg = str(e.value.code)
    assert msg.startswith(f"{algorithm.ALGORITHM}.py: error: ") and "\n" not in msg
    return msg


def signal_in_step(algorithm, monkeypatch, signum, step):
    """Make the training loop send itself `signum` in step `step` (at its EMA update, the step's last op)."""
    real_ema_update, calls = algorithm.ema_update, []

    def ema_update_then_signal(*a):
        real_ema_update(*a)
        calls.append(None)
        if len(calls) == step:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(algorithm, "ema_update", ema_update_then_signal)


@pytest.fixture(scope="session")
def fixmatch():
    return load_algorithm("fixmatch")
