"""Python API for the demo, the trainer's tests and notebooks: the same work as the CLIs, without a subprocess."""

from __future__ import annotations

from pathlib import Path

from matpac_fast.cli_args import usable_cpus
from shard_tools.discover import discover_audioset, discover_folder, discover_manifest, discover_synthetic
from shard_tools.pipeline import MakeConfig, format_summary, make_shards
from shard_tools.verify import Report, format_report, verify

__all__ = [
    "make_synthetic_shards",
    "make_folder_shards",
    "make_manifest_shards",
    "make_audioset_shards",
    "verify_shards",
    "format_summary",
    "format_report",
]


def _config(out_dir, **options) -> MakeConfig:
    options.setdefault("workers", min(4, usable_cpus()))
    return MakeConfig(out=Path(out_dir), **options)


def make_synthetic_shards(out_dir: str | Path, n: int, seed: int = 0, frontend: str = "matpac", **options) -> dict:
    """Render `n` synthetic clips (shard_tools.synthetic) into shards in `out_dir`; returns the stats.json dict
    plus `out`, `resumed_from`, `already_complete` and, for a run that wrote the set, `classes_without_clips` (the
    classes no written clip has; they stay in `classes`). Options are MakeConfig fields: workers, device, min_frames,
    short, shard_size ('1GB', '200MB' or a sample count such as '64'), name, overwrite, progress."""
    return make_shards(discover_synthetic(n, seed), _config(out_dir, frontend=frontend, seed=seed, **options))


def make_folder_shards(out_dir: str | Path, root: str | Path, **options) -> dict:
    return make_shards(discover_folder(root, options.get("progress", True)), _config(out_dir, **options))


def make_manifest_shards(out_dir: str | Path, csv_path: str | Path, **options) -> dict:
    return make_shards(discover_manifest(csv_path), _config(out_dir, **options))


def make_audioset_shards(
    out_dir: str | Path,
    segments: str | Path | list[str | Path],
    class_index: str | Path,
    audio_root: str | Path,
    **options,
) -> dict:
    """`segments`: one segments CSV or a list of them (make-shards audioset --segments A.csv B.csv)."""
    if isinstance(segments, str | Path):  # one CSV: a str was iterated, "segments CSV not found: /"
        segments = [segments]
    disc = discover_audioset(segments, class_index, audio_root, options.get("progress", True))
    return make_shards(disc, _config(out_dir, **options))


def verify_shards(out_dir: str | Path, progress: bool = False) -> dict:
    """Check every sample; returns {'ok', 'problems', 'warnings', 'shards', 'samples', 'frames', 'hours', 'labels',
    'flags'} ('problems' includes an interrupted run; 'warnings' leave the set usable, e.g. a foreign .tar file)."""
    report: Report = verify(out_dir, progress=progress)
    return report.to_dict()
