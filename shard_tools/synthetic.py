"""A deterministic, labelled corpus of synthetic sounds (the project's embedded default data set).

Each clip is a function of (seed, index) only: the class is ``index % len(CLASSES)`` and every random parameter
(pitch, timing, level, background noise) comes from a numpy Generator seeded with ``(seed, index)``. The classes
differ in spectro-temporal structure (steady vs sweeping pitch, harmonic vs noisy, periodic vs continuous) while
the per-clip parameters overlap in pitch and level, so a model has to learn shapes, not one loudness or one
frequency bin, yet a linear probe on good features separates them.

Clips are 6.5 s at 16 kHz by default: 1 + (104000 - 400) // 160 = 648 frames, above the 608-frame crop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

CLASSES: list[str] = [
    "pure_tone",
    "chirp_up",
    "chirp_down",
    "harmonic_note",
    "noise_burst",
    "click_train",
    "am_tone",
    "fm_tone",
    "tone_pulses",
    "bandpass_noise",
]


def _rng(seed: int, index: int) -> np.random.Generator:
    if index < 0 or seed < 0:
        raise ValueError(f"seed and index must be >= 0 (got seed={seed}, index={index})")
    return np.random.default_rng([int(seed), int(index)])


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def _fade(n: int, sr: int, ms: float = 10.0) -> np.ndarray:
    """Raised-cosine ramps so that onsets do not add broadband clicks to the tonal classes."""
    env = np.ones(n, dtype=np.float64)
    k = min(n // 2, max(1, int(sr * ms / 1000)))
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, k))
    env[:k] = ramp
    env[n - k :] = ramp[::-1]
    return env


def _phase(freq_hz: np.ndarray, sr: int) -> np.ndarray:
    """Instantaneous frequency (Hz, per sample) -> phase (rad)."""
    return 2 * np.pi * np.cumsum(freq_hz) / sr


def _pure_tone(rng, t, sr):
    f = _log_uniform(rng, 150, 4000)
    return np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))


def _chirp(rng, t, sr, up: bool):
    lo, hi = _log_uniform(rng, 100, 600), _log_uniform(rng, 1500, 6000)
    period = rng.uniform(0.8, 2.5)  # repeated sweeps: every crop of the clip contains the class's shape
    frac = (t / period) % 1.0
    if not up:
        frac = 1.0 - frac
    f = lo * (hi / lo) ** frac  # exponential sweep
    return np.sin(_phase(f, sr))


def _harmonic_note(rng, t, sr):
    f0 = _log_uniform(rng, 80, 600)
    n_h = int(rng.integers(4, 12))
    tilt = rng.uniform(0.5, 1.5)
    out = np.zeros_like(t)
    for h in range(1, n_h + 1):
        if f0 * h >= 0.45 * sr:
            break
        out += np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) / h**tilt
    # note-like envelope: repeated attack-decay notes
    period = rng.uniform(0.5, 1.5)
    decay = rng.uniform(2.0, 6.0)
    return out * np.exp(-decay * ((t - rng.uniform(0, period)) % period))


def _noise_burst(rng, t, sr):
    noise = rng.standard_normal(t.size)
    period = rng.uniform(0.3, 1.2)
    duty = rng.uniform(0.15, 0.5)
    gate = ((t + rng.uniform(0, period)) % period) < duty * period
    return noise * gate


def _click_train(rng, t, sr):
    rate = rng.uniform(3, 40)  # clicks per second
    out = np.zeros_like(t)
    jitter = rng.uniform(0, 0.1)
    times = np.arange(rng.uniform(0, 1 / rate), t[-1], 1 / rate)
    times = times + rng.normal(0, jitter / rate, times.size)
    idx = np.clip((times * sr).astype(np.int64), 0, t.size - 1)
    out[idx] = rng.uniform(0.5, 1.0, idx.size) * rng.choice([-1.0, 1.0], idx.size)
    # a short decaying resonance per click keeps it audible in the mel domain without making it tonal
    k = int(0.003 * sr)
    kernel = np.exp(-np.arange(k) / (0.0006 * sr))
    return np.convolve(out, kernel)[: t.size]


def _am_tone(rng, t, sr):
    fc = _log_uniform(rng, 200, 4000)
    fm = rng.uniform(2, 12)
    depth = rng.uniform(0.7, 1.0)
    return (1 - depth * 0.5 * (1 + np.cos(2 * np.pi * fm * t))) * np.sin(2 * np.pi * fc * t)


def _fm_tone(rng, t, sr):
    fc = _log_uniform(rng, 300, 3000)
    fm = rng.uniform(3, 10)
    dev = fc * rng.uniform(0.1, 0.3)
    return np.sin(_phase(fc + dev * np.sin(2 * np.pi * fm * t), sr))


def _tone_pulses(rng, t, sr):
    f = _log_uniform(rng, 300, 4000)
    period = rng.uniform(0.2, 0.6)
    duty = rng.uniform(0.2, 0.5)
    gate = ((t + rng.uniform(0, period)) % period) < duty * period
    # smooth the gate edges (5 ms) so the pulses stay tonal
    k = int(0.005 * sr)
    gate = np.convolve(gate.astype(np.float64), np.ones(k) / k, mode="same")
    return gate * np.sin(2 * np.pi * f * t)


def _bandpass_noise(rng, t, sr):
    centre = _log_uniform(rng, 300, 5000)
    width = centre * rng.uniform(0.1, 0.4)
    spec = np.fft.rfft(rng.standard_normal(t.size))
    freqs = np.fft.rfftfreq(t.size, 1 / sr)
    spec *= np.exp(-0.5 * ((freqs - centre) / width) ** 2)
    return np.fft.irfft(spec, t.size)


_GENERATORS: dict[str, Callable] = {
    "pure_tone": _pure_tone,
    "chirp_up": lambda rng, t, sr: _chirp(rng, t, sr, up=True),
    "chirp_down": lambda rng, t, sr: _chirp(rng, t, sr, up=False),
    "harmonic_note": _harmonic_note,
    "noise_burst": _noise_burst,
    "click_train": _click_train,
    "am_tone": _am_tone,
    "fm_tone": _fm_tone,
    "tone_pulses": _tone_pulses,
    "bandpass_noise": _bandpass_noise,
}
assert list(_GENERATORS) == CLASSES


def synth_clip(index: int, seed: int = 0, sample_rate: int = 16000, seconds: float = 6.5) -> tuple[np.ndarray, str]:
    """Clip number `index` of corpus `seed`: (float32 (N,) waveform in [-1, 1], class name)."""
    if sample_rate < 8000:
        raise ValueError(f"sample_rate must be >= 8000 Hz (got {sample_rate})")
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0 (got {seconds})")
    rng = _rng(seed, index)
    label = CLASSES[index % len(CLASSES)]
    n = int(round(seconds * sample_rate))
    t = np.arange(n, dtype=np.float64) / sample_rate
    sig = _GENERATORS[label](rng, t, sample_rate)
    sig = sig / (np.max(np.abs(sig)) + 1e-12)
    # event placement: the sound may start late / end early (at least 70% of the clip stays active)
    active = rng.uniform(0.7, 1.0) * n
    start = int(rng.uniform(0, n - active))
    env = np.zeros(n)
    env[start : start + int(active)] = _fade(int(active), sample_rate)
    level = 10 ** (rng.uniform(-24, -3) / 20)
    snr_db = rng.uniform(10, 35)
    background = rng.standard_normal(n) * level * 10 ** (-snr_db / 20)
    wave = level * sig * env + background
    peak = np.max(np.abs(wave))
    if peak > 0.99:
        wave *= 0.99 / peak
    return wave.astype(np.float32), label


def synth_corpus(n: int, seed: int = 0, sample_rate: int = 16000, seconds: float = 6.5) -> Iterator[
    tuple[int, np.ndarray, str]
]:
    """Yield (index, waveform, label) for index 0..n-1."""
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    for i in range(n):
        wave, label = synth_clip(i, seed, sample_rate, seconds)
        yield i, wave, label
