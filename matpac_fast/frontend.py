"""The front end: waveform -> log-mel, exactly as the authors compute it (METHOD.md §1).

Shared by `shard_tools` (offline conversion) and the trainer/evaluation (on-device), so the data contract lives in
one place. The spec is a small frozen dataclass; its `to_dict()` is written into every shard set's `stats.json` and
compared against the training config (a mismatch there is a silent accuracy loss otherwise).

Shapes: waveforms are float32 (B, N) at 16 kHz; log-mel is float32 (B, 80, T), unnormalised (ln(mel + eps)).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

FLOAT32_EPS = float(np.finfo(np.float32).eps)  # 1.1920929e-07, the authors' log offset


@dataclass(frozen=True)
class FrontendSpec:
    """Everything that determines the numbers in a log-mel frame."""

    name: str = "matpac"
    sample_rate: int = 16000
    n_fft: int = 400
    win_length: int = 400
    hop_length: int = 160
    n_mels: int = 80
    f_min: float = 50.0
    f_max: float = 8000.0
    center: bool = False  # matpac: no padding (10 s -> 998 frames); m2d: reflect pad (10 s -> 1001 frames)
    log_eps: float = FLOAT32_EPS
    resampler: str = "kaiser"  # "kaiser": torchaudio windowed sinc, the authors' settings; "soxr_hq": librosa default
    norm_mean: float = -7.056  # matpac: one fixed global pair; m2d: overwritten by dataset stats when known
    norm_std: float = 4.193

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def numerics(self) -> dict:
        """The fields that change the log-mel values (normalisation excluded: it is applied later, on the device)."""
        d = self.to_dict()
        d.pop("norm_mean")
        d.pop("norm_std")
        return d

    def num_frames(self, n_samples: int) -> int:
        if self.center:
            # reflect padding of n_fft // 2 on each side needs more samples than it pads (torch and nnAudio raise
            # otherwise), so a shorter clip gives no frame at all
            return 1 + n_samples // self.hop_length if n_samples > self.n_fft // 2 else 0
        if n_samples < self.n_fft:
            return 0
        return 1 + (n_samples - self.n_fft) // self.hop_length


PRESETS: dict[str, FrontendSpec] = {
    "matpac": FrontendSpec(),
    "m2d": FrontendSpec(name="m2d", center=True, resampler="soxr_hq", norm_mean=-7.1, norm_std=4.2),
}


def get_spec(name: str) -> FrontendSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown front end {name!r}: choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def check_compatible(expected: FrontendSpec | dict, found: FrontendSpec | dict, where: str = "shards") -> None:
    """One-line error when two specs would produce different log-mel values."""
    e = expected.numerics() if isinstance(expected, FrontendSpec) else FrontendSpec(**expected).numerics()
    f = found.numerics() if isinstance(found, FrontendSpec) else FrontendSpec(**found).numerics()
    diff = {k: (e[k], f.get(k)) for k in e if e[k] != f.get(k)}
    if diff:
        parts = ", ".join(f"{k}: config={a!r} {where}={b!r}" for k, (a, b) in diff.items())
        raise ValueError(
            f"front-end mismatch ({parts}); re-make the {where} with --frontend {e['name']} or train with "
            f"--frontend {f['name']}"
        )


def to_mono(wave: np.ndarray) -> np.ndarray:
    """(N,) or (N, C) as soundfile returns -> float32 (N,), the mean of the channels."""
    wave = np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=1)
    return np.ascontiguousarray(wave)


KAISER_WIDTH, KAISER_ROLLOFF = 64, 0.9475937167399596
# The Kaiser resampler's windowed-sinc kernel holds (new/g) x (orig/g + 2·ceil(64·orig/(rolloff·min rate))) floats
# for g = gcd(orig, new): 180 M for 11,127 Hz, but 16 G (64 GB) for a 999,983 Hz header, which a 60-KB WAV can
# declare. Above this many floats a rate is refused rather than allocated.
MAX_KAISER_KERNEL = 2**28


def check_kaiser_rate(orig_sr: int, new_sr: int) -> None:
    """ValueError (one line) when resampling orig_sr -> new_sr with the Kaiser resampler would need a kernel over
    MAX_KAISER_KERNEL floats (a rate sharing almost no factor with the target: a damaged or hostile header)."""
    g = math.gcd(orig_sr, new_sr)
    o, n = orig_sr // g, new_sr // g
    floats = n * (o + 2 * math.ceil(KAISER_WIDTH * o / (min(o, n) * KAISER_ROLLOFF)))
    if floats > MAX_KAISER_KERNEL:
        raise ValueError(f"sample rate {orig_sr} Hz cannot be resampled to {new_sr} Hz (its resampling kernel would "
                         f"take {4 * floats / 2**30:.0f} GiB); convert the file to a common rate first")


def resample(wave: torch.Tensor, orig_sr: int, spec: FrontendSpec = PRESETS["matpac"]) -> torch.Tensor:
    """Resample float32 (..., N) from `orig_sr` to `spec.sample_rate` with the spec's resampler."""
    if orig_sr == spec.sample_rate:
        return wave
    if spec.resampler == "kaiser":
        check_kaiser_rate(orig_sr, spec.sample_rate)
        import torchaudio.functional as AF

        # The authors' settings (= librosa "kaiser_best"): windowed sinc, Kaiser window. torchaudio applies the
        # kernel with conv1d: on a GPU in TF32 by default, which lifted quiet bins of the log-mel after it as it did
        # with the STFT's (up to ~0.9 in ln(mel), 44.1 kHz tone over noise 74 dB below, TF32 emulated on the CPU).
        with _convolutions_in_full_fp32():
            return AF.resample(
                wave,
                orig_sr,
                spec.sample_rate,
                lowpass_filter_width=64,
                rolloff=0.9475937167399596,
                resampling_method="sinc_interp_kaiser",
                beta=14.769656459379492,
            )
    if spec.resampler == "soxr_hq":
        import soxr  # librosa's default resampler is soxr "HQ"

        x = wave.detach().cpu().numpy()
        flat = x.reshape(-1, x.shape[-1])
        out = np.stack([soxr.resample(row, orig_sr, spec.sample_rate, quality="HQ") for row in flat])
        return torch.from_numpy(out.reshape(*x.shape[:-1], out.shape[-1]).astype(np.float32)).to(wave.device)
    raise ValueError(f"unknown resampler {spec.resampler!r}")


