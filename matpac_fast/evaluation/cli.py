"""`matpac-eval`: frozen embeddings + linear probe on a labelled audio set; prints a RESULT line last.

Example (FSDD, leave-one-speaker-out, the log-mel baseline):
    matpac-eval --checkpoint logmel --data ../shared/data/fsdd --folds group:speaker --out runs/eval_fsdd
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from matpac_fast.cli_args import nonempty_arg, path_arg
from matpac_fast.evaluation import embed, report
from matpac_fast.evaluation.datasets import LabelledSet, UnknownLabels, load_dataset, select_classes
from matpac_fast.evaluation.folds import Scheme, make_folds, parse_scheme
from matpac_fast.evaluation.metrics import metric_name
from matpac_fast.evaluation.probe import LinearProbeConfig, ProbeSettings, run_probes, summarize
from matpac_fast.safe_files import JSON_MAX_BYTES, read_regular

# The M2D probe learning rate (3e-5) needs most of its 200 epochs on small CPU-sized sets and still under-fits a
# 160-d baseline; 3e-3 reaches the same or better validation scores in a few dozen epochs. `--lr 3e-5` gives parity.
CLI_DEFAULT_LR = 3e-3
MAX_AUTO_CLIP_SECONDS = 10.0
MAX_CLIP_SECONDS = 600.0  # --clip-seconds: 10 minutes (32 such clips are 1.2 GB of float32 audio)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative 'None' of options whose help already says what happens and the
    'False' of flags. Identity checks: `0 in (None, False)` is true, and would hide `--seed`'s default 0."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matpac-eval",
        description="Evaluate an audio encoder: embed every clip of a labelled set with a frozen encoder, train a "
        "linear probe per fold and seed, report accuracy (single-label) or mAP (multi-label) as mean ± std. "
        "Writes JSON, a markdown table (results.md) and a PNG of a 2-D projection into --out; the last line "
        "printed is 'RESULT eval task=... checkpoint=... metric=... mean=... std=... probe=... lr=...'.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=nonempty_arg,
        metavar="PATH|random|logmel",
        help="a checkpoint (this project's or the authors' weights); 'random' = randomly initialised "
        "encoder of --preset (seeded); 'logmel' = no encoder: per-mel-bin mean and std over time of the "
        "normalised log-mel (160-d). A training run folder evaluates its encoder.pt (one result row for both); "
        "a checkpoint folder <run>/checkpoints/step_N evaluates that step",
    )
    p.add_argument(
        "--data",
        required=True,
        type=nonempty_arg,
        metavar="FOLDER|CSV",
        help="folder of <label>/ subfolders, a CSV (file,label[,fold|split][,other columns]; "
        "several labels in one cell = multi-label, separated by ';' (or ',' inside a quoted cell)), or the root of "
        "FSDD (labels.csv), ESC-50 "
        "(meta/esc50.csv), UrbanSound8K (metadata/UrbanSound8K.csv) or GTZAN (genre folders)",
    )
    p.add_argument(
        "--task",
        help="task name in reports (default: the dataset name, plus the protocol when it is "
        "not 'official', e.g. fsdd-group-speaker)",
    )
    p.add_argument(
        "--clip-seconds",
        type=float,
        help="crop/pad every clip to this length, 0.035 to 600 s (default: the known "
        "layout's, e.g. FSDD 1, ESC-50 5, US8K 4, GTZAN 30; otherwise the longest clip, at most 10)",
    )
    p.add_argument(
        "--folds",
        default="official",
        help="official | kfold:K[:COLUMN] | group[:COLUMN[:K]] (group:speaker = leave-one-speaker-out; plain "
        "'group' = the layout's natural group, e.g. FSDD speaker)",
    )
    p.add_argument(
        "--probe",
        default="linear",
        choices=["linear", "logreg"],
        help="linear = EVAR/M2D linear probe with early stopping; logreg = scikit-learn logistic "
        "regression (deterministic, one run per fold)",
    )
    p.add_argument("--seeds", type=int, default=3, help="linear-probe runs per fold (different seeds), 1 to 1000")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (probe init, validation carve, K-fold shuffle, random encoder init)",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="where the encoder and the probes run (cuda when a GPU is visible, else cpu)",
    )
    p.add_argument("--out", default="runs/eval", type=path_arg, help="output folder (JSON, results.md, PNG)")
    p.add_argument(
        "--preset",
        default="matpac",
        help="encoder preset (tiny, matpac, matpac_plusplus, m2d) for 'random' and for checkpoints without a "
        "saved config: a run's encoder.pt or checkpoint folder uses the run's config.json (heads, normalisation, "
        "front end); m2d embeds with the M2D front end",
    )
    g = p.add_argument_group(
        "linear probe (METHOD.md §6)",
        "settings other than these defaults are part of the result's name (e.g. '__linear-lr3e-05.json'), so runs "
        "with other settings get their own rows in results.md instead of replacing each other",
    )
    g.add_argument("--lr", type=float, default=CLI_DEFAULT_LR,
                   help="Adam learning rate (METHOD.md §6 / M2D: 3e-5, which needs all 200 epochs on small sets)")
    g.add_argument("--weight-decay", type=float, default=1e-8, help="Adam weight decay (M2D setting)")
    g.add_argument("--probe-batch", type=int, default=200, help="probe training batch size (clips)")
    g.add_argument("--max-epochs", type=int, default=200, help="probe training epochs at most (early stopping)")
    g.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation part carved from each training fold")
    g.add_argument("--logreg-c", type=float, default=1.0, help="inverse L2 strength for --probe logreg")
    e = p.add_argument_group("embedding")
    e.add_argument("--embed-batch", type=int, default=32, help="clips per encoder batch")
    # default None (resolved in `run`): an unwritable default is then named after where it came from, XDG_CACHE_HOME
    # or the home folder, not after a --cache-dir the user never passed
    e.add_argument("--cache-dir", type=path_arg, default=None,
                   help="embedding cache (default: $XDG_CACHE_HOME/matpac_fast/embeddings when XDG_CACHE_HOME is an "
                        "absolute path, else ~/.cache/matpac_fast/embeddings)")  # fmt: skip
    e.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    e.add_argument("--cache-max-gb", type=float, default=embed.CACHE_MAX_GB,
                   help="bound on the embedding cache folder: after each run its least recently used entries are "
                        "removed (one line says so) until the rest fit, never this run's entry; 0 keeps only this "
                        "run's, inf removes none")  # fmt: skip
    e.add_argument("--projection", default="pca", choices=["pca", "tsne", "none"], help="2-D projection for the PNG")
    e.add_argument(
        "--classes",
        help="evaluate only these labels (comma-separated, or a .txt/.csv file with one label per line), for any "
        "--data layout; clips of other labels are left out, a label the data does not have is an error",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bars, and no note about clips longer than the "
                   "clip length")
    return p


def probe_defaults() -> dict:
    """The probe settings of a plain `matpac-eval` run: they give the plain probe identity ('linear', 'logreg')."""
    d = LinearProbeConfig(lr=CLI_DEFAULT_LR)
    return {**vars(d), "C": 1.0}


CLASS_FILE_SUFFIXES = (".txt", ".csv", ".tsv", ".lst")


def _classes(arg: str | None) -> list[str] | None:
    """--classes -> labels. A value naming an existing file is read (one label per line, or comma-separated); a
    value ending in .txt/.csv that does not exist is an error (not a label list)."""
    if arg is None:
        return None
    if not arg.strip():
        raise ValueError(f"--classes {arg!r} is empty; give comma-separated labels (a,b,c) or a file with one label "
                         "per line")
    p = Path(arg).expanduser()
    if p.is_dir():
        raise ValueError(f"--classes {arg}: is a folder; give a file with one label per line, or labels a,b,c")
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--classes {arg}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
        items = [x for line in text.splitlines() for x in line.split(",")]
    elif arg.lower().endswith(CLASS_FILE_SUFFIXES):
        raise ValueError(f"--classes {arg}: no such file; give an existing file with one label per line")
    else:
        items = arg.split(",")
    labels = list(dict.fromkeys(s.strip() for s in items if s.strip()))
    if not labels:
        raise ValueError(f"--classes {arg!r}: no labels in it; give comma-separated labels or a file, one per line")
    return labels


def _looks_like_path(arg: str) -> bool:
    return os.sep in arg or "/" in arg


def _auto_clip_seconds(ds: LabelledSet) -> float:
    """The longest readable clip (at most MAX_AUTO_CLIP_SECONDS); unreadable files are reported by the embedding."""
    durations = [d for d in (embed.audio_duration(c.path) for c in ds.clips) if d is not None]  # None: unreadable
    longest = max(durations, default=1.0)
    return float(min(MAX_AUTO_CLIP_SECONDS, max(longest, 0.1)))


MAX_SEEDS = 1000


def _validate(a: argparse.Namespace) -> None:
    """Every argument check that needs no data: all of them run before any file is read or embedded."""
    for name in ("seeds", "embed_batch", "probe_batch", "max_epochs", "patience"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.seeds > MAX_SEEDS:  # 10**8 was accepted: a probe per seed and fold, a run that would never end
        raise ValueError(f"--seeds must be at most {MAX_SEEDS} (linear-probe runs per fold; the protocol uses 3), got "
                         f"{a.seeds}")
    from matpac_fast.config import PRESETS  # plain data: no model code is imported for --checkpoint logmel

    if a.preset not in PRESETS:  # was accepted with --checkpoint logmel, and refused only after loading otherwise
        raise ValueError(f"--preset {a.preset}: unknown model preset; choose one of {', '.join(sorted(PRESETS))}")
    if not 0 <= a.seed <= 2**32 - a.seeds:  # numpy takes seeds 0 .. 2^32 - 1; the runs use seed .. seed + seeds - 1
        raise ValueError(f"--seed must be between 0 and {2**32 - a.seeds} (with --seeds {a.seeds}), got {a.seed}")
    if not a.cache_max_gb >= 0:  # also NaN
        raise ValueError(f"--cache-max-gb must be >= 0 (inf: no bound), got {a.cache_max_gb}")
    if not (math.isfinite(a.lr) and a.lr > 0):
        raise ValueError("--lr must be > 0")
    if not (math.isfinite(a.weight_decay) and a.weight_decay >= 0):
        raise ValueError("--weight-decay must be >= 0")
    if not 0.0 < a.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be between 0 and 1 (exclusive), got {a.val_fraction}")
    if not (math.isfinite(a.logreg_c) and a.logreg_c > 0):
        raise ValueError(f"--logreg-c must be > 0, got {a.logreg_c}")
    if a.clip_seconds is not None:
        # two log-mel frames at least: the log-mel baseline's std over time is NaN on one
        spec = embed.get_spec("matpac")
        least = (spec.n_fft + spec.hop_length) / embed.SAMPLE_RATE
        if not (math.isfinite(a.clip_seconds) and least <= a.clip_seconds <= MAX_CLIP_SECONDS):
            raise ValueError(f"--clip-seconds must be between {least:.3f} and {MAX_CLIP_SECONDS:g} (every batch of "
                             f"--embed-batch clips is held in memory at this length; cut longer recordings into "
                             f"clips), got {a.clip_seconds}")
    if a.task is not None and (not a.task.strip() or any(ch.isspace() for ch in a.task)):
        raise ValueError(f"--task {a.task!r}: give a non-empty name without spaces (it is a field of the RESULT line)")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device visible; use --device cpu")


def _writable_dir(path: Path, option: str, hint: str) -> Path | None:
    """Create `path` if needed and check a file can be written there; -> the topmost folder created (or None)."""
    path = path.expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path}: exists and is not a folder; {hint}")
    created = next((d for d in reversed([path, *path.parents]) if not d.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise ValueError(f"{option} {path}: cannot create or write this folder ({e.strerror or e}); {hint}") from None
    return created


def _remove_created(out: Path, created: Path | None) -> None:
    """Undo `_writable_dir` for a run that failed before writing anything: remove the empty folders it made."""
    if created is None:
        return
    d = out.expanduser()
    try:
        while True:
            d.rmdir()  # only succeeds on an empty folder
            if d == created:
                break
            d = d.parent
    except OSError:
        pass


def _check_classes(ds: LabelledSet, context: str) -> None:
    present = {lab for c in ds.clips for lab in c.labels}
    if not ds.clips:
        raise ValueError(f"{ds.source}: no clips left{context}")
    if len(present) < 2:
        raise ValueError(
            f"{ds.source}: only one class ({next(iter(present))!r}){context}; a probe needs at least 2 classes"
        )


def _load(a: argparse.Namespace, classes: list[str] | None) -> LabelledSet:
    ds = load_dataset(a.data)
    if classes is None:
        return ds
    n_all, n_classes = len(ds), len(ds.classes)
    try:
        select_classes(ds, classes)
    except UnknownLabels as e:
        if _looks_like_path(a.classes) and not Path(a.classes).expanduser().exists():  # a mistyped path
            raise ValueError(f"--classes {a.classes}: no such file (nor labels of the data); {e.known_hint}") from None
        raise
    embed.note(f"--classes keeps {len(ds.classes)} of {n_classes} classes: {len(ds)} of {n_all} clips")
    return ds


def _task_name(a: argparse.Namespace, ds: LabelledSet, scheme: Scheme, classes: list[str] | None) -> str:
    """The dataset name (+ classes) + the protocol (`scheme` with the layout's default group already filled in)."""
    if a.task:
        return a.task
    name = ds.name
    if classes is not None:
        joined = "_".join(ds.classes)
        digest = hashlib.sha256(joined.encode()).hexdigest()[:6]
        short = joined if len(joined) <= 24 else f"{len(ds.classes)}-{digest}"
        name += f"-classes_{report.safe_name(short)}"
    return name if scheme.kind == "official" else f"{name}-{scheme.slug}"


def _skip_counts(reasons: list[str], advice: bool = False) -> str:
    """'2 cannot be decoded, 1 with NaN or infinite samples' (with advice: '...: what to do; ...'), by cause. Every
    skipped clip was called undecodable, also a float file holding NaN or inf samples, which decodes."""
    counts: dict[str, int] = {}
    for r in reasons:
        cause = embed.skip_cause(r)
        counts[cause] = counts.get(cause, 0) + 1
    causes = sorted(counts, key=lambda c: -counts[c])
    if not advice:
        return ", ".join(f"{counts[c]} {embed.SKIP_CAUSES[c][0]}" for c in causes)
    return "; ".join(f"{counts[c]} {embed.SKIP_CAUSES[c][0]}: {embed.SKIP_CAUSES[c][1]}" for c in causes)


def _drop_skipped(ds: LabelledSet, ex: embed.Extracted) -> None:
    """Keep the clips that were embedded; warn once, naming the files left out and why."""
    n = len(ds)
    listed = ", ".join(f"{p} ({r})" for p, r in ex.skipped[:3]) + (
        f", ... ({len(ex.skipped) - 3} more)" if len(ex.skipped) > 3 else ""
    )
    reasons = [r for _, r in ex.skipped]
    embed.warn(f"skipped {len(ex.skipped)} of {n} clips ({_skip_counts(reasons)}): {listed}; all are listed in the "
               "JSON")
    dropped = [c for c, ok in zip(ds.clips, ex.ok) if not ok]
    ds.clips = [c for c, ok in zip(ds.clips, ex.ok) if ok]
    present = {lab for c in ds.clips for lab in c.labels}
    gone = [c for c in ds.classes if c not in present]
    if gone and len(present) >= 2:
        why = dict(ex.skipped)
        theirs = [why.get(c.path, "") for c in dropped if set(c.labels) & set(gone)]
        embed.warn(f"no clip of class(es) {', '.join(map(repr, gone))} could be used ({_skip_counts(theirs)}); "
                   "evaluating without them")
    ds.classes = [c for c in ds.classes if c in present]
    _check_classes(ds, f" after skipping {len(ex.skipped)} of {n} clips ({_skip_counts(reasons, advice=True)})")


def run(a: argparse.Namespace) -> dict:
    """The whole evaluation; every argument, the data, the protocol and --out are checked before any embedding."""
    _validate(a)
    classes = _classes(a.classes)
    scheme = parse_scheme(a.folds)
    out = Path(a.out).expanduser()
    if a.no_cache and a.cache_dir is not None:
        embed.note(f"--no-cache: --cache-dir {a.cache_dir} is not used (neither read nor written)")
    elif a.cache_dir is None:
        a.cache_dir = embed.default_cache_dir()
        option = (f"the embedding cache (XDG_CACHE_HOME={embed.xdg_cache_home()})" if embed.xdg_cache_home()
                  else "the embedding cache (in the home folder)")
        _writable_dir(a.cache_dir, option, "set XDG_CACHE_HOME to a writable folder, give a writable --cache-dir or "
                      "pass --no-cache")
    else:
        _writable_dir(a.cache_dir, "--cache-dir", "give a writable --cache-dir or pass --no-cache")
    report.check_table(out)  # another tool's results.md (e.g. the demo's) is never replaced
    created = _writable_dir(out, "--out", "give a folder that can be created and written (results go inside it)")
    kept: dict = {}  # what an interruption leaves for a rerun: "cache" (the entry's path), "json" (the result)
    try:
        return _run(a, classes, scheme, out, kept)
    except KeyboardInterrupt as e:
        _remove_created(out, created)
        raise Interrupted(_interrupted_text(a, kept)) from e
    except BaseException:
        _remove_created(out, created)
        raise


def _interrupted_text(a: argparse.Namespace, kept: dict) -> str:
    """One line for a Ctrl-C: what was kept and what rerunning the same command does."""
    cache = kept.get("cache")
    cached = cache is not None and cache.is_file()  # checked now: the entry is written atomically, whole or not
    if kept.get("json"):
        also = ", and its embeddings in the cache" if cached else ""
        return (f"interrupted; kept the result {kept['json']}{also}: results.md may not list it yet, rerunning the "
                "same command redoes the probes and rebuilds it")
    if cached:
        return (f"interrupted; kept the embeddings, cached in {cache}: rerunning the same command reuses them and "
                "redoes the probes")
    why = "--no-cache" if a.no_cache else "the embedding cache is written once every clip is embedded"
    return f"interrupted; nothing was kept ({why}): rerunning the same command starts again"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during `run`: `str()` is one line saying what was kept (e.g. the embedding cache) and what a rerun
    does. A KeyboardInterrupt still, so a caller that does not handle it stops as on any Ctrl-C."""


def _run(a: argparse.Namespace, classes: list[str] | None, scheme: Scheme, out: Path, kept: dict) -> dict:
    ds = _load(a, classes)
    _check_classes(ds, " after --classes" if classes is not None else "")
    # A known layout's fixed vocabulary (FSDD's 10 digits, ESC-50's 50 classes, ...) keeps classes no clip has: the
    # probe got an output for each, which it could predict (an FSDD subset of 2 digits scored 0 % with a 10-way probe
    # and 33 % with a 2-way one: the width depended on whether a clip was skipped, which pruned them), and the JSON
    # counted them. Only the classes the clips have, in the dataset's order, as after a skip.
    present = {lab for c in ds.clips for lab in c.labels}
    ds.classes = [c for c in ds.classes if c in present]
    scheme = scheme.for_dataset(ds)  # plain 'group' -> 'group:<the layout's group column>': one protocol, one name
    make_folds(ds, scheme, seed=a.seed)  # the protocol is valid for this data (made again if clips are skipped)
    task = _task_name(a, ds, scheme, classes)
    clip_seconds = a.clip_seconds or ds.default_clip_seconds or _auto_clip_seconds(ds)
    probe = ProbeSettings(
        a.probe, a.seeds,
        LinearProbeConfig(a.lr, a.weight_decay, a.probe_batch, a.max_epochs, a.patience, a.val_fraction),
        a.logreg_c, a.device,
    )  # fmt: skip
    probe_config = vars(probe.linear) if a.probe == "linear" else {"C": a.logreg_c}
    probe_id = report.probe_id(a.probe, probe_config, probe_defaults())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        embedder = embed.make_embedder(a.checkpoint, preset=a.preset, device=a.device, seed=a.seed)
    _note_encoder_config(a, embedder)
    for w in caught:  # a run config.json not read, or read without fields it does not know: one line of ours
        if w.category.__name__ == "RunConfigWarning":
            embed.warn(str(w.message))
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    name, replaces = report.unique_name(out, task, embedder.name, probe_id, embedder.identity)
    if name != embedder.name:
        embed.note(f"{out} already holds a result of another embedder named {embedder.name!r}; this one is {name!r}")
    settings = embed.ExtractSettings(clip_seconds, a.embed_batch, None if a.no_cache else a.cache_dir, not a.quiet,
                                     a.cache_max_gb * 1e9)
    t0 = time.perf_counter()
    kept["cache"] = embed.cache_path(ds, embedder, ds.name, settings)  # the entry extract reads or writes
    ex = embed.extract(ds, embedder, ds.name, settings)
    t_embed = time.perf_counter() - t0
    if ex.n_cropped and not a.quiet:
        embed.note(f"{ex.n_cropped} of {int(ex.ok.sum())} clips are longer than the clip length {clip_seconds:g} s "
              f"(longest {ex.longest_seconds:.2f} s): only their first {clip_seconds:g} s were embedded; "
              "--clip-seconds sets the length")  # fmt: skip
    if ex.skipped:
        _drop_skipped(ds, ex)
    folds = make_folds(ds, scheme, seed=a.seed)
    X, Y = ex.emb, ds.targets()
    t0 = time.perf_counter()
    runs = run_probes(X, Y, folds, len(ds.classes), ds.multilabel, probe, seed=a.seed, progress=not a.quiet)
    t_probe = time.perf_counter() - t0
    mean, std = summarize(runs)
    result = {
        "task": task, "dataset": ds.name, "layout": ds.layout, "data": str(a.data),
        "source": os.path.realpath(ds.source), "folds": scheme.text,
        "checkpoint": a.checkpoint, "checkpoint_name": name, "embedder_identity": embedder.identity,
        "encoder_config": getattr(embedder, "config_source", None),
        "preset": a.preset if a.checkpoint != "logmel" else None, "probe": a.probe, "probe_id": probe_id,
        "probe_config": probe_config, "seed": a.seed, "seeds": probe.seeds if a.probe == "linear" else 1,
        "metric": metric_name(ds.multilabel), "mean": mean, "std": std, "n_clips": len(ds),
        "n_classes": len(ds.classes), "classes": list(ds.classes), "clip_seconds": clip_seconds,
        "embedding_dim": int(X.shape[1]), "device": a.device, "cache_hit": ex.cache_hit,
        "embed_seconds": t_embed, "probe_seconds": t_probe, "n_cropped": ex.n_cropped,
        "skipped": [{"path": p, "reason": r} for p, r in ex.skipped], "runs": [vars(r) for r in runs],
    }  # fmt: skip
    if replaces is not None:
        embed.note(f"replacing the earlier result of this embedder: {replaces}{_settings_change(replaces, result)}")
    result["json"] = str(report.write_json(out, result))
    kept["json"] = result["json"]
    result["table"] = report.write_table(out)
    if a.projection != "none":
        _projection(a, out, task, name, ds, X, Y, result)
    return result


def _short_of_schedule(path: Path) -> str | None:
    """For a training run's encoder.pt or a trainer checkpoint folder: a line when the training had not reached
    the end of its schedule (stopped by a signal, a Ctrl-C of the demo, or --max-steps), so that the scores are not
    read as a trained encoder's. The run's newest checkpoint tells (trainer_state.json: step, total_steps)."""
    if path.is_dir() and (path / "trainer_state.json").is_file():
        state_file, what = path / "trainer_state.json", f"checkpoint {path}"
    elif path.name == "encoder.pt" and (path.parent / "checkpoints").is_dir():
        from matpac_fast.checkpoint import STATE_FILE, list_checkpoints

        # completed ones only: a step_XXXXXXXX.tmp left by a kill while saving is not where the run is
        steps = [d / STATE_FILE for d in list_checkpoints(path.parent)]
        if not steps:
            return None
        state_file, what = steps[-1], f"{path} (its run's newest checkpoint, {steps[-1].parent.name})"
    else:
        return None
    try:
        state = json.loads(read_regular(state_file, JSON_MAX_BYTES))  # a link to /dev/zero: read without end
        step, total = int(state["step"]), int(state["total_steps"])
    except (OSError, ValueError, KeyError, TypeError, RecursionError):  # RecursionError: JSON nested too deep
        return None
    if step >= total:
        return None
    return (f"{what} is at step {step} of the {total} its schedule has: a part-trained encoder (the run was "
            "stopped or cut short by --max-steps; --resume auto trains it to the end)")


def _note_encoder_config(a: argparse.Namespace, embedder) -> None:
    """One line: where a checkpoint's heads, normalisation and front end come from (a run's config.json, the
    checkpoint's saved config, or --preset)."""
    if a.checkpoint in ("logmel", "random"):
        return
    enc = embedder.encoder
    path = getattr(embedder, "path", None)
    given = Path(a.checkpoint).expanduser()
    read = ""
    if path is not None and given.is_dir() and path != given:  # a run folder: its encoder.pt
        read = f" (a training run folder: evaluating {path})"
    elif path is not None and given.is_file() and path.is_dir():  # step_N/model.safetensors: the folder step_N
        read = f" (the weights of the trainer checkpoint folder {path}: evaluating that checkpoint)"
    note = enc.settings_note() if hasattr(enc, "settings_note") else (
        f"heads, normalisation and front end ({enc.frontend}) from {enc.settings_from}")
    embed.note(f"{a.checkpoint}{read}: {note}")
    short = _short_of_schedule(path) if path is not None else None
    if short:
        embed.note(short)
    if getattr(enc, "heads_guessed", False):
        source = enc.heads_from.removesuffix(" (guess)").replace(" (same dim and depth)", ", same dim and depth")
        link = "=" if source.startswith("dim ") else "from"
        embed.warn(
            f"the number of heads cannot be read from the weights, {a.checkpoint} has no run config or saved config "
            f"and --preset {a.preset} has dim {_preset_dim(a.preset)}, not {enc.dim}: {enc.settings()['heads']} "
            f"heads is a guess ({link} {source}), and other heads give other embeddings; keep the run's config.json "
            "beside the file (or pass the run folder / checkpoint folder), or pass the --preset it was trained with"
        )


def _preset_dim(preset: str) -> int | str:
    try:
        from matpac_fast.config import get_model_config

        return get_model_config(preset).dim
    except ValueError:
        return "?"


def _settings_change(path: Path, result: dict) -> str:
    """' (data a -> b; probe settings lr 0.01 -> 0.003)' when the replaced result had another dataset, protocol,
    clip length (one --task name reused) or probe settings (written before they were part of the name); ''
    otherwise."""
    try:
        prev = json.loads(path.read_text())
        prev_probe = prev.get("probe_config") or {}
    except (OSError, ValueError, AttributeError):
        return ""
    parts = [f"{label} {prev[k]} -> {result[k]}" for k, label in
             (("dataset", "data"), ("folds", "protocol"), ("clip_seconds", "clip seconds"))
             if k in prev and prev[k] != result.get(k)]  # fmt: skip
    # The same dataset name can hold other clips: a known layout is named after its kind (a 2-digit copy of FSDD is
    # 'fsdd' too), a generic CSV after its folder. Say so, and what changed.
    # `source` is the file or folder read, resolved when it was read (`data` is as typed: relative to the directory
    # of that run, and `dir` reads dir/labels.csv), so it compares across working directories and spellings
    if prev.get("dataset") == result.get("dataset") and isinstance(prev.get("source"), str) and (
            prev["source"] != result.get("source")):
        parts.append(f"data path {prev['source']} -> {result['source']}")
    parts += [f"{label} {prev[k]} -> {result[k]}" for k, label in
              (("n_clips", "clips"), ("n_classes", "classes"), ("seeds", "probe seeds"), ("seed", "seed"))
              if k in prev and prev[k] != result.get(k)]  # fmt: skip
    diff = [f"{k} {prev_probe[k]:g} -> {v:g}" for k, v in (result.get("probe_config") or {}).items()
            if isinstance(prev_probe.get(k), (int, float)) and prev_probe[k] != v]  # fmt: skip
    if diff:
        parts.append(f"probe settings {', '.join(diff)}")
    return f" ({'; '.join(parts)})" if parts else ""


def _projection(a, out: Path, task: str, name: str, ds: LabelledSet, X, Y, result: dict) -> None:
    """The PNG is a by-product: a projection that cannot be made is a warning, never a lost result."""
    label = Y if not ds.multilabel else Y.argmax(1)  # multi-label: colour by the first label
    try:
        xy = report.project_2d(X, a.projection, seed=a.seed)
        report.save_projection(out, task, name, ds.name, xy, label, ds.classes, a.projection)
        result["png"] = report.plot_projections(out, ds.name)
    except (ValueError, OSError) as e:
        embed.warn(f"no {a.projection} projection ({e}); the results are written")


def _field(value) -> str:
    """A RESULT line value: whitespace becomes '_' (as the benchmarks' device=), so the line splits into key=value
    fields on spaces (a run folder "with space" -> checkpoint=with_space-encoder-<sha8>); JSON and table keep the
    real name."""
    return re.sub(r"\s", "_", str(value)) or "n/a"


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        r = run(a)
    except KeyboardInterrupt as e:  # Ctrl-C: one line, no traceback; 130 = 128 + SIGINT, as a shell reports it
        print(f"matpac-eval: {e if isinstance(e, Interrupted) else 'interrupted'}", file=sys.stderr, flush=True)
        raise SystemExit(130) from None
    except ValueError as e:
        raise SystemExit(f"matpac-eval: error: {e}") from None
    except OSError as e:  # e.g. the disk filled up or --out was removed while the probes ran
        where = f"{e.filename}: " if e.filename else ""
        raise SystemExit(f"matpac-eval: error: {where}{e.strerror or e}") from None
    per_fold = {}
    for run_ in r["runs"]:
        per_fold.setdefault(run_["fold"], []).append(run_["score"])
    for fold, s in per_fold.items():
        print(f"  {fold}: {100 * np.mean(s):.2f}% over {len(s)} run(s)")
    print(
        f"embeddings {r['n_clips']} x {r['embedding_dim']} ({r['embed_seconds']:.1f} s"
        f"{', cached' if r['cache_hit'] else ''}); probes {r['probe_seconds']:.1f} s"
    )
    print(f"table: {r['table']}" + (f"  figure: {r['png']}" if r.get("png") else ""))
    print(f"RESULT eval task={_field(r['task'])} checkpoint={_field(r['checkpoint_name'])} metric={r['metric']} "
          f"mean={r['mean']:.4f} std={r['std']:.4f} probe={_field(r['probe_id'])} lr={report.lr_text(r)}")  # fmt: skip
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
