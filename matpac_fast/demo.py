"""`python -m matpac_fast.demo --out DIR`: the embedded default end to end (what `make demo` runs).

synthetic corpus -> log-mel shards (shard_tools' Python API) -> verify -> pre-train the tiny preset with the real
trainer -> linear probes (held-out synthetic split; FSDD when ../shared is present) -> table + RESULT line.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import signal
import sys
from pathlib import Path

from matpac_fast.cli_args import path_arg, usable_cpus
from matpac_fast.interrupts import INTERRUPTED, held_ctrl_c, run_main


class Stopped(Exception):
    """Pre-training was stopped by a signal (the trainer's graceful stop: its checkpoint is written). A table of a
    part-trained encoder would read as the demo's result, so the demo ends there."""

    def __init__(self, step: int, signum: int | None):
        name = signal.Signals(signum).name if signum else "a signal"
        super().__init__(f"pre-training stopped by {name} at step {step}")
        self.exit_code = 128 + (signum or signal.SIGINT)  # as a shell reports a process that signal ended


def shards_step(out_dir: Path, n: int, seed: int = 0, workers: int | None = None, n_shards: int = 8) -> dict:
    """Synthetic corpus -> shards in out_dir/shards; several shards so that loader workers can split them."""
    from shard_tools.api import format_summary, make_synthetic_shards

    print(f"[demo] 1/5 synthetic corpus ({n} clips) -> shards in {out_dir}", flush=True)
    summary = make_synthetic_shards(
        out_dir,
        n=n,
        seed=seed,
        workers=usable_cpus() if workers is None else workers,
        shard_size=str(max(1, math.ceil(n / n_shards))),
    )
    print(format_summary(summary), flush=True)
    return summary


def verify_step(out_dir: Path) -> dict:
    from shard_tools.verify import format_report, verify

    print(f"[demo] 2/5 verify-shards {out_dir}", flush=True)
    report = verify(out_dir, progress=False)
    print(format_report(report, top=10), flush=True)
    if not report.ok:
        raise SystemExit(f"demo: the shards in {out_dir} failed verification (see above)")
    return report.to_dict()


# The demo's mark on its pre-training folder, written before the trainer starts and deleted last: what a rerun may
# replace. Any trainer-looking folder was replaced before: `make demo DEMO_DIR=runs` deleted a real runs/train.
DEMO_MARK = ".matpac-demo"


def _is_earlier_demo_run(run_dir: Path) -> bool:
    """Marked by the demo, or (a demo from before the mark) a run whose config.json trained on the demo's shards
    into this folder."""
    if (run_dir / DEMO_MARK).is_file():
        return True
    try:
        train = json.loads((run_dir / "config.json").read_text())["train"]
        return train["data"]["shards"] == str(run_dir.parent / "shards") and train["run"]["out"] == str(run_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _clear_earlier_demo_run(run_dir: Path) -> None:
    """A second `make demo` starts its run afresh (the trainer refuses to mix two runs in one folder, and the demo is
    deterministic, so nothing is lost). Only the demo's own earlier run is removed, its mark last (a removal cut
    short leaves a folder the next rerun still knows); then the folder is made and marked for this run."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not an earlier demo run; give another --out or move it")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not _is_earlier_demo_run(run_dir):
            raise ValueError(f"{run_dir} exists and is not an earlier demo run (no {DEMO_MARK}); give another --out "
                             "or empty it")
        print(f"[demo] replacing the earlier demo run in {run_dir}", flush=True)
        for p in run_dir.iterdir():
            if p.name != DEMO_MARK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / DEMO_MARK).write_text("pre-training folder of `python -m matpac_fast.demo`: a rerun replaces it\n")


def pretrain_step(shard_dir: Path, run_dir: Path, epochs: float, batch_size: int, seed: int) -> Path:
    """Pre-train the tiny preset on CPU with the real trainer (the same code path as `train.py`)."""
    from matpac_fast.train_config import resolve
    from matpac_fast.trainer import Trainer

    print(f"[demo] 3/5 pre-train the tiny preset on CPU ({epochs:g} epochs) -> {run_dir}", flush=True)
    _clear_earlier_demo_run(run_dir)
    cfg, _ = resolve([
        "--recipe", "tiny", "--shards", str(shard_dir), "--out", str(run_dir), "--epochs", str(epochs),
        "--batch-size", str(batch_size), "--seed", str(seed), "--workers", "1", "--log-every", "25",
    ])  # fmt: skip
    result = Trainer(cfg).train()
    if result["stopped_early"]:
        raise Stopped(result["step"], result.get("stop_signal"))
    first, last = result["history"][0], result["history"][-1]
    print(f"[demo] loss {first['loss']:.3f} -> {last['loss']:.3f} over {result['step']} steps; teacher entropy "
          f"{last['teacher_entropy']:.2f} (ln K = {math.log(64):.2f})", flush=True)
    return run_dir / "encoder.pt"


def _synthetic_probe_set(n: int, seed: int, seconds: float):
    """A labelled synthetic split that pre-training never saw (another corpus seed)."""
    import numpy as np

    from shard_tools.synthetic import CLASSES, synth_clip

    waves, labels = [], []
    for i in range(n):
        w, label = synth_clip(i, seed=seed, seconds=seconds)
        waves.append(w)
        labels.append(CLASSES.index(label))
    return np.stack(waves), np.array(labels, dtype=np.int64), list(CLASSES)


def _embed(embedder, waves, batch: int = 50):
    import numpy as np
    import torch

    return np.concatenate([embedder(torch.from_numpy(waves[i:i + batch])) for i in range(0, len(waves), batch)])


def probe_step(encoder_path: Path, n: int, seed: int, seconds: float = 3.0) -> dict[str, float]:
    """Linear probe (the evaluation module's EVAR-style probe, 3 seeds) on the held-out synthetic split:
    70 % train (10 % of it carved for early stopping) / 30 % test, stratified by class."""
    import numpy as np

    from matpac_fast.evaluation.cli import CLI_DEFAULT_LR
    from matpac_fast.evaluation.embed import make_embedder
    from matpac_fast.evaluation.folds import Fold
    from matpac_fast.evaluation.probe import LinearProbeConfig, ProbeSettings, run_probes, summarize

    print(f"[demo] 4/5 linear probe on {n} held-out synthetic clips (corpus seed {seed})", flush=True)
    waves, y, classes = _synthetic_probe_set(n, seed, seconds)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in range(len(classes)):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(0.7 * len(idx)))
        train += idx[:cut].tolist()
        test += idx[cut:].tolist()
    fold = Fold("heldout", np.sort(np.array(train)), np.sort(np.array(test)))
    settings = ProbeSettings("linear", 3, LinearProbeConfig(lr=CLI_DEFAULT_LR))
    scores = {"chance": float(np.bincount(y[fold.test]).max() / len(fold.test))}
    for name, ckpt in (("logmel", "logmel"), ("random", "random"), ("pretrained", str(encoder_path))):
        X = _embed(make_embedder(ckpt, preset="tiny", seed=seed), waves)
        scores[name] = summarize(run_probes(X, y, [fold], len(classes), False, settings, seed=0, progress=False))[0]
        print(f"[demo]   {name:<10} {100 * scores[name]:.1f}%", flush=True)
    return scores


def fsdd_step(encoder_path: Path, fsdd: Path, out: Path) -> dict[str, float]:
    """FSDD 10-way digits, official split, with the evaluation CLI (real 8 kHz speech, not seen in training)."""
    import numpy as np

    from matpac_fast.evaluation.cli import build_parser, run
    from matpac_fast.evaluation.datasets import load_dataset
    from matpac_fast.evaluation.folds import make_folds

    print(f"[demo] 5/5 FSDD ({fsdd}) official split", flush=True)
    ds = load_dataset(fsdd)
    test = make_folds(ds, "official")[0].test
    scores = {"chance": float(np.bincount(ds.targets()[test]).max() / len(test))}
    for name, ckpt in (("logmel", "logmel"), ("random", "random"), ("pretrained", str(encoder_path))):
        a = build_parser().parse_args([
            "--checkpoint", ckpt, "--data", str(fsdd), "--preset", "tiny", "--out", str(out / "eval_fsdd"),
            "--seeds", "1", "--quiet", "--no-cache", "--projection", "none", "--device", "cpu",
        ])  # fmt: skip
        scores[name] = run(a)["mean"]
        print(f"[demo]   {name:<10} {100 * scores[name]:.1f}%", flush=True)
    return scores


def _check_fsdd(fsdd: Path) -> None:
    """SystemExit (one line) unless `fsdd` reads as FSDD with its official split (what fsdd_step evaluates)."""
    import warnings

    from matpac_fast.evaluation.datasets import load_dataset
    from matpac_fast.evaluation.folds import make_folds

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a layout warning is for matpac-eval's --data; the error below says it
            make_folds(load_dataset(fsdd), "official")
    except ValueError as e:
        why = str(e).removeprefix(f"--data {fsdd}: ").removeprefix(f"{fsdd}: ").split("; use --folds")[0]
        raise SystemExit(f"demo: --fsdd {fsdd} is not the Free Spoken Digit Dataset with its official split ({why}); "
                         "give its folder (recordings/ or labels.csv) or --skip-fsdd") from None


TABLE_HEADER = "| encoder | held-out synthetic (10 classes) | FSDD digits (official split) |"


def _first_line(path: Path) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline(len(TABLE_HEADER) + 2).rstrip("\n")
    except OSError:
        return ""


def format_table(synth: dict[str, float], fsdd: dict[str, float] | None, fsdd_note: str = "no ../shared") -> str:
    """The demo's table; `fsdd_note` says why the FSDD column is empty when `fsdd` is None."""
    rows = [TABLE_HEADER, "|---|---|---|"]
    names = {"chance": "chance", "logmel": "raw log-mel baseline", "random": "random-init encoder (tiny)",
             "pretrained": "pre-trained encoder (tiny, this demo)"}
    for key, label in names.items():
        f = f"{100 * fsdd[key]:.1f}%" if fsdd else f"n/a ({fsdd_note})"
        rows.append(f"| {label} | {100 * synth[key]:.1f}% | {f} |")
    return "\n".join(rows)


def default_fsdd() -> Path | None:
    p = Path(__file__).resolve().parents[2] / "shared" / "data" / "fsdd"
    return p if (p / "labels.csv").exists() else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m matpac_fast.demo",
        description="The embedded default, end to end on CPU: a deterministic labelled synthetic corpus -> log-mel "
        "shards -> verify -> pre-train the tiny MATPAC preset -> linear probe on a held-out synthetic split (and on "
        "FSDD when ../shared/data/fsdd exists) -> a table of chance, raw log-mel, random-init and pre-trained "
        "encoders. Last line: RESULT demo chance=... logmel=... random=... pretrained=...",
    )
    p.add_argument("--out", type=path_arg, default=Path("runs/demo"), help="run folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=2000, help="pre-training clips, 6.5 s each (default: %(default)s)")
    p.add_argument("--probe-n", type=int, default=600, help="held-out labelled clips (default: %(default)s)")
    p.add_argument("--epochs", type=float, default=24.0, help="pre-training epochs (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="pre-training batch (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="corpus, shuffle and init seed (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="make-shards processes (default: all usable cores)")
    p.add_argument("--fsdd", type=path_arg, default=default_fsdd(), help="FSDD root (default: ../shared/data/fsdd)")
    p.add_argument("--skip-fsdd", action="store_true", help="do not evaluate on FSDD")
    args = p.parse_args(argv)
    if args.n < 1 or args.probe_n < 20:
        raise SystemExit("demo: --n must be >= 1 and --probe-n >= 20")
    # Checked before any work: these failed at pre-training (stage 3) or, for --fsdd, after it (stage 5, ~5 min in),
    # in the words of options the demo does not have (--warmup-epochs, --data, --folds).
    if not (math.isfinite(args.epochs) and args.epochs >= 1):
        raise SystemExit(f"demo: --epochs {args.epochs:g}: give a number >= 1 (the tiny recipe warms the learning "
                         "rate up over its first epoch)")
    if args.batch_size < 1 or (args.workers is not None and args.workers < 0):
        raise SystemExit("demo: --batch-size must be >= 1 and --workers >= 0")
    if args.fsdd is not None and not args.skip_fsdd:
        _check_fsdd(args.fsdd)
    again = "run the same command again to start over (finished shards are kept; pre-training starts afresh)"
    try:
        return _run(args)
    except KeyboardInterrupt:  # "\n": a progress bar may be half-way through its line
        print(f"\ndemo: interrupted: no table; {again}", file=sys.stderr, flush=True)
        return INTERRUPTED
    except Stopped as e:
        print(f"demo: {e} (its checkpoint is written): no table from a part-trained encoder; {again}",
              file=sys.stderr, flush=True)
        return e.exit_code


def _run(args: argparse.Namespace) -> int:
    # One intra-op thread: the loader worker needs the other core, and on 2 cores two OpenMP threads per process
    # made the tiny model's step several times slower (measured: ~1 s vs ~0.2 s per step at batch 32).
    with held_ctrl_c():  # a Ctrl-C half-way through torch's import could abort the process: handled after it
        import torch

    torch.set_num_threads(1)
    # An earlier run's table goes first: beside this run's encoder, should this run stop, it would read as its result.
    # Only the demo's own: another results.md (matpac-eval's) is refused, before any work, as matpac-eval refuses
    # the demo's. An --out that is a file: shards_step says so in one line.
    table = args.out / "results.md"
    if args.out.is_dir() and (table.exists() or table.is_symlink()):
        if not table.is_file() or _first_line(table) != TABLE_HEADER:
            raise SystemExit(f"demo: --out {args.out} holds a results.md that the demo did not write; choose another "
                             "--out (or move that file away)")
        table.unlink()
    shard_dir = args.out / "shards"
    try:
        shards_step(shard_dir, args.n, args.seed, args.workers)
    except ValueError as e:
        raise SystemExit(f"demo: {e}") from None
    verify_step(shard_dir)
    try:
        encoder = pretrain_step(shard_dir, args.out / "train", args.epochs, args.batch_size, args.seed)
    except ValueError as e:
        raise SystemExit(f"demo: {e}") from None
    synth = probe_step(encoder, args.probe_n, seed=args.seed + 1000)
    fsdd = None
    if args.fsdd is not None and not args.skip_fsdd:
        fsdd = fsdd_step(encoder, args.fsdd, args.out)
    table = format_table(synth, fsdd, "--skip-fsdd" if args.skip_fsdd else "no ../shared")
    (args.out / "results.md").write_text(table + "\n")
    print(table)
    print(f"[demo] table: {args.out / 'results.md'}; encoder: {encoder}")
    print("RESULT demo " + " ".join(f"{k}={synth[k]:.4f}" for k in ("chance", "logmel", "random", "pretrained")))
    return 0


if __name__ == "__main__":
    run_main(main)  # after a Ctrl-C the process ends by SIGINT: `make demo` in a script stops there too
