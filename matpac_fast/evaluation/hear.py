"""HEAR 2021 API (https://hearbenchmark.com/hear-api.html), so the encoder drops into hear-eval-kit / EVAR-style
evaluation kits:

    from matpac_fast.evaluation import hear
    model = hear.load_model("encoder.pt")                       # or "random" (seeded), preset=... for the arch
    emb, ts = hear.get_timestamp_embeddings(audio_BN, model)    # (B, n, 5·D), (B, n) in ms
    scene = hear.get_scene_embeddings(audio_BN, model)          # (B, 5·D) = mean of the timestamp embeddings

Audio is float32 (n_sounds, n_samples) at 16 kHz (`model.sample_rate`); integer PCM (int16/int32,
uint8) is scaled to [-1, 1] as `Encoder.encode` does. One embedding per 16 log-mel frames
(160 ms). Timestamps are the centres of those frames: with the MATPAC front end (n_fft 400, hop 160, no centring)
log-mel frame j is centred at 10·j + 12.5 ms, so patch column i is centred at 160·i + 87.5 ms; with the M2D front
end (centred frames) frame j is centred at 10·j ms and patch column i at 160·i + 75 ms. The last column, when the
audio's frames end inside it (the rest is zero padding), is centred on its real frames, so no timestamp lies past
the end of the audio. The encoder's own front end
(`Encoder.frontend`, from its run config or preset) decides. Inference runs without an autograd graph.
"""

from __future__ import annotations

import torch
from torch import nn

SAMPLE_RATE = 16000
HOP_MS = 10.0
FIRST_FRAME_CENTRE_MS = 12.5  # matpac front end: n_fft / 2 / sr = 200 samples (first_frame_centre_ms: any front end)


class HearModel(nn.Module):
    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.sample_rate = SAMPLE_RATE
        self.scene_embedding_size = encoder.embed_dim
        self.timestamp_embedding_size = encoder.embed_dim

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        return get_scene_embeddings(audio, self)


def load_model(model_file_path: str = "random", preset: str = "matpac", device: str | None = None, seed: int = 0):
    """A checkpoint path (this project's or the authors' layout) or "random" ("" too) -> HearModel in eval mode."""
    from matpac_fast.encoder import load_encoder

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if model_file_path in ("", "random"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = load_encoder("random", preset=preset, device=device)
    else:
        enc = load_encoder(model_file_path, preset=preset, device=device)
    return HearModel(enc).eval()


def _check(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    if not isinstance(model, HearModel):
        raise ValueError("model must come from matpac_fast.evaluation.hear.load_model")
    # Integer PCM (scipy's int16, ...) is scaled to [-1, 1] as `Encoder.encode` does: a plain float32 cast kept
    # int16 samples 32,768 times too loud, silently giving other embeddings than the same clip as float.
    from matpac_fast.encoder import _float_wave

    audio = _float_wave(audio)
    if audio.ndim != 2:
        raise ValueError(f"audio must be (n_sounds, n_samples) at {SAMPLE_RATE} Hz, got shape {tuple(audio.shape)}")
    return audio


def first_frame_centre_ms(frontend: str) -> float:
    """Centre of log-mel frame 0: n_fft / 2 after the start without centring (matpac), the start itself with it."""
    from matpac_fast.frontend import get_spec

    spec = get_spec(frontend)
    return 0.0 if spec.center else 1000.0 * spec.n_fft / 2 / spec.sample_rate


@torch.no_grad()
def get_timestamp_embeddings(audio: torch.Tensor, model: HearModel) -> tuple[torch.Tensor, torch.Tensor]:
    audio = _check(audio, model)
    from matpac_fast.frontend import get_spec

    frames, _ = model.encoder.encode(audio, SAMPLE_RATE)
    patch = model.encoder.patch
    n = frames.shape[1]
    first = first_frame_centre_ms(model.encoder.frontend)
    # Each embedding's log-mel frames: [patch·i, patch·(i+1)), the last clipped to the frames the audio has (the
    # rest of its patch is zero padding), so no timestamp lies past the end of the audio.
    t = get_spec(model.encoder.frontend).num_frames(audio.shape[-1])
    start = patch * torch.arange(n, dtype=torch.float32)
    end = torch.clamp(start + patch, max=float(t))
    centres = first + HOP_MS * (start + end - 1) / 2
    return frames, centres.to(frames.device).expand(len(frames), n)


@torch.no_grad()
def get_scene_embeddings(audio: torch.Tensor, model: HearModel) -> torch.Tensor:
    frames, _ = get_timestamp_embeddings(audio, model)
    return frames.mean(dim=1)
