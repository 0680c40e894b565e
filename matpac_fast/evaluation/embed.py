"""Clip embeddings in batches, with a progress bar and an on-disk cache.

Embedders (`make_embedder`):
  logmel   built-in baseline, no learning: the normalised log-mel (MATPAC front end, (x + 7.056) / 4.193) of the
           clip, then per mel bin the mean and the standard deviation over time -> 160-d. It shows what a probe
           gets from the spectrum alone; a pre-trained encoder should beat it.
  random   the MATPAC encoder (`--preset`) with random initial weights (seeded): the architecture's prior.
  PATH     a checkpoint: this project's training checkpoint / exported encoder, or the authors' released weights,
           loaded by `matpac_fast.encoder.load_encoder` (imported lazily, so the logmel baseline needs no model).

Audio: soundfile decode -> mono (mean of channels) -> 16 kHz (the front end's Kaiser resampler) -> crop from the
start / zero-pad at the end to exactly `clip_seconds` (a fixed length keeps batches rectangular; each task has its
own length: FSDD 1 s, ESC-50 5 s, US8K 4 s, GTZAN 30 s).

Cache: `<cache_dir>/<task>-<embedder>-<key16>.npz` holding `emb` (n, D) float32 and `paths`; the key hashes the
embedder identity (checkpoint file SHA-256, or preset + seed), the data (file paths, sizes, mtimes), clip seconds,
sample rate and this module's version. Loaded with allow_pickle=False.
"""

from __future__ import annotations

import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from matpac_fast.evaluation.datasets import LabelledSet
from matpac_fast.frontend import FrontendSpec, LogMelSpec, get_spec, normalize, resample, to_mono

EMBED_VERSION = 1
SAMPLE_RATE = 16000


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "matpac_fast" / "embeddings"


@functools.lru_cache(maxsize=16)
def _kaiser(orig_sr: int, new_sr: int):
    """torchaudio's Resample module with the front end's Kaiser settings, built once per source rate: building the
    sinc kernel costs more than applying it to a short clip. Same numbers as frontend.resample (tested)."""
    import torchaudio.transforms as T

    return T.Resample(
        orig_sr, new_sr, resampling_method="sinc_interp_kaiser", lowpass_filter_width=64,
        rolloff=0.9475937167399596, beta=14.769656459379492, dtype=torch.float32,
    )  # fmt: skip


# --- audio --------------------------------------------------------------------------------------------------------
def load_clip(path: str, clip_samples: int, spec: FrontendSpec) -> np.ndarray:
    """float32 (clip_samples,) at spec.sample_rate: decoded, mono, resampled, cropped from the start / zero-padded."""
    import soundfile as sf

    try:
        wave, sr = sf.read(path, dtype="float32", always_2d=False)
    except Exception as e:  # soundfile raises several types; the user needs the file name, not the type
        raise ValueError(f"{path}: cannot decode audio ({e}); convert it to wav/flac or drop it") from None
    wave = to_mono(wave)
    if sr != spec.sample_rate:
        x = torch.from_numpy(wave)
        wave = (_kaiser(sr, spec.sample_rate)(x) if spec.resampler == "kaiser" else resample(x, sr, spec)).numpy()
    out = np.zeros(clip_samples, dtype=np.float32)
    n = min(len(wave), clip_samples)
    out[:n] = wave[:n]
    return out


# --- embedders ----------------------------------------------------------------------------------------------------
class LogMelEmbedder:
    name = "logmel"

    def __init__(self, device: str = "cpu", frontend: str = "matpac"):
        self.spec = get_spec(frontend)
        self.device = torch.device(device)
        self.mel = LogMelSpec(self.spec).to(self.device)
        self.identity = f"logmel:v1:{frontend}"

    @torch.no_grad()
    def __call__(self, wave_BN: torch.Tensor) -> np.ndarray:
        lms = normalize(self.mel(wave_BN.to(self.device)), self.spec.norm_mean, self.spec.norm_std)  # (B, F, T)
        return torch.cat([lms.mean(-1), lms.std(-1)], dim=1).cpu().numpy().astype(np.float32)


