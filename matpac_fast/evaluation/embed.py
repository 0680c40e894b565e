"""Clip embeddings in batches, with a progress bar and an on-disk cache.

Embedders (`make_embedder`):
  logmel   built-in baseline, no learning: the normalised log-mel (MATPAC front end, (x + 7.056) / 4.193) of the
           clip, then per mel bin the mean and the standard deviation over time -> 160-d. It shows what a probe
           gets from the spectrum alone; a pre-trained encoder should beat it.
  random   the MATPAC encoder (`--preset`) with random initial weights (seeded): the architecture's prior.
  PATH     a checkpoint: this project's training checkpoint / exported encoder, or the authors' released weights,
           loaded by `matpac_fast.encoder.load_encoder` (imported lazily, so the logmel baseline needs no model).
An encoder embeds with the front end it was trained on (`Encoder.frontend`: the run's, or m2d for an M2D model):
the embedder's `spec` decides the resampler used here and the log-mel inside the encoder.

Audio: soundfile decode (m4a/webm/aac/mp4/mka/mkv with PyAV, as make-shards does) -> mono (mean of channels) ->
16 kHz (the front end's resampler: Kaiser for matpac, soxr HQ for m2d) -> crop from the start / zero-pad at the end
to exactly `clip_seconds` (a fixed length keeps batches rectangular; each task has its own length: FSDD 1 s, ESC-50
5 s, US8K 4 s, GTZAN 30 s). Only the first `clip_seconds` + 1 s of a file are decoded, so an hour-long recording costs
what its clip costs (the clip is the same, bit for bit, as the one cut from the whole file). How many clips were
longer (and so cropped) is reported by `extract` (`Extracted.n_cropped`); the CLI prints it in one note.

A file that cannot be used (unknown format, empty, truncated, no samples, NaN/inf samples) is skipped, not
fatal: `extract` returns which clips were embedded and why the others were not; the caller reports them.

Names: a checkpoint file is named `<stem>-<sha8>` (the first 8 hex digits of its SHA-256), with the nearest
informative folder in front of a generic stem: runs/u/encoder.pt -> `u-encoder-1a2b3c4d`, so two runs' encoder.pt
files never share a name (or a results row); a training run folder is named and identified as the encoder.pt it
loads (runs/u -> `u-encoder-1a2b3c4d`, one row for both spellings; a checkpoint folder runs/u/checkpoints/step_9 is
its own checkpoint, named `u-step_9-<sha8>`); `random-<preset>` (plus `-seed<N>` for N != 0); `logmel`.
Identities: `logmel:v1:matpac`; `random:<preset>:seed<N>` (+ `:<front end>` when not matpac); `ckpt:<sha256>:<preset>`
(+ `:<sha8 of Encoder.settings()>` when the front end is not matpac, or when a run config or saved config gives
settings other than `--preset` alone would: a config that changes nothing keeps the plain identity).

Cache: `<cache_dir>/<task>-<embedder>-<key16>.npz` holding `emb` (n_ok, D) float32, `paths` (n,), `ok` (n,) bool,
`reasons` (n,) (why a clip was skipped, "" if embedded) and `lengths` (n,) (samples at 16 kHz before the crop, 0 if
skipped; older entries lack it); the key hashes the embedder identity (above), the data (file paths, sizes,
mtimes), clip seconds, sample rate and this module's version. Loaded with allow_pickle=False; an unreadable or
inconsistent entry is reported, deleted and recomputed. The folder is bounded (`ExtractSettings.cache_max_bytes`,
matpac-eval's --cache-max-gb, default 10 GB): after each extraction the least recently used entries (an entry's mtime:
when it was written or last read) are removed until the folder's entries fit, never the entry of this extraction.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from matpac_fast.evaluation.datasets import LabelledSet
from matpac_fast.frontend import FrontendSpec, LogMelSpec, check_kaiser_rate, get_spec, normalize, resample, to_mono
from matpac_fast.safe_files import create_new

EMBED_VERSION = 1
SAMPLE_RATE = 16000
# The cache folder's bound: the key holds the data files' times, so re-downloading or touching a dataset adds a whole
# new entry (tens to hundreds of MB for a ViT-B over a few thousand clips), and the folder grew without end.
CACHE_MAX_GB = 10.0
CACHE_ENTRY = re.compile(r"-[0-9a-f]{16}\.npz$")  # `cache_path`'s names; a writer's `.<pid>.tmp.npz` does not match


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/matpac_fast/embeddings, else ~/.cache/matpac_fast/embeddings. A relative XDG_CACHE_HOME is
    ignored, as the XDG base directory spec says: it was used as given, so the cache moved with the working
    directory."""
    return Path(xdg_cache_home() or os.path.join(os.path.expanduser("~"), ".cache")) / "matpac_fast" / "embeddings"


