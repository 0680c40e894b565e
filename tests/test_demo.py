"""The README's main command, shrunk: every stage of `python -m matpac_fast.demo` runs and the table adds up."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from matpac_fast.demo import format_table, main


def test_demo_end_to_end_small(tmp_path, capsys):
    rc = main(["--out", str(tmp_path), "--n", "64", "--epochs", "1", "--batch-size", "16", "--probe-n", "40",
               "--skip-fsdd", "--workers", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    m = re.fullmatch(r"RESULT demo chance=([\d.]+) logmel=([\d.]+) random=([\d.]+) pretrained=([\d.]+)", last)
    assert m, last
    chance, *scores = map(float, m.groups())
    assert chance == 0.1  # 40 clips = 4 per class; 3 train / 1 test each -> the majority share of the test set
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert (tmp_path / "train" / "encoder.pt").exists() and (tmp_path / "results.md").exists()
    assert "| pre-trained encoder (tiny, this demo) |" in (tmp_path / "results.md").read_text()
    assert "n/a (--skip-fsdd)" in (tmp_path / "results.md").read_text()  # skipped, not missing
    # The table adds up: each row of results.md shows the RESULT line's figure (table: percent, 1 decimal).
    labels = {"chance": "chance", "logmel": "raw log-mel baseline", "random": "random-init encoder (tiny)",
              "pretrained": "pre-trained encoder (tiny, this demo)"}
    table = {}
    for line in (tmp_path / "results.md").read_text().splitlines():
        row = re.fullmatch(r"\| (.+?) \| ([\d.]+)% \| n/a \(--skip-fsdd\) \|", line)
        if row:
            table[row.group(1)] = float(row.group(2))
    assert set(table) == set(labels.values()), table
    result = dict(zip(labels, (chance, *scores)))
    for key, label in labels.items():
        # RESULT has 4 decimals, the table 0.1 %: equal up to the coarser rounding (plus the finer one's)
        assert abs(table[label] - 100 * result[key]) <= 0.05 + 0.005 + 1e-9, (label, table[label], result[key])
    def losses():
        return [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "train" / "history.jsonl").open())]

    rows = losses()
    # A second run in the same folder replaces the first (deterministic: the same figures), never mixes the two.
    assert main(["--out", str(tmp_path), "--n", "64", "--epochs", "1", "--batch-size", "16", "--probe-n", "40",
                 "--skip-fsdd", "--workers", "1"]) == 0
    out2 = capsys.readouterr().out
    assert "replacing the earlier demo run" in out2 and out2.strip().splitlines()[-1] == last
    assert losses() == rows and len(rows) == len(set(rows))


@pytest.mark.parametrize("with_fsdd", [False, True])
def test_results_md_and_result_line_show_the_probe_figures(tmp_path, capsys, monkeypatch, with_fsdd):
    """main's wiring, with the slow stages stubbed: distinct probe figures (in the tiny end-to-end run two of them
    coincide) must reach results.md's rows and the RESULT line unchanged and unswapped."""
    import torch

    from matpac_fast import demo

    synth = {"chance": 0.1, "logmel": 0.2346, "random": 0.3456, "pretrained": 0.4567}
    fsdd = {"chance": 0.125, "logmel": 0.6789, "random": 0.5678, "pretrained": 0.789}
    monkeypatch.setattr(demo, "shards_step", lambda *a, **k: {})
    monkeypatch.setattr(demo, "verify_step", lambda *a, **k: {})
    monkeypatch.setattr(demo, "pretrain_step", lambda *a, **k: tmp_path / "encoder.pt")
    monkeypatch.setattr(demo, "probe_step", lambda *a, **k: dict(synth))
    monkeypatch.setattr(demo, "fsdd_step", lambda *a, **k: dict(fsdd))
    monkeypatch.setattr(demo, "_check_fsdd", lambda path: None)  # --fsdd is a stand-in folder here
    threads = torch.get_num_threads()
    try:
        args = ["--out", str(tmp_path)] + (["--fsdd", str(tmp_path)] if with_fsdd else ["--skip-fsdd"])
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)  # main sets one thread for the whole process
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "RESULT demo chance=0.1000 logmel=0.2346 random=0.3456 pretrained=0.4567"
    rows = (tmp_path / "results.md").read_text().splitlines()
    f = (lambda x: x) if with_fsdd else (lambda x: "n/a (--skip-fsdd)")
    assert rows[2:] == [
        f"| chance | 10.0% | {f('12.5%')} |",
        f"| raw log-mel baseline | 23.5% | {f('67.9%')} |",
        f"| random-init encoder (tiny) | 34.6% | {f('56.8%')} |",
        f"| pre-trained encoder (tiny, this demo) | 45.7% | {f('78.9%')} |",
    ]


