"""Resources that runs must not leave behind or pile up: temporary files, open shard mappings, worker processes."""

from __future__ import annotations

import numpy as np
import pytest

from matpac_fast.evaluation import cli


def test_ctrl_c_while_the_embedding_cache_is_written_leaves_no_temporary_file(tones, tmp_path, capsys, monkeypatch):
    """The entry is written to `<entry>.<pid>.tmp.npz`, then renamed. A Ctrl-C inside the write left that file in
    the cache folder for good (found with a slowed np.savez and SIGINT: one 258 KB file per interrupted run of
    300 FSDD clips, logmel), since only an OSError removed it."""
    cache = tmp_path / "cache"
    args = ["--checkpoint", "logmel", "--data", str(tones), "--out", str(tmp_path / "o"), "--quiet", "--probe",
            "logreg", "--folds", "kfold:3", "--projection", "none", "--cache-dir", str(cache)]  # fmt: skip
    real = np.savez

    def interrupted_savez(f, **arrays):
        real(f, **arrays)  # the bytes are in the temporary file...
        raise KeyboardInterrupt  # ...and Ctrl-C comes before the rename

    with monkeypatch.context() as m:
        m.setattr(np, "savez", interrupted_savez)
        try:
            cli.main(args)
        except KeyboardInterrupt:  # not re-raised: it would stop the whole pytest session
            pytest.fail("Ctrl-C escaped matpac-eval's main")
        except SystemExit as e:
            assert e.code == 130, e.code
        else:
            pytest.fail("matpac-eval went on after Ctrl-C")
    assert "nothing was kept" in capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == []  # before: ['tones-logmel-<key>.<pid>.tmp.npz']
