"""PNG chart of training throughput from train_throughput.py CSVs: samples/s by mode and batch size, per device.

One panel per (device, preset, processes); in each, groups of bars by batch size, one bar per mode, labelled with
samples/s (and MFU when known). A run with the residual stream in the autocast dtype (`--stream-dtype amp`) is its
own bar, hatched, labelled "<mode> · bf16 stream"; so is a run with another attention kernel than the mode's
default (`--attn-impl`: "<mode> · cudnn attention"), one with an autotuning compile mode ("<mode> · gemm-autotune";
default and reduce-overhead rows share a bar), one with Inductor options (`--inductor`: "<mode> · KEY=VALUE"), and a
reference-design row measured by an earlier peer (CSV column `peer` = "earlier": see benchmarks/RESULTS.md),
labelled "reference-design · earlier peer", so that it is never read as the current peer's figure. In a panel that
holds rows from both synthetic data and shards (CSV column `data`), the synthetic ones are their own bars too,
labelled "<bar> · synthetic". When the CSVs hold the same (device, preset, processes, bar, data kind, batch) more
than once, the most recent row (CSV column `time_utc`) is drawn, whatever the order of the files.

    python benchmarks/plot_results.py benchmarks/results/cpu_tiny.csv --out /tmp/throughput.png
    python benchmarks/plot_results.py a.csv b.csv --out chart.png --title "MATPAC ViT-B, bf16"
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on CI or GPU boxes

import matplotlib.pyplot as plt  # noqa: E402

MODE_ORDER = ["reference-design", "eager", "compiled", "compiled+kernels"]
COLORS = {"reference-design": "#9e9e9e", "eager": "#64b5f6", "compiled": "#1e88e5", "compiled+kernels": "#0d47a1"}
NEEDED = ("device", "preset", "world", "mode", "batch", "samples_per_s", "mfu")
AUTOTUNE_MODES = ("gemm-autotune", "max-autotune-no-cudagraphs", "max-autotune")


def bar_label(row: dict) -> str:
    """The bar a row belongs to: its mode, plus the residual-stream variant when it is not the default (without
    autocast, precision "no", `amp` changes nothing and the row is an ordinary one), plus the attention kernel when
    it is not the mode's default (`sdpa`; `math` for reference-design: the authors' written-out attention), plus
    "earlier peer" for a reference-design row of the peer measured before benchmarks/_peer.py became the authors'
    fairseq step (that peer used our SDPA attention: it is part of what "earlier peer" means, not named again).
    Without the attention part, a side-by-side `--attn-impl cudnn` run replaced the default run's bar."""
    low = row.get("stream_dtype") == "amp" and row.get("precision", "no") not in ("no", "")
    earlier = row["mode"] == "reference-design" and row.get("peer") == "earlier"
    default_attn = "math" if row["mode"] == "reference-design" else "sdpa"
    attn = row.get("attn_impl") or default_attn  # CSVs older than the column: the default
    # An autotuning compile mode is its own bar too: the suite's gemm_autotune row used to replace the
    # reduce-overhead row of the same mode and batch (default vs reduce-overhead stays one bar, as in older charts).
    compiled = row["mode"] in ("compiled", "compiled+kernels")
    tuned = row.get("compile_mode") in AUTOTUNE_MODES and compiled
    return (row["mode"] + (f" · {row['precision']} stream" if low else "")
            + (f" · {attn} attention" if attn != default_attn and not earlier else "")
            + (f" · {row['compile_mode']}" if tuned else "")
            + (f" · {row['inductor']}" if row.get("inductor") and compiled else "")
            + (" · earlier peer" if earlier else ""))


def read_rows(paths: list[Path]) -> list[dict]:
    """Rows of the CSVs, one per key: the most recent by `time_utc` (ISO 8601, so text order is time order); among
    rows of the same time, or without one, the later row in the later file. File order alone used to decide, so a
    shell glob (sorted by name) could draw an old run over a newer one."""
    latest: dict[tuple, dict] = {}
    for path in paths:
        if not path.exists():
            raise SystemExit(f"error: {path} does not exist; give a CSV written by train_throughput.py --csv")
        if not path.is_file():
            raise SystemExit(f"error: {path} is not a file; give a CSV written by train_throughput.py --csv")
        try:  # one line, not a traceback, for a file that cannot be read or is not text
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                missing = [c for c in NEEDED if c not in (reader.fieldnames or [])]
                if missing:
                    raise SystemExit(f"error: {path} lacks columns {missing}: is it a train_throughput.py --csv file?")
                for r in reader:
                    try:
                        r["samples_per_s"] = float(r["samples_per_s"])
                        r["batch"] = int(r["batch"])
                    except (TypeError, ValueError):  # TypeError: a cut-short row (a killed writer) has None cells
                        continue  # a row without a figure (should not happen; skip rather than plot garbage)
                    if not math.isfinite(r["samples_per_s"]) or any(r.get(c) is None for c in NEEDED):
                        continue  # inf / nan drew no chart (axis limits), a missing cell a traceback
                    r["mfu"] = _fraction(r.get("mfu"))
                    r["bar"] = bar_label(r)
                    # The data kind is part of the key: a side-by-side run on synthetic data used to replace the
                    # suite's row from shards (or the reverse) of the same mode and batch, whichever was later.
                    key = (r["device"], r["preset"], r["world"], r["bar"], r.get("data") == "synthetic", r["batch"])
                    if key not in latest or r.get("time_utc", "") >= latest[key].get("time_utc", ""):
                        latest[key] = r
        except (OSError, UnicodeDecodeError, csv.Error) as e:
            raise SystemExit(f"error: cannot read {path} as a CSV ({e}); give a CSV written by train_throughput.py "
                             "--csv") from None
    if not latest:
        raise SystemExit("error: no rows with a samples/s figure in the given CSV(s)")
    # Where a panel mixes synthetic data and shards in our modes, its synthetic rows are bars of their own.
    kinds: dict[tuple, set] = {}
    for (device, preset, world, _, synthetic, _), r in latest.items():
        if r["mode"] != "reference-design":
            kinds.setdefault((device, preset, world), set()).add(synthetic)
    for (device, preset, world, _, synthetic, _), r in latest.items():
        if synthetic and len(kinds.get((device, preset, world), ())) > 1:
            r["bar"] += " · synthetic"
    return list(latest.values())


