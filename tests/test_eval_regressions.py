"""Regressions from the evaluation audit: probe settings in the result identity, the run config beside an exported
encoder.pt, the M2D front end, --help defaults, the plain 'group' protocol name, cropped-clip notes, inference
without autograd graphs, full training state dicts of the authors' fairseq model, make-shards' ';' manifest labels,
dataset names from the resolved --data path, and the warning for nested class folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_encoder import authors_layout
from test_eval import RESULT_RE, tone
from test_eval_cli_errors import _fsdd_like, _run

from matpac_fast.config import get_model_config
from matpac_fast.encoder import Encoder, export_encoder_state, load_encoder
from matpac_fast.evaluation import cli, embed, hear
from matpac_fast.evaluation.datasets import load_dataset
from matpac_fast.train_config import RECIPES, TrainConfig

FAST_LOGREG = ["--quiet", "--probe", "logreg", "--folds", "kfold:3", "--projection", "none", "--no-cache"]


# --- 1: probe settings are part of the result identity, lr is shown -------------------------------------------------
def test_probe_lr_is_shown_and_a_other_lr_gets_its_own_row(tones, tmp_path, capsys):
    out = tmp_path / "o"
    base = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(out), "--folds", "kfold:3", "--seeds", "1",
            "--quiet", "--no-cache", "--projection", "none"]  # fmt: skip
    lines, _ = _run(base, capsys)
    assert RESULT_RE.match(lines[-1]), lines[-1]
    assert lines[-1].endswith(f" probe=linear lr={cli.CLI_DEFAULT_LR:g}"), lines[-1]
    assert (out / "tones-kfold-3__logmel__linear.json").exists()  # the default settings keep their file name
    lines, err = _run(base + ["--lr", "3e-5"], capsys)
    assert lines[-1].endswith(" probe=linear-lr3e-05 lr=3e-05"), lines[-1]
    assert "replacing" not in err
    results = sorted(p.name for p in out.glob("*__*__*.json"))
    assert results == ["tones-kfold-3__logmel__linear-lr3e-05.json", "tones-kfold-3__logmel__linear.json"]
    table = (out / "results.md").read_text()
    assert "| probe | lr |" in table.splitlines()[0]
    assert "| logmel | linear | 0.003 |" in table and "| logmel | linear-lr3e-05 | 3e-05 |" in table
    # the same settings again replace only their own row
    _, err = _run(base, capsys)
    assert "replacing the earlier result" in err and len(list(out.glob("*__*__*.json"))) == 2
    # other non-default settings are part of the identity too; logreg has no lr
    lines, _ = _run(base + ["--weight-decay", "0", "--probe-batch", "16"], capsys)
    assert " probe=linear-wd0-batch16 lr=0.003" in lines[-1]
    lines, _ = _run(base + ["--probe", "logreg"], capsys)
    assert lines[-1].endswith(" probe=logreg lr=n/a")
    assert "| logmel | logreg | n/a |" in (out / "results.md").read_text()
    assert len(list(out.glob("*__*__*.json"))) == 4


# --- 2: encoder.pt beside the run's config.json ---------------------------------------------------------------------
def _trainer_run(run: Path, frontend: str = "matpac", **model) -> Encoder:
    """What the trainer leaves in a run folder: config.json {"train", "model"} and encoder.pt (authors' layout)."""
    cfg = TrainConfig.from_dict(RECIPES["tiny"])
    cfg.run.frontend, cfg.run.out = frontend, str(run)
    mcfg = get_model_config("tiny", **model)
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict(), "model": mcfg.__dict__}, indent=1))
    torch.manual_seed(3)
    enc = Encoder.from_config(mcfg, frontend)
    torch.save(export_encoder_state(enc), run / "encoder.pt")
    return enc


def test_encoder_pt_uses_the_run_config_beside_it(tmp_path):
    ref = _trainer_run(tmp_path / "runs" / "x", heads=2, norm_mean=-6.0, norm_std=3.0)
    enc = load_encoder(tmp_path / "runs" / "x" / "encoder.pt", preset="tiny")
    assert enc.student_encoder.blocks[0].attn.num_heads == 2 and (enc.norm_mean, enc.norm_std) == (-6.0, 3.0)
    assert enc.config_source == str(tmp_path / "runs" / "x" / "config.json")
    lms = torch.randn(2, 80, 200) * 4 - 7
    with torch.no_grad():
        torch.testing.assert_close(enc.encode_lms(lms), ref.encode_lms(lms))
    # a file not named like the trainer's export, or a config.json that is not a training config: --preset
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "matpac_10_2048.pt").write_bytes((tmp_path / "runs" / "x" / "encoder.pt").read_bytes())
    (other / "config.json").write_text((tmp_path / "runs" / "x" / "config.json").read_text())
    enc = load_encoder(other / "matpac_10_2048.pt", preset="tiny")
    assert enc.student_encoder.blocks[0].attn.num_heads == 4 and enc.config_source is None
    (other / "encoder.pt").write_bytes((tmp_path / "runs" / "x" / "encoder.pt").read_bytes())
    (other / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 64}))  # e.g. a HF config
    with pytest.warns(UserWarning, match='config.json is not a matpac_fast run config .* another tool.s.*: not read'):
        enc = load_encoder(other / "encoder.pt", preset="tiny")
    assert enc.student_encoder.blocks[0].attn.num_heads == 4 and enc.config_source is None


