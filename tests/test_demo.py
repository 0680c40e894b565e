"""The README's main command, shrunk: every stage of `python -m matpac_fast.demo` runs and the table adds up."""

import json
import re

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
    def losses():
        return [(r["step"], r["loss"]) for r in map(json.loads, (tmp_path / "train" / "history.jsonl").open())]

    rows = losses()
    # A second run in the same folder replaces the first (deterministic: the same figures), never mixes the two.
    assert main(["--out", str(tmp_path), "--n", "64", "--epochs", "1", "--batch-size", "16", "--probe-n", "40",
                 "--skip-fsdd", "--workers", "1"]) == 0
    out2 = capsys.readouterr().out
    assert "replacing the earlier demo run" in out2 and out2.strip().splitlines()[-1] == last
    assert losses() == rows and len(rows) == len(set(rows))


def test_table_marks_missing_fsdd():
    synth = {"chance": 0.1, "logmel": 0.5, "random": 0.4, "pretrained": 0.6}
    table = format_table(synth, None)
    assert "| pre-trained encoder (tiny, this demo) | 60.0% | n/a (no ../shared) |" in table
    table = format_table(synth, {"chance": 0.1, "logmel": 0.95, "random": 0.94, "pretrained": 0.96})
    assert "| chance | 10.0% | 10.0% |" in table and "| raw log-mel baseline | 50.0% | 95.0% |" in table