def _fraction(cell) -> float | None:
    """An MFU cell as a number, or None where there is none to print: empty, `n/a` (no peak known for the device)
    or anything else that is not a finite number (a hand-edited cell used to end the chart in a traceback)."""
    try:
        value = float(cell)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def panels(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["device"], r["preset"], r["world"]), []).append(r)
    return out


def _bar_key(bar: str) -> tuple:
    mode = bar.split(" · ")[0]
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), bar)


def plot(rows: list[dict], out: Path, title: str | None = None) -> Path:
    groups = panels(rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(8, 4.4 * len(groups)), squeeze=False)
    for ax, ((device, preset, world), rs) in zip(axes[:, 0], sorted(groups.items())):
        batches = sorted({r["batch"] for r in rs})
        modes = sorted({r["bar"] for r in rs}, key=_bar_key)
        width = 0.8 / len(modes)
        by = {(r["bar"], r["batch"]): r for r in rs}
        top = max(r["samples_per_s"] for r in rs)
        for m_i, mode in enumerate(modes):
            xs, ys, labels = [], [], []
            for b_i, b in enumerate(batches):
                r = by.get((mode, b))
                if r is None:
                    continue
                xs.append(b_i + (m_i - (len(modes) - 1) / 2) * width)
                ys.append(r["samples_per_s"])
                mfu = r.get("mfu")
                labels.append(f"{r['samples_per_s']:.0f}" + (f"\n{100 * mfu:.1f}%" if mfu is not None else ""))
            # same colour, told apart by hatch: stream / earlier-peer variants //, another attention kernel \\,
            # an autotuning compile mode xx, synthetic-data bars dotted
            parts = mode.split(" · ")[1:]
            hatch = ("//" if any(p.endswith(" stream") or p == "earlier peer" for p in parts) else "") \
                + ("\\\\" if any(p.endswith(" attention") for p in parts) else "") \
                + ("xx" if any(p in AUTOTUNE_MODES for p in parts) else "") \
                + (".." if "synthetic" in parts else "")
            bars = ax.bar(xs, ys, width * 0.95, label=mode, color=COLORS.get(mode.split(" · ")[0]),
                          hatch=hatch or None, edgecolor="white")
            ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
        ax.set_xticks(range(len(batches)), [f"batch {b}/device" for b in batches])
        ax.set_ylabel("samples/s")
        ax.set_ylim(0, top * 1.15)  # room for the bar labels; the legend sits below the axes
        procs = "1 process" if str(world) == "1" else f"{world} processes (aggregate)"
        ax.set_title(f"{device} — preset {preset}, {procs}", fontsize=9)
        # Below the axes, two columns: inside them, long variant labels ran past the figure's right edge.
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(len(modes), 2),
                  frameon=False)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title or "MATPAC training throughput (bar labels: samples/s, MFU)", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Into a temporary file beside it, then renamed over it: a save cut short (Ctrl-C, the suite's timeout) left a
    # truncated PNG in place of the chart that was there.
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, dpi=110, format="png")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make the chart private
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+", type=Path, help="CSV file(s) from train_throughput.py --csv")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    if args.out.suffix.lower() != ".png":
        p.error(f"--out {args.out}: give a .png path")
    # Checked before drawing: a folder, or a path whose folder cannot be made or written, used to end in a traceback.
    if args.out.is_dir():
        p.error(f"--out {args.out} is a folder; give a file path such as {args.out / 'throughput.png'}")
    rows = read_rows(args.csv)  # before the folder is made: a bad CSV left a new empty folder behind
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--out {args.out}: cannot create its folder {args.out.parent} ({e.strerror or e})")
    if not os.access(args.out.parent, os.W_OK):
        p.error(f"--out {args.out}: its folder {args.out.parent} is not writable")
    path = plot(rows, args.out, args.title)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
