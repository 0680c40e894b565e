"""`make-shards`: any audio corpus -> WebDataset log-mel shards (see docs/CONTRACTS.md for the format)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn

from matpac_fast.cli_args import path_arg, usable_cpus
from matpac_fast.interrupts import INTERRUPTED, TERMINATED, Terminated, held_ctrl_c, run_main, sigterm_as_interrupt
from shard_tools.discover import (
    discover_audioset,
    discover_folder,
    discover_manifest,
    discover_synthetic,
)

if TYPE_CHECKING:
    from shard_tools.pipeline import MakeConfig

DESCRIPTION = """\
Convert an audio corpus into WebDataset tar shards of float16 log-mel spectrograms (80 x T, the whole clip),
each with its index file (<shard>.tar.idx: where each clip lies, so the loader need not read every tar header),
plus sizes.json, stats.json (front end, global mean/std, counts) and manifest.jsonl (one line per input file:
its key and shard and any flags, or why it was skipped). A WAV, AIFF, W64 or RF64 file that ends before the size
its header declares (an interrupted download or copy) is kept as far as it goes, with the flag 'truncated'. Clips
are shuffled across shards with --seed; the same inputs and seed give byte-identical shards for any --workers. An
interrupted run (even SIGKILL) is finished by running the same command again. A run in which every input is
skipped writes only manifest.jsonl and exits with an error that says why (by skip reason) and what to do.

examples:
  make-shards synthetic --n 2000 --out data/synth
  make-shards audioset --segments balanced_train_segments.csv unbalanced_train_segments.csv \\
      --class-index class_labels_indices.csv --audio-root /data/audioset --out data/as2m
  make-shards folder /data/esc50_by_class --out data/esc --short pad
  make-shards manifest files.csv --out data/mine
  verify-shards data/as2m
