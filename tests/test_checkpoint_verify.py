"""checkpoint.verify: an optimizer file holding pickled objects is refused as such, never called damaged."""

import os

import pytest
import torch
from safetensors.torch import save_file

from matpac_fast import checkpoint as ckpt


class _Payload:
    def __reduce__(self):  # what a hostile checkpoint holds: never run by verify
        return (os.system, ("true",))


def _checkpoint(tmp_path, optimizer_obj):
    d = tmp_path / "step_00000001"
    d.mkdir()
    save_file({"w": torch.zeros(2)}, str(d / "model.safetensors"))
    torch.save(optimizer_obj, d / "optimizer.bin")
    return d


def test_pickled_optimizer_is_refused_as_pickled_not_damaged(tmp_path):
    d = _checkpoint(tmp_path, {"state": {}, "x": _Payload()})
    with pytest.raises(ValueError) as e:
        ckpt.verify(d)
    msg = str(e.value)
    assert "\n" not in msg and "optimizer.bin holds pickled Python objects (posix.system)" in msg, msg
    assert "damaged" not in msg and "--resume PATH" in msg, msg


def test_truncated_optimizer_is_still_damaged(tmp_path):
    d = _checkpoint(tmp_path, {"state": {}, "param_groups": []})
    data = (d / "optimizer.bin").read_bytes()
    (d / "optimizer.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="optimizer.bin is damaged"):
        ckpt.verify(d)


def test_intact_checkpoint_passes(tmp_path):
    ckpt.verify(_checkpoint(tmp_path, {"state": {}, "param_groups": []}))


def _random_states(d, extra=None):
    """Accelerate's random-state file, as its save_state writes it (torch.save of Python's, numpy's and torch's)."""
    import random

    import numpy as np

    states = {"step": 0, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state(), **(extra or {})}
    torch.save(states, d / "random_states_0.pkl")


def test_a_pickled_random_state_file_is_refused_before_accelerate_reads_it(tmp_path):
    """Accelerate versions before its weights-only default unpickle random_states_N.pkl in full (our floor, 0.34,
    did); later ones refuse a pickled object there and resume without a word, not exactly. verify now reads it
    weights-only (numpy's RNG arrays allowed) and refuses one holding an object, naming it."""
    d = _checkpoint(tmp_path, {"state": {}, "param_groups": []})
    _random_states(d)
    ckpt.verify(d)  # what Accelerate writes passes
    _random_states(d, {"x": _Payload()})
    with pytest.raises(ValueError) as e:
        ckpt.verify(d)
    msg = str(e.value)
    assert "\n" not in msg and "random_states_0.pkl holds pickled Python objects (posix.system)" in msg, msg
    (d / "random_states_0.pkl").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(ValueError, match="random_states_0.pkl is damaged"):
        ckpt.verify(d)
