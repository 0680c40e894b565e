"""Regressions from the third evaluation audit: integer PCM through the HEAR API, and audio formats that
make-shards decodes (PyAV: m4a/webm/aac/...) but matpac-eval ignored or could not read."""

from __future__ import annotations

import numpy as np
import torch
from test_eval import tone

from matpac_fast.evaluation import hear


def test_hear_api_scales_integer_pcm_like_encode():
    """int16 audio (scipy.io.wavfile's) was cast to float32 as is: 32,768 times too loud, other embeddings than the
    same clip as float, without a word."""
    model = hear.load_model("random", preset="tiny", device="cpu")
    w = np.stack([tone(440.0, 1.0, sr=16000), tone(1500.0, 1.0, sr=16000)]).astype(np.float32)
    ref = hear.get_scene_embeddings(torch.from_numpy(w), model)
    pcm = (w * 32767).astype(np.int16)
    for audio in (pcm, torch.from_numpy(pcm)):
        torch.testing.assert_close(hear.get_scene_embeddings(audio, model), ref, atol=1e-3, rtol=1e-3)
        emb, ts = hear.get_timestamp_embeddings(audio, model)
        assert emb.shape == (2, 7, 320) and ts.shape == (2, 7)