def test_cli_names_the_config_it_used(tones, tmp_path, capsys):
    _trainer_run(tmp_path / "runs" / "x", heads=2)
    ckpt = tmp_path / "runs" / "x" / "encoder.pt"
    lines, err = _run(["--checkpoint", str(ckpt), "--data", str(tones), "--out", str(tmp_path / "o")]
                      + FAST_LOGREG, capsys)  # fmt: skip
    assert RESULT_RE.match(lines[-1])
    notes = [line for line in err.splitlines() if "config.json" in line]
    assert len(notes) == 1 and str(tmp_path / "runs" / "x" / "config.json") in notes[0], err


# --- 3: the M2D front end -------------------------------------------------------------------------------------------
def test_m2d_run_and_preset_embed_with_the_m2d_front_end(tmp_path, monkeypatch):
    _trainer_run(tmp_path / "runs" / "m", frontend="m2d", norm_mean=-7.1, norm_std=4.2)
    enc = load_encoder(tmp_path / "runs" / "m" / "encoder.pt", preset="tiny")
    assert enc.frontend == "m2d"
    assert load_encoder("random", preset="m2d").frontend == "m2d"
    assert load_encoder("random", preset="tiny").frontend == "matpac"
    emb = embed.make_embedder(str(tmp_path / "runs" / "m" / "encoder.pt"), preset="tiny")
    assert emb.spec.name == "m2d"
    specs = []
    real = embed.load_clip

    def spy(path, n, spec, **kw):
        specs.append(spec.name)
        return real(path, n, spec, **kw)

    monkeypatch.setattr(embed, "load_clip", spy)
    (tmp_path / "d" / "a").mkdir(parents=True)
    sf.write(tmp_path / "d" / "a" / "x.wav", tone(440.0, 0.5, sr=8000), 8000)
    from matpac_fast.evaluation.datasets import load_dataset

    ds = load_dataset(tmp_path / "d")
    ex = embed.extract(ds, emb, "d", embed.ExtractSettings(0.5, progress=False))
    assert specs == ["m2d"] and ex.emb.shape == (1, 320)
    wave = real(str(tmp_path / "d" / "a" / "x.wav"), 8000, embed.get_spec("m2d"))
    np.testing.assert_allclose(ex.emb[0], enc.encode(torch.from_numpy(wave), 16000)[1][0].numpy(), rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    # not the cache entry (or result row) of the same file embedded with --preset alone, as before the fix
    ckpt = tmp_path / "runs" / "m" / "encoder.pt"
    assert emb.identity != f"ckpt:{embed.file_digest(ckpt)}:tiny"
    assert embed.make_embedder("random", preset="m2d").identity != "random:m2d:seed0"
    # HEAR timestamps follow the front end's centring (m2d: centre=True, frame j centred at 10·j ms)
    model = hear.load_model(str(tmp_path / "runs" / "m" / "encoder.pt"), preset="tiny", device="cpu")
    _, ts = hear.get_timestamp_embeddings(torch.from_numpy(np.stack([tone(300.0, 1.0)])), model)
    # 1 s -> 101 centred frames -> 7 columns; the last holds real frames 96-100, centred at 10 * 98 = 980 ms
    np.testing.assert_allclose(ts[0].numpy(), [*(75.0 + 160.0 * np.arange(6)), 980.0])


# --- 4: --help shows every default ----------------------------------------------------------------------------------
def test_help_has_text_and_default_for_every_option():
    p = cli.build_parser()
    text = re.sub(r"\s+", " ", p.format_help())
    assert "first seed (probe init, validation carve, K-fold shuffle, random encoder init) (default: 0)" in text
    fmt = p._get_formatter()
    for action in p._actions:
        if "-h" in action.option_strings:
            continue
        assert action.help, f"{action.option_strings} has no help text"
        shown = fmt._get_help_string(action)
        if action.default is not None and action.default is not False:
            assert "default" in shown, f"{action.option_strings}: default {action.default!r} not shown"


# --- 5: 'group' and 'group:speaker' are one protocol ----------------------------------------------------------------
def test_plain_group_and_its_column_give_the_same_task(tmp_path, capsys):
    fsdd = _fsdd_like(tmp_path / "fsdd")
    out = tmp_path / "o"
    base = ["--checkpoint", "logmel", "--data", str(fsdd), "--out", str(out), "--quiet", "--probe", "logreg",
            "--projection", "none", "--no-cache"]  # fmt: skip
    a, _ = _run(base + ["--folds", "group"], capsys)
    b, err = _run(base + ["--folds", "group:speaker"], capsys)
    assert "task=fsdd-group-speaker " in a[-1] and "task=fsdd-group-speaker " in b[-1]
    assert "replacing the earlier result" in err and len(list(out.glob("*__*__*.json"))) == 1
    r = json.loads(next(out.glob("*__*__*.json")).read_text())
    assert r["folds"] == "group:speaker"


# --- 6: clips longer than --clip-seconds are counted in one note -----------------------------------------------------
def test_cropped_clips_are_one_note_unless_quiet(tones, tmp_path, capsys):
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--clip-seconds", "0.2",
            "--probe", "logreg", "--folds", "kfold:3", "--projection", "none", "--no-cache"]  # fmt: skip
    lines, err = _run(args, capsys)
    notes = [line for line in err.splitlines() if "longer than" in line]
    assert len(notes) == 1 and "24 of 24 clips" in notes[0] and "0.3" in notes[0], err
    assert "embed logmel" in err  # the progress bar is shown without --quiet
    lines, err = _run(args + ["--quiet"], capsys)
    assert "longer than" not in err and "embed logmel" not in err


