"""Checkpoint directories: naming, atomic completion, `--resume auto`, keep-last-N, trainer state as JSON.

A checkpoint is a directory `step_XXXXXXXX/` holding Accelerate's `save_state` output (model as safetensors, the
optimizer and RNG states loaded back with `weights_only=True`) plus `trainer_state.json`. The teacher, the centre
and the EMA shadows are part of the model's state dict, so they travel with it. We deliberately do not use
`accelerator.register_for_checkpointing`: Accelerate reloads such objects with `weights_only=False` (unpickling),
and a checkpoint from a stranger must not run code. The directory is written as `step_XXXXXXXX.tmp` and renamed
once every rank has finished, so `--resume auto` never picks a half-written checkpoint.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

_STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "trainer_state.json"


def checkpoint_root(out: str | Path) -> Path:
    return Path(out) / "checkpoints"


def step_dir(out: str | Path, step: int) -> Path:
    return checkpoint_root(out) / f"step_{step:08d}"


def list_checkpoints(out: str | Path) -> list[Path]:
    """Completed checkpoints, oldest first."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / STATE_FILE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def resolve_resume(resume: str, out: str | Path) -> Path | None:
    """'' -> None; 'auto' -> latest completed checkpoint in `out` (or None); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "auto":
        ckpts = list_checkpoints(out)
        return ckpts[-1] if ckpts else None
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise ValueError(f"--resume {resume}: not a checkpoint directory (no {STATE_FILE}); use --resume auto")
    return path


def write_state(path: Path, state: dict) -> None:
    (path / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())


def finalize(tmp: Path, final: Path) -> None:
    """Atomically publish a completed checkpoint directory (main process only)."""
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def prune(out: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` completed checkpoints and stale .tmp directories; returns deleted."""
    ckpts = list_checkpoints(out)
    doomed = ckpts[:-keep_last] if keep_last > 0 else []
    root = checkpoint_root(out)
    if root.is_dir():
        doomed += [p for p in root.iterdir() if p.is_dir() and p.name.endswith(".tmp")]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed
