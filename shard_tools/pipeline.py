"""The make-shards engine: plan -> ordered parallel decode/log-mel -> deterministic shards -> journal -> summary files.

Determinism and resumability come from one rule: the output is a pure function of the (seeded) input order.
* Inputs are discovered in sorted order, shuffled with `seed`, and processed by an *ordered* parallel map, so the
  sample sequence never depends on worker count or timing; each clip's log-mel is computed alone with one thread.
* A shard closes after the sample that makes it full, so shard k+1 always starts at the input position right after
  shard k. When a shard is renamed from `.tar.tmp` to `.tar`, one line is appended (and fsynced) to
  `OUT/.make-shards/journal.jsonl` with the input range it covers, its manifest lines and its statistics sums.
* After a kill (SIGKILL included), the same command reads the plan hash and the journal, drops any `.tmp`, and
  restarts at the first input after the last journaled shard. Because that is exactly where the uninterrupted run
  started that shard, the output is byte-identical. Totals and stats.json are always summed from the journal in
  shard order, so they are identical too.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from matpac_fast.frontend import FrontendSpec, LogMelSpec, get_spec
from shard_tools.decode import Prepared, Skip, prepare
from shard_tools.discover import Discovery, Item
from shard_tools.writer import ShardLimit, ShardWriter, encode_json, encode_npy, parse_shard_size

FORMAT_VERSION = 1
WORK_DIR = ".make-shards"


def tool_version() -> str:
    from matpac_fast import __version__

    return f"matpac-fast {__version__}"


@dataclass(frozen=True)
class MakeConfig:
    out: Path
    frontend: str = "matpac"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    device: str = "cpu"
    min_frames: int = 608
    short: str = "drop"  # "drop": skip clips below min_frames (the authors); "pad": keep them, the loader pads
    shard_size: str = "1GB"
    seed: int = 0
    name: str = "shards"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        get_spec(self.frontend)
        parse_shard_size(self.shard_size)
        if self.short not in ("drop", "pad"):
            raise ValueError(f"--short must be 'drop' or 'pad' (got {self.short!r})")
        if self.min_frames < 1:
            raise ValueError(f"--min-frames must be >= 1 (got {self.min_frames})")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0 (got {self.workers})")
        if not self.name or any(c in self.name for c in "./\\") or "%" in self.name:
            raise ValueError(f"--name {self.name!r}: use letters, digits, '_' or '-' (no dots or slashes)")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda (got {self.device!r})")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(
                "--device cuda: CUDA is not available (torch.cuda.is_available() is False); use --device cpu"
            )


@dataclass
class Result:
    """What the writer needs for one input: a sample (members + sums) or a skip reason."""

    source: str
    key: str
    skipped: str | None = None
    detail: str = ""
    members: dict[str, bytes] | None = None
    n_frames: int = 0
    value_sum: float = 0.0
    value_sumsq: float = 0.0
    seconds: float = 0.0
    flags: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------- per-item processing
def featurize(item: Item, prep: Prepared, mel: LogMelSpec, device: str) -> Result:
    x = torch.from_numpy(prep.wave)[None].to(device)
    lms = mel(x)[0].to(torch.float16).cpu().numpy()  # (80, T): stored as float16, the whole clip
    if not np.isfinite(lms).all():
        return Result(item.source, item.key, skipped="non_finite", detail="log-mel not finite")
    values = lms.astype(np.float64)  # statistics of exactly the values the loader will read
    spec = mel.spec
    meta = {
        "key": item.key,
        "source": item.source,
        "ytid": item.ytid,
        "start": item.start,
        "end": item.end,
        "labels": list(item.labels),
        "label_indices": list(item.label_indices),
        "source_sr": prep.source_sr,
        "duration": round(prep.duration, 6),
        "n_frames": int(lms.shape[1]),
        "flags": list(prep.flags),
    }
    return Result(
        item.source,
        item.key,
        members={"npy": encode_npy(lms), "json": encode_json(meta)},
        n_frames=int(lms.shape[1]),
        value_sum=float(values.sum()),
        value_sumsq=float(np.square(values).sum()),
        seconds=prep.wave.shape[0] / spec.sample_rate,
        flags=prep.flags,
    )


def _skip_result(item: Item, e: Skip) -> Result:
    detail = str(e)
    if item.path:  # keep outputs free of absolute paths (they differ between machines)
        detail = detail.replace(item.path, item.source)
    return Result(item.source, item.key, skipped=e.reason, detail=detail)


def process_item(item: Item, spec: FrontendSpec, min_frames: int, short: str, mel: LogMelSpec | None):
    """CPU path: Result. GPU path (mel is None): (item, Prepared) for the main process to featurize, or a Result."""
    try:
        prep = prepare(item, spec, min_frames, short)
    except Skip as e:
        return _skip_result(item, e)
    except Exception as e:  # a bug or an exotic failure must not stop the run: record it as undecodable
        return _skip_result(item, Skip("undecodable", f"{type(e).__name__}: {e}"))
    if mel is None:
        return item, prep
    return featurize(item, prep, mel, "cpu")


_WORKER: dict = {}


def _init_worker(frontend: str, min_frames: int, short: str, cpu_mel: bool) -> None:
    torch.set_num_threads(1)  # one clip per process: threads would only fight, and results must not depend on them
    spec = get_spec(frontend)
    _WORKER.update(spec=spec, min_frames=min_frames, short=short, mel=LogMelSpec(spec) if cpu_mel else None)


def _work(item: Item):
    w = _WORKER
    return process_item(item, w["spec"], w["min_frames"], w["short"], w["mel"])


def ordered_results(items: list[Item], cfg: MakeConfig) -> Iterator[Result]:
    """Results in input order, computed by `cfg.workers` processes (0 or 1: in this process)."""
    spec = get_spec(cfg.frontend)
    on_gpu = cfg.device.startswith("cuda")
    gpu_mel = LogMelSpec(spec).to(cfg.device) if on_gpu else None
    if cfg.workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            mel = None if on_gpu else LogMelSpec(spec)
            for item in items:
                yield _finish(process_item(item, spec, cfg.min_frames, cfg.short, mel), gpu_mel, cfg.device)
        finally:
            torch.set_num_threads(threads)
        return
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock; spawn is always safe
    with ctx.Pool(cfg.workers, _init_worker, (cfg.frontend, cfg.min_frames, cfg.short, not on_gpu)) as pool:
        for out in pool.imap(_work, items, chunksize=2):
            yield _finish(out, gpu_mel, cfg.device)


def _finish(out, gpu_mel: LogMelSpec | None, device: str) -> Result:
    if isinstance(out, Result):
        return out
    item, prep = out
    return featurize(item, prep, gpu_mel, device)


# ----------------------------------------------------------------------------------------------------- plan/journal
def shuffled(items: list[Item], seed: int) -> list[Item]:
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def plan_hash(disc: Discovery, cfg: MakeConfig) -> str:
    """Everything that determines the output bytes; a resume with a different hash is refused."""
    h = hashlib.sha256()
    settings = {
        "format_version": FORMAT_VERSION,
        "frontend": get_spec(cfg.frontend).numerics(),
        "device": "cuda" if cfg.device.startswith("cuda") else "cpu",
        "min_frames": cfg.min_frames,
        "short": cfg.short,
        "shard_size": str(parse_shard_size(cfg.shard_size)),
        "seed": cfg.seed,
        "name": cfg.name,
        "classes": disc.class_ids,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for it in disc.items:
        row = [it.source, it.key, it.labels, it.label_indices, it.size, it.skip, it.start, it.end, it.synth]
        h.update(json.dumps(row).encode() + b"\n")
    return h.hexdigest()


def read_journal(path: Path) -> list[dict]:
    """Complete lines only: a kill during an append leaves a partial last line, which is dropped."""
    if not path.exists():
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):
                break
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return entries


def _valid_prefix(entries: list[dict], out: Path) -> list[dict]:
    """Journaled shards whose file is still there with the journaled size (a user may have deleted one)."""
    ok = []
    for e in entries:
        if e["shard"] is not None:
            p = out / e["shard"]
            if not p.is_file() or p.stat().st_size != e["bytes"]:
                break
        ok.append(e)
    return ok


def _append_line(path: Path, obj: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(obj, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _our_shards(out: Path, name: str) -> list[Path]:
    return sorted(list(out.glob(f"{name}-[0-9]*.tar")) + list(out.glob(f"{name}-[0-9]*.tar.tmp")))


def _clear(out: Path, name: str) -> None:
    for p in _our_shards(out, name):
        p.unlink()
    for f in ("sizes.json", "stats.json", "manifest.jsonl"):
        (out / f).unlink(missing_ok=True)
    work = out / WORK_DIR
    if work.is_dir():
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


# ------------------------------------------------------------------------------------------------------------- run
class _Segment:
    """Accumulates one journal entry: the inputs from `start` up to the end of one shard."""

    def __init__(self, start: int):
        self.start = start
        self.manifest: list[dict] = []
        self.sum = self.sumsq = self.seconds = 0.0
        self.n_frames = 0
        self.min_clip_frames: int | None = None

    def add(self, r: Result, shard: str | None) -> None:
        if r.skipped:
            line = {"source": r.source, "skipped": r.skipped}
            if r.detail and r.detail != r.skipped:
                line["detail"] = r.detail
            self.manifest.append(line)
            return
        line = {"source": r.source, "key": r.key, "shard": shard}
        if r.flags:
            line["flags"] = list(r.flags)
        self.manifest.append(line)
        self.sum += r.value_sum
        self.sumsq += r.value_sumsq
        self.seconds += r.seconds
        self.n_frames += r.n_frames
        self.min_clip_frames = r.n_frames if self.min_clip_frames is None else min(self.min_clip_frames, r.n_frames)

    def entry(self, end: int, shard: str | None, count: int, n_bytes: int, sha: str | None) -> dict:
        return {
            "start": self.start,
            "end": end,
            "shard": shard,
            "count": count,
            "bytes": n_bytes,
            "sha256": sha,
            "sum": self.sum,
            "sumsq": self.sumsq,
            "seconds": self.seconds,
            "n_frames": self.n_frames,
            "min_clip_frames": self.min_clip_frames,
            "manifest": self.manifest,
        }


def _run_segments(order: list[Item], start: int, shard_index: int, cfg: MakeConfig, journal: Path) -> None:
    limit: ShardLimit = parse_shard_size(cfg.shard_size)
    from tqdm import tqdm

    bar = tqdm(
        total=len(order), initial=start, unit="file", desc="make-shards", file=sys.stderr,
        disable=not cfg.progress, dynamic_ncols=True, smoothing=0.05,
    )
    seg, writer, pos = _Segment(start), None, start
    counts = Counter()
    try:
        for r in ordered_results(order[start:], cfg):
            if r.skipped:
                seg.add(r, None)
                counts["skipped"] += 1
            else:
                if writer is None:
                    writer = ShardWriter(cfg.out, cfg.name, shard_index)
                writer.add(r.key, r.members)
                seg.add(r, writer.final.name)
                counts["written"] += 1
            pos += 1
            bar.update(1)
            if pos % 64 == 0:
                bar.set_postfix(counts, refresh=False)
            if writer is not None and limit.full(writer.n_bytes, writer.count):
                path, n_bytes, sha = writer.close()
                _append_line(journal, seg.entry(pos, path.name, writer.count, n_bytes, sha))
                writer, seg, shard_index = None, _Segment(pos), shard_index + 1
        if writer is not None:
            path, n_bytes, sha = writer.close()
            _append_line(journal, seg.entry(pos, path.name, writer.count, n_bytes, sha))
            writer = None
        elif seg.manifest:
            _append_line(journal, seg.entry(pos, None, 0, 0, None))
    finally:
        bar.close()
        if writer is not None:  # interrupted (Ctrl-C, error): leave no half shard under its final name
            writer.abort()


def _finalize(disc: Discovery, cfg: MakeConfig, entries: list[dict], phash: str) -> dict:
    spec = get_spec(cfg.frontend)
    out = cfg.out
    shards = [e for e in entries if e["shard"] is not None]
    manifest = [line for e in entries for line in e["manifest"]]
    skipped = Counter(line["skipped"] for line in manifest if "skipped" in line)
    flags = Counter(f for line in manifest for f in line.get("flags", []))
    written = sum(e["count"] for e in shards)
    total, total_sq, frames, seconds = 0.0, 0.0, 0, 0.0
    for e in shards:  # always in shard order: the same floating-point sums whether or not the run was resumed
        total += e["sum"]
        total_sq += e["sumsq"]
        frames += e["n_frames"]
        seconds += e["seconds"]
    n_values = frames * spec.n_mels
    mean = total / n_values if n_values else 0.0
    std = float(np.sqrt(max(total_sq / n_values - mean * mean, 0.0))) if n_values else 0.0
    mins = [e["min_clip_frames"] for e in shards if e["min_clip_frames"] is not None]
    stats = {
        "format_version": FORMAT_VERSION,
        "frontend": spec.to_dict(),
        "mean": mean,
        "std": std,
        "n_clips": written,
        "n_frames": frames,
        "hours": seconds / 3600,
        "min_frames": cfg.min_frames,
        "min_clip_frames": min(mins) if mins else None,
        "short": cfg.short,
        "classes": disc.classes,
        "class_ids": disc.class_ids,
        "inputs": len(manifest),
        "written": written,
        "skipped": dict(sorted(skipped.items())),
        "flags": dict(sorted(flags.items())),
        "tool_version": tool_version(),
        "plan_hash": phash,
        "shard_sha256": {e["shard"]: e["sha256"] for e in shards},
    }
    if stats["inputs"] != len(disc.items) or written + sum(skipped.values()) != len(disc.items):
        raise RuntimeError(f"internal error: accounted {stats['inputs']} of {len(disc.items)} inputs")
    keep = {e["shard"] for e in shards}
    for p in _our_shards(out, cfg.name):  # leftovers of an older, longer run under the same name
        if p.name not in keep:
            p.unlink()
    _write_atomic(out / "sizes.json", json.dumps({e["shard"]: e["count"] for e in shards}, indent=1) + "\n")
    _write_atomic(out / "manifest.jsonl", "".join(json.dumps(line, sort_keys=True) + "\n" for line in manifest))
    _write_atomic(out / "stats.json", json.dumps(stats, indent=1) + "\n")  # last: its presence means "complete"
    return stats


def make_shards(disc: Discovery, cfg: MakeConfig) -> dict:
    """Run (or resume, or recognise as done) one shard job. Returns stats.json's dict plus run facts."""
    cfg.validate()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    work = out / WORK_DIR
    phash = plan_hash(disc, cfg)
    stats_path, plan_path, journal = out / "stats.json", work / "plan.json", work / "journal.jsonl"
    if cfg.overwrite:
        _clear(out, cfg.name)
    if stats_path.exists():
        old = json.loads(stats_path.read_text(encoding="utf-8"))
        if old.get("plan_hash") == phash:
            if work.is_dir():  # killed after stats.json was written, before the clean-up
                _clear_work(work)
            return {**old, "out": str(out), "resumed_from": len(disc.items), "already_complete": True}
        raise ValueError(f"{out} already holds a different shard set; choose another --out or pass --overwrite")
    if plan_path.exists():
        if json.loads(plan_path.read_text(encoding="utf-8")).get("plan_hash") != phash:
            raise ValueError(
                f"{out} holds an interrupted run with other inputs or options; rerun that exact command to finish "
                f"it, choose another --out, or pass --overwrite"
            )
    elif _our_shards(out, cfg.name):
        raise ValueError(f"{out} already has {cfg.name}-*.tar files from an unknown run; pass --overwrite or --out")
    else:
        work.mkdir(exist_ok=True)
        _write_atomic(plan_path, json.dumps({"plan_hash": phash, "inputs": len(disc.items)}) + "\n")
    for p in out.glob(f"{cfg.name}-[0-9]*.tar.tmp"):  # a shard the killed run was writing
        p.unlink()
    entries = _valid_prefix(read_journal(journal), out)
    if len(entries) != len(read_journal(journal)):  # rewrite the journal without the entries we cannot trust
        _write_atomic(journal, "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries))
    start = entries[-1]["end"] if entries else 0
    shard_index = sum(1 for e in entries if e["shard"] is not None)
    order = shuffled(disc.items, cfg.seed)
    if start < len(order):
        _run_segments(order, start, shard_index, cfg, journal)
    stats = _finalize(disc, cfg, read_journal(journal), phash)
    _clear_work(work)
    return {**stats, "out": str(out), "resumed_from": start, "already_complete": False}


def _clear_work(work: Path) -> None:
    for p in work.iterdir():
        p.unlink()
    work.rmdir()


def format_summary(s: dict) -> str:
    skipped = s["skipped"]
    parts = [
        f"inputs {s['inputs']}  written {s['written']}  skipped {sum(skipped.values())}"
        + (" (" + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")" if skipped else ""),
    ]
    if s.get("flags"):
        parts.append("flags (kept): " + ", ".join(f"{k} {v}" for k, v in s["flags"].items()))
    parts.append(
        f"shards {len(s['shard_sha256'])} in {s['out']}  hours {s['hours']:.3f}  frames {s['n_frames']}  "
        f"log-mel mean {s['mean']:.4f} std {s['std']:.4f}"
    )
    if s.get("already_complete"):
        parts.insert(0, "already complete (same inputs and options): nothing to do")
    elif s.get("resumed_from"):
        parts.insert(0, f"resumed an interrupted run at input {s['resumed_from']}")
    return "\n".join(parts)
