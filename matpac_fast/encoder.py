"""Embeddings from a trained (or released) MATPAC encoder, and the export to the authors' key layout (METHOD.md §6).

The authors' layout (their `matpac_wrapper`, and the released `matpac_10_2048.pt`):

    patch_embed.proj.weight (D, 1, 16, 16)   patch_embed.proj.bias (D,)
    cls_token (1, 1, D)                      pos_embed (1, 1 + n_f·n_t, D)   # row 0 is the (zero) CLS slot
    student_encoder.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}
    student_encoder.norm.{weight, bias}

`MATPAC` uses the same names for those parts, so `export_encoder_state` is a filter of its state dict and an
exported file loads strictly here and in the authors' wrapper. `load_encoder` accepts:

- that layout (a flat dict, or nested under "model");
- the authors' full training state dict (their fairseq `GeneralModel.state_dict()`, e.g. `model` of a training
  checkpoint re-saved weights-only): the predictor `decoder.*`, MATPAC++ `mcl_heads.*`, `cls_student_head.*`,
  `cls_head_loss.center` and the EMA teacher encoder / teacher head (nested dicts `_ema`, `_cls_head_ema`) are
  dropped when the dict is recognisably theirs (it holds `decoder.decoder_embed.weight`, `_ema`, `_cls_head_ema`
  or `cls_head_loss.center`);
- this project's checkpoints: a full `MATPAC.state_dict()` (teacher, predictor, heads and centre are dropped),
  flat or under "model", optionally with "config" (ModelConfig.to_dict()) beside it; a `.safetensors` file; a
  trainer checkpoint directory (`model.safetensors` inside; `config.json` of the run, up to two levels up, is read;
  its `model.safetensors` file is that directory);
  or the trainer's export `<run>/encoder.pt`, whose `<run>/config.json` is read as the checkpoint folders' is; a
  training run folder `<run>` is that encoder.pt (`resolve_checkpoint`: the same file, config, settings and so
  result identity). A run config that cannot be used (unreadable, not a JSON object, a "model" without dim and
  heads or with values of the wrong type, another dim than the weights') is a one-line ValueError naming it, never
  replaced by `preset`'s settings; a JSON object with neither "train" nor "model" (another tool's config.json) is
  not read, and model fields this version does not know are ignored, each with a `RunConfigWarning`;
- "random": a freshly initialised encoder of `preset`.

A run config supplies the number of heads, n_mels, the normalisation pair and the front end
(`train.run.frontend`); `Encoder.config_source` names the file used (None: none was). The architecture is read from
the tensor shapes (dim, depth, MLP ratio, patch size, time patches). The number of heads cannot be: it comes from a
saved config, else from `preset` when its dim matches, else from any preset with the same dim and depth, else
dim // 64 (the ViT convention); those last two are guesses (`Encoder.heads_guessed`, `Encoder.heads_from` says
which, `Encoder.settings_note()` says where every setting came from): keep a run's config.json beside its
encoder.pt, or load the run / checkpoint folder. The front end is the run's, else "m2d" for an M2D model (preset
or saved config named m2d), else "matpac"; `frontend=` overrides it. Unknown or missing keys raise ValueError
listing them. Files are read with `torch.load(weights_only=True)` or safetensors: nothing is unpickled. A path that
is no checkpoint (a run's config.json or history.jsonl, a shard set or shard, a folder without a model file, a file
of a trainer checkpoint folder other than its weights) is a one-line ValueError saying what to pass instead.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from matpac_fast.cli_args import finite_number
from matpac_fast.config import PRESETS, ModelConfig, get_model_config
from matpac_fast.pos_embed import sincos_2d, truncate_time
from matpac_fast.vit import PatchEmbed, ViTEncoder

ENCODER_PREFIXES = ("patch_embed.", "student_encoder.")
ENCODER_KEYS = ("cls_token", "pos_embed")
# Parts of a full MATPAC state dict that an encoder does not need.
TRAINING_ONLY = ("teacher_encoder.", "predictor.", "student_head.", "teacher_head.", "center")
# The same for the authors' fairseq model (training_matpac/models/model.py): predictor `decoder`, MATPAC++ `mcl_heads`,
# classification heads, the loss's centre buffer. Their teacher encoder and teacher head are fairseq EMAModules (not
# nn.Modules): their state_dict() adds them as nested dicts of tensors under `_ema` and `_cls_head_ema`.
AUTHORS_TRAINING_ONLY = ("decoder.", "mcl_heads.", "cls_student_head.", "cls_teacher_head.", "cls_head_loss.")
AUTHORS_EMA_KEYS = ("_ema", "_cls_head_ema")
# Keys that only the authors' full training state dict has: its other training-only keys are dropped only then, so
# that a stray key such as `decoder.x` in any other dict is still reported as unknown.
AUTHORS_TRAINING_MARKERS = ("decoder.decoder_embed.weight", "cls_head_loss.center") + AUTHORS_EMA_KEYS
# The authors' AudioSet-fine-tuned release with its classifier (`*_enc_and_head.pt`, their inference package's
# `TaskHead`: BatchNorm1d without affine + Linear 768 -> 527, keys `head.norm.*`, `head.mlp.mlp.0.*`). Embeddings come
# from the encoder, so the head is dropped, only when its marker key is present (a stray `head.x` is still unknown).
AUTHORS_AS_HEAD, AUTHORS_AS_HEAD_MARKER = "head.", "head.mlp.mlp.0.weight"
# The same classifier as the wrapper's later version builds it (inference_matpac/matpac/model.py at 1bc5678, loaded
# with strict=False): `head_norm` (BatchNorm1d without affine) and `head` (Linear 768 -> 527). Dropped when both are
# there (the markers); the released file's own key names are not known here, so both layouts are read.
AUTHORS_AS_HEAD_V2_MARKERS = ("head_norm.running_mean", "head.weight")
AUTHORS_AS_HEAD_V2 = ("head_norm.running_mean", "head_norm.running_var", "head_norm.num_batches_tracked", "head.weight",
                      "head.bias")
# The trainer's export: <run>/encoder.pt beside <run>/config.json (trainer.export_encoder).
EXPORT_NAMES = ("encoder.pt",)
# The model file a checkpoint folder is read from (the first one present).
MODEL_FILE_NAMES = ("model.safetensors", "encoder.safetensors", "encoder.pt", "pytorch_model.bin", "model.pt")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _is_encoder_key(k: str) -> bool:
    return k in ENCODER_KEYS or k.startswith(ENCODER_PREFIXES)


def export_encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The student encoder of a MATPAC (or an Encoder) in the authors' layout (tensors detached, same device)."""
    model = getattr(model, "module", model)
    model = getattr(model, "_orig_mod", model)
    return {k: v.detach() for k, v in model.state_dict().items() if _is_encoder_key(k)}


