"""`matpac-eval`: frozen embeddings + linear probe on a labelled audio set; prints a RESULT line last.

Example (FSDD, leave-one-speaker-out, the log-mel baseline):
    matpac-eval --checkpoint logmel --data ../shared/data/fsdd --folds group:speaker --out runs/eval_fsdd
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from matpac_fast.evaluation import embed, report
from matpac_fast.evaluation.datasets import LabelledSet, load_dataset
from matpac_fast.evaluation.folds import make_folds, parse_scheme
from matpac_fast.evaluation.metrics import metric_name
from matpac_fast.evaluation.probe import LinearProbeConfig, ProbeSettings, run_probes, summarize

# The M2D probe learning rate (3e-5) needs most of its 200 epochs on small CPU-sized sets and still under-fits a
# 160-d baseline; 1e-3 reaches the same or better validation scores in a few dozen epochs. `--lr 3e-5` gives parity.
CLI_DEFAULT_LR = 3e-3
MAX_AUTO_CLIP_SECONDS = 10.0


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the uninformative 'None' of options whose help already says what happens."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matpac-eval",
        description="Evaluate an audio encoder: embed every clip of a labelled set with a frozen encoder, train a "
        "linear probe per fold and seed, report accuracy (single-label) or mAP (multi-label) as mean ± std. "
        "Writes JSON, a markdown table (results.md) and a PNG of a 2-D projection into --out; the last line "
        "printed is 'RESULT eval task=... checkpoint=... metric=... mean=... std=...'.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="PATH|random|logmel",
        help="a checkpoint (this project's or the authors' weights); 'random' = randomly initialised "
        "encoder of --preset (seeded); 'logmel' = no encoder: per-mel-bin mean and std over time of the "
        "normalised log-mel (160-d)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="FOLDER|CSV",
        help="folder of <label>/ subfolders, a CSV (file,label[,fold|split][,other columns]; "
        "comma-separated labels = multi-label), or the root of FSDD (labels.csv), ESC-50 "
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
        help="crop/pad every clip to this length (default: the known "
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
    p.add_argument("--seeds", type=int, default=3, help="linear-probe runs per fold (different seeds)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first seed (probe init, validation carve, K-fold shuffle, random encoder init)",
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default="runs/eval", type=Path, help="output folder (JSON, results.md, PNG)")
    p.add_argument(
        "--preset",
        default="matpac",
        help="encoder preset for 'random' and for checkpoints that do "
        "not record one (tiny, matpac, matpac_plusplus, m2d)",
    )
    g = p.add_argument_group("linear probe (METHOD.md §6)")
    g.add_argument("--lr", type=float, default=CLI_DEFAULT_LR, help="Adam learning rate (M2D parity: 3e-5)")
    g.add_argument("--weight-decay", type=float, default=1e-8)
    g.add_argument("--probe-batch", type=int, default=200)
    g.add_argument("--max-epochs", type=int, default=200)
    g.add_argument("--patience", type=int, default=20, help="early-stopping patience (epochs)")
    g.add_argument("--val-fraction", type=float, default=0.1, help="validation part carved from each training fold")
    g.add_argument("--logreg-c", type=float, default=1.0, help="inverse L2 strength for --probe logreg")
    e = p.add_argument_group("embedding")
    e.add_argument("--embed-batch", type=int, default=32, help="clips per encoder batch")
    e.add_argument("--cache-dir", type=Path, default=embed.default_cache_dir(), help="embedding cache")
    e.add_argument("--no-cache", action="store_true", help="neither read nor write the embedding cache")
    e.add_argument("--projection", default="pca", choices=["pca", "tsne", "none"], help="2-D projection for the PNG")
    e.add_argument(
        "--classes",
        help="allowed labels (comma-separated, or a file with one per line); any other label in the CSV is an error",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _classes(arg: str | None) -> list[str] | None:
    if arg is None:
        return None
    p = Path(arg)
    items = p.read_text().split("\n") if p.is_file() else arg.split(",")
    return [s.strip() for s in items if s.strip()]


def _auto_clip_seconds(ds: LabelledSet) -> float:
    import soundfile as sf

    longest = max(sf.info(c.path).duration for c in ds.clips)
    return float(min(MAX_AUTO_CLIP_SECONDS, max(longest, 0.1)))


def _validate(a: argparse.Namespace) -> None:
    for name in ("seeds", "embed_batch", "probe_batch", "max_epochs", "patience"):
        if getattr(a, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if a.lr <= 0:
        raise ValueError("--lr must be > 0")
    if a.clip_seconds is not None and a.clip_seconds <= 0:
        raise ValueError("--clip-seconds must be > 0")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device visible; use --device cpu")


def run(a: argparse.Namespace) -> dict:
    _validate(a)
    ds = load_dataset(a.data, classes=_classes(a.classes))
    scheme = parse_scheme(a.folds)
    folds = make_folds(ds, scheme, seed=a.seed)
    task = a.task or (ds.name if scheme.kind == "official" else f"{ds.name}-{scheme.slug}")
    clip_seconds = a.clip_seconds or ds.default_clip_seconds or _auto_clip_seconds(ds)
    embedder = embed.make_embedder(a.checkpoint, preset=a.preset, device=a.device, seed=a.seed)
    settings = embed.ExtractSettings(clip_seconds, a.embed_batch, None if a.no_cache else a.cache_dir, not a.quiet)
    t0 = time.perf_counter()
    X, hit = embed.extract(ds, embedder, ds.name, settings)
    t_embed = time.perf_counter() - t0
    Y = ds.targets()
    probe = ProbeSettings(
        a.probe, a.seeds,
        LinearProbeConfig(a.lr, a.weight_decay, a.probe_batch, a.max_epochs, a.patience, a.val_fraction),
        a.logreg_c, a.device,
    )  # fmt: skip
    t0 = time.perf_counter()
    runs = run_probes(X, Y, folds, len(ds.classes), ds.multilabel, probe, seed=a.seed, progress=not a.quiet)
    t_probe = time.perf_counter() - t0
    mean, std = summarize(runs)
    result = {
        "task": task, "dataset": ds.name, "layout": ds.layout, "data": str(a.data), "folds": a.folds,
        "checkpoint": a.checkpoint, "checkpoint_name": embedder.name, "embedder_identity": embedder.identity,
        "preset": a.preset if a.checkpoint != "logmel" else None, "probe": a.probe,
        "probe_config": vars(probe.linear) if a.probe == "linear" else {"C": a.logreg_c},
        "metric": metric_name(ds.multilabel), "mean": mean, "std": std, "n_clips": len(ds),
        "n_classes": len(ds.classes), "clip_seconds": clip_seconds, "embedding_dim": int(X.shape[1]),
        "device": a.device, "cache_hit": hit, "embed_seconds": t_embed, "probe_seconds": t_probe,
        "runs": [vars(r) for r in runs],
    }  # fmt: skip
    out = Path(a.out)
    report.write_json(out, result)
    result["table"] = report.write_table(out)
    if a.projection != "none":
        label = Y if not ds.multilabel else Y.argmax(1)  # multi-label: colour by the first label
        xy = report.project_2d(X, a.projection, seed=a.seed)
        report.save_projection(out, task, embedder.name, ds.name, xy, label, ds.classes, a.projection)
        result["png"] = report.plot_projections(out, ds.name)
    return result


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        r = run(a)
    except ValueError as e:
        raise SystemExit(f"matpac-eval: error: {e}") from None
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
    print(f"RESULT eval task={r['task']} checkpoint={r['checkpoint_name']} metric={r['metric']} "
          f"mean={r['mean']:.4f} std={r['std']:.4f}")  # fmt: skip
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
