"""Regressions from the embeddings / linear-probe audit (ev): the identity (cache key) of a checkpoint folder read with
and without its run's config.json, cache entries that skipped clips for want of PyAV, a clip too loud to embed named
by its file, and the resamplers' memory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors.torch import save_file
from test_eval import tone

from matpac_fast.config import get_model_config
from matpac_fast.encoder import Encoder, export_encoder_state
from matpac_fast.evaluation import embed
from matpac_fast.evaluation.datasets import load_dataset
from matpac_fast.train_config import RECIPES, TrainConfig


def _checkpoint_folder(run: Path, **model) -> Path:
    """A run folder with config.json and checkpoints/step_00000003/model.safetensors (the encoder's weights)."""
    cfg = TrainConfig.from_dict(RECIPES["tiny"])
    cfg.run.out = str(run)
    mcfg = get_model_config("tiny", **model)
    step = run / "checkpoints" / "step_00000003"
    step.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": mcfg.__dict__}, indent=1))
    torch.manual_seed(3)
    save_file({k: v.contiguous() for k, v in export_encoder_state(Encoder.from_config(mcfg)).items()},
              str(step / "model.safetensors"))
    return step


def test_checkpoint_folder_with_and_without_its_run_config_are_two_cache_entries(tmp_path):
    # A checkpoint folder's digest covers the folder, not the run's config.json two levels up, which gives the
    # heads and normalisation: the folder read in its run (heads 2) and a copy of it without the run (the preset's 4
    # heads) had one identity and one cache entry, and the second evaluation was served the first one's embeddings.
    step = _checkpoint_folder(tmp_path / "a" / "run", heads=2, norm_mean=-6.0)
    copy = tmp_path / "b" / "run" / "checkpoints" / step.name
    shutil.copytree(step, copy)
    in_run, alone = embed.make_embedder(str(step), "tiny"), embed.make_embedder(str(copy), "tiny")
    assert in_run.encoder.settings() != alone.encoder.settings()
    assert in_run.name == alone.name  # same folder names: the same cache file name but for the key
    assert in_run.identity != alone.identity
    assert alone.identity == f"ckpt:{embed.file_digest(copy)}:tiny"  # the preset's settings: the plain identity
    ds = embed.LabelledSet("t", str(tmp_path), "csv", [], [], False, "t")
    s = embed.ExtractSettings(1.0, cache_dir=tmp_path / "cache")
    assert embed.cache_path(ds, in_run, "t", s) != embed.cache_path(ds, alone, "t", s)
    # a run config with the preset's own settings changes nothing: the plain identity, as before
    same = _checkpoint_folder(tmp_path / "c" / "run")
    assert embed.make_embedder(str(same), "tiny").identity == f"ckpt:{embed.file_digest(same)}:tiny"


def test_clips_skipped_for_want_of_pyav_are_embedded_once_it_is_installed(tmp_path, monkeypatch):
    # A cache entry written without PyAV lists the m4a clips as skipped ("needs_pyav: ... pip install av"); the key
    # holds no word of PyAV, so after `pip install av` the same command was served that entry: the clips stayed
    # skipped, with the advice to install what was installed.
    import shard_tools.decode

    root = tmp_path / "clips"
    for label, f in (("low", 300.0), ("high", 3000.0)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            sf.write(root / label / f"{label}_{i}.wav", tone(f, 0.5), 16000)
        (root / label / f"{label}_9.m4a").write_bytes(b"\0" * 64)  # decoded by the stand-in below
    ds = load_dataset(root)
    s = embed.ExtractSettings(0.5, cache_dir=tmp_path / "cache", progress=False)
    emb = embed.make_embedder("logmel")
    monkeypatch.setattr(shard_tools.decode, "pyav_available", lambda: False)
    first = embed.extract(ds, emb, ds.name, s)
    assert [embed.skip_cause(r) for _, r in first.skipped] == ["needs_pyav"] * 2
    monkeypatch.undo()  # PyAV installed (its decoder stood in for)
    monkeypatch.setattr(shard_tools.decode, "read_audio", lambda path, **kw: (tone(440.0, 0.5)[:, None], 16000))
    second = embed.extract(ds, emb, ds.name, s)
    assert not second.skipped and second.ok.all() and not second.cache_hit
    third = embed.extract(ds, emb, ds.name, s)  # complete now: served from the cache
    assert third.cache_hit and np.array_equal(third.emb, second.emb)


def test_a_clip_too_loud_to_embed_is_named_by_its_file(tmp_path):
    # Encoder.encode refuses a clip whose log-mel overflows (finite samples of ~1e17 and above) and names its row in
    # the batch: matpac-eval stopped with "encode: clip 2 of the batch (wave[2]) holds samples so loud ...", which
    # does not say which file of the dataset it is (the log-mel baseline names it).

    root = tmp_path / "clips"
    for label, f in (("low", 300.0), ("high", 3000.0)):
        (root / label).mkdir(parents=True)
        for i in range(3):
            sf.write(root / label / f"{label}_{i}.wav", tone(f, 0.5) * (1e19 if (label, i) == ("low", 2) else 1.0),
                     16000, subtype="FLOAT")
    ds = load_dataset(root)
    emb = embed.make_embedder("random", preset="tiny")
    with pytest.raises(ValueError, match=r"low_2\.wav: encode: the clip holds samples so loud") as e:
        embed.extract(ds, emb, ds.name, embed.ExtractSettings(0.5, progress=False))
    assert "batch" not in str(e.value)


def test_large_resampling_kernels_are_not_all_kept(monkeypatch):
    # embed's resamplers were an lru_cache of 16: a Kaiser kernel for a rate sharing few factors with 16 kHz is
    # hundreds of MB (690 MB for 11,127 Hz; 1 GiB is allowed), and each one met stayed (RSS +690 MB per such rate,
    # measured: 1.2, 1.9, 2.6 GB after clips at 11127, 11131, 11133 Hz). Now only the last large one is kept.
    from matpac_fast.frontend import resample
    from shard_tools import decode

    monkeypatch.setattr(decode, "_RESAMPLERS", {})
    monkeypatch.setattr(embed, "_LAST_LARGE", {})
    monkeypatch.setattr(decode, "MAX_CACHED_KERNEL", 2**20)  # 1001 / 1003 Hz kernels (17 M floats) count as large
    x = torch.from_numpy(tone(300.0, 0.5, sr=1001))
    for sr in (1001, 1003, 22050):
        assert embed._kaiser(sr, 16000) is embed._kaiser(sr, 16000)  # kept while it is the last large one
    assert list(embed._LAST_LARGE) == [(1003, 16000)] and list(decode._RESAMPLERS) == [(22050, 16000)]
    torch.testing.assert_close(embed._kaiser(1001, 16000)(x), resample(x, 1001), rtol=0, atol=0)
