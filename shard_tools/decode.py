"""Decoding and checking one input: file -> mono float32 waveform at the front end's rate, or a skip reason.

Decoding never raises to the caller for bad data: every failure becomes a `Skip(reason)`, so one corrupt file
cannot stop a two-million-file run, and every file ends in the manifest with a reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass

import numpy as np
import torch

from matpac_fast.frontend import FrontendSpec, check_kaiser_rate, resample, to_mono
from shard_tools.discover import PYAV_EXTS, Item, printable

SILENCE_PEAK = 1e-6  # about -120 dBFS: below one LSB of 16-bit audio, i.e. digital silence
TRUNCATION_TOLERANCE_S = 0.5  # AudioSet downloads are often a few tens of ms short; that is not truncation
# M2D's data preparation (nttcslab/m2d wav_to_lms.py, min_length=6.1) zero-pads every waveform shorter than 6.1 s
# before the log-mel, so its short clips reach training as >= 611 frames ending in silence (ln eps), and the
# zero-padding of raw log-mel in its audio_dataset.py never fires on them. make-shards does the same for --frontend m2d
# with --short pad (flag 'padded'); the loader's padding then never applies to such sets either.
M2D_MIN_SECONDS = 6.1


def pad_wave_samples(spec: FrontendSpec, short: str) -> int:
    """Samples a short waveform is zero-padded to before the log-mel (at spec.sample_rate), 0 for none: M2D's
    `int(sample_rate * min_length)` for the m2d front end with --short pad."""
    return int(spec.sample_rate * M2D_MIN_SECONDS) if spec.name == "m2d" and short == "pad" else 0
# A file is decoded whole before its log-mel: an hour at 48 kHz stereo is 1.4 GB of float32 per worker. Longer
# files (a recorded lecture, or a few-KB FLAC that declares days of constant audio) are skipped as too_long rather
# than read: a worker the out-of-memory killer ended stopped the run, and the same command met the same file again.
# (Not for an AudioSet file that may hold the whole video: crop_and_flag cuts its segment out of it after decoding.)
MAX_SECONDS = 3600.0
# An AudioSet file that may hold the whole video is cut to its segment: only its audio up to the segment's end and
# this much past it is decoded (enough for crop_and_flag to see that the file runs past its segment, so the cut, the
# flags and the bytes are those of a whole read). Decoded whole, a 1.2-MB FLAC of a 90-minute video took 1.6 GB.
WHOLE_VIDEO_MARGIN_S = 2.0
TOO_LONG_HINT = "split such files into shorter ones, e.g. ffmpeg -i IN -f segment -segment_time 600 OUT_%03d.flac"
NEEDS_PYAV = "needs_pyav"
PYAV_HINT = "m4a/webm/aac need PyAV: pip install av (or pip install 'matpac-fast[av]')"


class Skip(Exception):
    """A file that cannot become a sample; `reason` is a short snake_case word written into the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class Prepared:
    """A decoded, checked, resampled clip ready for the log-mel."""

    wave: np.ndarray  # float32 (N,) at spec.sample_rate
    source_sr: int
    duration: float  # seconds of the (possibly cropped) source audio
    flags: tuple[str, ...]


# A resampler's kernel holds (new/g) x (orig/g + ~2·64·orig/(g·min rate)) floats for g = gcd(orig, new): 0.5 MB
# for 44.1 kHz, but 720 MB for 11,127 Hz (g = 1; ~3 GB while it is built). Up to this many floats it is kept for
# the run; a larger one is built for each clip and freed after it, so a worker does not hold gigabytes for a rate
# it met once (32 such rates would have been tens of GB per worker).
MAX_CACHED_KERNEL = 16 * 2**20  # floats: 64 MiB
_RESAMPLERS: dict[tuple[int, int], torch.nn.Module] = {}


def kaiser_resampler(orig_sr: int, new_sr: int):
    """torchaudio's Resample module with the front end's Kaiser settings. Building the windowed-sinc kernel costs
    more than applying it (18 of 28 ms for 10 s at 44.1 kHz), and a corpus has only a few source rates, so the
    kernel is built once per rate (at most 32 rates, kernels up to MAX_CACHED_KERNEL floats). With dtype float32
    the output is bit-identical to frontend.resample (tests/test_shards.py::test_cached_resampler_is_bit_identical)."""
    import torchaudio.transforms as T

    r = _RESAMPLERS.get((orig_sr, new_sr))
    if r is not None:
        return r
    r = T.Resample(
        orig_sr,
        new_sr,
        resampling_method="sinc_interp_kaiser",
        lowpass_filter_width=64,
        rolloff=0.9475937167399596,
        beta=14.769656459379492,
        dtype=torch.float32,
    )
    if r.kernel.numel() <= MAX_CACHED_KERNEL and len(_RESAMPLERS) < 32:
        _RESAMPLERS[(orig_sr, new_sr)] = r
    return r