def test_table_marks_missing_fsdd():
    synth = {"chance": 0.1, "logmel": 0.5, "random": 0.4, "pretrained": 0.6}
    table = format_table(synth, None)
    assert "| pre-trained encoder (tiny, this demo) | 60.0% | n/a (no ../shared) |" in table
    table = format_table(synth, {"chance": 0.1, "logmel": 0.95, "random": 0.94, "pretrained": 0.96})
    assert "| chance | 10.0% | 10.0% |" in table and "| raw log-mel baseline | 50.0% | 95.0% |" in table


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_a_stop_during_pretraining_ends_the_demo_without_a_table(tmp_path, capsys, monkeypatch, sig):
    # Before, the trainer's graceful stop (Ctrl-C: finish the step, checkpoint) returned to the demo, which went on
    # to probe the part-trained encoder and printed its table and RESULT line, exit 0, as if the demo had run.
    import signal

    import torch

    from matpac_fast.trainer import Trainer

    signum = signal.Signals[sig]
    real, sent = Trainer.micro_step, []

    def micro_step(self, lms):
        if not sent:  # in the first step: the stop comes after it
            sent.append(signum)
            signal.raise_signal(signum)
        return real(self, lms)

    monkeypatch.setattr(Trainer, "micro_step", micro_step)
    earlier = format_table({"chance": 0.1, "logmel": 0.5, "random": 0.4, "pretrained": 0.6}, None)
    (tmp_path / "results.md").write_text(earlier + "\n")  # an earlier run's: it would sit beside the part-trained one
    threads = torch.get_num_threads()
    try:
        rc = main(["--out", str(tmp_path), "--n", "64", "--epochs", "2", "--batch-size", "16", "--probe-n", "40",
                   "--skip-fsdd", "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    captured = capsys.readouterr()
    assert rc == 128 + signum and sent == [signum]
    assert captured.err.strip().splitlines()[-1] == (
        f"demo: pre-training stopped by {sig} at step 1 (its checkpoint is written): no table from a part-trained "
        "encoder; run the same command again to start over (finished shards are kept; pre-training starts afresh)")
    assert "[demo] 4/5" not in captured.out and "RESULT" not in captured.out
    assert not (tmp_path / "results.md").exists()
    assert (tmp_path / "train" / "checkpoints" / "step_00000001").is_dir()


@pytest.mark.parametrize("left", ["tb", "encoder.pt", "config.json", "history.jsonl", "checkpoints"])
def test_a_rerun_replaces_what_any_earlier_demo_run_left(tmp_path, left):
    # A run stopped a few ms after the trainer began holds only tb/, and one cut while the demo deleted the earlier
    # run may hold any one of these: the rerun refused it ("exists and is not an earlier demo run") for tb/ and
    # encoder.pt alone. The demo's mark (made before the trainer starts, deleted last) says it is the demo's.
    from matpac_fast.demo import DEMO_MARK, _clear_earlier_demo_run

    run = tmp_path / "train"
    _clear_earlier_demo_run(run)  # a first run: the folder made and marked
    assert [p.name for p in run.iterdir()] == [DEMO_MARK]
    if "." in left:
        (run / left).write_bytes(b"x")
    else:
        (run / left).mkdir()
    _clear_earlier_demo_run(run)
    assert [p.name for p in run.iterdir()] == [DEMO_MARK]


def test_a_rerun_never_deletes_a_run_the_demo_did_not_make(tmp_path, capsys):
    """Any folder holding one of a trainer run's files was taken for an earlier demo run and deleted whole:
    `make demo DEMO_DIR=runs` deleted a real runs/train (found by review). Now only the demo's marked folder, or a
    demo run from before the mark (its config.json trained on the demo's shards into that folder), is replaced."""
    import json

    from matpac_fast.demo import DEMO_MARK, _clear_earlier_demo_run

    def run_folder(name: str, shards: str, out: str):
        run = tmp_path / name / "train"
        (run / "checkpoints" / "step_00000010").mkdir(parents=True)
        (run / "NOTES.txt").write_text("mine")
        (run / "config.json").write_text(json.dumps({"train": {"data": {"shards": shards}, "run": {"out": out}}}))
        return run

    real = run_folder("runs", "/data/as2m", "runs/train")
    with pytest.raises(ValueError, match=f"exists and is not an earlier demo run \\(no {DEMO_MARK}\\)"):
        _clear_earlier_demo_run(real)
    assert (real / "NOTES.txt").read_text() == "mine" and (real / "checkpoints" / "step_00000010").is_dir()
    old_demo = run_folder("demo", str(tmp_path / "demo" / "shards"), str(tmp_path / "demo" / "train"))
    _clear_earlier_demo_run(old_demo)
    assert [p.name for p in old_demo.iterdir()] == [DEMO_MARK]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("not a run")
    with pytest.raises(ValueError, match="is not an earlier demo run"):
        _clear_earlier_demo_run(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "not a run"


def test_an_out_that_is_a_file_is_one_line_not_a_traceback(tmp_path):
    # fb35af1's deletion of an earlier results.md ran first: unlink("FILE/results.md") raised NotADirectoryError, a
    # traceback, where c99fd25 said in one line that no folder can be made under a file.
    import torch

    from matpac_fast.demo import main

    out = tmp_path / "afile"
    out.write_text("mine")
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit) as e:
            main(["--out", str(out), "--n", "8", "--probe-n", "20", "--skip-fsdd", "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    assert str(e.value.code).startswith(f"demo: --out {out / 'shards'}: {out} is a file"), e.value.code
    assert out.read_text() == "mine"


def test_a_results_md_the_demo_did_not_write_is_refused_before_any_work(tmp_path):
    # The demo deletes its earlier table when it starts (see the stop test): matpac-eval's was deleted too, and the
    # demo then went on (or refused the run for another reason, the table gone all the same).
    import torch

    theirs = "# matpac-eval results\n\n| task | checkpoint |\n"
    (tmp_path / "results.md").write_text(theirs)
    threads = torch.get_num_threads()
    try:
        with pytest.raises(SystemExit, match=r"^demo: --out .* holds a results\.md that the demo did not write; "):
            main(["--out", str(tmp_path), "--n", "64", "--skip-fsdd", "--workers", "1"])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "results.md").read_text() == theirs
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"]  # no shards, no run


@pytest.mark.parametrize("argv, message", [
    (["--fsdd", "{tmp}/nowhere"], "demo: --fsdd {tmp}/nowhere is not the Free Spoken Digit Dataset with its official "
                                  "split (no such file or folder); give its folder (recordings/ or labels.csv) or "
                                  "--skip-fsdd"),
    (["--fsdd", "{tmp}/notfsdd"], "demo: --fsdd {tmp}/notfsdd is not the Free Spoken Digit Dataset with its official "
                                  "split (no official protocol (no 'split' or 'fold' column))"),
    (["--epochs", "0.5"], "demo: --epochs 0.5: give a number >= 1 (the tiny recipe warms the learning rate up"),
    (["--epochs", "nan"], "demo: --epochs nan: give a number >= 1"),
    (["--batch-size", "0"], "demo: --batch-size must be >= 1 and --workers >= 0"),
])
def test_bad_options_are_refused_before_any_work(tmp_path, argv, message):
    """A bad --fsdd failed at stage 5, after the whole pre-training (~5 min), naming matpac-eval's --data and --folds;
    --epochs 0.5 after the shards were made, naming --warmup-epochs (found by review). Now one line, nothing made."""
    import soundfile as sf

    (tmp_path / "notfsdd" / "a").mkdir(parents=True)  # a folder of classes: read, but without an official split
    (tmp_path / "notfsdd" / "b").mkdir()
    for c in "ab":
        sf.write(tmp_path / "notfsdd" / c / "x.wav", [0.1, -0.1] * 4000, 8000)
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), *[a.format(tmp=tmp_path) for a in argv]])
    assert str(e.value.code).startswith(message.format(tmp=tmp_path)), e.value.code
    assert not out.exists()


def test_make_clean_keeps_runs(tmp_path):
    """`make clean` ran `rm -rf .venv runs build *.egg-info`: runs/ holds what the README's commands write there
    besides the demo (`train.py --out runs/as2m`, days of GPU time; `matpac-eval --out runs/eval_fsdd`), all deleted
    by a target one runs to tidy a checkout (found by a README walkthrough). It removes the build outputs only."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("no make on this machine")
    shutil.copy(Path(__file__).resolve().parents[1] / "Makefile", tmp_path / "Makefile")
    for d in (".venv/bin", "build/lib", "matpac_fast.egg-info", "runs/as2m/checkpoints", "runs/demo/train"):
        (tmp_path / d).mkdir(parents=True)
    (tmp_path / "runs/as2m/encoder.pt").write_bytes(b"weights")
    r = subprocess.run([make, "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not any((tmp_path / d).exists() for d in (".venv", "build", "matpac_fast.egg-info"))
    assert (tmp_path / "runs/as2m/encoder.pt").read_bytes() == b"weights"
    assert (tmp_path / "runs/demo/train").is_dir()
    assert "kept runs/" in r.stdout