class LogMelSpec(torch.nn.Module):
    """Batched log-mel with nnAudio (CPU or GPU): float32 (B, N) at 16 kHz -> float32 (B, n_mels, T)."""

    def __init__(self, spec: FrontendSpec | str = "matpac"):
        super().__init__()
        from nnAudio.features import MelSpectrogram

        self.spec = get_spec(spec) if isinstance(spec, str) else spec
        s = self.spec
        self.mel = MelSpectrogram(
            sr=s.sample_rate,
            n_fft=s.n_fft,
            win_length=s.win_length,
            n_mels=s.n_mels,
            hop_length=s.hop_length,
            window="hann",
            center=s.center,
            pad_mode="reflect",
            power=2.0,
            htk=False,  # Slaney mel scale
            fmin=s.f_min,
            fmax=s.f_max,
            norm=1,  # Slaney (area) normalisation
            trainable_mel=False,
            trainable_STFT=False,
            verbose=False,
        )

    @torch.no_grad()
    def forward(self, wave_BN: torch.Tensor) -> torch.Tensor:
        if wave_BN.ndim == 1:
            wave_BN = wave_BN[None]
        with _convolutions_in_full_fp32():
            mel = self.mel(wave_BN.float())
        return torch.log(mel + self.spec.log_eps)


@contextlib.contextmanager
def _convolutions_in_full_fp32() -> Iterator[None]:
    """cuDNN convolutions in full float32 inside the block, the caller's setting back afterwards.

    nnAudio's STFT is a conv1d, and PyTorch lets cuDNN run float32 convolutions in TF32 by default (10-bit mantissa
    on Ampere and later GPUs). The DFT's rounding error then scales with the loudest component of a frame: bins
    60-80 dB below it were lifted by up to ~1.5 in ln(mel) (a tone over quiet noise, TF32 emulated on the CPU), where
    the authors' torch.stft stays float32. Through the per-operation flag where torch has it (2.9+): reading the
    older `cudnn.allow_tf32` raises a RuntimeError once conv and RNN flags differ, as a caller's may."""
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        previous = conv.fp32_precision
        conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            conv.fp32_precision = previous
        return
    previous = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = previous


def normalize(lms: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / std in float32; applied on the device, after the loader."""
    return (lms.float() - mean) / std