"""


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common options")
    g.add_argument("--out", required=True, type=path_arg, help="output folder (created if missing)")
    g.add_argument(
        "--workers", type=int, default=usable_cpus(),
        help="decode/log-mel processes (default: all %(default)s usable cores; 0 or 1 = in this process)",
    )
    g.add_argument("--device", default="cpu", help="where the log-mel is computed: cpu (default) or cuda")
    g.add_argument(
        "--frontend", default="matpac", choices=["matpac", "m2d"],
        help="front-end preset (METHOD.md §1): matpac (the MATPAC authors' log-mel) or m2d (M2D's) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--min-frames", type=int, default=608,
        help="clips with fewer log-mel frames are skipped as too_short unless --short is pad (the m2d default) "
        "(default: %(default)s = one training crop, about 6.1 s)",
    )
    g.add_argument(
        "--short", choices=["drop", "pad"], default=None,
        help="drop: skip clips shorter than --min-frames as too_short; pad: keep every clip of at least one frame, "
        "the loader pads it (m2d: the waveform is first zero-padded to 6.1 s, as M2D's wav_to_lms.py does, flag "
        "'padded'). Default: each front end's authors' choice (matpac: drop; m2d: pad)",
    )
    g.add_argument(
        "--shard-size", default="1GB",
        help="close a shard at this size: bytes with a unit (1GB, 200MB, 512KB) or a sample count (1000) "
        "(default: %(default)s)",
    )
    g.add_argument(
        "--seed", type=int, default=0, help="shuffle seed (and synthetic corpus seed), a whole number >= 0 (default: 0)"
    )
    g.add_argument(
        "--name", default="shards",
        help="shard file prefix: <name>-000000.tar; letters, digits, _ and - only (default: %(default)s)",
    )
    g.add_argument(
        "--overwrite", action="store_true",
        help="first delete what make-shards wrote in --out before (the shards its sets list, under any --name; "
        "sizes.json, stats.json, manifest.jsonl, .make-shards/) and any <name>-NNNNNN.tar of this --name, which it "
        "would overwrite; other files are never touched",
    )
    g.add_argument("--no-progress", action="store_true",
                   help="no progress on stderr (the bar over the files, and the file counter of an input scan that "
                        "takes more than 2 s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-shards", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{audioset,folder,manifest,synthetic}")
    a = sub.add_parser(
        "audioset",
        help="AudioSet: labels from the segment CSVs, audio from a download folder (any common layout)",
        description="Labels and splits come from the CSVs, never from folder names. Accepted file names under "
        "--audio-root (any depth, also per-label folders; duplicates are skipped as 'duplicate'): Y<ytid>.<ext>, "
        "<ytid>.<ext>, <ytid>_<start>.<ext>, <ytid>_<start>-<end>.<ext>, <ytid>_<start ms>_<end ms>.<ext> "
        "(audiosetdl), audio/<split>/<ytid>.<ext>. "
        "A file holding the whole video is cut to the CSV segment (flag 'cropped'). One shorter than its segment "
        "by more than 0.5 s gets the flag 'truncated' and is treated like any clip: written if it has at least "
        "--min-frames frames, else --short decides (drop: skipped as too_short; pad: written). The count of CSV "
        "segments without a file is printed at the start and in the final summary, and stored in stats.json.",
    )
    a.add_argument(
        "--segments", nargs="+", required=True, type=path_arg, help="segment CSV(s), e.g. balanced_train_segments.csv"
    )
    a.add_argument("--class-index", required=True, type=path_arg, help="class_labels_indices.csv")
    a.add_argument("--audio-root", required=True, type=path_arg, help="folder holding the downloaded clips")
    _common(a)
    f = sub.add_parser("folder", help="every audio file under DIR; label = name of the folder that holds it "
                       "(no label for files directly in DIR)")
    f.add_argument("dir", type=path_arg, help="input folder")
    _common(f)
    m = sub.add_parser(
        "manifest",
        help="a UTF-8 CSV with a header row and columns path[,label] (labels separated by ';'; a file or filename "
        "column stands for path); a file listed twice is written once",
    )
    m.add_argument("csv", type=path_arg, help="manifest CSV; relative paths are relative to its folder; a path "
                   "cell is used as written when that file exists, else without its leading and trailing spaces")
    _common(m)
    s = sub.add_parser("synthetic", help="the embedded deterministic labelled corpus of synthetic sounds")
    s.add_argument("--n", type=int, required=True, help="number of clips (6.5 s each, 10 classes)")
    _common(s)
    return parser


def discover(args: argparse.Namespace):
    if args.source == "audioset":
        return discover_audioset(args.segments, args.class_index, args.audio_root, not args.no_progress)
    if args.source == "folder":
        return discover_folder(args.dir, not args.no_progress)
    if args.source == "manifest":
        return discover_manifest(args.csv)
    return discover_synthetic(args.n, args.seed)


def config_from_args(args: argparse.Namespace) -> MakeConfig:
    from shard_tools.pipeline import MakeConfig

    return MakeConfig(
        out=args.out,
        frontend=args.frontend,
        workers=args.workers,
        device=args.device,
        min_frames=args.min_frames,
        short=args.short,
        shard_size=args.shard_size,
        seed=args.seed,
        name=args.name,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with held_ctrl_c():  # torch's import: a Ctrl-C in it is handled (below) once it is done, not inside it
            from shard_tools.pipeline import format_summary, make_shards

        with sigterm_as_interrupt():  # after torch's import: raised inside it, an interrupt could abort the process
            cfg = config_from_args(args)
            cfg.validate()  # before discovery: a wrong option should not wait for a two-million-file scan
            disc = discover(args)
            for note in disc.notes:
                print(f"make-shards: {note}", file=sys.stderr)
            summary = make_shards(disc, cfg)
    except ValueError as e:
        raise SystemExit(f"make-shards: error: {e}") from None
    except RuntimeError as e:
        from shard_tools.pipeline import WorkerDied

        if not isinstance(e, WorkerDied):
            raise
        raise SystemExit(f"make-shards: error: {e}") from None
    except OSError as e:  # disk full, permissions, a folder that vanished: the journal keeps the work done so far
        where = f": {e.filename}" if e.filename else ""
        raise SystemExit(
            f"make-shards: error: {e.strerror or e}{where}; fix that and run the same command again to finish"
        ) from None
    except Terminated:  # SIGTERM (a job scheduler's time limit, `timeout`, `kill`): as a Ctrl-C, with its own status
        print("make-shards: stopped by SIGTERM; run the same command again to finish the job", file=sys.stderr)
        raise SystemExit(TERMINATED) from None
    except KeyboardInterrupt:  # the worker pool is already stopped; completed shards are journaled
        print("make-shards: interrupted; run the same command again to finish the job", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None  # 128 + SIGINT, as a shell reports a Ctrl-C
    print(format_summary(summary))
    return 0


def command() -> NoReturn:
    """The `make-shards` console script: main(), then the process ends as interrupts.run_main says (after a Ctrl-C,
    by SIGINT, so that a shell script running it stops too)."""
    run_main(main)


if __name__ == "__main__":
    command()