def xdg_cache_home() -> str | None:
    """XDG_CACHE_HOME when it is set to an absolute path, else None."""
    base = os.environ.get("XDG_CACHE_HOME")
    return base if base and os.path.isabs(base) else None


# The last resampler whose kernel is too large for make-shards' cache (a rate sharing few factors with 16 kHz: 690 MB
# for 11,127 Hz): kept here alone, since an evaluation runs in one process and a dataset usually has one such rate
# (an lru_cache of 16 held each one met: gigabytes for a set with a few of them).
_LAST_LARGE: dict[tuple[int, int], torch.nn.Module] = {}


def _kaiser(orig_sr: int, new_sr: int):
    """make-shards' cached Kaiser resampler (same numbers as frontend.resample, tested), plus the last large one."""
    from shard_tools import decode

    key = (orig_sr, new_sr)
    if key in _LAST_LARGE:
        return _LAST_LARGE[key]
    r = decode.kaiser_resampler(orig_sr, new_sr)
    if r.kernel.numel() > decode.MAX_CACHED_KERNEL:  # not kept by decode (its workers would each hold one)
        _LAST_LARGE.clear()
        _LAST_LARGE[key] = r
    return r


# --- audio --------------------------------------------------------------------------------------------------------
NON_FINITE = "NaN or infinite samples"  # the reason of a clip that decodes but holds them (a float WAV can)
NO_SAMPLES = "no audio samples"

# Why skipped clips were skipped, read from their short reasons (a cached entry keeps only those), and what to do:
# matpac-eval called every skipped clip "undecodable" and advised converting it to wav/flac, also a float WAV that
# decodes fine but holds NaN or infinite samples. cause: (counted as, what to do with them, what to do with it)
SKIP_CAUSES = {
    "undecodable": ("cannot be decoded", "convert them to wav/flac, or re-export the damaged ones",
                    "convert it to wav/flac, or re-export it if it is damaged"),
    "non_finite": (f"with {NON_FINITE}", "replace those samples with finite values (e.g. numpy.nan_to_num) and save "
                   "the files again", "replace those samples with finite values (e.g. numpy.nan_to_num) and save "
                   "it again"),
    "empty": ("without audio samples", "replace them with their recordings", "replace it with its recording"),
    "rate": ("at a sample rate that cannot be resampled", "convert them to a common rate, e.g. 16000 Hz",
             "convert it to a common rate, e.g. 16000 Hz"),
    "needs_pyav": ("that need PyAV", "pip install av", "pip install av"),
}


def skip_cause(reason: str) -> str:
    """The SKIP_CAUSES key of a skipped clip's reason."""
    if reason == NON_FINITE:
        return "non_finite"
    if reason in (NO_SAMPLES, "empty file") or reason.startswith("empty:"):  # the last: PyAV's Skip("empty", ...)
        return "empty"
    if reason.startswith("sample rate "):  # check_kaiser_rate's
        return "rate"
    return "needs_pyav" if reason.startswith("needs_pyav") else "undecodable"


class UnreadableAudio(ValueError):
    """A clip that cannot be used; `reason` is short (for a one-line report listing several files)."""

    def __init__(self, path: str, reason: str):
        cause = skip_cause(reason)
        what = {"undecodable": f"cannot decode audio ({reason})", "non_finite": f"holds {reason}"}.get(cause, reason)
        advice = "" if cause == "needs_pyav" else f"; {SKIP_CAUSES[cause][2]}"  # its reason names the fix already
        super().__init__(f"{path}: {what}{advice}, or drop it")
        self.path, self.reason, self.cause = path, reason, cause