def resample_np(mono: np.ndarray, sr: int, spec: FrontendSpec) -> np.ndarray:
    """float32 (N,) at sr -> float32 (M,) at spec.sample_rate, equal to matpac_fast.frontend.resample."""
    if sr == spec.sample_rate:
        return mono
    x = torch.from_numpy(np.ascontiguousarray(mono))
    if spec.resampler == "kaiser":
        try:
            check_kaiser_rate(sr, spec.sample_rate)
        except ValueError as e:
            raise Skip("undecodable", str(e)) from None
        return kaiser_resampler(sr, spec.sample_rate)(x).numpy()
    return resample(x, sr, spec).numpy()


def pyav_available() -> bool:
    try:
        import av  # noqa: F401
    except ImportError:
        return False
    return True


@contextlib.contextmanager
def _captured_stderr_fd():
    """Capture what C code writes to file descriptor 2 (libmpg123 prints 'Note: ...' lines there for every damaged
    MP3). Yields a list that holds the captured text after the block. One process decodes one file at a time, so
    redirecting fd 2 for the duration of one decode hides nothing else."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured.append(tmp.read().decode("utf-8", "replace"))


def _is_decoder_noise(line: str) -> bool:
    """libmpg123's resync notes and ID3 warnings: the decode result (or its Skip) already says what matters."""
    return line.startswith("Note:") or ("libmpg123" in line and "warning:" in line)


