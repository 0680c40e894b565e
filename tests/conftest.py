import getpass
import os
import shutil
import signal
import tempfile
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FSDD = SHARED / "fsdd"
AUDIOSET_META = SHARED / "audioset_meta"

os.environ.setdefault("OMP_NUM_THREADS", "2")

# torchrun and `accelerate launch` make a `torchelastic_*` log folder in $TMPDIR per launch and never remove it: each
# run of the suite left five in /tmp (628 after a few weeks of runs). The processes the tests start get a $TMPDIR of
# their own, removed when the session ends. Set here, at import, because test modules copy os.environ into their
# subprocess environments at import. This process's own temporary folder (tempfile's, cached by the first call, which
# pytest's tmp_path also uses) and Inductor's compile cache (torch's default place, so compiles stay warm between
# runs) do not move.
_TMP = tempfile.gettempdir()
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_TMP, f"torchinductor_{getpass.getuser()}"))
_SUBPROCESS_TMP = tempfile.mkdtemp(prefix="matpac-test-subprocesses-")
os.environ["TMPDIR"] = _SUBPROCESS_TMP


def pytest_unconfigure(config):
    shutil.rmtree(_SUBPROCESS_TMP, ignore_errors=True)

# A test run started as a background job of a non-interactive shell (`make test &`) inherits SIGINT ignored, and so
# does every process the tests start: the Ctrl-C tests then saw their SIGINT ignored and a run finish normally
# (four failures, in a clean-clone run started that way). A Python handler here is reset to the default at exec,
# so the processes the tests start get the SIGINT a user's terminal would give them.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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


@pytest.fixture
def tones(tmp_path) -> Path:
    """3 classes x 8 clips of 0.3 s tones (300 / 1000 / 3000 Hz) at 16 kHz, one folder per class (matpac-eval tests)."""
    import soundfile as sf
    from test_eval import tone

    root = tmp_path / "tones"
    for label, freq in (("low", 300.0), ("mid", 1000.0), ("high", 3000.0)):
        (root / label).mkdir(parents=True)
        for i in range(8):
            sf.write(root / label / f"{label}_{i}.wav", tone(freq * (1 + 0.02 * i), seed=i), 16000)
    return root


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one AcceleratorState per process: an earlier test's precision would be refused."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def kernels_auto_as_on_cuda(monkeypatch):
    """matpac_kernels' backend "auto", deciding for this process's CPU tensors as it decides for CUDA tensors, and a
    count of which path each op took.

    On CPU "auto" is the reference, so a test of "auto" there compares the reference with itself and cannot see "auto"
    fall back to the reference on a GPU. Here each op's `use_triton` calls the real rule (`_runtime.use_triton`) with
    a CUDA device in place of a CPU one: "auto" then picks Triton exactly where it would on a GPU, and the kernels run
    in Triton's interpreter (TRITON_INTERPRET=1; tests that reach a kernel need it). Yields a Counter with one entry
    per kernel launch ("xent fwd_launch", "xent bwd_launch", "patchify launch", "attention fwd_launch",
    "attention bwd_launch") and per call of an op's reference ("xent reference", "patchify reference",
    "attention reference"). matpac_kernels is imported here, at test time: importing it from this file at collection
    would import triton before the kernel test modules could choose the interpreter.
    """
    import collections
    import importlib

    import matpac_kernels as mk
    import torch

    runtime = importlib.import_module("matpac_kernels._runtime")
    calls = collections.Counter()

    def use_triton_as_on_cuda(device, supported=True, why=""):
        return runtime.use_triton(torch.device("cuda") if device.type == "cpu" else device, supported, why)

    def count(module, attr, key):
        real = getattr(module, attr)

        def counted(*args, **kwargs):
            calls[key] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(module, attr, counted)

    ops = (
        ("xent", "centered_xent", ("_fwd_launch", "_bwd_launch"), "reference_centered_softmax_xent"),
        ("patchify", "patchify_gather", ("_launch",), "reference_patchify_gather"),
        ("attention", "attention", ("_fwd_launch", "_bwd_launch"), "reference_packed_attention"),
    )
    for op, module_name, launchers, reference in ops:
        module = importlib.import_module(f"matpac_kernels.{module_name}")
        monkeypatch.setattr(module, "use_triton", use_triton_as_on_cuda)
        for attr in launchers:
            count(module, attr, f"{op} {attr.strip('_')}")
        count(module, reference, f"{op} reference")
    with mk.use_backend("auto"):
        yield calls