# --- 7: inference without an autograd graph -------------------------------------------------------------------------
def test_inference_paths_build_no_graph():
    enc = load_encoder("random", preset="tiny")
    lms = torch.randn(1, 80, 100) * 4 - 7
    assert enc.encode_lms(lms).requires_grad  # documented: encode_lms keeps the graph (for fine-tuning)
    frames, clip = enc.encode(tone(440.0, 1.0), 16000)
    assert not frames.requires_grad and not clip.requires_grad
    model = hear.HearModel(enc)
    audio = torch.from_numpy(np.stack([tone(440.0, 1.0)]))
    assert not hear.get_timestamp_embeddings(audio, model)[0].requires_grad
    assert not hear.get_scene_embeddings(audio, model).requires_grad
    assert "graph" in Encoder.encode_lms.__doc__


# --- 8: a full training state dict of the authors' fairseq model -----------------------------------------------------
def _authors_training_state(dim=64, depth=2, seed=0) -> tuple[dict, dict]:
    """The authors' GeneralModel.state_dict(): student parts, decoder (predictor), MATPAC++ MCL heads, student cls
    head, the loss's centre buffer, and the EMA teacher encoder / teacher head as nested dicts under "_ema" and
    "_cls_head_ema" (fairseq's EMAModule is not an nn.Module: its fp32 params are added by their state_dict)."""
    enc = authors_layout(dim=dim, depth=depth, seed=seed)
    z = torch.zeros
    full = dict(enc)
    full.update({
        "decoder.decoder_embed.weight": z(32, dim), "decoder.decoder_embed.bias": z(32),
        "decoder.mask_token": z(1, 1, 32), "decoder.decoder_pos_embed": z(1, 191, 32),
        "decoder.decoder_blocks.0.norm1.weight": z(32), "decoder.decoder_norm.weight": z(32),
        "decoder.decoder_pred.weight": z(dim, 32), "decoder.decoder_pred.bias": z(dim),
        "mcl_heads.heads.0.weight": z(dim, 32),
        "cls_student_head.mlp.0.weight": z(128, dim), "cls_student_head.last_layer.weight_g": z(64, 1),
        "cls_student_head.last_layer.weight_v": z(64, 32), "cls_head_loss.center": z(1, 1, 64),
        "_ema": {"blocks.0.norm1.weight": z(dim), "norm.weight": z(dim)},
        "_cls_head_ema": {"mlp.0.weight": z(128, dim)},
    })  # fmt: skip
    return full, enc


def test_authors_full_training_state_dict_loads_the_student(tmp_path):
    full, enc_sd = _authors_training_state()
    torch.save({"model": full, "optimizer_history": [{"num_updates": 10}], "extra_state": {"epoch": 2}},
               tmp_path / "checkpoint_last.pt")  # fmt: skip
    enc = load_encoder(tmp_path / "checkpoint_last.pt", preset="tiny")
    for k, v in enc.state_dict().items():
        assert torch.equal(v, enc_sd[k]), k
    # still strict about anything else
    bad = dict(full, **{"projector.weight": torch.zeros(3)})
    with pytest.raises(ValueError, match=r"unknown keys \['projector.weight'\]"):
        load_encoder(bad, preset="tiny")
    bad = dict(full, _ema=[1, 2])
    with pytest.raises(ValueError, match="not a state dict"):
        load_encoder(bad, preset="tiny")


def test_run_config_changes_the_result_identity_only_when_it_changes_the_embeddings(tmp_path):
    # A run trained with the preset's own settings embeds exactly as --preset alone did: its identity (and so its
    # result row and cache entry from before run configs were read) stays; other heads get a new identity.
    _trainer_run(tmp_path / "same")
    _trainer_run(tmp_path / "other", heads=2)
    same = embed.make_embedder(str(tmp_path / "same" / "encoder.pt"), "tiny", "cpu")
    other = embed.make_embedder(str(tmp_path / "other" / "encoder.pt"), "tiny", "cpu")
    digest = embed.file_digest(tmp_path / "same" / "encoder.pt")
    assert same.identity == f"ckpt:{digest}:tiny"
    assert other.identity.startswith(f"ckpt:{embed.file_digest(tmp_path / 'other' / 'encoder.pt')}:tiny:")


def test_checkpoint_with_its_own_config_keeps_its_identity():
    # A nested config was read before run configs beside encoder.pt were: such a checkpoint's identity stays
    # ckpt:<digest>:<preset> even when its settings differ from the preset's.
    import tempfile

    from matpac_fast.model import MATPAC

    cfg = get_model_config("tiny", heads=2)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "full.pt"
        torch.save({"model": MATPAC(cfg).state_dict(), "config": cfg.to_dict()}, path)
        emb = embed.make_embedder(str(path), "tiny", "cpu")
        assert emb.encoder.student_encoder.blocks[0].attn.num_heads == 2
        assert emb.identity == f"ckpt:{embed.file_digest(path)}:tiny"


def test_two_csvs_in_one_folder_get_their_own_tasks(tones, tmp_path, capsys):
    # Before, both were named after the folder: the second run replaced the first's result.
    wavs = sorted(tones.rglob("*.wav"))
    for stem, keep in (("all", wavs), ("some", [w for w in wavs if w.parent.name != "high"])):
        (tones / f"{stem}.csv").write_text("file,label\n" + "".join(f"{w},{w.parent.name}\n" for w in keep))
    out = tmp_path / "o"
    tasks = []
    for stem in ("all", "some"):
        lines, err = _run(["--checkpoint", "logmel", "--data", str(tones / f"{stem}.csv"), "--out", str(out),
                           *FAST_LOGREG], capsys)  # fmt: skip
        assert "replacing" not in err
        tasks.append(re.search(r"task=(\S+)", lines[-1]).group(1))
    assert tasks == ["tones-all-kfold-3", "tones-some-kfold-3"]
    assert len(list(out.glob("*__logmel__*.json"))) == 2