def _reason(e: Exception) -> str:
    text = getattr(e, "error_string", None) or str(e) or type(e).__name__  # LibsndfileError: "Format not recognised."
    return text.strip().splitlines()[0].rstrip(".")[:120]


def _needs_pyav(path: str) -> bool:
    """A container libsndfile cannot read (m4a, webm, aac, ...): make-shards decodes it with PyAV, and so do we."""
    from shard_tools.discover import PYAV_EXTS

    return os.path.splitext(path)[1].lower() in PYAV_EXTS


# Input read beyond the clip: the resamplers' filters reach ~0.01 s (Kaiser, width 64) or less (soxr HQ) past an
# output sample, so a clip resampled from its first clip + 1 s equals the clip cut from the whole file resampled.
DECODE_MARGIN_S = 1.0


def _read_pyav(path: str, seconds: float) -> tuple[np.ndarray, int, int | None]:
    """make-shards' PyAV decoder, stopped after `seconds` -> ((N, C) float32, rate, frames in the whole file or None
    when unknown); its Skip (no PyAV, undecodable, empty) -> UnreadableAudio."""
    from shard_tools.decode import Skip, read_audio

    try:  # no length limit: only the start is decoded
        wave, sr = read_audio(path, max_seconds=math.inf, stop_seconds=seconds)
    except Skip as e:
        raise UnreadableAudio(path, str(e).strip().splitlines()[0][:160]) from None
    if len(wave) <= seconds * sr:  # decoded to the end
        return wave, sr, len(wave)
    duration = audio_duration(path)  # the container's header, as matpac-eval's length summary reads it
    return wave, sr, max(len(wave), int(round(duration * sr))) if duration is not None else None


def _read_soundfile(path: str, seconds: float) -> tuple[np.ndarray, int, int]:
    """The first `seconds` of `path` (all of it when shorter) -> ((N,) or (N, C) float32, rate, frames in the file)."""
    import soundfile as sf

    try:
        # bytes, as make-shards reads it: libsndfile opens any file name, also one that is not valid UTF-8
        with sf.SoundFile(os.fsencode(path)) as f:
            sr, frames = f.samplerate, f.frames
            wave = f.read(frames=min(frames, int(np.ceil(seconds * sr))), dtype="float32", always_2d=False)
    except Exception as e:  # noqa: BLE001 - soundfile raises several types; the user needs the file, not the type
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
        raise UnreadableAudio(path, "empty file" if empty else _reason(e)) from None
    return wave, sr, max(frames, len(wave))


