"""matpac-train --config FILE: a --print-config output or a run's config.json gives the settings back; the recipe
fills what a file leaves out and the flags override it; anything else is one line naming the file and the setting."""

from __future__ import annotations

import json
import shutil

import pytest

from matpac_fast import trainer as T
from matpac_fast.train_config import RECIPES, model_config, resolve_args

SYN = ["--shards", "synthetic:64"]


def _resolved(argv: list[str]) -> dict:
    """What --print-config prints for a synthetic set (the config, every model field), without a Trainer."""
    cfg, _ = resolve_args(argv)
    return {**cfg.to_dict(), "model": model_config(cfg).to_dict()}


def _write(tmp_path, content, name="c.json") -> str:
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_a_print_config_output_gives_its_run_back_and_flags_override_it(tmp_path):
    argv = ["--recipe", "tiny", *SYN, "--out", str(tmp_path / "a"), "--kernels", "true", "--lr", "0.002",
            "--model", "alpha=0.7", "--inductor", "max_autotune_gemm=true"]
    printed = _resolved(argv)
    path = _write(tmp_path, printed)
    # without --recipe tiny: every run/data/optim/schedule setting comes from the file
    assert _resolved(["--config", path]) == printed
    over = _resolved(["--config", path, "--kernels", "false", "--lr", "0.004", "--model", "alpha=0.2"])
    assert over["run"]["kernels"] is False and over["model"]["use_kernels"] is False  # not pinned by the file
    assert over["optim"]["lr"] == 0.004 and over["model"]["alpha"] == 0.2
    assert over["inductor"] == {"max_autotune_gemm": True}


def test_a_print_config_output_keeps_only_the_model_fields_its_preset_does_not_imply(tmp_path):
    # The tiny recipe's EMA end-points and --model alpha are the run's choices; its widths are the tiny preset's.
    printed = _resolved(["--recipe", "tiny", *SYN, "--model", "alpha=0.7"])
    path = _write(tmp_path, printed)
    cfg, _ = resolve_args(["--config", path])
    assert cfg.model == {"alpha": 0.7, "ema_start": 0.99, "ema_end": 0.999, "head_ema_start": 0.99}
    # So another preset given as a flag keeps its own widths and takes the file's choices.
    other = _resolved(["--config", path, "--preset", "m2d", "--frontend", "m2d"])
    assert (other["model"]["name"], other["model"]["dim"], other["model"]["alpha"]) == ("m2d", 768, 0.7)
    assert other["model"]["ema_start"] == 0.99
    assert (other["model"]["norm_mean"], other["model"]["norm_std"]) != (printed["model"]["norm_mean"],
                                                                         printed["model"]["norm_std"])


def test_a_run_config_json_gives_the_options_as_given_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["--recipe", "tiny", *SYN, "--batch-size", "8", "--workers", "0", "--progress", "false",
            "--model", "depth=1", "--model", "pred_depth=1", "--model", "alpha=0.7"]
    assert T.main([*base, "--out", str(out), "--max-steps", "2"]) == 0
    saved = json.loads((out / "config.json").read_text())
    cfg, _ = resolve_args(["--config", str(out / "config.json")])
    assert cfg.to_dict() == saved["train"]  # the "train" part, --model options as given
    assert cfg.model == {**RECIPES["tiny"]["model"], "depth": 1, "pred_depth": 1, "alpha": 0.7}
    capsys.readouterr()
    assert T.main(["--config", str(out / "config.json"), "--resume", "auto", "--max-steps", "3"]) == 0
    printed = capsys.readouterr()
    assert "(changed: --max-steps 2 -> 3)" in printed.err and "done: step 3" in printed.out
    # The resumed run's config.json says resume "auto": a new run started from it is a new run, whatever its --out
    assert json.loads((out / "config.json").read_text())["train"]["run"]["resume"] == "auto"
    cfg, _ = resolve_args(["--config", str(out / "config.json"), "--out", str(tmp_path / "new")])
    assert cfg.run.resume == ""
    path = _write(tmp_path, {"run": {"resume": str(out / "checkpoints" / "step_00000002")}})
    assert resolve_args(["--config", path, *SYN])[0].run.resume == ""


