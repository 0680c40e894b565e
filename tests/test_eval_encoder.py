"""Evaluation with the MATPAC encoder (preset tiny): random baseline, an exported checkpoint, and the HEAR API."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from test_eval import RESULT_RE, tone, tone_folder  # noqa: F401  (fixture re-export)

from matpac_fast.encoder import export_encoder_state, load_encoder
from matpac_fast.evaluation import cli, embed, hear


def test_random_encoder_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = embed.make_embedder("random", preset="tiny", seed=0)
    after = torch.rand(1)
    assert torch.equal(before, after)  # seeding the init did not consume or reset the caller's stream
    b = embed.make_embedder("random", preset="tiny", seed=0)
    c = embed.make_embedder("random", preset="tiny", seed=1)
    x = torch.from_numpy(np.stack([tone(500.0, 1.0), tone(2000.0, 1.0)]))
    ea, eb, ec = a(x), b(x), c(x)
    assert ea.shape == (2, 5 * 64)  # tiny: D = 64, 5 frequency patches
    np.testing.assert_array_equal(ea, eb)
    assert not np.allclose(ea, ec)
    assert a.identity != c.identity  # different cache entries


def test_cli_with_exported_tiny_checkpoint(tone_folder, tmp_path, capsys):  # noqa: F811
    torch.manual_seed(7)
    enc = load_encoder("random", preset="tiny")
    ckpt = tmp_path / "tiny_encoder.pt"
    torch.save(export_encoder_state(enc), ckpt)
    out, cache = tmp_path / "out", tmp_path / "cache"
    common = ["--data", str(tone_folder), "--folds", "kfold:3", "--seeds", "1", "--preset", "tiny", "--quiet",
              "--out", str(out), "--cache-dir", str(cache), "--max-epochs", "40", "--lr", "1e-2"]  # fmt: skip
    assert cli.main(["--checkpoint", str(ckpt)] + common) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert RESULT_RE.match(last) and re.search(r"checkpoint=tiny_encoder-[0-9a-f]{8} ", last)  # stem + sha8
    name = re.search(r"checkpoint=(\S+)", last).group(1)
    r = json.loads((out / f"tones-kfold-3__{name}__linear-lr0.01-ep40.json").read_text())
    assert r["embedding_dim"] == 320 and r["embedder_identity"].startswith("ckpt:")
    # the cached embeddings are exactly the encoder's clip embeddings of the cropped/padded audio
    (npz,) = cache.glob("*.npz")
    with np.load(npz, allow_pickle=False) as z:
        emb, paths = z["emb"], z["paths"]
    wave = embed.load_clip(str(paths[0]), int(0.3 * 16000), embed.get_spec("matpac"))
    _, clip = enc.encode(torch.from_numpy(wave)[None], 16000)
    np.testing.assert_allclose(emb[0], clip[0].numpy(), rtol=1e-4, atol=1e-5)
    assert cli.main(["--checkpoint", "random"] + common) == 0
    assert "checkpoint=random-tiny " in capsys.readouterr().out.strip().splitlines()[-1]
    table = (out / "results.md").read_text()
    assert f"| {name} |" in table and "| random-tiny |" in table
    with pytest.raises(SystemExit, match="no such file"):
        cli.main(["--checkpoint", str(tmp_path / "nope.pt")] + common)


def test_hear_api_shapes_timestamps_and_scene_mean():
    model = hear.load_model("random", preset="tiny", device="cpu")
    assert model.sample_rate == 16000 and model.scene_embedding_size == model.timestamp_embedding_size == 320
    audio = torch.from_numpy(np.stack([tone(300.0, 1.0), tone(3000.0, 1.0)]))
    emb, ts = hear.get_timestamp_embeddings(audio, model)
    # 1 s -> 98 log-mel frames -> padded to 112 -> 7 patch columns of 160 ms, centred 87.5 ms + 160 ms * i; the
    # last holds real frames 96-97 only (frame j centred at 12.5 + 10 j ms): 12.5 + 10 * 96.5 = 977.5 ms, inside
    # the 1-s clip (it said 1047.5)
    assert emb.shape == (2, 7, 320) and ts.shape == (2, 7)
    np.testing.assert_allclose(ts[0].numpy(), [*(87.5 + 160.0 * np.arange(6)), 977.5])
    short = hear.get_timestamp_embeddings(torch.zeros(1, 2800), model)[1]  # 175 ms: frames 0-15, one full column
    np.testing.assert_allclose(short.numpy(), [[87.5]])
    tiny = hear.get_timestamp_embeddings(torch.zeros(1, 400), model)[1]  # 25 ms: one frame, centred at 12.5 ms
    np.testing.assert_allclose(tiny.numpy(), [[12.5]])
    scene = hear.get_scene_embeddings(audio, model)
    torch.testing.assert_close(scene, emb.mean(1))
    torch.testing.assert_close(scene, model.encoder.encode(audio, 16000)[1])
    with pytest.raises(ValueError, match="n_sounds, n_samples"):
        hear.get_scene_embeddings(audio[0], model)


def test_malformed_or_mislabelled_weight_files_are_one_line_errors(tmp_path):
    """A mis-shaped tensor or a non-string key ended in IndexError / AttributeError tracebacks; an intact
    safetensors file named .pt and a plain pickle were both called 'damaged or truncated'."""
    import os
    import pickle

    from safetensors.torch import save_file

    sd = load_encoder("random", preset="tiny").state_dict()
    cases = {
        "pos1d.pt": (dict(sd, pos_embed=torch.zeros(5)), "pos_embed has shape (5,), expected 3 dimensions"),
        "cls0d.pt": (dict(sd, cls_token=torch.zeros(())), "cls_token has shape (), expected 3 dimensions"),
        "intkeys.pt": ({0: torch.zeros(1)}, "its keys are not all parameter names (strings)"),
    }
    for name, (state, message) in cases.items():
        torch.save(state, tmp_path / name)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_encoder(tmp_path / name, preset="tiny")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "model_st.pt"))
    loaded = load_encoder(tmp_path / "model_st.pt", preset="tiny")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in sd.items())

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"pos_embed": Payload()}))
    (tmp_path / "raw.pt").write_bytes(pickle.dumps(dict(sd)))
    for name in ("evil.pt", "raw.pt"):
        with pytest.raises(ValueError, match="is a plain Python pickle, not torch.save or safetensors data: refused"):
            load_encoder(tmp_path / name, preset="tiny")
    assert not marker.exists()


def test_a_deep_config_json_or_a_crafted_tar_checkpoint_is_a_one_line_error(tmp_path):
    """A run folder whose config.json is nested deeper than json's recursion limit ended load_encoder (and matpac-eval)
    in a RecursionError, a tar whose first header has a GNU base-256 size of 2**80 in an OverflowError (security
    review 7)."""
    from safetensors.torch import save_file

    sd = load_encoder("random", preset="tiny").state_dict()
    deep = '{"model": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (tmp_path / "ck").mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "ck" / "model.safetensors"))
    (tmp_path / "ck" / "config.json").write_text(deep)
    with pytest.raises(ValueError, match="config.json: not a readable JSON run config"):
        load_encoder(tmp_path / "ck", preset="tiny")
    (tmp_path / "run").mkdir()
    torch.save(export_encoder_state(load_encoder("random", preset="tiny")), tmp_path / "run" / "encoder.pt")
    (tmp_path / "run" / "config.json").write_text(deep)  # beside encoder.pt too (was dropped in silence: CLI review 1)
    with pytest.raises(ValueError, match="config.json: not a readable JSON run config"):
        load_encoder(tmp_path / "run", preset="tiny")
    head = bytearray(512)
    head[0:13], head[124:136], head[156:157] = b"././@LongLink", bytes([0x80]) + (2**80).to_bytes(11, "big"), b"L"
    head[257:263], head[148:156] = b"ustar\0", b" " * 8
    head[148:156] = b"%06o\0 " % sum(head)
    (tmp_path / "crafted.tar").write_bytes(bytes(head) + bytes(2048))
    with pytest.raises(ValueError, match="crafted.tar cannot be read"):
        load_encoder(tmp_path / "crafted.tar", preset="tiny")
