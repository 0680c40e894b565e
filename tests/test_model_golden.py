"""Golden per-step loss traces of seeded tiny runs (tests/golden/loss_trace.json, made by make_golden.py).

A failure means the numerics changed: initialisation order, masking, a loss, the EMA, the centring or the schedules.
If the change is intended, regenerate with `python tests/golden/make_golden.py` and say why in the commit.
"""

import importlib.util
import json
from pathlib import Path

import pytest

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def _make_golden():
    spec = importlib.util.spec_from_file_location("make_golden", GOLDEN_DIR / "make_golden.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MG = _make_golden()
STORED = json.loads((GOLDEN_DIR / "loss_trace.json").read_text())


@pytest.mark.parametrize("run", sorted(MG.RUNS))
def test_golden_loss_trace(run):
    expected = STORED["runs"][run]
    got = MG.trace(MG.RUNS[run], steps=STORED["steps"])
    for key in MG.KEYS:
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-5), (run, key, got[key], expected[key])


def test_golden_trace_is_sensitive():
    """A change as small as one more centre-momentum digit moves the trace beyond the tolerance."""
    expected = STORED["runs"]["matpac_tiny"]
    got = MG.trace({"center_momentum": 0.899}, steps=STORED["steps"])
    assert got["loss"] != pytest.approx(expected["loss"], rel=1e-5, abs=1e-5)
