import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FSDD = SHARED / "fsdd"
AUDIOSET_META = SHARED / "audioset_meta"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def fsdd_dir():
    if not (FSDD / "labels.csv").exists():
        pytest.skip(f"FSDD not present at {FSDD} (../shared/data/fsdd); skipped on a fresh clone")
    return FSDD


@pytest.fixture
def audioset_meta_dir():
    if not (AUDIOSET_META / "class_labels_indices.csv").exists():
        pytest.skip(f"AudioSet CSVs not present at {AUDIOSET_META}; skipped on a fresh clone")
    return AUDIOSET_META
