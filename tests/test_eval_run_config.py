"""The run config.json read for a run's weights (CLI review, item 1): a config that cannot be used is a one-line
error naming the file, never replaced in silence by --preset's settings, and the run folder, its encoder.pt and its
checkpoints/step_N read it the same way."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
from safetensors.torch import save_file
from test_eval_cli_errors import _run
from test_eval_regressions import FAST_LOGREG, _trainer_run

from matpac_fast.encoder import RunConfigWarning, export_encoder_state, load_encoder


def _run_with_step(run: Path, **model) -> list[Path]:
    """A trainer run folder of an M2D-configured tiny model (norm -5 / 3, 2 heads): its three spellings."""
    enc = _trainer_run(run, frontend="m2d", heads=2, norm_mean=-5.0, norm_std=3.0, **model)
    step = run / "checkpoints" / "step_00000004"
    step.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in export_encoder_state(enc).items()}, str(step / "model.safetensors"))
    (step / "trainer_state.json").write_text(json.dumps({"step": 4, "total_steps": 4}))
    return [run, run / "encoder.pt", step]


def _load(path: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enc = load_encoder(path)  # default --preset matpac: dim 768, 12 heads, matpac front end
    return enc, [str(w.message) for w in caught if w.category is RunConfigWarning]


def _edit(run: Path, change) -> None:
    cfg = json.loads((run / "config.json").read_text())
    change(cfg)
    (run / "config.json").write_text(json.dumps(cfg))


def test_an_unknown_model_field_is_ignored_with_a_warning_for_every_spelling(tmp_path):
    # Before: run/ and run/encoder.pt dropped the whole config (front end matpac, norm -7.056, heads guessed from
    # another preset, "has no run config"), while step_N read it (m2d, -5): two results for one set of weights.
    run = tmp_path / "r"
    spellings = _run_with_step(run)
    _edit(run, lambda c: c["model"].update(some_new_field=1))
    for path in spellings:
        enc, warned = _load(path)
        s = enc.settings()
        assert (s["frontend"], s["norm_mean"], s["norm_std"], s["heads"]) == ("m2d", -5.0, 3.0, 2), path
        assert enc.config_source == str(run / "config.json") and not enc.heads_guessed
        assert len(warned) == 1 and "some_new_field" in warned[0] and str(run / "config.json") in warned[0], warned


@pytest.mark.parametrize("content, what", [
    ("", "not a readable JSON run config (an empty file)"),
    ('{"train": {', "not a readable JSON run config (Expecting"),
    ("[1, 2]", "the file holds a list, not a JSON object"),
    ('{"train": {}, "model": "tiny"}', 'its "model" is a text'),
    ('{"train": [], "model": {"dim": 64, "heads": 2}}', 'its "train" is a list'),
    ('{"train": {}, "model": {"dim": 64}}', 'its "model" has no heads'),
    ('{"train": {}, "model": {"dim": 64, "heads": 2, "norm_std": "3"}}', "model norm_std is '3', not a positive"),
    # an integer past float's range: math.isfinite raised OverflowError, a traceback
    ('{"train": {}, "model": {"dim": 64, "heads": 2, "norm_mean": 1' + "0" * 400 + '}}', "model norm_mean is 1000"),
    ('{"train": {"run": {"frontend": "m2x"}}, "model": {"dim": 64, "heads": 2}}', "train.run.frontend is 'm2x'"),
    ('{"train": {}, "model": {"dim": 768, "heads": 12}}', "has model dim 768, the weights 64"),
])
def test_a_run_config_that_cannot_be_used_is_an_error_for_every_spelling(tmp_path, content, what):
    run = tmp_path / "r"
    spellings = _run_with_step(run)
    (run / "config.json").write_text(content)
    for path in spellings:  # before: run/ and encoder.pt loaded with --preset's settings, without a word
        with pytest.raises(ValueError) as e:
            load_encoder(path)
        msg = str(e.value)
        assert str(run / "config.json") in msg and what in msg and "\n" not in msg, msg


def test_another_tools_config_json_is_not_read_and_says_so(tmp_path):
    run = tmp_path / "r"
    spellings = _run_with_step(run)
    (run / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 64}))  # e.g. Hugging Face's
    for path in spellings:
        enc, warned = _load(path)
        assert enc.config_source is None and enc.settings()["frontend"] == "matpac"
        assert len(warned) == 1 and f"{run / 'config.json'} is not a matpac_fast run config" in warned[0], warned


def test_cli_warns_about_ignored_fields_instead_of_saying_there_is_no_run_config(tones, tmp_path, capsys):
    run = tmp_path / "r"
    _run_with_step(run)
    _edit(run, lambda c: c["model"].update(some_new_field=1))
    lines, err = _run(["--checkpoint", str(run), "--data", str(tones), "--out", str(tmp_path / "o")] + FAST_LOGREG,
                      capsys)  # fmt: skip
    assert f"front end (m2d) from the run config {run / 'config.json'}" in err, err
    assert "matpac-eval: warning: " in err and "some_new_field" in err and "has no run config" not in err, err
    assert "UserWarning" not in err and "Traceback" not in err