# --- 9: a training run folder and its encoder.pt are one checkpoint; things that are not checkpoints ----------------
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A real 3-step tiny training run: config.json, history.jsonl, tb/, checkpoints/step_00000002 and _00000003
    (the final one), encoder.pt exported at the end (the student of step 3)."""
    import os
    import subprocess
    import sys

    run = tmp_path_factory.mktemp("runs") / "tinyrun"
    args = [sys.executable, str(ROOT / "train.py"), "--recipe", "tiny", "--shards", "synthetic:64", "--batch-size",
            "8", "--workers", "0", "--log-every", "1", "--progress", "false", "--model", "depth=1", "--model",
            "pred_depth=1", "--max-steps", "3", "--ckpt-every", "2", "--out", str(run)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(args, check=True, env=env, capture_output=True, timeout=300)
    assert (run / "encoder.pt").is_file() and (run / "checkpoints" / "step_00000002").is_dir()
    return run


def test_run_folder_and_its_encoder_pt_are_one_result_row(tiny_run, tones, tmp_path, capsys):
    # Before: `run/` was named and identified by a hash of every file in the folder (`tinyrun-<sha8>`, and without
    # the run-config suffix), `run/encoder.pt` by that file: two rows in results.md for the very same weights.
    out = tmp_path / "o"
    common = ["--data", str(tones), "--out", str(out)] + FAST_LOGREG  # default --preset matpac: the run config counts
    names, errs = [], []
    for ckpt in (str(tiny_run), str(tiny_run) + "/", str(tiny_run / "encoder.pt")):
        lines, err = _run(["--checkpoint", ckpt] + common, capsys)
        names.append(re.search(r"checkpoint=(\S+)", lines[-1]).group(1))
        errs.append(err)
    assert re.fullmatch(r"tinyrun-encoder-[0-9a-f]{8}", names[0]) and names == [names[0]] * 3, names
    assert "replacing the earlier result" in errs[1] and "replacing the earlier result" in errs[2]
    assert f"(a training run folder: evaluating {tiny_run / 'encoder.pt'})" in errs[0]  # the note says which file
    (res,) = out.glob("*__*__*.json")
    identity = json.loads(res.read_text())["embedder_identity"]
    assert identity.startswith(f"ckpt:{embed.file_digest(tiny_run / 'encoder.pt')}:matpac:")
    # a checkpoint folder is its own checkpoint, named so: the last one holds the same student as encoder.pt, an
    # earlier one other weights
    for step in ("step_00000002", "step_00000003"):
        lines, _ = _run(["--checkpoint", str(tiny_run / "checkpoints" / step)] + common, capsys)
        assert re.search(rf"checkpoint=tinyrun-{step}-[0-9a-f]{{8}} ", lines[-1]), lines[-1]
    table = (out / "results.md").read_text()
    assert table.count(f"| {names[0]} |") == 1 and len(list(out.glob("*__*__*.json"))) == 3
    # the same in the Python API: one encoder, one identity
    a, b = embed.make_embedder(str(tiny_run), "tiny"), embed.make_embedder(str(tiny_run / "encoder.pt"), "tiny")
    assert (a.name, a.identity, a.encoder.settings()) == (b.name, b.identity, b.encoder.settings())
    assert a.encoder.preset_settings == b.encoder.preset_settings and a.config_source == b.config_source
    for k, v in a.encoder.state_dict().items():
        assert torch.equal(v, b.encoder.state_dict()[k]), k
    last = load_encoder(tiny_run / "checkpoints" / "step_00000003", preset="tiny").state_dict()
    first = load_encoder(tiny_run / "checkpoints" / "step_00000002", preset="tiny").state_dict()
    assert all(torch.equal(v, last[k]) for k, v in a.encoder.state_dict().items())
    assert not all(torch.equal(v, first[k]) for k, v in a.encoder.state_dict().items())


def test_things_that_are_not_checkpoints_say_what_to_pass_instead(tiny_run, tones, tmp_path, monkeypatch):
    from test_eval_cli_errors import _one_line_error

    from matpac_fast.data_fixtures import clip, write_shard_set

    run, ckpts = tiny_run, tiny_run / "checkpoints"
    pass_run = f"pass the run folder {run} or its {run / 'encoder.pt'} instead"
    unfinished = tmp_path / "unfinished"  # a run still training: no encoder.pt yet
    unfinished.mkdir()
    (unfinished / "config.json").write_text((run / "config.json").read_text())
    (unfinished / "checkpoints" / "step_00000002").mkdir(parents=True)
    for f in (ckpts / "step_00000002").iterdir():
        (unfinished / "checkpoints" / "step_00000002" / f.name).write_bytes(f.read_bytes())
    rng = np.random.default_rng(0)
    write_shard_set(tmp_path / "shards", [(f"k{i}", clip(rng, 620), [0]) for i in range(4)], per_shard=2)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.jsonl").write_text('{"a": 1}\n')
    cases = [
        (run / "config.json", f"{run}/config.json is the run's training config (JSON), not a checkpoint; {pass_run}"),
        (run / "history.jsonl", f"is the run's training log (JSON lines), not a checkpoint; {pass_run}"),
        (ckpts, f"pass one of its step folders instead, e.g. the latest, {ckpts / 'step_00000003'}"),
        (ckpts / "step_00000003" / "optimizer.bin", "pass that folder instead"),
        (run / "tb", pass_run),
        (unfinished / "config.json", f"pass a checkpoint folder instead, e.g. the latest, {unfinished}/checkpoints"),
        (unfinished, f"{unfinished} is a training run folder; the run has no encoder.pt yet"),
        (tmp_path / "shards", "is a shard set (training data written by make-shards), not a checkpoint; pass a "),
        (tmp_path / "shards" / "shards-000000.tar", "is a shard of a shard set (training data written by make-shards)"),
        (tmp_path / "shards" / "stats.json", "is a file of the shard set"),
        (tmp_path / "empty", "holds no checkpoint (no model.safetensors, "),
        (tmp_path / "notes.jsonl", "is a JSON-lines file, not a checkpoint; pass a checkpoint instead: a weights file"),
        (next(tones.rglob("*.wav")), "is an audio file, not a checkpoint; pass a checkpoint instead"),
    ]  # fmt: skip
    real_load = torch.load

    def weights_only_load(*a, **k):  # never unpickle: every read is weights-only
        assert k.get("weights_only") is True, k
        return real_load(*a, **k)

    def no_hashing(*a, **k):
        raise AssertionError("hashed a path that is not a checkpoint (a shard set can be hundreds of GB)")

    monkeypatch.setattr(torch, "load", weights_only_load)
    monkeypatch.setattr(embed, "file_digest", no_hashing)
    for path, expected in cases:
        msg = _one_line_error(["--checkpoint", str(path), "--data", str(tones), "--out", str(tmp_path / "o")]
                              + FAST_LOGREG)  # fmt: skip
        assert expected in msg, msg
        assert "damaged" not in msg and "weights_only" not in msg and "no model file found" not in msg, msg
    assert not (tmp_path / "o").exists()
    # the same errors from the Python API (hear.load_model, load_encoder); a legacy-format torch .tar is named so
    with pytest.raises(ValueError, match="is the run's training config"):
        hear.load_model(str(run / "config.json"), preset="tiny")
    import io
    import tarfile

    with tarfile.open(tmp_path / "old.tar", "w") as tf:
        for name in ("sys_info", "pickle", "storages", "tensors"):
            info = tarfile.TarInfo(name)
            info.size = 4
            tf.addfile(info, io.BytesIO(b"\x80\x02N."))
    with pytest.raises(ValueError, match=r"PyTorch's legacy .tar format, which cannot be read weights-only"):
        load_encoder(tmp_path / "old.tar")


# --- 10: heads the weights do not hold: the note says where they came from; a guess is a warning ---------------------
def _notes(err: str, what: str) -> list[str]:
    return [line for line in err.splitlines() if what in line]


def test_guessed_heads_are_named_and_warned(tiny_run, tones, tmp_path, capsys):
    # Before: a run's encoder.pt copied without its config.json got "heads, normalisation and front end (matpac) from
    # preset 'matpac'" (implying 12 heads) while the encoder had dim // 64 = 1 head, and no warning.
    copied = tmp_path / "copied" / "encoder.pt"
    copied.parent.mkdir()
    copied.write_bytes((tiny_run / "encoder.pt").read_bytes())
    common = ["--data", str(tones), "--out", str(tmp_path / "o")] + FAST_LOGREG
    lines, err = _run(["--checkpoint", str(copied)] + common, capsys)
    assert RESULT_RE.match(lines[-1])
    (note,) = _notes(err, f"matpac-eval: {copied}: ")
    assert note.endswith(": heads 1 = dim 64 // 64 (guess), normalisation and front end (matpac) from preset "
                         "'matpac'"), note  # fmt: skip
    (warning,) = _notes(err, "warning: the number of heads cannot be read from the weights")
    assert "--preset matpac has dim 768, not 64" in warning and "keep the run's config.json beside the file" in warning
    assert "(or pass the run folder / checkpoint folder)" in warning
    guessed = load_encoder(copied)
    assert guessed.heads_guessed and guessed.student_encoder.blocks[0].attn.num_heads == 1
    right = load_encoder(tiny_run)  # the run folder: its config.json gives the run's 4 heads
    assert not right.heads_guessed and right.student_encoder.blocks[0].attn.num_heads == 4
    lms = torch.randn(1, 80, 64) * 4 - 7
    with torch.no_grad():
        assert not torch.allclose(guessed.encode_lms(lms), right.encode_lms(lms))  # why the warning matters
    # the run folder, and --preset with the weights' dim: the note names one source, no warning
    for ckpt, preset, source in ((str(tiny_run), "matpac", f"the run config {tiny_run / 'config.json'}"),
                                 (str(copied), "tiny", "preset 'tiny'")):  # fmt: skip
        _, err = _run(["--checkpoint", ckpt, "--preset", preset] + common, capsys)
        assert f": heads, normalisation and front end (matpac) from {source}" in err, err
        assert "cannot be read from the weights" not in err
    # another preset with the weights' dim and depth: its heads, named as such (still a guess)
    state = export_encoder_state(Encoder.from_config(get_model_config("tiny", heads=8)))
    enc = load_encoder(state)
    assert enc.heads_guessed and enc.heads_from == "preset 'tiny' (same dim and depth)"
    assert enc.settings_note() == ("heads 4 from preset 'tiny' (same dim and depth), normalisation and front end "
                                   "(matpac) from preset 'matpac'")  # fmt: skip
    assert not load_encoder(state, preset="tiny").heads_guessed


def test_model_safetensors_of_a_checkpoint_folder_is_that_checkpoint(tiny_run, tones, tmp_path, capsys):
    # Before: step_N/model.safetensors read no run config (heads guessed from --preset) and was named and
    # identified as a file of its own (`step_N-model-<sha8>`), unlike the folder step_N.
    step = tiny_run / "checkpoints" / "step_00000003"
    folder, file = embed.make_embedder(str(step)), embed.make_embedder(str(step / "model.safetensors"))
    assert (file.name, file.identity, file.encoder.settings()) == (folder.name, folder.identity,
                                                                   folder.encoder.settings())  # fmt: skip
    assert file.config_source == folder.config_source == str(tiny_run / "config.json")
    assert file.encoder.student_encoder.blocks[0].attn.num_heads == 4 and not file.encoder.heads_guessed
    lines, err = _run(["--checkpoint", str(step / "model.safetensors"), "--data", str(tones), "--out",
                       str(tmp_path / "o")] + FAST_LOGREG, capsys)  # fmt: skip
    assert f"checkpoint={folder.name} " in lines[-1], lines[-1]
    assert f"(the weights of the trainer checkpoint folder {step}: evaluating that checkpoint)" in err, err
    assert f"from the run config {tiny_run / 'config.json'}" in err and "cannot be read from the weights" not in err
    # its other files are still refused; a model.safetensors outside a trainer checkpoint folder is itself
    with pytest.raises(ValueError, match="pass that folder instead"):
        load_encoder(step / "trainer_state.json")
    alone = tmp_path / "alone" / "model.safetensors"
    alone.parent.mkdir()
    alone.write_bytes((step / "model.safetensors").read_bytes())
    assert embed.make_embedder(str(alone)).name.startswith("alone-model-")


# --- 11: another tool's results.md in --out is never overwritten ----------------------------------------------------
def test_out_with_a_foreign_results_md_is_refused_before_any_work(tones, tmp_path, capsys, monkeypatch):
    from test_eval_cli_errors import _no_work, _one_line_error

    from matpac_fast.demo import format_table
    from matpac_fast.evaluation import report

    demo = tmp_path / "demo"  # what `python -m matpac_fast.demo --out demo` leaves
    demo.mkdir()
    table = format_table({"chance": 0.1, "logmel": 0.5, "random": 0.6, "pretrained": 0.7}, None) + "\n"
    (demo / "results.md").write_text(table)
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(demo)] + FAST_LOGREG
    with monkeypatch.context() as m:
        _no_work(m)
        msg = _one_line_error(args)
    assert f"--out {demo} holds a results.md that matpac-eval did not write (it starts '| encoder |" in msg, msg
    assert "choose another --out" in msg
    assert (demo / "results.md").read_text() == table and sorted(p.name for p in demo.iterdir()) == ["results.md"]
    # its own results.md: re-evaluation into the same --out rebuilds it; it ends with the marker line
    out = tmp_path / "o"
    _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out)] + FAST_LOGREG, capsys)
    _, err = _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out)] + FAST_LOGREG, capsys)
    assert "replacing the earlier result" in err
    text = (out / "results.md").read_text()
    assert text.splitlines()[0] == report.TABLE_HEADER.splitlines()[0] and text.rstrip().endswith(report.TABLE_MARKER)
    # a results.md of an older matpac-eval (no marker, the header before the lr column) is its own too; so is an
    # empty one
    old = ("| task | data | protocol | checkpoint | probe | metric | mean ± std (%) | runs | dim | embed s | probe s "
           "|\n|---|---|---|---|---|---|---|---|---|---|---|\n"
           "| t | d | official | logmel | linear | accuracy | 50.0 ± 1.0 | 3 | 160 | 1 | 1 |\n")  # fmt: skip
    for earlier in (old, ""):
        (out / "results.md").write_text(earlier)
        lines, _ = _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out)] + FAST_LOGREG, capsys)
        assert RESULT_RE.match(lines[-1]) and "| tones-kfold-3 | tones |" in (out / "results.md").read_text()


# --- 12: RESULT values never hold spaces ----------------------------------------------------------------------------
def test_result_line_values_have_no_spaces(tones, tmp_path, capsys):
    # Before: a run folder "with space" printed `checkpoint=with space-encoder-<sha8>`: key=value parsing broke.
    _trainer_run(tmp_path / "with space")
    data = tmp_path / "my tones"
    tones.rename(data)
    out = tmp_path / "o"
    lines, _ = _run(["--checkpoint", str(tmp_path / "with space" / "encoder.pt"), "--data", str(data), "--out",
                     str(out), "--preset", "tiny"] + FAST_LOGREG, capsys)  # fmt: skip
    assert RESULT_RE.match(lines[-1]), lines[-1]
    fields = dict(f.split("=", 1) for f in lines[-1].split()[2:])
    assert fields["task"] == "my_tones-kfold-3"
    assert re.fullmatch(r"with_space-encoder-[0-9a-f]{8}", fields["checkpoint"]), fields
    (res,) = out.glob("*__*__*.json")
    r = json.loads(res.read_text())  # the JSON and the table keep the real names
    assert r["task"] == "my tones-kfold-3" and r["checkpoint_name"] == fields["checkpoint"].replace("_", " ", 1)
    assert f"| my tones-kfold-3 | my tones | kfold:3 | {r['checkpoint_name']} |" in (out / "results.md").read_text()


@pytest.mark.parametrize("where", ["embed", "probe"])
def test_ctrl_c_clears_the_progress_bar_before_its_line(tones, tmp_path, capsys, monkeypatch, where):
    # The bars were closed only when their loop finished: after a Ctrl-C the line was printed after the bar's text,
    # on the bar's line, and the bar was cleared (its width overwritten with spaces) later, when collected.
    from matpac_fast.evaluation import cli, embed, probe

    calls = []

    def interrupt_on_the_third(real):
        def wrapped(*a, **k):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return real(*a, **k)
        return wrapped

    if where == "embed":
        monkeypatch.setattr(embed, "load_clip", interrupt_on_the_third(embed.load_clip))
    else:
        monkeypatch.setattr(probe, "fit_linear_probe", interrupt_on_the_third(probe.fit_linear_probe))
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--folds", "kfold:3",
            "--no-cache", "--projection", "none", "--embed-batch", "1", "--max-epochs", "2"]  # progress bars on
    with pytest.raises(SystemExit) as e:
        cli.main(args)
    import gc

    gc.collect()  # a bar left open is cleared when collected: after the line, on a terminal over its start
    err = capsys.readouterr().err
    assert e.value.code == 130 and calls and len(calls) == 3
    last = err.split("\n")
    assert last[-1] == "" and last[-2].split("\r")[-1].startswith("matpac-eval: interrupted"), repr(err[-600:])
    assert "\r" not in err.split("matpac-eval: interrupted", 1)[1]  # nothing written over it afterwards


# --- 13: Ctrl-C is one line and exit status 130 ---------------------------------------------------------------------
def test_ctrl_c_is_one_line_and_exit_130(tones, tmp_path):
    # Before: a KeyboardInterrupt traceback. A real SIGINT, sent by the process to itself while it embeds.
    import os
    import subprocess
    import sys

    script = ("import os, signal, sys\nfrom matpac_fast.evaluation import cli, embed\nreal = embed.load_clip\n"
              "def load(*a, **k):\n    os.kill(os.getpid(), signal.SIGINT)\n    return real(*a, **k)\n"
              "embed.load_clip = load\nsys.exit(cli.main(sys.argv[1:]))\n")  # fmt: skip
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--quiet", "--folds",
            "kfold:3", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == ("matpac-eval: interrupted; nothing was kept (the embedding cache is written once "
                                   "every clip is embedded): rerunning the same command starts again"), proc.stderr
    assert not (tmp_path / "o").exists()  # the --out it created is removed again (it is empty)


def main_ends_by_ctrl_c(args: list[str]) -> None:
    """matpac-eval's main(args), in which a Ctrl-C comes (planted by the caller): it must end with status 130, not
    let the KeyboardInterrupt out (a traceback) nor go on."""
    try:
        cli.main(args)
    except KeyboardInterrupt:  # not re-raised: it would stop the whole pytest session
        pytest.fail("Ctrl-C escaped matpac-eval's main (a traceback, not one line and exit 130)")
    except SystemExit as e:
        assert e.code == 130, e.code
    else:
        pytest.fail("matpac-eval went on after Ctrl-C")


def test_ctrl_c_after_embedding_says_the_cache_is_kept(tones, tmp_path, capsys, monkeypatch):
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--quiet", "--probe",
            "logreg", "--folds", "kfold:3", "--projection", "none", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(cli, "run_probes", interrupt)
        main_ends_by_ctrl_c(args)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    err = capsys.readouterr().err.strip()
    assert err == (f"matpac-eval: interrupted; kept the embeddings, cached in {entry}: rerunning the same command "
                   "reuses them and redoes the probes"), err
    lines, _ = _run(args, capsys)
    assert RESULT_RE.match(lines[-1])
    assert json.loads(next((tmp_path / "o").glob("*__*__*.json")).read_text())["cache_hit"]


# --- 10: a make-shards manifest means the same labels in matpac-eval; names from the resolved path; nested folders -
def _wavs(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(names):
        sf.write(folder / n, tone(300.0 * (i + 1), 0.1, seed=i), 16000)


def test_manifest_labels_are_split_like_make_shards(tmp_path):
    # Before, only ',' separated labels: 'x.wav,0;even' was one class '0;even' and the score was silently wrong.
    from shard_tools.discover import discover_manifest

    _wavs(tmp_path, ["a.wav", "b.wav", "c.wav", "d.wav"])
    rows = ["path,label", "a.wav,0;even", "b.wav, 1 ; odd ;", "c.wav,2;;even", "d.wav,3"]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_dataset(tmp_path / "m.csv")
    ours = {Path(c.path).name: c.labels for c in ds.clips}
    assert ours == {"a.wav": ("0", "even"), "b.wav": ("1", "odd"), "c.wav": ("2", "even"), "d.wav": ("3",)}
    shards = {Path(it.path).name: it.labels for it in discover_manifest(tmp_path / "m.csv").items}
    assert ours == shards  # one manifest, the same labels in both tools
    assert ds.multilabel and ds.classes == ["0", "1", "2", "3", "even", "odd"]
    # a quoted comma cell (documented, tested in test_eval.py) still holds several labels
    (tmp_path / "q.csv").write_text('file,label\na.wav,"dog, cat"\nb.wav,dog;cow\n')
    assert [c.labels for c in load_dataset(tmp_path / "q.csv").clips] == [("dog", "cat"), ("dog", "cow")]


def test_dataset_names_come_from_the_resolved_path(tones, tmp_path, capsys, monkeypatch):
    # Before, `--data .` was named '' (task '-kfold-3', figure '_projection.png'), `../ev.csv` '..-ev', and
    # `ev.csv` typed in its folder 'ev' while its absolute path gave 'tones-ev': two rows for one dataset.
    wavs = sorted(tones.rglob("*.wav"))
    (tones / "ev.csv").write_text("file,label\n" + "".join(f"{w.relative_to(tones)},{w.parent.name}\n" for w in wavs))
    monkeypatch.chdir(tones)
    assert load_dataset(".").name == load_dataset(str(tones)).name == "tones"
    assert load_dataset("ev.csv").name == load_dataset("./ev.csv").name == load_dataset(tones / "ev.csv").name
    assert load_dataset("ev.csv").name == "tones-ev"
    monkeypatch.chdir(tones / "low")
    assert load_dataset("..").name == "tones" and load_dataset("../ev.csv").name == "tones-ev"
    # ESC-50's CSV typed in its own meta/ folder is still recognised (its layout is found by folder names)
    esc = tmp_path / "ESC-50"
    _wavs(esc / "audio", ["1-1-A-0.wav", "1-2-A-1.wav"])
    (esc / "meta").mkdir()
    (esc / "meta" / "esc50.csv").write_text(
        "filename,fold,target,category,esc10,src_file,take\n1-1-A-0.wav,1,0,dog,True,1,A\n1-2-A-1.wav,1,1,cat,False,2,A\n"
    )
    monkeypatch.chdir(esc / "meta")
    ds = load_dataset("esc50.csv")
    assert (ds.name, ds.layout, len(ds)) == ("esc50", "esc50", 2)
    # the CLI: one task, one dataset column and one result row whichever way the data is typed
    out = tmp_path / "o"
    monkeypatch.chdir(tones)
    lines, _ = _run(["--checkpoint", "logmel", "--data", ".", "--out", str(out), *FAST_LOGREG], capsys)
    assert re.search(r"task=(\S+)", lines[-1]).group(1) == "tones-kfold-3"
    lines, err = _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out), *FAST_LOGREG], capsys)
    assert re.search(r"task=(\S+)", lines[-1]).group(1) == "tones-kfold-3" and "replacing the earlier result" in err
    assert [p.name for p in out.glob("*__*__*.json")] == ["tones-kfold-3__logmel__logreg.json"]
    assert "| tones-kfold-3 | tones | kfold:3 |" in (out / "results.md").read_text()


def test_nested_class_folders_warn_once_and_keep_their_labels(tmp_path, tones, capsys):
    # matpac-eval labels by the first-level folder, make-shards by the folder holding the file: for nested folders
    # they differ. Neither rule changes (labels of existing data would); matpac-eval says so in one warning line.
    from shard_tools.discover import discover_folder

    root = tmp_path / "nested"
    _wavs(root / "dog" / "s1", ["a.wav", "b.wav"])
    _wavs(root / "dog" / "dog", ["c.wav"])  # same label under both rules
    _wavs(root / "cat", ["d.wav", "e.wav"])
    capsys.readouterr()
    ds = load_dataset(root)
    assert sorted((Path(c.path).name, c.labels[0]) for c in ds.clips) == [
        ("a.wav", "dog"), ("b.wav", "dog"), ("c.wav", "dog"), ("d.wav", "cat"), ("e.wav", "cat")]  # fmt: skip
    shards = {Path(it.path).name: it.labels for it in discover_folder(root).items}
    assert shards["a.wav"] == ("s1",) and shards["c.wav"] == ("dog",)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("matpac-eval: warning: "), err
    assert "2 of 5 audio files" in err[0] and "dog/s1/a.wav" in err[0] and "first-level folder" in err[0]
    assert "make-shards" in err[0] and "'s1'" in err[0] and "CSV manifest" in err[0]
    # the normal flat layout, and a folder whose nested files get the same label either way, stay quiet
    load_dataset(tones)
    (root / "dog" / "s1" / "a.wav").unlink()
    (root / "dog" / "s1" / "b.wav").unlink()
    load_dataset(root)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("preset", ["matpac", "m2d"])  # Kaiser and soxr HQ resamplers
def test_a_long_file_is_decoded_only_as_far_as_its_clip(tmp_path, monkeypatch, preset):
    # A 20 s file embedded as a 1 s clip: the clip is the one the whole file gave (bit for bit), its length is the
    # whole file's, and libsndfile was asked for the clip plus the resampler margin, not for 20 s.
    from matpac_fast.frontend import get_spec, resample, to_mono

    sr, spec = 22050, get_spec(preset)
    x = (np.random.default_rng(0).standard_normal((20 * sr, 2)) * 0.1).astype(np.float32)
    sf.write(tmp_path / "long.wav", x, sr, subtype="FLOAT")
    asked = []
    real_read = sf.SoundFile.read
    monkeypatch.setattr(sf.SoundFile, "read", lambda self, frames=-1, **kw: asked.append(frames) or
                        real_read(self, frames, **kw))  # fmt: skip
    lengths = []
    got = embed.load_clip(str(tmp_path / "long.wav"), 16000, spec, lengths)
    whole = resample(torch.from_numpy(to_mono(x)), sr, spec).numpy()
    assert np.array_equal(got, whole[:16000])
    assert lengths == [len(whole)] == [320000]
    assert asked == [int((1 + embed.DECODE_MARGIN_S) * sr)]


def test_a_long_pyav_file_stops_decoding_after_its_clip(tmp_path, monkeypatch):
    # PyAV containers: decoding stops after clip + margin (no 1 h make-shards limit applies), and the length comes
    # from the container's header
    import shard_tools.decode

    sr, calls = 16000, []

    def fake_read_audio(path, size=None, max_seconds=None, stop_seconds=float("inf")):
        calls.append((max_seconds, stop_seconds))
        n = int(min(7200.0, stop_seconds + 0.02) * sr)  # a 2 h file, decoded in 20 ms frames
        return np.full((n, 1), 0.25, np.float32), sr

    monkeypatch.setattr(shard_tools.decode, "read_audio", fake_read_audio)
    monkeypatch.setattr(embed, "audio_duration", lambda path: 7200.0)
    lengths = []
    got = embed.load_clip(str(tmp_path / "talk.m4a"), 32000, embed.get_spec("matpac"), lengths)
    assert calls == [(float("inf"), 2 + embed.DECODE_MARGIN_S)]
    assert np.array_equal(got, np.full(32000, 0.25, np.float32)) and lengths == [7200 * sr]
