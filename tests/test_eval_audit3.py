"""Regressions from the third evaluation audit: integer PCM through the HEAR API, and audio formats that
make-shards decodes (PyAV: m4a/webm/aac/...) but matpac-eval ignored or could not read."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
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


def test_eval_reads_the_formats_make_shards_reads(tmp_path, monkeypatch, capsys):
    """A folder of m4a/webm clips, which `make-shards folder` decodes with PyAV: matpac-eval listed no .webm/.aac/...
    file at all and skipped every .m4a as 'Format not recognised' (PyAV installed or not), then stopped."""
    import shard_tools.decode
    from matpac_fast.evaluation import cli, datasets, embed
    assert {".webm", ".aac", ".m4a"} <= datasets.AUDIO_EXTS  # the formats make-shards reads (its own set)
    root = tmp_path / "clips"
    freq = {"low": 300.0, "high": 3000.0}
    for label in freq:
        (root / label).mkdir(parents=True)
        for i in range(4):
            for ext in (".m4a", ".webm"):
                (root / label / f"{label}_{i}{ext}").write_bytes(b"\0" * 64)  # decoded by the stand-in below

    def fake_pyav(path, **kwargs):  # (N, C) float32 at the file's rate, as shard_tools.decode.read_audio gives it
        w = tone(freq[os.path.basename(path).split("_")[0]], 0.5, sr=22050)
        return np.stack([w, w], 1), 22050

    monkeypatch.setattr(shard_tools.decode, "read_audio", fake_pyav)
    out = tmp_path / "out"
    args = ["--checkpoint", "logmel", "--data", str(root), "--folds", "kfold:2", "--probe", "logreg", "--quiet",
            "--projection", "none", "--no-cache", "--clip-seconds", "0.5", "--out", str(out)]  # fmt: skip
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "skipped" not in captured.err and "metric=accuracy mean=1.0000" in captured.out.splitlines()[-1]
    (result,) = out.glob("*.json")
    assert json.loads(result.read_text())["n_clips"] == 16  # 8 m4a + 8 webm

    # without PyAV: each such clip is skipped with make-shards' reason and its fix, not "Format not recognised"
    monkeypatch.undo()
    monkeypatch.setattr(shard_tools.decode, "pyav_available", lambda: False)
    with pytest.raises(embed.UnreadableAudio, match=r"needs_pyav: .*pip install av") as e:
        embed.load_clip(str(root / "low" / "low_0.m4a"), 8000, embed.get_spec("matpac"))
    assert str(e.value).count("pip install av") == 1, str(e.value)  # the advice once, not appended again
    assert embed.audio_duration(str(root / "low" / "low_0.webm")) is None


def test_audio_duration_of_a_pyav_container(tmp_path):
    av = pytest.importorskip("av")
    from matpac_fast.evaluation import embed

    p = tmp_path / "x.m4a"
    with av.open(str(p), "w", format="mp4") as out:
        st = out.add_stream("aac", rate=16000, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(440.0, 2.0)[None], format="flt", layout="mono")
        frame.sample_rate = 16000
        for f in av.AudioResampler(format=st.codec_context.format.name, layout="mono", rate=16000).resample(frame):
            for packet in st.encode(f):
                out.mux(packet)
        for packet in st.encode(None):
            out.mux(packet)
    assert abs(embed.audio_duration(str(p)) - 2.0) < 0.1
    wave = embed.load_clip(str(p), 16000 * 3, embed.get_spec("matpac"))
    assert wave.shape == (48000,) and np.abs(wave[:16000]).max() > 0.1


def test_a_folder_holding_a_run_folder_names_it(tmp_path):
    """`make demo` leaves runs/demo/train/encoder.pt: --checkpoint runs/demo said only 'holds no checkpoint' with the
    generic list of what to pass, not that the run is runs/demo/train."""
    from matpac_fast.encoder import export_encoder_state, load_encoder

    demo, run = tmp_path / "demo", tmp_path / "demo" / "train"
    run.mkdir(parents=True)
    torch.save(export_encoder_state(load_encoder("random", preset="tiny")), run / "encoder.pt")
    cfg = {"train": {"run": {"preset": "tiny"}}, "model": {"name": "tiny", "dim": 64, "depth": 2, "heads": 4}}
    (run / "config.json").write_text(json.dumps(cfg))
    (demo / "shards").mkdir()
    with pytest.raises(ValueError) as e:
        load_encoder(demo, preset="tiny")
    msg = str(e.value)
    assert f"but the training run folder {run}: pass that folder instead (it loads {run / 'encoder.pt'})" in msg
    assert "\n" not in msg
    assert load_encoder(run).settings()["heads"] == 4  # what it points to loads
