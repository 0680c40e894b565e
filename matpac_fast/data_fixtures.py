"""A minimal writer of the shard-set contract (docs/CONTRACTS.md "Shard set") for tests and benchmarks.

It uses the standard library's `tarfile` so that the loader's own tar parser is checked against an independent
writer, and it does not depend on `shard_tools` (the production writer), whose output follows the same contract.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from matpac_fast.frontend import get_spec


def clip(rng: np.random.Generator, n_frames: int, n_mels: int = 80) -> np.ndarray:
    """A random unnormalised log-mel clip, float16 (n_mels, n_frames), values near the AudioSet range."""
    return (rng.standard_normal((n_mels, n_frames), dtype=np.float32) * 4.0 - 7.0).astype(np.float16)


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    tf.addfile(info, io.BytesIO(payload))


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def write_shard_set(
    out: str | Path,
    clips: Iterable[tuple[str, np.ndarray, list[int]]],
    per_shard: int,
    name: str = "shards",
    frontend: str = "matpac",
    short: str = "drop",
    min_frames: int = 608,
    classes: list[str] | None = None,
) -> list[Path]:
    """Write (key, fp16 (80, T) array, label indices) clips as `<name>-%06d.tar` + sizes.json + stats.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    paths: list[Path] = []
    tf = None
    total_frames = n = 0
    acc_sum = acc_sq = 0.0
    for i, (key, arr, labels) in enumerate(clips):
        if i % per_shard == 0:
            if tf is not None:
                tf.close()
            paths.append(out / f"{name}-{len(paths):06d}.tar")
            sizes[paths[-1].name] = 0
            tf = tarfile.open(paths[-1], "w", format=tarfile.PAX_FORMAT)
        meta = {"key": key, "source": f"{key}.wav", "labels": [str(x) for x in labels], "label_indices": labels,
                "n_frames": int(arr.shape[1]), "flags": []}
        _add(tf, f"{key}.npy", npy_bytes(arr))
        _add(tf, f"{key}.json", json.dumps(meta).encode())
        sizes[paths[-1].name] += 1
        n += 1
        total_frames += arr.shape[1]
        a = arr.astype(np.float64)
        acc_sum += a.sum()
        acc_sq += (a * a).sum()
    if tf is not None:
        tf.close()
    count = max(1, total_frames * 80)
    mean = acc_sum / count
    stats = {
        "format_version": 1,
        "frontend": get_spec(frontend).to_dict(),
        "mean": float(mean),
        "std": float(np.sqrt(max(acc_sq / count - mean * mean, 0.0))),
        "n_clips": n,
        "n_frames": int(total_frames),
        "hours": total_frames * 0.01 / 3600,
        "min_frames": min_frames,
        "short": short,
        "classes": classes or [],
        "inputs": n,
        "written": n,
        "skipped": {},
        "tool_version": "data_fixtures",
    }
    (out / "sizes.json").write_text(json.dumps(sizes, indent=1))
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    return paths