class EncoderEmbedder:
    """The mean-over-time clip embedding of `Encoder.encode` (METHOD.md §6: 5*D per 160 ms frame, then mean)."""

    def __init__(self, encoder, name: str, identity: str):
        self.encoder, self.name, self.identity = encoder, name, identity

    @torch.no_grad()
    def __call__(self, wave_BN: torch.Tensor) -> np.ndarray:
        _, clip = self.encoder.encode(wave_BN, SAMPLE_RATE)
        return clip.float().cpu().numpy()


def _load_encoder_fn():
    try:
        from matpac_fast.encoder import load_encoder
    except ImportError as e:
        raise SystemExit(f"matpac_fast.encoder is not available ({e}); only --checkpoint logmel works here") from None
    return load_encoder


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def make_embedder(checkpoint: str, preset: str = "matpac", device: str = "cpu", seed: int = 0):
    if checkpoint == "logmel":
        return LogMelEmbedder(device)
    load_encoder = _load_encoder_fn()
    if checkpoint == "random":
        with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
            torch.manual_seed(seed)
            enc = load_encoder("random", preset=preset, device=device)
        return EncoderEmbedder(enc, f"random-{preset}", f"random:{preset}:seed{seed}")
    p = Path(checkpoint).expanduser()
    if not p.exists():
        raise SystemExit(f"--checkpoint {checkpoint}: no such file; give a checkpoint path, 'random' or 'logmel'")
    digest = file_digest(p)
    enc = load_encoder(str(p), preset=preset, device=device)
    return EncoderEmbedder(enc, p.stem, f"ckpt:{digest}:{preset}")


# --- extraction with cache ----------------------------------------------------------------------------------------
@dataclass
class ExtractSettings:
    clip_seconds: float
    batch_size: int = 32
    cache_dir: Path | None = None  # None = no cache
    progress: bool = True


def cache_path(ds: LabelledSet, embedder, task: str, s: ExtractSettings) -> Path | None:
    if s.cache_dir is None:
        return None
    key = "\n".join([f"v{EMBED_VERSION}", embedder.identity, ds.digest(), f"{s.clip_seconds:.6f}", str(SAMPLE_RATE)])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{task}-{embedder.name}")
    return Path(s.cache_dir) / f"{safe}-{digest}.npz"


def extract(ds: LabelledSet, embedder, task: str, s: ExtractSettings) -> tuple[np.ndarray, bool]:
    """(n, D) float32 embeddings for every clip of `ds`, and whether they came from the cache."""
    path = cache_path(ds, embedder, task, s)
    paths = np.array([c.path for c in ds.clips])
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:
            if z["paths"].shape == paths.shape and (z["paths"] == paths).all():
                return z["emb"], True
    spec = get_spec("matpac")
    n_samples = int(round(s.clip_seconds * SAMPLE_RATE))
    if n_samples < spec.n_fft:
        raise ValueError(f"--clip-seconds {s.clip_seconds}: too short (needs >= {spec.n_fft / SAMPLE_RATE:.3f} s)")
    chunks = []
    bar = tqdm(total=len(ds), desc=f"embed {embedder.name}", unit="clip", disable=not s.progress, leave=False)
    for i in range(0, len(ds), s.batch_size):
        batch = np.stack([load_clip(c.path, n_samples, spec) for c in ds.clips[i : i + s.batch_size]])
        chunks.append(embedder(torch.from_numpy(batch)))
        bar.update(len(batch))
    bar.close()
    emb = np.concatenate(chunks).astype(np.float32)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, emb=emb, paths=paths)
        os.replace(tmp, path)  # atomic: a killed run never leaves a truncated cache entry
    return emb, False