# libsndfile's log lines of a chunk's size, "data : 64000 (should be 31978)" when the file ends before it. WAV and
# AIFF: the audio chunk's (data, SSND; a file cut in a chunk after the audio has all its audio). W64 and RF64 leave
# theirs uncorrected (RF64's is 0xFFFFFFFF): the whole file's (riff, Riff size).
_SIZE_LINE = {"audio": re.compile(r"^\s*(?:data|SSND)\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE),
              "file": re.compile(r"^\s*(?:riff|Riff size)\s*:\s*(\d+) \(should be (\d+)\)", re.MULTILINE)}
_SIZE_LINE_OF = {"WAV": "audio", "WAVEX": "audio", "AIFF": "audio", "W64": "file", "RF64": "file"}
CUT_SHORT_FRACTION = 0.001  # of the declared size missing: 10 ms of a 10-s clip; a writer's miscount is a few bytes
UNKNOWN_SIZE = 0xFFFFFF00  # a streaming writer (e.g. ffmpeg to a pipe) declares 0xFFFFFFFF: length unknown, not cut


def cut_short(log: str, fmt: str) -> bool:
    """True when libsndfile's log of an opened file (SoundFile.extra_info; `fmt` SoundFile.format) says its audio
    ends before the size its header declares: an interrupted download or copy, which libsndfile reads without an
    error. Formats other than WAV, AIFF, W64 and RF64: False (a cut FLAC, Ogg or MP3 is a decode error or ends early
    without a trace here)."""
    kind = _SIZE_LINE_OF.get(fmt)
    m = _SIZE_LINE[kind].search(log) if kind else None
    if m is None:
        return False
    declared, actual = int(m.group(1)), int(m.group(2))
    return actual < declared < UNKNOWN_SIZE and (declared - actual) > CUT_SHORT_FRACTION * declared


def _read_soundfile(
    path: str, max_seconds: float = math.inf, stop_seconds: float = math.inf, flags: list[str] | None = None
) -> tuple[np.ndarray, int]:
    """(N, C) float32 and the rate, as read_audio; `flags`, when given, gets 'truncated' appended for a file that
    ends before the size its header declares (what is there is returned)."""
    import soundfile as sf

    is_mp3 = path.lower().endswith(".mp3")
    quiet = _captured_stderr_fd() if is_mp3 else contextlib.nullcontext([""])
    error, seconds = None, 0.0
    with quiet as captured:
        try:  # bytes: libsndfile opens any file name, also one that is not valid UTF-8
            with sf.SoundFile(os.fsencode(path)) as f:
                sr = f.samplerate
                if flags is not None and cut_short(f.extra_info, f.format):
                    flags.append("truncated")
                limit = f.frames if math.isinf(max_seconds) else int(max_seconds * sr)
                if f.frames > limit:  # what the header declares: nothing is decoded
                    seconds = f.frames / sr
                else:  # = sf.read(path, dtype="float32", always_2d=True), at most `limit` frames
                    n = limit + 1 if math.isinf(stop_seconds) else min(limit + 1, int(stop_seconds * sr) + 1)
                    data = f.read(frames=n, dtype="float32", always_2d=True)
                    seconds = len(data) / sr if len(data) > limit else 0.0
        except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError depending on the damage
            error = e
    lines = [line for line in captured[0].splitlines() if line.strip()]
    if error is None and seconds:
        raise Skip("too_long", _too_long_detail(seconds, max_seconds))
    if error is None:
        real = [line for line in lines if not _is_decoder_noise(line)]
        if real:  # the decoder's own lines do not say which file (one of two million) they are about
            name = os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")
            print("\n".join(f"make-shards: {name}: {line.strip()}" for line in real), file=sys.stderr)
        return data, int(sr)
    raise _vanished(path) or Skip("undecodable", _soundfile_detail(path, error, lines)) from None


def _too_long_detail(seconds: float, max_seconds: float, at_least: bool = False) -> str:
    return (f"{'at least ' if at_least else ''}{seconds / 3600:.2f} h of audio, more than make-shards decodes per file "
            f"({max_seconds / 3600:g} h): {TOO_LONG_HINT}")


def _vanished(path: str) -> Skip | None:
    """A file listed by the scan but gone when its turn came (deleted or moved while make-shards ran): not_found, as
    for a manifest path that does not exist, not undecodable."""
    if os.path.lexists(path):
        return None
    return Skip("not_found", "the file was deleted or moved after make-shards listed it")


def _unopenable(path: str) -> str | None:
    """Why the file cannot be opened at all (no read permission, a vanished file), or None: libsndfile says only
    "System error." for an unreadable file, which does not tell the user what to fix."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        fix = " (check its permissions)" if isinstance(e, PermissionError) else ""
        return f"cannot open the file: {e.strerror or e}{fix}"


def _soundfile_detail(path: str, e: Exception, decoder_lines: list[str]) -> str:
    why = _unopenable(path)
    if why:
        return why
    msg = getattr(e, "error_string", None) or str(e)  # LibsndfileError: without the "Error opening b'...'" prefix
    if "possibly a pipe" in msg and os.path.isfile(path):  # what libsndfile says for a file that is not an MP3
        ext = os.path.splitext(path)[1].lower()
        msg = f"not a valid {ext} audio file (libsndfile cannot read it)"
    detail = f"{type(e).__name__}: {msg}"
    notes = [line.removeprefix("Note:").strip() for line in decoder_lines if line.startswith("Note:")]
    said = (notes or [line.strip() for line in decoder_lines])[:1]  # mpg123's first note names the damage
    return f"{detail}; decoder said: {said[0]}" if said else detail


def _read_pyav(path: str, max_seconds: float = math.inf, stop_seconds: float = math.inf) -> tuple[np.ndarray, int]:
    """(N, C) float32 and the rate. Decoding ends once more than `stop_seconds` are decoded (the caller needs only the
    start; what was decoded is returned) and fails with Skip("too_long") past `max_seconds`."""
    if not pyav_available():
        raise Skip(NEEDS_PYAV, PYAV_HINT)
    import av

    try:
        with contextlib.ExitStack() as stack:
            # PyAV cannot open a file name that is not valid UTF-8: give it the open file instead
            target = path if printable(path) == path else stack.enter_context(open(path, "rb"))
            container = stack.enter_context(av.open(target))
            if not container.streams.audio:
                raise Skip("undecodable", "no audio stream")
            stream = container.streams.audio[0]
            # planar float keeps the channels apart so that the downmix is the same mean as for soundfile
            resampler = av.AudioResampler(format="fltp")
            chunks, sr, samples = [], None, 0
            for frame in container.decode(stream):
                sr = sr or frame.sample_rate
                samples += frame.samples
                if samples > max_seconds * sr:  # stop decoding: the rest is not read
                    raise Skip("too_long", _too_long_detail(samples / sr, max_seconds, at_least=True))
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray())
                if samples > stop_seconds * sr:
                    break
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray())
    except Skip:
        raise
    except Exception as e:
        raise _vanished(path) or Skip("undecodable", _unopenable(path) or f"{type(e).__name__}: {e}") from None
    if not chunks or sr is None:
        raise Skip("empty", "no audio frames")
    return np.concatenate(chunks, axis=1).T.astype(np.float32), int(sr)


def read_audio(
    path: str, size: int | None = None, max_seconds: float | None = None, stop_seconds: float = math.inf,
    flags: list[str] | None = None,
) -> tuple[np.ndarray, int]:
    """(N, C) float32 and the sample rate; Skip on any problem, also ("too_long") a file over `max_seconds` (None:
    MAX_SECONDS; math.inf: no limit). Decoding ends once more than `stop_seconds` are decoded (for a caller that needs
    only the start; the array then ends there). `flags`, when given, gets 'truncated' appended for a WAV, AIFF, W64
    or RF64 file shorter than its header declares (`cut_short`)."""
    if size == 0:
        raise Skip("empty", "0-byte file")
    max_seconds = MAX_SECONDS if max_seconds is None else max_seconds
    ext = path[path.rfind(".") :].lower() if "." in path else ""
    if ext in PYAV_EXTS:
        return _read_pyav(path, max_seconds, stop_seconds)
    return _read_soundfile(path, max_seconds, stop_seconds, flags)


def check_wave(wave: np.ndarray) -> None:
    if wave.size == 0:
        raise Skip("empty", "no samples")
    if not np.isfinite(wave).all():
        raise Skip("non_finite", "NaN or Inf samples")
    if float(np.abs(wave).max()) <= SILENCE_PEAK:
        raise Skip("silent", "all samples are (near) zero")


def crop_and_flag(item: Item, wave: np.ndarray, sr: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """AudioSet: a file more than 1 s longer than its segment whose name does not give the start, and that reaches
    into the segment, holds the whole video (it starts at 0 s): it is cut to the CSV segment, flag 'cropped'. A clip
    (cropped or not) more than TRUNCATION_TOLERANCE_S shorter than its segment is kept with the flag 'truncated' (the
    authors keep such clips too, and the frame count is in the json): so a full video that ends inside its segment
    is cut to [start, end of file) and flagged both. A file about as long as the segment is the segment's clip
    already and is never cut; so is a longer one that ends before its segment starts (it cannot be the whole video:
    kept whole, as before)."""
    flags = []
    if item.start is None or item.end is None:
        return wave, ()
    expected = item.end - item.start
    duration = wave.shape[0] / sr
    if not item.name_has_start and duration > expected + 1.0 and duration > item.start + TRUNCATION_TOLERANCE_S:
        wave = wave[int(round(item.start * sr)) : int(round(item.end * sr))]
        duration = wave.shape[0] / sr
        flags.append("cropped")
    if duration < expected - TRUNCATION_TOLERANCE_S:
        flags.append("truncated")
    return wave, tuple(flags)


def _too_short_detail(duration: float, frames: int, need: int, short: str, spec: FrontendSpec) -> str:
    if short == "drop":
        return f"{duration:.2f} s gives {max(frames, 0)} frames < --min-frames {need} (--short pad keeps it)"
    least = spec.n_fft // 2 + 1 if spec.center else spec.n_fft  # samples for one frame (reflect padding: > n_fft/2)
    return f"{duration:.4f} s gives no log-mel frame (one frame needs {1000 * least / spec.sample_rate:.1f} ms)"


def prepare(item: Item, spec: FrontendSpec, min_frames: int, short: str, pad_to: int | None = None) -> Prepared:
    """Decode, check and resample one item; raises Skip with the reason when it cannot be used. `pad_to`: samples a
    shorter waveform is zero-padded to (None: `pad_wave_samples(spec, short)`; 0: none)."""
    if item.skip:
        raise Skip(item.skip, item.detail)
    if item.synth is not None:
        from shard_tools.synthetic import synth_clip

        mono, _ = synth_clip(item.synth[1], item.synth[0], sample_rate=spec.sample_rate)
        sr, flags = spec.sample_rate, ()
    else:
        whole_video = item.end is not None and not item.name_has_start  # may be cut to its segment: no limit
        cut: list[str] = []  # 'truncated' when the file is shorter than its header says
        if whole_video:  # read up to just past the segment's end: the rest would be cut off anyway
            data, sr = read_audio(item.path, item.size, math.inf, item.end + WHOLE_VIDEO_MARGIN_S, flags=cut)
        else:
            data, sr = read_audio(item.path, item.size, flags=cut)
        if data.shape[0] == 0:
            raise Skip("empty", "no samples")
        data, flags = crop_and_flag(item, data, sr)
        flags = (*flags, *(f for f in cut if f not in flags))
        mono = to_mono(data)
        if data.shape[1] > 1 and mono.size and float(np.abs(mono).max()) <= SILENCE_PEAK < float(np.abs(data).max()):
            raise Skip("silent", "its channels cancel out in the mono downmix (one is the other inverted)")
    check_wave(mono)
    duration = mono.shape[0] / sr
    # frame count known before resampling: skip too-short clips without paying for the resampler
    need = min_frames if short == "drop" else 1
    frames = spec.num_frames(math.ceil(mono.shape[0] * spec.sample_rate / sr))
    if frames < need:
        raise Skip("too_short", _too_short_detail(duration, frames, need, short, spec))
    wave = resample_np(mono, sr, spec)
    frames = spec.num_frames(wave.shape[0])
    if frames < need:
        raise Skip("too_short", _too_short_detail(duration, frames, need, short, spec))
    if pad_to is None:  # after the check: a clip too short for one frame alone stays too_short
        pad_to = pad_wave_samples(spec, short)
    if wave.shape[0] < pad_to:
        wave = np.pad(wave, (0, pad_to - wave.shape[0]))
        flags = (*flags, "padded")
    return Prepared(np.ascontiguousarray(wave, dtype=np.float32), sr, duration, flags)