class Encoder(nn.Module):
    """The student encoder for embedding extraction (authors' "precise" mode)."""

    def __init__(self, dim: int, depth: int, heads: int, n_time_patches: int = 38, n_mels: int = 80,
                 patch: int = 16, mlp_ratio: float = 4.0, norm_mean: float = -7.056, norm_std: float = 4.193,
                 frontend: str = "matpac", attn_impl: str = "sdpa"):
        super().__init__()
        if n_mels % patch:
            raise ValueError(f"n_mels={n_mels} must be a multiple of the patch size {patch}")
        from matpac_fast.frontend import get_spec

        get_spec(frontend)  # an unknown name (load_encoder(frontend="m2x")) failed only at the first encode
        self.n_f, self.n_t, self.patch, self.n_mels = n_mels // patch, n_time_patches, patch, n_mels
        self.dim, self.norm_mean, self.norm_std, self.frontend = dim, norm_mean, norm_std, frontend
        self.config_source: str | None = None  # the run config file load_encoder read (None: none was)
        self.settings_from = "the constructor's arguments"  # where heads / normalisation / front end came from
        # load_encoder: where the number of heads came from, when not from `settings_from` (the weights do not
        # hold it), e.g. "preset 'tiny' (same dim and depth)" or "dim // 64 (guess)"; and whether it was guessed
        # (no run config, no saved config, and the preset's dim differs from the weights')
        self.heads_from = self.settings_from
        self.heads_guessed = False
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(dim, self.n_f, n_time_patches, cls_token=True))
        self.student_encoder = ViTEncoder(dim, depth, heads, mlp_ratio, attn_impl)
        self._melspec = None
        self.eval()

    @classmethod
    def from_config(cls, cfg: ModelConfig, frontend: str | None = None) -> Encoder:
        """`frontend` None: "m2d" for the m2d preset's config, else "matpac"."""
        frontend = frontend or ("m2d" if cfg.name == "m2d" else "matpac")
        return cls(cfg.dim, cfg.depth, cfg.heads, cfg.grid[1], cfg.n_mels, cfg.patch, cfg.mlp_ratio,
                   cfg.norm_mean, cfg.norm_std, frontend, cfg.attn_impl)

    @property
    def chunk_frames(self) -> int:
        return self.n_t * self.patch

    @property
    def embed_dim(self) -> int:
        """Per-frame embedding size: n_f · D (3840 for ViT-B on 80 mel bins)."""
        return self.n_f * self.dim

    def forward_chunk(self, x_B1FT: torch.Tensor) -> torch.Tensor:
        """Normalised chunk of at most `chunk_frames` frames (a multiple of the patch) -> (B, n_t', n_f·D)."""
        if x_B1FT.ndim != 4 or x_B1FT.shape[1] != 1 or x_B1FT.shape[2] != self.n_mels:
            # (B, 80, T) was torch's "expected input[1, B, 80, T] to have 1 channels, but got B channels instead"
            shape = tuple(x_B1FT.shape)
            hint = (": add the channel axis with .unsqueeze(1), or pass raw log-mel to encode_lms, which takes "
                    f"(B, {self.n_mels}, T)" if len(shape) == 3 and shape[1] == self.n_mels else "")
            raise ValueError(f"forward_chunk expects a normalised (B, 1, {self.n_mels}, T) chunk, got {shape}{hint}")
        t = x_B1FT.shape[-1]
        if t == 0 or t % self.patch or t > self.chunk_frames:
            # T < patch was the Conv2d's RuntimeError "Kernel size can't be greater than actual input size"; a T not a
            # multiple of the patch silently dropped its last T % patch frames (encode_lms pads them, METHOD.md §6)
            raise ValueError(f"forward_chunk expects {self.patch} to {self.chunk_frames} frames, a multiple of "
                             f"{self.patch} (zero-padded after normalisation), got {t}; encode_lms takes raw log-mel "
                             "of any length and pads and chunks it")
        x = self.patch_embed(x_B1FT.to(self.cls_token.dtype))
        n_t = x.shape[1] // self.n_f
        x = x + truncate_time(self.pos_embed[:, 1:], self.n_f, n_t)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        z = self.student_encoder(torch.cat([cls, x], dim=1))[:, 1:]  # drop CLS
        b = len(z)
        return z.reshape(b, self.n_f, n_t, self.dim).permute(0, 2, 1, 3).reshape(b, n_t, self.n_f * self.dim)

    def settings_note(self) -> str:
        """Where the settings the weights do not hold came from, e.g. "heads, normalisation and front end (matpac)
        from the run config runs/u/config.json" or "heads 4 from preset 'tiny' (same dim and depth), normalisation
        and front end (matpac) from preset 'matpac'", or "heads 12 = dim 768 // 64 (guess), ..."."""
        if self.heads_from == self.settings_from:
            return f"heads, normalisation and front end ({self.frontend}) from {self.settings_from}"
        link = "=" if self.heads_from.startswith("dim ") else "from"  # "heads 12 = dim // 64 (guess)"
        return (f"heads {self.settings()['heads']} {link} {self.heads_from}, normalisation and front end "
                f"({self.frontend}) from {self.settings_from}")

    def settings(self) -> dict:
        """What determines the embeddings besides the weights (for cache keys and result identities)."""
        return dict(dim=self.dim, depth=len(self.student_encoder.blocks),
                    heads=self.student_encoder.blocks[0].attn.num_heads if len(self.student_encoder.blocks) else 0,
                    n_mels=self.n_mels, patch=self.patch, n_time_patches=self.n_t, norm_mean=self.norm_mean,
                    norm_std=self.norm_std, frontend=self.frontend)  # fmt: skip

    def encode_lms(self, lms_BFT: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Raw log-mel (B, n_mels, T), a tensor or numpy array -> frame embeddings (B, ceil(T / patch), n_f·D), one
        per 160 ms.

        `chunk_frames`-frame chunks (608 for the presets; loaded weights: their position table's length, e.g. 992 for
        the authors' AudioSet-fine-tuned encoder); the input is zero-padded (after normalisation) to a multiple of the
        patch, so the last chunk is shorter and uses a truncated positional table. Full chunks run as one batch.

        Runs under the caller's autograd mode: outside `torch.no_grad()` / `torch.inference_mode()` the result
        keeps the autograd graph (for fine-tuning), which holds every block's activations in memory. For
        inference wrap the call in `torch.inference_mode()` or use `encode`, which runs without a graph."""
        if not isinstance(lms_BFT, torch.Tensor):  # a numpy log-mel (librosa's) failed with "has no attribute 'float'"
            lms_BFT = torch.as_tensor(_as_array(lms_BFT, "encode_lms", "log-mel"), device=self.cls_token.device)
        if lms_BFT.ndim != 3 or lms_BFT.shape[1] != self.n_mels:
            raise ValueError(f"encode_lms expects (B, {self.n_mels}, T) log-mel, got {tuple(lms_BFT.shape)}"
                             f"{_lms_shape_hint(tuple(lms_BFT.shape), self.n_mels)}")
        if lms_BFT.shape[-1] == 0:
            raise ValueError(f"encode_lms: the input has no frames (T = 0); at least one is needed (a clip under "
                             f"{self.patch} frames is zero-padded to one patch)")
        # NaN or inf in a clip gave it NaN embeddings, silently (a probe on them scores chance and looks like a result)
        _refuse_non_finite(lms_BFT, "encode_lms", "lms", "NaN or infinite values", "replace them with finite values "
                           "(silence is ln(mel + eps), not ln(0) = -inf) or drop the clip")
        return self._frames(lms_BFT)

    def _frames(self, lms_BFT: torch.Tensor) -> torch.Tensor:
        """encode_lms on a checked (B, n_mels, T > 0) finite log-mel tensor."""
        x = (lms_BFT.float() - self.norm_mean) / self.norm_std
        b, f, t = x.shape
        x = F.pad(x, (0, (-t) % self.patch))
        unit = self.chunk_frames
        n_full = x.shape[-1] // unit
        out = []
        if n_full:
            full = x[..., : n_full * unit].reshape(b, f, n_full, unit).transpose(1, 2).reshape(b * n_full, 1, f, unit)
            out.append(self.forward_chunk(full).reshape(b, n_full * self.n_t, -1))
        if x.shape[-1] > n_full * unit:
            out.append(self.forward_chunk(x[:, None, :, n_full * unit :]))
        return torch.cat(out, dim=1)

    @torch.no_grad()
    def encode(self, wave, sr: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mono waveform (N,) or a batch of clips (B, N) at `sr` -> (frames (B, n, n_f·D), clip (B, n_f·D) = mean
        over frames). Floats are taken as they are (the front ends expect [-1, 1]); integer PCM (scipy's or
        soundfile's int16/int32, 8-bit unsigned) is scaled to [-1, 1] by its type's range. Rows are clips, never
        channels: mix stereo down first (`wave.mean(axis=1)` for soundfile's (N, C))."""
        from matpac_fast.frontend import LogMelSpec, get_spec, resample

        spec = get_spec(self.frontend)
        device = self.cls_token.device
        wave = _float_wave(wave)
        batched = wave.ndim != 1
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2:
            hint = ": drop the channel axis with .squeeze(1)" if wave.ndim == 3 and wave.shape[1] == 1 else ""
            raise ValueError(f"encode expects a waveform (N,) or (B, N), got shape {tuple(wave.shape)}{hint}")
        if wave.shape[1] <= 8 < wave.shape[0]:
            raise ValueError(f"encode got shape {tuple(wave.shape)}: that looks like (samples, channels) audio; pass "
                             "mono (N,), e.g. wave.mean(axis=1), or clips as rows (B, N)")
        # NaN or inf samples (a float WAV can hold them) gave NaN embeddings, silently: make-shards and matpac-eval
        # skip such clips as non_finite; here the caller chooses, so the clip is named
        _refuse_non_finite(wave, "encode", "wave" if batched else None, "NaN or infinite samples",
                           "replace them with finite values (e.g. numpy.nan_to_num) or drop the clip")
        rate, n = _sample_rate(sr), wave.shape[-1]
        wave = resample(wave.to(device), rate, spec)
        if wave.shape[-1] < spec.n_fft:
            # named in the caller's rate: "4 samples at 16000 Hz" for 10 at 44100 Hz read as a miscount
            got = f"{n} samples at {rate} Hz" + (f" ({wave.shape[-1]} at {spec.sample_rate} Hz)"
                                                 if rate != spec.sample_rate else "")
            raise ValueError(f"encode: audio too short: {got}; one log-mel frame needs {spec.n_fft} samples at "
                             f"{spec.sample_rate} Hz ({1000 * spec.n_fft / spec.sample_rate:g} ms): zero-pad the clip "
                             "to that or drop it")
        if self._melspec is None:
            # A plain attribute, not a submodule: registered, its mel filters joined state_dict() after the first
            # encode (that dict then failed to load: "unknown keys _melspec.*") and .half() cast them (the next
            # encode: "expected scalar type Float but found Half"). encode moves it to the device itself.
            object.__setattr__(self, "_melspec", LogMelSpec(spec))
        lms = self._melspec.to(device)(wave)
        # finite samples of magnitude ~1e17 and above overflow the float32 power spectrum: inf log-mel, NaN embeddings
        _refuse_non_finite(lms, "encode", "wave" if batched else None, "samples so loud that the log-mel overflows "
                           "to inf", "the front end expects [-1, 1]: scale the audio down")
        frames = self._frames(lms)
        return frames, frames.mean(dim=1)


def _lms_shape_hint(shape: tuple, n_mels: int) -> str:
    """How to turn a log-mel of a near-miss shape into encode_lms' (B, n_mels, T); "" when none fits."""
    if len(shape) == 4 and shape[1] == 1 and shape[2] == n_mels:  # the loader's and the model's (B, 1, F, T)
        return ": drop the channel axis with .squeeze(1)"
    if len(shape) == 2 and shape[0] == n_mels:
        return ": add the batch axis with .unsqueeze(0)"
    if len(shape) == 3 and shape[2] == n_mels:
        return ": put the mel bins second with .transpose(1, 2)"
    return ""


def _refuse_non_finite(x: torch.Tensor, caller: str, name: str | None, problem: str, fix: str) -> None:
    """One-line ValueError naming the clips of `x` (B, ...) that hold NaN or inf: rows of the caller's batch `name`
    (None: the caller passed one clip). Costs one torch.isfinite over x (a bool per element), reduced per clip."""
    ok = torch.isfinite(x)
    while ok.ndim > 1:
        ok = ok.all(dim=-1)
    if bool(ok.all()):
        return
    bad = (~ok).nonzero().flatten().tolist()
    rows = ", ".join(map(str, bad[:5])) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if name is None:
        clips = "the clip holds"
    elif len(bad) == 1:
        clips = f"clip {rows} of the batch ({name}[{rows}]) holds"
    else:
        clips = f"clips {rows} of the batch hold"
    raise ValueError(f"{caller}: {clips} {problem}; {fix}")


def _sample_rate(sr) -> int:
    """`sr` as an int; a string or a fractional rate was truncated by int() (or failed inside the resampler)."""
    if isinstance(sr, bool) or not isinstance(sr, numbers.Real) or not math.isfinite(sr) or sr != int(sr) or sr <= 0:
        raise ValueError(f"encode: sr must be the audio's sample rate in Hz, a positive whole number (got {sr!r})")
    return int(sr)


def _as_array(x, caller: str, what: str) -> np.ndarray:
    """np.asarray(x), whose failures were numpy's and torch's words: clips of different lengths in a list were
    "setting an array element with a sequence ... inhomogeneous shape", None or text "can't convert np.ndarray of
    type numpy.object_"."""
    try:
        a = np.asarray(x)
    except ValueError:
        raise ValueError(f"{caller}: the clips differ in length; pad them to one length or pass them one at a "
                         "time") from None
    if a.dtype.kind not in "biufc":  # object, str, bytes, datetime, structured
        got = f"an array of {a.dtype}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ValueError(f"{caller} expects {what} (a numpy array or tensor of numbers), got {got}")
    return a


def _float_wave(wave) -> torch.Tensor:
    """float32 tensor of `wave`; integer PCM scaled to [-1, 1] as soundfile and librosa read it (int16 / 2^15,
    int32 / 2^31, uint8 centred on 128): taken as is, int16 audio is 32,768 times too loud for the log-mel."""
    if not isinstance(wave, torch.Tensor):
        # torch.as_tensor refuses big-endian samples (scipy reads a RIFX WAV as >i2) and negative strides (w[::-1]):
        # a copy in native order, only when needed
        wave = _as_array(wave, "encode", "audio samples")
        wave = np.require(wave, dtype=wave.dtype.newbyteorder("="), requirements="C")
    t = torch.as_tensor(wave)
    if t.dtype == torch.uint8:
        return (t.to(torch.float32) - 128.0) / 128.0
    if t.dtype in (torch.int8, torch.int16, torch.int32):
        return t.to(torch.float32) / float(2 ** (torch.iinfo(t.dtype).bits - 1))
    if not t.is_floating_point():  # int64 is no PCM format: a list of ints or widened int16 (scaled by 2^63: silence)
        raise ValueError(f"encode got {str(t.dtype).removeprefix('torch.')} samples: pass float audio in [-1, 1] or "
                         "integer PCM as int16/int32 (e.g. np.asarray(x, np.int16))")
    return t.to(torch.float32)


# ------------------------------------------------------------------------------------------------ loading
ACCEPTED_FORMATS = (
    "accepted: a dict of tensors (optionally under 'model', with a 'config' dict) saved with torch.save, "
    "a .safetensors file, or a trainer checkpoint folder"
)


def _read_file(path: Path) -> dict:
    """Tensors only: safetensors, or torch.load(weights_only=True). Any failure is one line that never suggests
    loading with weights_only=False (torch's own message does): a checkpoint from a stranger must not run code."""
    head = _head_bytes(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head):  # any name: a .pt may hold safetensors
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...: all mean "not a safetensors file"
            reason = _first_line(e)
            raise ValueError(f"{path}: not a readable .safetensors file ({reason}); {ACCEPTED_FORMATS}") from None
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": about a file refused below anyway
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch's text is never shown whole: it suggests weights_only=False
        error = e
    pickled = _pickled_object(error)
    not_weights = None if pickled else _not_a_checkpoint_file(path)
    if not_weights:
        raise ValueError(not_weights)
    if pickled:
        raise ValueError(
            f"{path} holds pickled Python objects ({pickled}), which could run code when loaded: refused (this tool "
            f"reads weights-only: tensors and plain containers); re-save just its tensors; {ACCEPTED_FORMATS}"
        )
    if head[:1] == b"\x80" and not head.startswith(_LEGACY_TORCH_MAGIC):
        # pickle.dump output, not torch.save's: intact, but unpickling a stranger's file could run code
        raise ValueError(f"{path} is a plain Python pickle, not torch.save or safetensors data: refused (unpickling "
                         f"it could run code); re-save its tensors with torch.save or "
                         f"safetensors; {ACCEPTED_FORMATS}")
    raise ValueError(f"{path} cannot be read (damaged or truncated: {_damage_reason(path, error)}); copy or export "
                     f"it again; {ACCEPTED_FORMATS}")


# What to pass instead of something that is not a checkpoint (the CLI's --checkpoint, hear.load_model, load_encoder).
PASS_INSTEAD = ("pass a checkpoint instead: a weights file (.pt, .safetensors), a trainer checkpoint folder "
                "(<run>/checkpoints/step_N) or a training run folder (it loads <run>/encoder.pt)")
AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".aac", ".aif", ".aiff", ".webm")


def _is_run_folder(d: Path) -> bool:
    """A matpac_fast training run: its config.json is a training config, or it holds trainer checkpoints."""
    from matpac_fast.checkpoint import list_checkpoints

    try:
        cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # RecursionError: JSON nested too deep
        cfg = None
    try:
        return _is_training_config(cfg) or bool(list_checkpoints(d))
    except OSError:
        return False


def _run_checkpoints(run: Path) -> list[Path]:
    """The run's complete checkpoint folders that hold weights, oldest first."""
    from matpac_fast.checkpoint import list_checkpoints

    try:
        return [c for c in list_checkpoints(run) if (c / "model.safetensors").is_file()]
    except OSError:
        return []


def _run_hint(run: Path) -> str:
    """What to pass for run folder `run`: the run folder / its encoder.pt, or a checkpoint folder of it."""
    export, ckpts = run / EXPORT_NAMES[0], _run_checkpoints(run)
    if export.is_file():
        step = f"; a checkpoint folder such as {ckpts[-1]} evaluates that step" if ckpts else ""
        return f"pass the run folder {run} or its {export} instead (the same weights){step}"
    if ckpts:
        return (f"the run has no {export.name} yet (training writes it when it ends): pass a checkpoint folder "
                f"instead, e.g. the latest, {ckpts[-1]}")
    return f"the run has neither {export.name} nor a checkpoint yet: train it first"


def _enclosing_run(path: Path) -> Path | None:
    """The training run folder `path` lies in (up to three levels up: <run>/checkpoints/step_N/file), or None."""
    return next((d for d in list(path.parents)[:3] if _is_run_folder(d)), None)


def _is_shard_set(d: Path) -> bool:
    """A make-shards output folder (sizes.json / stats.json beside <name>-NNNNNN.tar shards)."""
    shard = "*-" + "[0-9]" * 6 + ".tar"
    return (d / "sizes.json").is_file() or ((d / "stats.json").is_file() and any(d.glob(shard)))


def _tar_members(path: Path, n: int = 16) -> list[str] | None:
    """The first `n` member names of a tar archive (read lazily: a shard can be gigabytes), or None if not a tar."""
    import tarfile

    try:
        with tarfile.open(path, "r:") as tf:
            names = []
            for m in tf:
                names.append(m.name)
                if len(names) >= n:
                    break
            return names or None
    except (tarfile.TarError, OSError, ValueError, EOFError, OverflowError):  # Overflow: a header size of 2**80
        return None


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3  # only a character cut by the read
    return True


def _not_a_checkpoint_file(path: Path) -> str | None:
    """One line saying what `path` is and what to pass instead, for a file that torch.load cannot read because it
    is no checkpoint at all (a run's config.json or history.jsonl, a shard .tar, audio, text); None otherwise (a
    damaged checkpoint). Reads bytes, JSON and tar member names only: nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return None
    if not head:
        return None  # an empty file: damaged (a truncated download or an interrupted save)
    run = _enclosing_run(path)
    hint = _run_hint(run) if run is not None else PASS_INSTEAD
    suffix = path.suffix.lower()
    members = None if _looks_like_text(head) else _tar_members(path)
    if members is not None:
        if {"pickle", "storages", "tensors"} & {m.rsplit("/", 1)[-1] for m in members}:
            return (f"{path} is a checkpoint in PyTorch's legacy .tar format, which cannot be read weights-only "
                    "(without unpickling); re-save its tensors with torch.save in a current PyTorch, or "
                    f"{PASS_INSTEAD.replace('pass a checkpoint instead', 'pass another checkpoint')}")
        if any(m.endswith(".npy") for m in members):
            what = "a shard of a shard set (training data written by make-shards)"
        else:
            what = "a tar archive"
    elif suffix in AUDIO_SUFFIXES:
        what = "an audio file"
    elif _looks_like_text(head):
        is_json = suffix in (".json", ".jsonl") or head.lstrip()[:1] in (b"{", b"[")
        if run is not None and path.parent == run and path.name == "config.json":
            what = "the run's training config (JSON)"
        elif run is not None and path.parent == run and path.name == "history.jsonl":
            what = "the run's training log (JSON lines)"
        elif _is_shard_set(path.parent):
            what = f"a file of the shard set {path.parent} (training data written by make-shards)"
        elif is_json:
            what = "a JSON-lines file" if suffix == ".jsonl" else "a JSON file"
        else:
            what = "a text file"
    else:
        return None
    return f"{path} is {what}, not a checkpoint; {hint}"


def _no_checkpoint_in_folder(path: Path) -> str:
    """One line for a folder that holds no model file: what it is (a run without encoder.pt, a run's checkpoints/,
    a shard set, ...) and what to pass instead."""
    looked = ", ".join(MODEL_FILE_NAMES)
    if _is_run_folder(path):
        return f"{path} is a training run folder; {_run_hint(path)}"  # one without encoder.pt (else resolved)
    run = _enclosing_run(path / "x")  # the folder itself or up to two levels up
    if run is not None and path == run / "checkpoints":
        ckpts = _run_checkpoints(run)
        if ckpts:
            also = f", or the run folder {run} (its {EXPORT_NAMES[0]})" if (run / EXPORT_NAMES[0]).is_file() else ""
            return (f"{path} holds the run's checkpoints, not one checkpoint; pass one of its step folders instead, "
                    f"e.g. the latest, {ckpts[-1]}{also}")
    if run is not None:
        return f"{path} holds no checkpoint (no {looked}); {_run_hint(run)}"
    if _is_shard_set(path):
        return f"{path} is a shard set (training data written by make-shards), not a checkpoint; {PASS_INSTEAD}"
    runs = _run_folders_in(path)  # e.g. `make demo`'s runs/demo, whose run is runs/demo/train
    if runs:
        run, export = runs[0], runs[0] / EXPORT_NAMES[0]
        more = f" (one of {len(runs)})" if len(runs) > 1 else ""
        what = f"pass that folder instead (it loads {export})" if export.is_file() else _run_hint(run)
        return f"{path} holds no checkpoint (no {looked}) but the training run folder {run}{more}: {what}"
    return f"{path} holds no checkpoint (no {looked}); {PASS_INSTEAD}"


def _run_folders_in(path: Path, limit: int = 200) -> list[Path]:
    """The training run folders directly inside `path` that hold weights (an encoder.pt or a checkpoint)."""
    try:
        subs = sorted(d for d in path.iterdir() if d.is_dir())[:limit]
    except OSError:
        return []
    return [d for d in subs if _is_run_folder(d) and ((d / EXPORT_NAMES[0]).is_file() or _run_checkpoints(d))]


def _pickled_object(e: Exception) -> str | None:
    """The name of the Python object a weights-only load refused (e.g. 'argparse.Namespace'), or None when the
    failure is not a refused object (a damaged, truncated or foreign file)."""
    text = str(e)
    if type(e).__name__ != "UnpicklingError":
        return None
    # torch's wordings: "Unsupported global: GLOBAL x.y", "Unsupported class x.y", and for a blocked module such as
    # os's posix (torch >= 2.6) "unsupported GLOBAL posix.system whose module posix is blocked".
    found = re.search(r"(?:Unsupported (?:global: GLOBAL|class)|unsupported GLOBAL) ([\w.]+)", text, re.IGNORECASE)
    if found:
        return found.group(1)
    return "an object" if re.search(r"global|reduce|Unsupported class", text, re.IGNORECASE) else None


# torch.save's legacy (non-zip) format starts with this pickled magic number; pickle.dump output does not.
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _head_bytes(path: Path, n: int = 16) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors: an 8-byte little-endian header length, then the JSON header ('{')."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 2**31


def _damage_reason(path: Path, e: Exception) -> str:
    """A short reason for a file torch.load cannot read, without torch's advice."""
    try:
        if path.stat().st_size == 0:
            return "empty file"
    except OSError:
        pass
    if isinstance(e, EOFError):
        return "the file ends early"
    text = str(e)
    operand = re.search(r"Unsupported operand (\d+)", text)
    if operand:
        return f"not torch.save data (unknown byte {operand.group(1)})"
    if type(e).__name__ == "UnpicklingError" or isinstance(e, KeyError):
        return f"not torch.save data ({type(e).__name__})"
    if "central directory" in text:
        return "incomplete zip archive (no central directory)"
    first = re.split(r"(?<=[^.])\. ", _first_line(e), maxsplit=1)[0].rstrip(".")
    return first[:120] or type(e).__name__


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


class RunConfig(dict):
    """The parts of a run's config.json the encoder needs: the "model" dict (ModelConfig fields), plus
    `frontend` (train.run.frontend, or None when not recorded) and `source` (the file)."""

    frontend: str | None = None
    source: str | None = None


def resolve_checkpoint(path: str | Path) -> Path:
    """The path `load_encoder` reads for `path`. A folder whose model file is the trainer's export (a training run
    folder: <run>/encoder.pt, no model.safetensors of its own) is that file: `run/` and `run/encoder.pt` are one
    checkpoint (the same bytes, run config, settings and result identity). A checkpoint folder (model.safetensors)
    is itself, and so is its model.safetensors when it is a trainer checkpoint folder (trainer_state.json beside
    it): `step_N/` and `step_N/model.safetensors` are one checkpoint (the run's config.json is read for both). Any
    other file is itself. A path that is no checkpoint (a folder without a model file, a file of a trainer
    checkpoint folder other than its weights) is a one-line ValueError saying what to pass instead."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in MODEL_FILE_NAMES if (path / n).is_file()]
        if not found:
            raise ValueError(_no_checkpoint_in_folder(path))
        return found[0] if found[0].name in EXPORT_NAMES else path
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    folder = path.parent
    if (folder / "model.safetensors").is_file() and (folder / "trainer_state.json").is_file():
        if path.name == "model.safetensors":  # the weights of a trainer checkpoint folder are that checkpoint
            return folder
        # optimizer.bin, random_states_0.pkl, trainer_state.json: no encoder weights (nor read as such)
        raise ValueError(f"{path} is part of the trainer checkpoint folder {folder}, not its weights; pass that "
                         "folder instead")
    return path


def _read_path(path: Path) -> tuple[dict, RunConfig | None]:
    """-> (raw object, run config or None)."""
    path = resolve_checkpoint(path)
    if path.is_dir():
        found = [path / n for n in MODEL_FILE_NAMES if (path / n).is_file()]
        cfg = None
        for d in (path, path.parent, path.parent.parent):  # run_dir/checkpoints/step_X -> run_dir/config.json
            if (d / "config.json").exists():
                cfg = _read_run_config(d / "config.json")
                break
        return _read_file(found[0]), cfg
    cfg = None
    if path.name in EXPORT_NAMES and (path.parent / "config.json").is_file():  # the trainer's <run>/encoder.pt
        cfg = _read_run_config(path.parent / "config.json")
    return _read_file(path), cfg


class RunConfigWarning(UserWarning):
    """A config.json beside the weights that is another tool's (not read), or a run config with model fields this
    version does not know (ignored). matpac-eval prints it as its own warning line."""


def _is_training_config(cfg) -> bool:
    """What the trainer writes: {"train": TrainConfig.to_dict(), "model": ModelConfig fields}."""
    from dataclasses import fields

    if not (isinstance(cfg, dict) and isinstance(cfg.get("train"), dict) and isinstance(cfg.get("model"), dict)):
        return False
    model = cfg["model"]
    return {"dim", "heads"} <= set(model) and set(model) <= {f.name for f in fields(ModelConfig)}


def _kind(x) -> str:
    """train_config.json_kind's words, "null" for None."""
    from matpac_fast.train_config import json_kind

    return json_kind(x) or "null"


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def _read_run_config(path: Path) -> RunConfig | None:
    """The model part of the run config `path` (the config.json of a run folder, beside its encoder.pt or two levels
    above its checkpoint folders), read the same way for every spelling of a run's weights (run folder, encoder.pt,
    checkpoints/step_N), so that one set of weights gets one set of settings. A file that is meant as a run config
    (a JSON object with "train" or "model") but cannot be used is a one-line ValueError naming the file and what is
    wrong: it used to be dropped in silence, and the weights were embedded with --preset's normalisation and front
    end while the CLI said the run "has no run config". A JSON object without either (another tool's config.json,
    e.g. a Hugging Face one) is not read, with a RunConfigWarning saying so (None). Model fields this version does
    not know are ignored with a RunConfigWarning: the fields the encoder uses are all checked."""
    from dataclasses import fields

    from matpac_fast.frontend import PRESETS as FRONTENDS

    def bad(what: str) -> ValueError:
        return ValueError(f"{path}: {what}; fix or remove it")

    try:
        text = path.read_text(encoding="utf-8")
        cfg = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # Recursion: nested too deep
        reason = "an empty file" if isinstance(e, json.JSONDecodeError) and not text.strip() else _first_line(e)
        raise bad(f"not a readable JSON run config ({reason})") from None
    if not isinstance(cfg, dict):  # no tool writes a config.json that is a list or a number: damaged or hand-made
        raise bad(f"not a run config: the file holds {_kind(cfg)}, not a JSON object")
    if "train" not in cfg and "model" not in cfg:
        warnings.warn(f"{path} is not a matpac_fast run config (a JSON object without \"train\" and \"model\"; "
                      "another tool's?): not read", RunConfigWarning, stacklevel=4)
        return None
    model, train = cfg.get("model"), cfg.get("train", {})
    if not isinstance(model, dict):
        raise bad(f"its \"model\" is {_kind(model)}, not a JSON object of model settings")
    if not isinstance(train, dict):
        raise bad(f"its \"train\" is {_kind(train)}, not a JSON object")
    missing = [k for k in ("dim", "heads") if k not in model]
    if missing:
        raise bad(f"its \"model\" has no {' or '.join(missing)}")
    count = "a positive whole number"
    for key, ok, want in (("dim", _is_count, count), ("heads", _is_count, count), ("n_mels", _is_count, count),
                          ("norm_mean", finite_number, "a finite number"),
                          ("norm_std", lambda x: finite_number(x) and x > 0, "a positive number"),
                          ("name", lambda x: isinstance(x, str), "a preset name (text)")):
        if key in model and not ok(model[key]):
            raise bad(f"model {key} is {model[key]!r}, not {want}")
    run = train.get("run", {})
    if not isinstance(run, dict):
        raise bad(f"its train.run is {_kind(run)}, not a JSON object")
    frontend = run.get("frontend")  # None: not recorded (then m2d for an M2D model, else matpac)
    if frontend is not None and frontend not in FRONTENDS:
        raise bad(f"train.run.frontend is {frontend!r}, not one of the front ends {sorted(FRONTENDS)}")
    unknown = sorted(set(model) - {f.name for f in fields(ModelConfig)})
    if unknown:
        warnings.warn(f"{path}: model field(s) {', '.join(map(str, unknown))} unknown to this version of matpac_fast "
                      "and ignored (written by a newer version, or edited?); the others are read", RunConfigWarning,
                      stacklevel=4)
    out = RunConfig(model)
    out.frontend = frontend
    out.source = str(path)
    return out


def _unwrap(obj) -> tuple[dict, dict | None]:
    cfg = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
        obj = obj["model"]
    if isinstance(obj, dict) and any(k in obj for k in AUTHORS_TRAINING_MARKERS):
        obj = _drop_authors_training(obj)
    if isinstance(obj, dict) and AUTHORS_AS_HEAD_MARKER in obj:
        obj = {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith(AUTHORS_AS_HEAD))}
    if isinstance(obj, dict) and all(k in obj for k in AUTHORS_AS_HEAD_V2_MARKERS):
        obj = {k: v for k, v in obj.items() if k not in AUTHORS_AS_HEAD_V2}
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict: expected a dict of tensors (optionally nested under 'model')")
    if not all(isinstance(k, str) for k in obj):
        raise ValueError("not a state dict: its keys are not all parameter names (strings)")
    state = {}
    for k, v in obj.items():
        for p in WRAPPER_PREFIXES:
            k = k.removeprefix(p)
        state[k] = v
    return state, cfg


