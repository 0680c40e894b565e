"""Reports: one JSON per run, a markdown table over every run in the output folder, and a PNG of a 2-D
projection of the embeddings coloured by label (one panel per task and checkpoint of a dataset).

Each CLI run writes `<out>/<task>__<checkpoint>__<probe>.json` and `<out>/<task>__<checkpoint>.proj.npz`, then
rebuilds `<out>/results.md` and `<out>/<dataset>_projection.png` from everything in the folder, so several runs
(baselines, checkpoints, protocols, probe settings) into one folder give one table and one figure. A results.md
that matpac-eval did not write (no `TABLE_MARKER` line, no table header of its own) is never overwritten: the CLI
refuses such an --out before any work (`check_table`). `<probe>` is the
probe's identity (`probe_id`): its kind, plus every setting that differs from the CLI's defaults (`linear`,
`linear-lr3e-05`, `linear-wd0-batch64`, `logreg-C0.5`). A run replaces only its own earlier result (same task,
probe identity and embedder identity); `unique_name` gives any other embedder a new name.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

from matpac_fast.safe_files import write_atomic

TABLE_HEADER = (
    "| task | data | protocol | checkpoint | probe | lr | metric | mean ± std (%) | runs | dim | embed s | probe s |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)
# The last line of the results.md this module writes (an HTML comment: invisible when rendered). A results.md is
# matpac-eval's when it has this line or, written before the line existed, starts with the table header's first
# columns (every version's header began so); any other results.md is never overwritten (`check_table`).
TABLE_MARKER = "<!-- written by matpac-eval: rebuilt from the result JSON files in this folder on every run -->"
OLD_HEADER_START = "| task | data | protocol | checkpoint | probe |"
# Short names of the probe settings in a probe identity (`probe_id`), in this order.
PROBE_TAGS = {"lr": "lr", "weight_decay": "wd", "batch_size": "batch", "max_epochs": "ep", "patience": "pat",
              "val_fraction": "val", "C": "C"}


def safe_name(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def probe_id(kind: str, settings: dict, defaults: dict) -> str:
    """The probe's identity in result names: `kind`, then `-<tag><value>` for each setting (PROBE_TAGS order) that
    differs from `defaults`, e.g. ('linear', lr 3e-5 vs 3e-3) -> 'linear-lr3e-05'. Default settings -> `kind`."""
    parts = [kind]
    for key, tag in PROBE_TAGS.items():
        if key in settings and key in defaults and settings[key] != defaults[key]:
            parts.append(f"{tag}{_number(settings[key])}")
    return "-".join(parts)


def _number(v) -> str:
    """Short and exact: %g unless that loses digits (then repr)."""
    text = f"{v:g}"
    return text if float(text) == v else repr(v)


def lr_text(r: dict) -> str:
    """The probe learning rate of a result ('n/a' for logistic regression, which has none)."""
    lr = (r.get("probe_config") or {}).get("lr") if r.get("probe", "linear") == "linear" else None
    return f"{lr:g}" if isinstance(lr, (int, float)) else "n/a"


def result_path(out: Path, task: str, checkpoint_name: str, probe: str) -> Path:
    return out / f"{safe_name(task)}__{safe_name(checkpoint_name)}__{probe}.json"


def unique_name(out: Path, task: str, name: str, probe: str, identity: str) -> tuple[str, Path | None]:
    """-> (checkpoint name to use, the earlier result of the same embedder it will replace or None). A result in
    `out` under `name` from another embedder (another seed, preset or file) is never replaced: the name gets the
    embedder identity's hash (and a counter if even that is taken)."""
    h = hashlib.sha256(identity.encode()).hexdigest()[:8]
    candidates = [name, f"{name}-{h}"] + [f"{name}-{h}-{i}" for i in range(2, 1000)]
    for cand in candidates:
        p = result_path(out, task, cand, probe)
        if not p.exists():
            return cand, None
        try:
            prev = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # not ours to overwrite
        if isinstance(prev, dict) and prev.get("embedder_identity") == identity:
            return cand, p
    raise ValueError(f"--out {out}: too many results named {name!r}; use another --out")


def write_json(out: Path, result: dict) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    p = result_path(out, result["task"], result["checkpoint_name"], result.get("probe_id", result["probe"]))
    write_atomic(p, json.dumps(result, indent=2) + "\n")  # atomic: an interrupted write never leaves half a result
    return p


