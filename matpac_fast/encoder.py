"""Embeddings from a trained (or released) MATPAC encoder, and the export to the authors' key layout (METHOD.md §6).

The authors' layout (their `matpac_wrapper`, and the released `matpac_10_2048.pt`):

    patch_embed.proj.weight (D, 1, 16, 16)   patch_embed.proj.bias (D,)
    cls_token (1, 1, D)                      pos_embed (1, 1 + n_f·n_t, D)   # row 0 is the (zero) CLS slot
    student_encoder.blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}
    student_encoder.norm.{weight, bias}

`MATPAC` uses the same names for those parts, so `export_encoder_state` is a filter of its state dict and an
exported file loads strictly here and in the authors' wrapper. `load_encoder` accepts:

- that layout (a flat dict, or nested under "model");
- this project's checkpoints: a full `MATPAC.state_dict()` (teacher, predictor, heads and centre are dropped),
  flat or under "model", optionally with "config" (ModelConfig.to_dict()) beside it; a `.safetensors` file; or a
  trainer checkpoint directory (`model.safetensors` inside; `config.json` of the run two levels up is read for
  the number of heads and the normalisation);
- "random": a freshly initialised encoder of `preset`.

The architecture is read from the tensor shapes (dim, depth, MLP ratio, patch size, time patches). The number of
heads cannot be: it comes from a saved config, else from `preset` when its dim matches, else from any preset with
the same dim and depth, else dim // 64 (the ViT convention). Unknown or missing keys raise ValueError listing them.
Files are read with `torch.load(weights_only=True)` or safetensors: nothing is unpickled.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from matpac_fast.config import PRESETS, ModelConfig, get_model_config
from matpac_fast.pos_embed import sincos_2d, truncate_time
from matpac_fast.vit import PatchEmbed, ViTEncoder

ENCODER_PREFIXES = ("patch_embed.", "student_encoder.")
ENCODER_KEYS = ("cls_token", "pos_embed")
# Parts of a full MATPAC state dict that an encoder does not need.
TRAINING_ONLY = ("teacher_encoder.", "predictor.", "student_head.", "teacher_head.", "center")
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
        self.n_f, self.n_t, self.patch, self.n_mels = n_mels // patch, n_time_patches, patch, n_mels
        self.dim, self.norm_mean, self.norm_std, self.frontend = dim, norm_mean, norm_std, frontend
        self.patch_embed = PatchEmbed(dim, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.cls_token, std=0.02)
        self.register_buffer("pos_embed", sincos_2d(dim, self.n_f, n_time_patches, cls_token=True))
        self.student_encoder = ViTEncoder(dim, depth, heads, mlp_ratio, attn_impl)
        self._melspec = None
        self.eval()

    @classmethod
    def from_config(cls, cfg: ModelConfig, frontend: str = "matpac") -> Encoder:
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
        x = self.patch_embed(x_B1FT.to(self.cls_token.dtype))
        n_t = x.shape[1] // self.n_f
        x = x + truncate_time(self.pos_embed[:, 1:], self.n_f, n_t)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1)
        z = self.student_encoder(torch.cat([cls, x], dim=1))[:, 1:]  # drop CLS
        b = len(z)
        return z.reshape(b, self.n_f, n_t, self.dim).permute(0, 2, 1, 3).reshape(b, n_t, self.n_f * self.dim)

    def encode_lms(self, lms_BFT: torch.Tensor) -> torch.Tensor:
        """Raw log-mel (B, n_mels, T) -> frame embeddings (B, ceil(T / patch), n_f·D), one per 160 ms.

        608-frame chunks; the input is zero-padded (after normalisation) to a multiple of the patch, so the last
        chunk is shorter and uses a truncated positional table. Full chunks run as one batch."""
        if lms_BFT.ndim != 3 or lms_BFT.shape[1] != self.n_mels:
            raise ValueError(f"encode_lms expects (B, {self.n_mels}, T) log-mel, got {tuple(lms_BFT.shape)}")
        x = (lms_BFT.float() - self.norm_mean) / self.norm_std
        b, f, t = x.shape
        if t == 0:
            raise ValueError("encode_lms: the input has no frames")
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
        """Waveform (N,) or (B, N) at `sr` -> (frames (B, n, n_f·D), clip (B, n_f·D) = mean over frames)."""
        from matpac_fast.frontend import LogMelSpec, get_spec, resample

        spec = get_spec(self.frontend)
        device = self.cls_token.device
        wave = torch.as_tensor(wave, dtype=torch.float32)
        if wave.ndim == 1:
            wave = wave[None]
        if wave.ndim != 2:
            raise ValueError(f"encode expects a waveform (N,) or (B, N), got shape {tuple(wave.shape)}")
        wave = resample(wave.to(device), int(sr), spec)
        if wave.shape[-1] < spec.n_fft:
            raise ValueError(f"audio too short: {wave.shape[-1]} samples at {spec.sample_rate} Hz < n_fft {spec.n_fft}")
        if self._melspec is None:
            self._melspec = LogMelSpec(spec)
        frames = self.encode_lms(self._melspec.to(device)(wave))
        return frames, frames.mean(dim=1)


# ------------------------------------------------------------------------------------------------ loading
ACCEPTED_FORMATS = (
    "accepted: a dict of tensors (optionally under 'model', with a 'config' dict) saved with torch.save, "
    "a .safetensors file, or a trainer checkpoint folder"
)


def _read_file(path: Path) -> dict:
    """Tensors only: safetensors, or torch.load(weights_only=True). Any failure is one line that never suggests
    loading with weights_only=False (torch's own message does): a checkpoint from a stranger must not run code."""
    if path.suffix == ".safetensors":
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
    if pickled:
        raise ValueError(
            f"{path} holds pickled Python objects ({pickled}), which could run code when loaded: refused (this tool "
            f"reads weights-only: tensors and plain containers); re-save just its tensors; {ACCEPTED_FORMATS}"
        )
    raise ValueError(f"{path} cannot be read (damaged or truncated: {_damage_reason(path, error)}); copy or export "
                     f"it again; {ACCEPTED_FORMATS}")


def _pickled_object(e: Exception) -> str | None:
    """The name of the Python object a weights-only load refused (e.g. 'argparse.Namespace'), or None when the
    failure is not a refused object (a damaged, truncated or foreign file)."""
    text = str(e)
    if type(e).__name__ != "UnpicklingError":
        return None
    found = re.search(r"Unsupported (?:global: GLOBAL|class) ([\w.]+)", text)
    if found:
        return found.group(1)
    return "an object" if re.search(r"global|reduce|Unsupported class", text) else None


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


def _read_path(path: Path) -> tuple[dict, dict | None]:
    """-> (raw object, model config dict or None)."""
    if path.is_dir():
        names = ("model.safetensors", "encoder.safetensors", "encoder.pt", "pytorch_model.bin", "model.pt")
        found = [path / n for n in names if (path / n).exists()]
        if not found:
            raise ValueError(f"{path}: no model file found (looked for {', '.join(names)})")
        cfg = None
        for d in (path, path.parent, path.parent.parent):  # run_dir/checkpoints/step_X -> run_dir/config.json
            if (d / "config.json").exists():
                cfg = _read_run_config(d / "config.json")
                break
        return _read_file(found[0]), cfg
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    return _read_file(path), None


def _read_run_config(path: Path) -> dict | None:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON run config ({_first_line(e)}); fix or remove it") from None
    model = cfg.get("model") if isinstance(cfg, dict) else None
    return model if isinstance(model, dict) else None


def _unwrap(obj) -> tuple[dict, dict | None]:
    cfg = None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        cfg = obj.get("config") if isinstance(obj.get("config"), dict) else None
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict: expected a dict of tensors (optionally nested under 'model')")
    state = {}
    for k, v in obj.items():
        for p in WRAPPER_PREFIXES:
            k = k.removeprefix(p)
        state[k] = v
    return state, cfg


def _infer_arch(state: dict, preset: str, cfg: dict | None) -> dict:
    if "cls_token" not in state or "pos_embed" not in state or "patch_embed.proj.weight" not in state:
        missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in state]
        raise ValueError(f"not a MATPAC encoder state dict: missing keys {missing}")
    dim = state["cls_token"].shape[-1]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"student_encoder\.blocks\.(\d+)\.", k))}
    depth = max(blocks) + 1 if blocks else 0
    patch = state["patch_embed.proj.weight"].shape[-1]
    fc1 = state.get("student_encoder.blocks.0.mlp.fc1.weight")
    mlp_ratio = fc1.shape[0] / dim if fc1 is not None else 4.0
    base = get_model_config(preset)
    cfg = cfg or {}
    if cfg.get("dim") == dim and "heads" in cfg:
        heads = cfg["heads"]
    elif base.dim == dim:
        heads = base.heads
    else:
        same = [get_model_config(n) for n in PRESETS]
        same = [c for c in same if c.dim == dim and c.depth == depth]
        heads = same[0].heads if same else (dim // 64 if dim % 64 == 0 else 0)
        if not heads:
            raise ValueError(f"cannot infer the number of heads for dim {dim}: pass a checkpoint with its config")
    n_mels = cfg.get("n_mels", base.n_mels)
    n_tokens = state["pos_embed"].shape[1] - 1
    n_f = n_mels // patch
    if n_tokens % n_f:
        raise ValueError(f"pos_embed has {n_tokens} patch rows, not a multiple of {n_f} frequency patches")
    return dict(dim=dim, depth=depth, heads=heads, n_time_patches=n_tokens // n_f, n_mels=n_mels, patch=patch,
                mlp_ratio=mlp_ratio, norm_mean=cfg.get("norm_mean", base.norm_mean),
                norm_std=cfg.get("norm_std", base.norm_std))


def load_encoder(source, preset: str = "matpac", device: str | torch.device = "cpu", strict: bool = True,
                 frontend: str = "matpac") -> Encoder:
    """Path (file or checkpoint directory), state dict, or "random" -> Encoder in eval mode on `device`."""
    if isinstance(source, str) and source == "random":
        return Encoder.from_config(get_model_config(preset), frontend).to(device)
    if isinstance(source, (str, Path)):
        raw, file_cfg = _read_path(Path(source))
    else:
        raw, file_cfg = source, None
    state, nested_cfg = _unwrap(raw)
    cfg = nested_cfg or file_cfg
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY)}
    arch = _infer_arch(state, preset, cfg)
    enc = Encoder(**arch, frontend=frontend)
    expected = set(enc.state_dict())
    unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if strict and (unknown or missing):
        raise ValueError(f"encoder state dict does not match: unknown keys {unknown}, missing keys {missing}")
    bad = [k for k in expected & set(state) if state[k].shape != enc.state_dict()[k].shape]
    if bad:
        raise ValueError(f"shape mismatch for {sorted(bad)}")
    enc.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=strict)
    return enc.to(device).eval()