def _drop_authors_training(obj: dict) -> dict:
    """The authors' full training state dict without its training-only parts; `_ema` / `_cls_head_ema` must be
    what their EMAModule stores (a dict of tensors), anything else there stays and is refused as not a state dict."""
    out = {}
    for k, v in obj.items():
        if k in AUTHORS_EMA_KEYS and isinstance(v, dict) and all(isinstance(t, torch.Tensor) for t in v.values()):
            continue
        if isinstance(k, str) and k.startswith(AUTHORS_TRAINING_ONLY):
            continue
        out[k] = v
    return out


def _infer_arch(state: dict, preset: str, cfg: dict | None, why: dict | None = None) -> dict:
    """The Encoder's arguments for `state`. `why`, when given, gets "heads": where the number of heads came from
    (None: the config; else e.g. "preset 'tiny'") and "heads_guessed": True when neither a config nor `preset`
    (its dim differs) gave it, so that it is another preset's with the same dim and depth, or dim // 64."""
    if "cls_token" not in state or "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
        raise ValueError(f"not a MATPAC encoder state dict: missing keys {missing}")
    # the shapes read below, checked first: a mis-shaped tensor is "not this model", never an IndexError
    for key, rank in (("cls_token", 3), ("pos_embed", 3), ("patch_embed.proj.weight", 4)):
        if state[key].dim() != rank:
            raise ValueError(f"not a MATPAC encoder state dict: {key} has shape {tuple(state[key].shape)}, expected "
                             f"{rank} dimensions")
    dim = state["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"student_encoder\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    patch = state["patch_embed.proj.weight"].shape[-1]
    fc1 = state.get("student_encoder.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    base = get_model_config(preset)
    if isinstance(cfg, RunConfig) and cfg.get("dim") != dim:
        # its heads were passed over for --preset's, but its normalisation and front end were used: half a config
        raise ValueError(f"the run config {cfg.source} has model dim {cfg.get('dim')}, the weights {dim}: it is not "
                         "these weights' config; fix or remove it")
    cfg = cfg or {}
    source, guessed = None, False
    if cfg.get("dim") == dim and "heads" in cfg:
        heads = cfg["heads"]
    elif base.dim == dim:
        heads, source = base.heads, f"preset {preset!r}"
    else:
        same = [(n, get_model_config(n)) for n in PRESETS]
        same = [(n, c) for n, c in same if c.dim == dim and c.depth == depth]
        guessed = True
        if same:
            heads, source = same[0][1].heads, f"preset {same[0][0]!r} (same dim and depth)"
        else:
            heads, source = (dim // 64 if dim % 64 == 0 else 0), f"dim {dim} // 64 (guess)"
        if not heads:
            raise ValueError(f"cannot infer the number of heads for dim {dim}: pass a checkpoint with its config")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or dim % heads:
        raise ValueError(f"heads {heads!r} (from {source or 'the saved config'}) does not divide the weights' width "
                         f"{dim}: the config does not belong to these weights")
    if why is not None:
        why.update(heads=source, heads_guessed=guessed)
    n_mels = cfg.get("n_mels", base.n_mels)
    n_tokens = state["pos_embed"].shape[1] - 1
    n_f = n_mels // patch
    if n_tokens % n_f:
        raise ValueError(f"pos_embed has {n_tokens} patch rows, not a multiple of {n_f} frequency patches")
    return dict(dim=dim, depth=depth, heads=heads, n_time_patches=n_tokens // n_f, n_mels=n_mels, patch=patch,
                mlp_ratio=mlp_ratio, norm_mean=cfg.get("norm_mean", base.norm_mean),
                norm_std=cfg.get("norm_std", base.norm_std))


def _frontend(explicit: str | None, cfg: dict | None, preset: str) -> str:
    """The front end the encoder was trained on: `explicit`, else the run's, else m2d for an M2D model."""
    if explicit is not None:
        return explicit
    if isinstance(cfg, RunConfig) and cfg.frontend:
        return cfg.frontend
    name = cfg.get("name") if isinstance(cfg, dict) and cfg.get("name") else preset
    return "m2d" if name == "m2d" else "matpac"


def load_encoder(source, preset: str = "matpac", device: str | torch.device = "cpu", strict: bool = True,
                 frontend: str | None = None) -> Encoder:
    """Path (file or checkpoint directory), state dict, or "random" -> Encoder in eval mode on `device`.
    `frontend` None: the run's front end when its config is read, else "m2d" for an M2D model, else "matpac"."""
    if frontend is not None:
        from matpac_fast.frontend import get_spec

        get_spec(frontend)  # before any file is read: "unknown front end 'm2x': choose one of [...]"
    if isinstance(source, str) and source == "random":
        enc = Encoder.from_config(get_model_config(preset), _frontend(frontend, None, preset))
        enc.settings_from = enc.heads_from = f"preset {preset!r}"
        return enc.to(device)
    if isinstance(source, (str, Path)):
        source = resolve_checkpoint(source)  # a run folder is its encoder.pt: the same settings as that file
        raw, file_cfg = _read_path(source)
    else:
        raw, file_cfg = source, None
    why: dict = {}
    try:
        state, nested_cfg = _unwrap(raw)
        cfg = nested_cfg or file_cfg
        state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
        arch = _infer_arch(state, preset, cfg, why)
    except ValueError as e:  # a readable file that holds something else: name it
        if isinstance(source, Path):
            raise ValueError(f"{source}: {e}") from None
        raise
    enc = Encoder(**arch, frontend=_frontend(frontend, cfg, preset))
    enc.config_source = cfg.source if isinstance(cfg, RunConfig) else None
    # What this file gave before an exported encoder.pt read its run config (`preset` alone): equal settings mean
    # equal embeddings, so a result keyed by file and preset keeps its name (evaluation.embed). A nested config is
    # part of the file (and of its digest): its settings are its own. A run config beside the file or above a
    # checkpoint folder is not in the digest, so a folder read in its run and a copy read without it (--preset's
    # settings) had one identity and one embedding cache entry: the second was served the first one's embeddings.
    enc.preset_settings = enc.settings()
    if nested_cfg is None and file_cfg is not None:
        try:
            alone = {**_infer_arch(state, preset, None), "frontend": _frontend(None, None, preset)}
            enc.preset_settings = {k: alone.get(k, v) for k, v in enc.settings().items()}
        except ValueError:  # the preset alone cannot even describe these weights
            enc.preset_settings = None
    if enc.config_source:
        enc.settings_from = f"the run config {enc.config_source}"
    else:
        enc.settings_from = "the config saved in the checkpoint" if cfg else f"preset {preset!r}"
    enc.heads_from = why["heads"] or enc.settings_from
    enc.heads_guessed = why["heads_guessed"]
    expected = set(enc.state_dict())
    unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if strict and (unknown or missing):
        raise ValueError(f"encoder state dict does not match: unknown keys {unknown}, missing keys {missing}")
    bad = [k for k in expected & set(state) if state[k].shape != enc.state_dict()[k].shape]
    if bad:
        raise ValueError(f"shape mismatch for {sorted(bad)}")
    # NaN/inf weights give NaN embeddings, which a probe turns into a chance-level score that looks like a result.
    nonfinite = sorted(k for k in expected & set(state)
                       if state[k].is_floating_point() and not bool(torch.isfinite(state[k]).all()))
    if nonfinite:
        where = f"{source}: " if isinstance(source, Path) else ""
        more = f" and {len(nonfinite) - 3} more" if len(nonfinite) > 3 else ""
        raise ValueError(f"{where}non-finite values (NaN or inf) in {', '.join(nonfinite[:3])}{more}: these weights "
                         "are damaged (a diverged run?); use an earlier checkpoint")
    enc.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
    return enc.to(device).eval()