def table_row(r: dict) -> str:
    return (
        f"| {r['task']} | {r['dataset']} | {r['folds']} | {r['checkpoint_name']} | {r.get('probe_id', r['probe'])} | "
        f"{lr_text(r)} | {r['metric']} | "
        f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f} | {len(r['runs'])} | {r['embedding_dim']} | "
        f"{r['embed_seconds']:.0f}{' (cached)' if r.get('cache_hit') else ''} | {r['probe_seconds']:.0f} |"
    )


def markdown_table(results: list[dict]) -> str:
    rows = sorted(results, key=lambda r: (r["dataset"], r["folds"], r.get("probe_id", r["probe"]),
                                          r["checkpoint_name"]))  # fmt: skip
    return "\n".join([TABLE_HEADER] + [table_row(r) for r in rows]) + "\n"


def load_results(out: Path) -> list[dict]:
    res = []
    for p in sorted(out.glob("*__*__*.json")):
        try:
            r = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            print(f"warning: {p} is not a readable result ({type(e).__name__}); left out of results.md (rerun that "
                  "evaluation, or delete the file)", file=sys.stderr)
            continue
        if isinstance(r, dict) and {"task", "mean", "runs"} <= set(r):
            why = _result_problem(r)
            if why is None:
                res.append(r)
            else:  # e.g. a hand-written or truncated file: one warning, not a KeyError on every later run
                print(f"warning: {p} is not a complete result ({why}); left out of results.md (rerun that "
                      "evaluation, or delete the file)", file=sys.stderr)
    return res


# What table_row and markdown_table read from a result, by type.
_RESULT_FIELDS = {"task": str, "dataset": str, "folds": str, "checkpoint_name": str, "probe": str, "metric": str,
                  "mean": (int, float), "std": (int, float), "runs": list, "embedding_dim": int,
                  "embed_seconds": (int, float), "probe_seconds": (int, float)}


def _result_problem(r: dict) -> str | None:
    missing = [k for k in _RESULT_FIELDS if k not in r]
    if missing:
        return f"no {', '.join(missing)}"
    wrong = [k for k, t in _RESULT_FIELDS.items() if isinstance(r[k], bool) or not isinstance(r[k], t)]
    return f"{', '.join(wrong)} of the wrong type" if wrong else None


def table_owner_problem(out: Path) -> str | None:
    """None when `out/results.md` may be (re)written: absent, empty, or written by matpac-eval; else why not."""
    p = out / "results.md"
    if not p.exists() and not p.is_symlink():
        return None
    if not p.is_file():
        return "it is not a regular file"
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return "it is not matpac-eval's table"
    except OSError as e:
        return f"it cannot be read: {e.strerror or e}"
    if not text.strip() or TABLE_MARKER in text or text.lstrip().startswith(OLD_HEADER_START):
        return None
    first = text.strip().splitlines()[0]
    return f"it starts {first[:60]!r}" + ("..." if len(first) > 60 else "")


def check_table(out: Path) -> None:
    """Refuse (ValueError, one line) an --out whose results.md matpac-eval did not write: it would be replaced."""
    why = table_owner_problem(out)
    if why is not None:
        raise ValueError(f"--out {out} holds a results.md that matpac-eval did not write ({why}); choose another "
                         "--out (matpac-eval rebuilds results.md there and never overwrites another tool's)")


def write_table(out: Path) -> Path:
    """Rebuild `out/results.md` (atomically) from every result JSON in `out`; refuses a results.md it did not write."""
    check_table(out)
    p = out / "results.md"
    write_atomic(p, markdown_table(load_results(out)) + "\n" + TABLE_MARKER + "\n")
    return p


