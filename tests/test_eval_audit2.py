"""Regressions from the second evaluation audit (eleventh session): which CSV is read, byte-order marks and other
encodings, non-finite weights and embeddings, integer and multi-channel waveforms in `Encoder.encode`, blocked
pickled globals, a config whose heads do not divide the width, --seed checks before embedding, repeated files,
incomplete result files and a --task reused for other data."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_eval import tone
from test_eval_cli_errors import _fsdd_like, _one_line_error, _run

from matpac_fast.config import get_model_config
from matpac_fast.encoder import Encoder, export_encoder_state, load_encoder
from matpac_fast.evaluation import embed
from matpac_fast.evaluation.datasets import load_dataset
from matpac_fast.model import MATPAC

FAST = ["--quiet", "--probe", "logreg", "--projection", "none", "--no-cache"]


@pytest.fixture(scope="module")
def tiny_pt(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    p = tmp_path_factory.mktemp("enc") / "tiny_enc.pt"
    torch.save({k: v.contiguous() for k, v in export_encoder_state(MATPAC(get_model_config("tiny"))).items()}, p)
    return p


def test_a_csv_with_fsdd_columns_is_read_as_itself(tmp_path, capsys):
    """Any CSV with filename,label,speaker columns used to be taken for FSDD: the folder's labels.csv was read
    instead of the file passed, with the ten digits forced as its classes."""
    root = _fsdd_like(tmp_path / "digits")
    rows = (root / "labels.csv").read_text().splitlines()
    (root / "only01.csv").write_text("\n".join([rows[0]] + [r for r in rows[1:] if r.split(",")[1] in "01"]) + "\n")
    out = tmp_path / "o"
    lines, _ = _run(["--checkpoint", "logmel", "--data", str(root / "only01.csv"), "--out", str(out), *FAST], capsys)
    result = json.loads(next(out.glob("*.json")).read_text())
    assert (result["dataset"], result["n_clips"], result["n_classes"]) == ("digits-only01", 8, 2)
    assert load_dataset(root).name == "fsdd" and load_dataset(root / "labels.csv").name == "fsdd"  # FSDD itself
    emo = tmp_path / "emo"  # FSDD's columns, other labels, named labels.csv: a generic CSV, not "unknown label"
    emo.mkdir()
    for i in range(6):
        sf.write(emo / f"{i}.wav", tone(300.0 * (1 + i % 2), 0.1, seed=i), 8000)
    (emo / "labels.csv").write_text("filename,label,speaker\n" + "".join(
        f"{i}.wav,{'happy' if i % 2 else 'sad'},s{i % 3}\n" for i in range(6)))
    ds = load_dataset(emo)
    assert ds.layout == "csv" and ds.classes == ["happy", "sad"] and len(ds) == 6


def test_a_csv_with_a_byte_order_mark_or_another_encoding(tones, tmp_path, capsys):
    files = sorted(tones.rglob("*.wav"))
    body = "".join(f"{f},{f.parent.name}\n" for f in files)
    (tmp_path / "bom.csv").write_bytes(b"\xef\xbb\xbf" + f"path,label\n{body}".encode())
    ds = load_dataset(tmp_path / "bom.csv")
    assert len(ds) == len(files) and ds.classes == ["high", "low", "mid"]
    (tmp_path / "latin.csv").write_bytes(f"path,label\n{files[0]},caf\xe9\n".encode("latin-1"))
    msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tmp_path / "latin.csv"), "--out",
                           str(tmp_path / "o"), *FAST])  # fmt: skip
    assert "latin.csv: not UTF-8 text (byte 0xe9 at offset" in msg and "save the CSV as UTF-8" in msg


def test_non_finite_weights_are_refused_when_loaded(tiny_pt, tmp_path):
    state = torch.load(tiny_pt, weights_only=True)
    state["student_encoder.norm.weight"][0] = float("nan")
    state["student_encoder.blocks.0.mlp.fc1.bias"][1] = float("inf")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError) as e:
        load_encoder(tmp_path / "nan.pt", preset="tiny")
    msg = str(e.value)
    assert "nan.pt: non-finite values (NaN or inf) in student_encoder.blocks.0.mlp.fc1.bias, " in msg
    assert "student_encoder.norm.weight" in msg and "use an earlier checkpoint" in msg


def test_non_finite_embeddings_stop_before_any_score_or_cache(tones, tmp_path, monkeypatch, capsys):
    class NaNEmbedder:
        name, identity, spec = "nan-embedder", "nan", None

        def __call__(self, waves):
            out = torch.zeros(len(waves), 4)
            out[0, 1] = float("nan")
            return out

    monkeypatch.setattr(embed, "make_embedder", lambda *a, **k: NaNEmbedder())
    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--quiet", "--probe",
            "logreg", "--projection", "none", "--folds", "kfold:2"]  # fmt: skip
    msg = _one_line_error(args)
    assert "nan-embedder: non-finite embeddings (NaN or inf) for " in msg and "nothing was scored" in msg
    assert not list((tmp_path / "o").glob("*.json")) and not list(cache.rglob("*.npz"))


def test_encode_scales_integer_pcm_and_refuses_channels_last(tiny_pt):
    enc = load_encoder(tiny_pt, preset="tiny")
    w = tone(440.0, 1.0, sr=16000)
    ref = enc.encode(w.astype(np.float32), 16000)[1]
    for pcm in ((w * 32767).astype(np.int16), (w * (2**31 - 1)).astype(np.int32),
                torch.from_numpy((w * 32767).astype(np.int16))):  # fmt: skip
        assert torch.allclose(enc.encode(pcm, 16000)[1], ref, atol=1e-3, rtol=1e-3)
    u8 = np.round(w * 127 + 128).astype(np.uint8)
    assert torch.nn.functional.cosine_similarity(enc.encode(u8, 16000)[1], ref).item() > 0.99
    for wide in ((w * 32767).astype(np.int64), [int(x) for x in (w[:800] * 32767)]):  # no PCM type: refused
        with pytest.raises(ValueError, match="encode got int64 samples: pass float audio in"):
            enc.encode(wide, 16000)
    with pytest.raises(ValueError, match=r"shape \(16000, 2\): that looks like \(samples, channels\) audio"):
        enc.encode(np.stack([w, w], 1), 16000)
    assert enc.encode(np.stack([w, w]), 16000)[1].shape[0] == 2  # rows are clips


def test_a_blocked_pickled_global_is_named_as_code_not_damage(tiny_pt, tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"model": torch.load(tiny_pt, weights_only=True), "x": Payload()}, tmp_path / "evil.pt",
               pickle_module=pickle)
    with pytest.raises(ValueError) as e:
        load_encoder(tmp_path / "evil.pt", preset="tiny")
    assert "holds pickled Python objects (posix.system)" in str(e.value) or "(nt.system)" in str(e.value)


def test_a_config_whose_heads_do_not_divide_the_width_is_one_line(tiny_pt, tmp_path):
    cfg = dict(get_model_config("tiny").__dict__, heads=3)
    torch.save({"model": torch.load(tiny_pt, weights_only=True), "config": cfg}, tmp_path / "h3.pt")
    with pytest.raises(ValueError, match=r"h3.pt: heads 3 \(from the saved config\) does not divide the weights' "
                                         r"width 64"):
        load_encoder(tmp_path / "h3.pt")


def test_seed_out_of_range_is_refused_before_embedding(tones, tmp_path, monkeypatch):
    called = []
    monkeypatch.setattr(embed, "make_embedder", lambda *a, **k: called.append(1))
    for seed, seeds in (("-1", "1"), (str(2**32 - 2), "3")):
        msg = _one_line_error(["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"),
                               "--seed", seed, "--seeds", seeds, *FAST])  # fmt: skip
        assert f"--seed must be between 0 and {2**32 - int(seeds)}" in msg
    assert not called


def test_a_file_listed_twice_is_warned_about(tones, tmp_path, capsys):
    files = sorted(tones.rglob("*.wav"))
    rows = [f"{f},{f.parent.name},train" for f in files] + [f"{files[0]},{files[0].parent.name},test"]
    (tmp_path / "dup.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    load_dataset(tmp_path / "dup.csv")
    err = capsys.readouterr().err
    assert f"1 row(s) repeat a file of an earlier row (e.g. row {len(files) + 1} repeats row 1: {files[0]})" in err


def test_an_incomplete_result_file_is_left_out_with_a_warning(tones, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes__v1__draft.json").write_text('{"task": "t", "mean": 0.5, "runs": []}')
    _, err = _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out), "--folds", "kfold:2", *FAST],
                  capsys)
    assert "notes__v1__draft.json is not a complete result (no dataset, folds," in err
    table = (out / "results.md").read_text()
    assert "| tones-kfold-2 |" in table and "| t |" not in table


def test_a_task_name_reused_for_other_data_says_what_it_replaces(tones, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(tones, other)
    out = tmp_path / "o"
    _run(["--checkpoint", "logmel", "--data", str(tones), "--task", "t", "--out", str(out), "--folds", "kfold:2",
          *FAST], capsys)  # fmt: skip
    _, err = _run(["--checkpoint", "logmel", "--data", str(other), "--task", "t", "--out", str(out), "--folds",
                   "kfold:3", *FAST], capsys)  # fmt: skip
    assert "replacing the earlier result of this embedder" in err
    assert "(data tones -> other; protocol kfold:2 -> kfold:3)" in err


def test_same_dataset_name_with_other_clips_says_so_when_it_replaces(tones, tmp_path, capsys):
    """Two folders of one name (x1/tones, x2/tones: one dataset name, one result row) with other clips, or a rerun
    with other probe seeds: the replace note said nothing (it compared the dataset name only)."""
    other = tmp_path / "x2" / "tones"
    shutil.copytree(tones, other)
    shutil.rmtree(other / "high")
    out = tmp_path / "o"
    _run(["--checkpoint", "logmel", "--data", str(tones), "--out", str(out), "--folds", "kfold:2", *FAST], capsys)
    _, err = _run(["--checkpoint", "logmel", "--data", str(other), "--out", str(out), "--folds", "kfold:2", "--seed",
                   "3", *FAST], capsys)  # fmt: skip
    assert f"(data path {tones} -> {other}; clips 24 -> 16; classes 3 -> 2; seed 0 -> 3)" in err, err
    # the same folder typed relative to its parent, then absolute from tmp_path (where ./tones is the other folder):
    # the same data, nothing to say (the typed path, resolved in the later run's directory, said it had changed)
    for cwd, data in ((other.parent, "tones"), (tmp_path, str(other))):
        with pytest.MonkeyPatch.context() as m:
            m.chdir(cwd)
            _, err = _run(["--checkpoint", "logmel", "--data", data, "--out", str(out), "--folds", "kfold:2",
                           "--seed", "3", *FAST], capsys)  # fmt: skip
        assert "replacing the earlier result of this embedder" in err and "data path" not in err, (data, err)


def test_float_input_is_used_as_it_is(tiny_pt):
    """Floats of any width and container give the same embedding, and are not rescaled (2w embeds as 2w)."""
    enc = load_encoder(tiny_pt, preset="tiny")
    assert isinstance(enc, Encoder)
    w = tone(440.0, 1.0, sr=16000).astype(np.float32)
    ref = enc.encode(torch.from_numpy(w), 16000)[1]
    for same in (w, w.astype(np.float64), torch.from_numpy(w).double(), w.tolist()):
        assert torch.equal(enc.encode(same, 16000)[1], ref)
    lms = enc._melspec(torch.from_numpy(2 * w)[None])
    assert torch.equal(enc.encode(2 * w, 16000)[1], enc.encode_lms(lms).mean(dim=1))