def test_the_recipe_fills_what_a_file_leaves_out(tmp_path):
    path = _write(tmp_path, {"optim": {"lr": 1e-4}, "model": {"alpha": 1}})
    cfg, _ = resolve_args(["--recipe", "tiny", *SYN, "--config", path])
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.run.preset, cfg.model["alpha"]) == (1e-4, 32, "tiny", 1)
    cfg, _ = resolve_args(["--config", path, *SYN, "--lr", "5e-4"])
    assert (cfg.optim.lr, cfg.data.batch_size, cfg.run.preset) == (5e-4, 256, "matpac")


@pytest.mark.parametrize("content, says", [
    ('{"optim": {"lr": "1e-4"}}', 'optim.lr is "1e-4" (a text), not a number like 0.0003'),
    ('{"data": {"batch_size": 8.0}}', "data.batch_size is 8.0 (a number), not an integer like 256"),
    ('{"run": {"cpu": 1}}', "run.cpu is 1 (a number), not true or false like False"),
    ('{"model": {"dim": true}}', "model.dim is true (true or false), not an integer like 768"),
    ('{"optim": {"lrr": 1}}', "optim.lrr is not a setting of matpac-train (did you mean lr?); fix or remove it"),
    ('{"model": {"depht": 1}}', "model.depht is not a setting of matpac-train (did you mean depth?)"),
    ('{"optm": {"lr": 1}}', "'optm' is not a section of matpac-train's config (did you mean optim?)"),
    ('{"optim": [1]}', '"optim" is a list, not an object of settings'),
    ("[1]", "holds a list, not an object of settings"),
    ('{"train": 3}', 'its "train" is a number, not the run\'s settings'),
    ("lr: 1e-4\n", "not a JSON file (Expecting value: line 1 column 1 (char 0))"),
    ('{"a":' * 100_000, "nested too deeply to be a config file"),
    ('{"optim": {"lr": 1' + "0" * 5000 + "}}", "Exceeds the limit (4300 digits)"),
])
def test_a_bad_config_file_is_one_line_naming_the_setting(tmp_path, capsys, content, says):
    path = _write(tmp_path, content)
    rc = T.main(["--config", path, *SYN, "--print-config"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: --config {path}: "), err
    assert says in err, err


def test_a_missing_file_or_a_run_folder_says_what_to_give(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("{}")
    for given, says in [(tmp_path / "nope.json", "no such file"),
                        (run, f"is a folder: give its config.json ({run / 'config.json'})"),
                        (tmp_path, "is a folder; give a JSON file")]:
        assert T.main(["--config", str(given), *SYN, "--print-config"]) == 2
        assert capsys.readouterr().err.strip() == f"error: --config {given}: {says}"
    shutil.rmtree(run)


def test_a_file_model_value_is_not_dropped_for_equalling_a_preset_it_does_not_use(tmp_path):
    # A field of a --print-config output equal to its preset's value was dropped so that --preset could decide it,
    # and the recipe's --model defaults then took its place: the tiny recipe's ema_start 0.99 over the file's 0.99995
    printed = _resolved([*SYN, "--preset", "tiny"])
    path = _write(tmp_path, printed)
    assert _resolved(["--recipe", "tiny", "--config", path]) == printed
    part = _write(tmp_path, {"model": {"ema_start": 0.99995}}, "part.json")
    assert model_config(resolve_args(["--recipe", "tiny", *SYN, "--config", part])[0]).ema_start == 0.99995
    # A hand-written "model" (no preset named in the file) is kept as given, as --model would be: alpha 0.5 is the
    # matpac preset's value, and was dropped, so that --preset m2d silently trained with its alpha 1
    part = _write(tmp_path, {"model": {"alpha": 0.5}}, "alpha.json")
    cfg, _ = resolve_args(["--preset", "m2d", *SYN, "--config", part])
    assert model_config(cfg).alpha == 0.5


@pytest.mark.parametrize("content, says", [
    ('{"optim": {"lr": 1' + "0" * 400 + "}}", "optim.lr is 1000"),
    ('{"model": {"tau_s": 1' + "0" * 400 + "}}", "model.tau_s is 1000"),
])
def test_an_integer_too_large_for_a_float_setting_is_one_line(tmp_path, capsys, content, says):
    # JSON integers are read as Python ints, which a float setting took as they were: the lr's reached the schedule
    # (OverflowError: integer division result too large for a float), the model's math.isfinite
    path = _write(tmp_path, content)
    assert T.main(["--config", path, "--recipe", "tiny", *SYN, "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and says in err and "too large" in err, err
    cfg, _ = resolve_args(["--config", _write(tmp_path, '{"optim": {"lr": 1}}', "one.json"), *SYN])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)  # an integer for a float setting is a float