# --- 2-D projection -----------------------------------------------------------------------------------------------
def project_2d(X: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """Standardised embeddings -> (n, 2). PCA is exact and fast; t-SNE shows clusters better but takes longer.
    t-SNE runs on a PCA to min(50, n, D) dimensions with perplexity min(30, (n - 1) / 3) (< n, as it must be).
    Raises ValueError when there are too few clips (PCA < 2, t-SNE < 4)."""
    from sklearn.decomposition import PCA

    X = np.asarray(X, dtype=np.float64)
    n, d = X.shape
    if method not in ("pca", "tsne"):
        raise ValueError(f"--projection {method!r}: choose pca, tsne or none")
    if n < (4 if method == "tsne" else 2) or d < 1:
        raise ValueError(f"{method} projection needs at least {4 if method == 'tsne' else 2} clips, got {n}")
    std = X.std(0)
    std[std < 1e-12] = 1.0
    Z = (X - X.mean(0)) / std
    if method == "pca":
        k = min(2, n, d)
        xy = PCA(k, random_state=seed).fit_transform(Z)
        return np.pad(xy, ((0, 0), (0, 2 - k))).astype(np.float32)
    from sklearn.manifold import TSNE

    k = min(50, n, d)
    if d > k:  # the usual PCA-50 before t-SNE: same picture, a fraction of the time
        Z = PCA(k, random_state=seed).fit_transform(Z)
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    init = "pca" if Z.shape[1] >= 2 else "random"
    return TSNE(2, perplexity=perplexity, init=init, random_state=seed).fit_transform(Z).astype(np.float32)


def save_projection(out: Path, task: str, checkpoint_name: str, dataset: str, xy, label_idx, classes, method) -> Path:
    p = out / f"{safe_name(task)}__{safe_name(checkpoint_name)}.proj.npz"
    np.savez(
        p, xy=np.asarray(xy, np.float32), label=np.asarray(label_idx, np.int64), classes=np.array(classes),
        checkpoint=np.array(checkpoint_name), dataset=np.array(dataset), method=np.array(method), task=np.array(task),
    )  # fmt: skip
    return p


def read_projections(out: Path, dataset: str) -> dict[tuple[str, str], dict]:
    """{(task, checkpoint name): {xy, label, classes, method}} of the projections of `dataset` saved in `out`."""
    panels = {}
    for p in sorted(out.glob("*.proj.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                if str(z["dataset"]) == dataset:
                    # files written before the task was saved: their name starts with it (save_projection)
                    task = str(z["task"]) if "task" in z.files else p.name.split("__")[0]
                    panels[(task, str(z["checkpoint"]))] = {k: z[k] for k in ("xy", "label", "classes", "method")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:  # a damaged earlier file: skip, say so
            print(f"warning: {p} is not a readable projection ({type(e).__name__}); left out of the chart (rerun "
                  "that evaluation, or delete the file)", file=sys.stderr)
    return panels


def plot_projections(out: Path, dataset: str) -> Path | None:
    """One panel per saved projection of `dataset` in `out` (per task and checkpoint: two --classes tasks of one
    dataset are two panels); returns the PNG path (None when there is none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = read_projections(out, dataset)
    if not panels:
        return None
    n = len(panels)
    # One legend for the figure (right of the panels) when every panel has the same classes; else each panel its
    # own (the figure's used to show the last panel's classes for all).
    shared = len({tuple(str(c) for c in v["classes"]) for v in panels.values()}) == 1
    legend_w = 1.2 if shared else 0.0
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n + legend_w, 4.2), squeeze=False)
    cmap = plt.get_cmap("tab10" if max(len(v["classes"]) for v in panels.values()) <= 10 else "tab20")
    several_tasks = len({task for task, _ in panels}) > 1
    for ax, ((task, name), v) in zip(axes[0], panels.items()):
        classes = [str(c) for c in v["classes"]]
        for ci, cname in enumerate(classes):
            m = v["label"] == ci
            ax.scatter(v["xy"][m, 0], v["xy"][m, 1], s=4, alpha=0.6, color=cmap(ci % cmap.N), label=cname)
        title = f"{task} · {name}" if several_tasks else name
        ax.set_title(f"{title} ({str(v['method']).upper()})", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        if not shared and len(classes) <= 20:
            ax.legend(markerscale=3, fontsize=7, loc="best")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if shared and len(labels) <= 20:
        fig.legend(handles, labels, loc="center right", markerscale=3, fontsize=8, title="label")
    fig.suptitle(f"{dataset}: clip embeddings, 2-D projection coloured by label", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1 - (1.1 if shared else 0.0) / (4.2 * n + legend_w), 0.95))
    png = out / f"{safe_name(dataset)}_projection.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