def _resampled_length(frames: int, orig_sr: int, spec: FrontendSpec) -> int:
    """Samples `resample` makes from `frames` (torchaudio's Kaiser: ceil; soxr: nearest)."""
    if orig_sr == spec.sample_rate:
        return frames
    if spec.resampler == "kaiser":
        return -(-frames * spec.sample_rate // orig_sr)
    return (2 * frames * spec.sample_rate + orig_sr) // (2 * orig_sr)


def audio_duration(path: str) -> float | None:
    """Seconds of audio in `path` from its header (soundfile, or PyAV for its containers), None when unknown."""
    import soundfile as sf

    try:
        return float(sf.info(os.fsencode(path)).duration)  # bytes: also a name that is not valid UTF-8
    except Exception:  # noqa: BLE001 - not a soundfile format (or unreadable): PyAV's containers are tried below
        pass
    if not _needs_pyav(path):
        return None
    try:
        import av

        with av.open(path) as c:
            if c.duration is not None:
                return c.duration / av.time_base
            s = c.streams.audio[0] if c.streams.audio else None
            return float(s.duration * s.time_base) if s is not None and s.duration is not None else None
    except Exception:  # noqa: BLE001 - no PyAV, or an unreadable file: the embedding reports it
        return None


def load_clip(path: str, clip_samples: int, spec: FrontendSpec, lengths: list[int] | None = None) -> np.ndarray:
    """float32 (clip_samples,) at spec.sample_rate: decoded, mono, resampled, cropped from the start / zero-padded.
    `lengths`, when given, gets the resampled length before the crop appended. Raises UnreadableAudio (a ValueError)
    for a file that cannot be decoded, holds no samples or NaN/infinite ones, or has a rate that cannot be
    resampled (its `cause` and message say which)."""
    # Only the start is decoded: a long recording costs the clip's time and memory, not the file's.
    seconds = clip_samples / spec.sample_rate + DECODE_MARGIN_S
    wave, sr, frames = (_read_pyav if _needs_pyav(path) else _read_soundfile)(path, seconds)
    wave = to_mono(wave)
    if wave.size == 0:
        raise UnreadableAudio(path, NO_SAMPLES)
    if not np.isfinite(wave).all():
        raise UnreadableAudio(path, NON_FINITE)
    if sr != spec.sample_rate:
        if spec.resampler == "kaiser":
            try:
                check_kaiser_rate(sr, spec.sample_rate)
            except ValueError as e:
                raise UnreadableAudio(path, str(e).split(";")[0]) from None
        x = torch.from_numpy(wave)
        wave = (_kaiser(sr, spec.sample_rate)(x) if spec.resampler == "kaiser" else resample(x, sr, spec)).numpy()
    if lengths is not None:  # the whole file's length (a lower bound when its header has none)
        lengths.append(max(len(wave), _resampled_length(frames or 0, sr, spec)))
    out = np.zeros(clip_samples, dtype=np.float32)
    n = min(len(wave), clip_samples)
    out[:n] = wave[:n]
    return out


def note(msg: str) -> None:
    print(f"matpac-eval: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"matpac-eval: warning: {msg}", file=sys.stderr, flush=True)


# --- embedders ----------------------------------------------------------------------------------------------------
class LogMelEmbedder:
    name = "logmel"

    def __init__(self, device: str = "cpu", frontend: str = "matpac"):
        self.spec = get_spec(frontend)
        self.device = torch.device(device)
        self.mel = LogMelSpec(self.spec).to(self.device)
        self.identity = f"logmel:v1:{frontend}"

    @torch.no_grad()
    def __call__(self, wave_BN: torch.Tensor | np.ndarray) -> np.ndarray:
        # As the encoder embedders (Encoder.encode): a numpy array too (was AttributeError: no `.to`), integer PCM
        # scaled to [-1, 1] (was taken 32,768 times too loud for int16)
        from matpac_fast.encoder import _float_wave

        wave = _float_wave(wave_BN)
        lms = normalize(self.mel(wave.to(self.device)), self.spec.norm_mean, self.spec.norm_std)  # (B, F, T)
        return torch.cat([lms.mean(-1), lms.std(-1)], dim=1).cpu().numpy().astype(np.float32)


class EncoderEmbedder:
    """The mean-over-time clip embedding of `Encoder.encode` (METHOD.md §6: 5*D per 160 ms frame, then mean)."""

    def __init__(self, encoder, name: str, identity: str):
        self.encoder, self.name, self.identity = encoder, name, identity
        self.spec = get_spec(encoder.frontend)  # the encoder's own front end (resampler, centring)
        self.config_source = getattr(encoder, "config_source", None)
        self.path: Path | None = None  # make_embedder: the checkpoint file or folder read

    @torch.no_grad()
    def __call__(self, wave_BN: torch.Tensor) -> np.ndarray:
        _, clip = self.encoder.encode(wave_BN, SAMPLE_RATE)
        return clip.float().cpu().numpy()


def _encoder_module():
    try:
        from matpac_fast import encoder
    except ImportError as e:
        raise ValueError(f"matpac_fast.encoder is not available ({e}); only --checkpoint logmel works here") from None
    return encoder


def _load_encoder_fn():
    return _encoder_module().load_encoder


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


GENERIC_STEMS = {"encoder", "model", "pytorch_model", "checkpoint", "weights", "state_dict", "last", "best", "final"}
GENERIC_DIRS = {"train", "checkpoints", "checkpoint", "export", "exports", "weights", "models", "final", "runs"}


def checkpoint_name(path: Path, digest: str) -> str:
    """`<stem>-<sha8>`; a generic stem (encoder.pt, model.safetensors, step_1000/) gets the nearest non-generic
    folder in front: runs/u/encoder.pt -> u-encoder-<sha8>, runs/u/train/checkpoints/step_9 -> u-step_9-<sha8>."""
    stem = path.stem if path.is_file() else path.name
    name = stem
    if stem.lower() in GENERIC_STEMS or re.fullmatch(r"(step|epoch|ckpt|checkpoint)[-_]?\d+", stem.lower()):
        for d in list(path.resolve().parents)[:4]:
            if d.name and d.name.lower() not in GENERIC_DIRS:
                name = f"{d.name}-{stem}"
                break
    return f"{name}-{digest[:8]}"


def make_embedder(checkpoint: str, preset: str = "matpac", device: str = "cpu", seed: int = 0):
    if checkpoint == "logmel":
        return LogMelEmbedder(device)
    load_encoder = _load_encoder_fn()
    if checkpoint == "random":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            enc = load_encoder("random", preset=preset, device=device)
        name = f"random-{preset}" + (f"-seed{seed}" if seed else "")
        fe = f":{enc.frontend}" if enc.frontend != "matpac" else ""
        return EncoderEmbedder(enc, name, f"random:{preset}:seed{seed}{fe}")
    p = Path(checkpoint).expanduser()
    if not p.exists():
        raise ValueError(f"--checkpoint {checkpoint}: no such file; give a checkpoint path, 'random' or 'logmel'")
    # A training run folder is the encoder.pt it loads: one name and identity for both spellings of those weights.
    # Resolved and loaded before hashing, so that a path that is no checkpoint is reported at once.
    p = _encoder_module().resolve_checkpoint(p)
    enc = load_encoder(str(p), preset=preset, device=device)
    digest = file_digest(p)
    identity = f"ckpt:{digest}:{preset}"
    # settings beyond the file and --preset (a run config, an M2D front end) that change the embeddings
    if enc.frontend != "matpac" or enc.settings() != getattr(enc, "preset_settings", enc.settings()):
        settings = json.dumps(enc.settings(), sort_keys=True)
        identity += ":" + hashlib.sha256(settings.encode()).hexdigest()[:8]
    emb = EncoderEmbedder(enc, checkpoint_name(p, digest), identity)
    emb.path = p  # the file or checkpoint folder read (a run folder's encoder.pt)
    return emb


# --- extraction with cache ----------------------------------------------------------------------------------------
@dataclass
class ExtractSettings:
    clip_seconds: float
    batch_size: int = 32
    cache_dir: Path | None = None  # None = no cache
    progress: bool = True
    cache_max_bytes: float = CACHE_MAX_GB * 1e9  # the cache folder's entries at most (least recently used go first)


def cache_path(ds: LabelledSet, embedder, task: str, s: ExtractSettings) -> Path | None:
    if s.cache_dir is None:
        return None
    key = "\n".join([f"v{EMBED_VERSION}", embedder.identity, ds.digest(), f"{s.clip_seconds:.6f}", str(SAMPLE_RATE)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{task}-{embedder.name}")
    return Path(s.cache_dir) / f"{safe}-{digest}.npz"


@dataclass
class Extracted:
    emb: np.ndarray  # (n_ok, D) float32, the embedded clips in dataset order
    ok: np.ndarray  # (n,) bool: which clips of the dataset were embedded
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of the others
    cache_hit: bool = False
    n_cropped: int = 0  # embedded clips longer than clip_seconds (only their start was embedded)
    longest_seconds: float = 0.0  # the longest embedded clip before the crop (0 when unknown: an old cache entry)


def extract(ds: LabelledSet, embedder, task: str, s: ExtractSettings) -> Extracted:
    """Embeddings of every usable clip of `ds` (the others are listed in `skipped` with their reasons, not fatal)."""
    path = cache_path(ds, embedder, task, s)
    paths = np.array([c.path for c in ds.clips])
    n_samples = int(round(s.clip_seconds * SAMPLE_RATE))
    if path is not None and path.is_file():
        hit = _read_cache(path, paths, n_samples)
        if hit is not None and not _pyav_installed_since(hit):
            _touch(path)  # read now: the most recently used entry
            bound_cache(path, s.cache_max_bytes)
            return hit
    spec = getattr(embedder, "spec", None) or get_spec("matpac")
    if n_samples < spec.n_fft:
        raise ValueError(f"--clip-seconds {s.clip_seconds}: too short (needs >= {spec.n_fft / SAMPLE_RATE:.3f} s)")
    chunks, reasons, lengths = [], [""] * len(ds), np.zeros(len(ds), np.int64)
    # Closed however the loop ends: a bar left open after a Ctrl-C had the CLI's one line printed after it, on its line
    with tqdm(total=len(ds), desc=f"embed {embedder.name}", unit="clip", disable=not s.progress, leave=False) as bar:
        for i in range(0, len(ds), s.batch_size):
            waves, rows = [], []
            for j in range(i, min(i + s.batch_size, len(ds))):
                n = []
                try:
                    waves.append(load_clip(ds.clips[j].path, n_samples, spec, lengths=n))
                    rows.append(j)
                    lengths[j] = n[0] if n else 0
                except UnreadableAudio as e:
                    reasons[j] = e.reason
            if waves:
                chunks.append(_embed_batch(embedder, waves, [ds.clips[j].path for j in rows]))
            bar.update(min(s.batch_size, len(ds) - i))
    ok = np.array([r == "" for r in reasons], dtype=bool)
    emb = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, 0), np.float32)
    if not np.isfinite(emb).all():  # a probe on NaN features scores chance and looks like a result: stop, cache nothing
        bad = [p for p, row in zip(paths[ok].tolist(), emb) if not np.isfinite(row).all()]
        raise ValueError(f"{embedder.name}: non-finite embeddings (NaN or inf) for {len(bad)} of {len(emb)} clips "
                         f"(e.g. {bad[0]}); the weights or the audio give values out of range, nothing was scored")
    if path is not None:
        _write_cache(path, emb=emb, paths=paths, ok=ok, reasons=np.array(reasons), lengths=lengths)
        bound_cache(path, s.cache_max_bytes)
    skipped = [(p, r) for p, r in zip(paths.tolist(), reasons) if r]
    return Extracted(emb, ok, skipped, False, *_cropped(lengths, n_samples))


def _pyav_installed_since(hit: Extracted) -> bool:
    """Whether a cache entry skipped clips for want of PyAV, which is installed now: the key does not hold PyAV's
    presence (it changes no embedding), so after `pip install av` the entry kept those clips skipped, with the advice
    to install it. Such an entry is recomputed (and replaced)."""
    if not any(skip_cause(r) == "needs_pyav" for _, r in hit.skipped):
        return False
    from shard_tools.decode import pyav_available

    return pyav_available()


def _embed_batch(embedder, waves: list[np.ndarray], paths: list[str]) -> np.ndarray:
    """embedder(batch). `Encoder.encode` refuses a batch holding a clip it cannot embed (samples so loud that the
    log-mel overflows) naming the clip's row in the batch ("clip 6 of the batch (wave[6])"), which says nothing
    about which of the dataset's files it is: the clips are then embedded one by one and the file is named."""
    try:
        return embedder(torch.from_numpy(np.stack(waves)))
    except ValueError:
        for w, p in zip(waves, paths):
            try:
                embedder(torch.from_numpy(w))  # one clip (N,): "the clip holds ..."
            except ValueError as e:
                raise ValueError(f"{p}: {e}") from None
        raise


def _cropped(lengths: np.ndarray, n_samples: int) -> tuple[int, float]:
    """-> (clips longer than n_samples, the longest in seconds)."""
    return int((lengths > n_samples).sum()), float(lengths.max(initial=0)) / SAMPLE_RATE


def _read_cache(path: Path, paths: np.ndarray, n_samples: int) -> Extracted | None:
    """The cached entry, or None when it belongs to other clips; a corrupt entry is reported and deleted."""
    try:
        with np.load(path, allow_pickle=False) as z:  # opened: another run removing the file now changes nothing
            if z["paths"].shape != paths.shape or not (z["paths"] == paths).all():
                return None
            emb = z["emb"]
            ok = z["ok"] if "ok" in z.files else np.ones(len(paths), dtype=bool)  # entries before skipping existed
            reasons = z["reasons"] if "reasons" in z.files else np.array([""] * len(paths))
            lengths = z["lengths"] if "lengths" in z.files else np.zeros(len(paths), np.int64)  # older entries
        if (emb.ndim != 2 or ok.shape != paths.shape or len(emb) != int(ok.sum()) or reasons.shape != paths.shape
                or lengths.shape != paths.shape or lengths.dtype.kind not in "iu"):
            raise ValueError(f"inconsistent shapes emb {emb.shape}, ok {ok.shape} for {len(paths)} clips")
        if not np.isfinite(emb).all():
            raise ValueError("non-finite values")
    except FileNotFoundError:  # removed since it was found (another run's `bound_cache`): a miss, nothing to report
        return None
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        warn(f"embedding cache entry {path} is unreadable ({_cache_reason(e)}); deleting it and recomputing")
        path.unlink(missing_ok=True)
        return None
    skipped = [(p, str(r)) for p, r, k in zip(paths.tolist(), reasons.tolist(), ok.tolist()) if not k]
    cropped = _cropped(lengths.astype(np.int64), n_samples)
    return Extracted(emb.astype(np.float32, copy=False), ok.astype(bool), skipped, True, *cropped)


def _cache_reason(e: Exception) -> str:
    """Why a cache entry cannot be used, in a few words: numpy's own text for a file that is not an .npz archive
    ("contains pickled (object) data ... allow_pickle=") is advice that does not apply here."""
    if isinstance(e, zipfile.BadZipFile):
        return "not a complete .npz archive: damaged or truncated"
    if isinstance(e, EOFError):
        return "empty or truncated file"
    if isinstance(e, KeyError):
        return f"no array {e.args[0]!r}" if e.args else "an array is missing"
    if isinstance(e, ValueError) and "allow_pickle" in str(e):
        return "not an .npz archive"
    return _reason(e)


def _touch(path: Path) -> None:
    """Mark a cache entry used now (its mtime orders `bound_cache`'s removals); a read-only folder keeps its time."""
    try:
        os.utime(path)
    except OSError:
        pass


def bound_cache(keep: Path, max_bytes: float) -> None:
    """Remove the least recently used entries of `keep`'s folder until its entries total at most `max_bytes`; `keep`
    (this extraction's entry) always stays, even alone over the bound. Runs at the same time may remove entries too:
    one gone already is passed over. One line says what was removed."""
    folder = keep.parent
    try:
        names = [n for n in os.listdir(folder) if CACHE_ENTRY.search(n)]
    except OSError:
        return
    entries, total = [], 0
    for name in names:
        try:
            st = os.lstat(folder / name)
        except OSError:  # removed by another run meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        total += st.st_size
        if name != keep.name:
            entries.append((st.st_mtime_ns, name, st.st_size))
    removed, freed = 0, 0
    for _, name, size in sorted(entries):  # oldest first
        if total <= max_bytes:
            break
        try:
            os.unlink(folder / name)
        except FileNotFoundError:  # another run removed it: it no longer counts
            total -= size
            continue
        except OSError:
            continue
        total, removed, freed = total - size, removed + 1, freed + size
    if removed:
        note(f"embedding cache {folder} over {max_bytes / 1e9:g} GB (--cache-max-gb): removed {removed} least "
             f"recently used entr{'y' if removed == 1 else 'ies'} ({freed / 1e9:.2f} GB)")


def _write_cache(path: Path, **arrays) -> None:
    """Atomic (a killed run never leaves a truncated entry); a failure costs the cache, never the run's results.
    An interruption while writing removes the temporary file: left there, each Ctrl-C added one to the cache folder
    for good (an entry's size: tens of MB for a ViT-B over a few thousand clips)."""
    tmp = path.with_name(path.stem + f".{os.getpid()}.tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with os.fdopen(create_new(tmp), "wb") as f:  # never through a link planted under that name
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except OSError as e:
        warn(f"could not write the embedding cache entry {path} ({e.strerror or e}); continuing without it")
        tmp.unlink(missing_ok=True)
    except BaseException:  # Ctrl-C while writing: the half-written file (named by pid, never reused) went nowhere
        tmp.unlink(missing_ok=True)
        raise
