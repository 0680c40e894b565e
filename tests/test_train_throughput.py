"""Throughput benchmark: the CPU smoke run (RESULT line, CSV, markdown), the reference-design pieces against our
references, the RESULT/speedup arithmetic, the chart, and the GPU suite's argument and environment checks."""

import csv
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from matpac_fast.config import get_model_config
from matpac_fast.flops import flops_per_sample
from matpac_fast.losses import centered_softmax_xent_reference
from matpac_fast.train_config import parse_inductor_options

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _peer  # noqa: E402
import plot_results  # noqa: E402
import train_throughput as tt  # noqa: E402

RESULT_RE = re.compile(r"^RESULT train samples_per_s=(\S+) mfu=(\S+) speedup_vs_reference_design=(\S+) device=(\S+)$")
# One thread: on a small shared CPU, OpenMP threads waiting on each other can make a tiny step ~50x slower.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# ------------------------------------------------------------------------------------------------ CPU smoke run
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--preset", "tiny", "--device", "cpu",
           "--batch-sizes", "8", "--steps", "3", "--warmup", "1", "--modes", "eager,reference-design",
           "--precision", "no", "--peak-tflops", "0.5", "--csv", str(out / "t.csv"), "--results-md", str(out / "R.md"),
           "--tmp-dir", str(out), "--inductor", "coordinate_descent_tuning=true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "t.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return proc.stdout, rows, out


def test_smoke_prints_a_parsable_result_line(smoke):
    stdout, rows, _ = smoke
    m = RESULT_RE.match(stdout.strip().splitlines()[-1])
    assert m, stdout[-1000:]
    sps, mfu, speedup = (float(v) for v in m.groups()[:3])
    assert sps > 0 and mfu > 0 and speedup > 0
    assert m.group(4).startswith("CPU")
    # The RESULT figures are the fastest non-reference row and its ratio to reference-design at the same batch.
    by = {r["mode"]: r for r in rows}
    assert sps == pytest.approx(float(by["eager"]["samples_per_s"]), abs=0.051)
    assert speedup == pytest.approx(float(by["eager"]["samples_per_s"]) / float(by["reference-design"]
                                                                                   ["samples_per_s"]), rel=0.02)


def test_smoke_rows_are_consistent(smoke):
    _, rows, out = smoke
    assert [r["mode"] for r in rows] == ["eager", "reference-design"]
    gflops = flops_per_sample(get_model_config("tiny")) / 1e9
    for r in rows:
        assert (r["batch"], r["world"], r["preset"], r["precision"]) == ("8", "1", "tiny", "no")
        sps = float(r["samples_per_s"])
        assert sps > 0 and float(r["samples_per_s_per_device"]) == sps
        # MFU = samples/s x FLOPs per sample / peak (0.5 TFLOP/s given on the command line).
        assert float(r["mfu"]) == pytest.approx(sps * gflops * 1e9 / 0.5e12, rel=0.01, abs=1e-4)
        assert float(r["gflops_per_sample"]) == pytest.approx(gflops, rel=1e-3)
        # ... and from the row's own columns (peak_tflops was rounded to 0 decimals: "0" for this 0.5)
        assert float(r["peak_tflops"]) == 0.5
        assert float(r["mfu"]) == pytest.approx(sps * float(r["gflops_per_sample"]) * 1e9 / 0.5e12, rel=2e-3,
                                                abs=1e-4)  # mfu has 4 decimals
        assert float(r["step_ms"]) == pytest.approx(float(r["data_wait_ms"]) + float(r["compute_ms"]), abs=0.02)
        assert float(r["step_ms"]) == pytest.approx(8 * 1000 / sps, rel=0.01)
        assert 0 <= float(r["data_wait_frac"]) <= 1
        assert float(r["peak_mem_MB"]) > 0 and r["mem_kind"] == "process_peak_rss"
        assert math.isfinite(float(r["final_loss"]))
        assert r["torch"] == torch.__version__ and r["commit"]
    assert {rows[0]["data"], rows[1]["data"]} == {"synthetic", "per-clip npy"}
    # The peer runs the authors' written-out attention (timm 0.4.12), ours SDPA; both the same residual stream.
    assert [(r["attn_impl"], r["stream_dtype"]) for r in rows] == [("sdpa", "fp32"), ("math", "fp32")]
    assert [r["peer"] for r in rows] == ["", _peer.PEER_VERSION]  # which peer measured the reference-design row
    assert [r["inductor"] for r in rows] == ["", ""]  # --inductor given, but neither mode compiles anything
    md = (out / "R.md").read_text()
    assert "| mode | batch/dev |" in md and "| eager | 8 | 1 | synthetic |" in md and "| reference-design | 8 |" in md
    assert not list(out.glob("matpac-npy-*")), "the temporary .npy folder must be removed"


def test_two_processes_report_aggregate_and_scaling(tmp_path):
    """torchrun, 2 CPU processes (gloo): per-device and aggregate samples/s, efficiency against a given baseline."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "benchmarks" / "train_throughput.py"), "--preset", "tiny", "--device", "cpu",
           "--batch-sizes", "4", "--steps", "2", "--warmup", "1", "--modes", "eager,reference-design",
           "--precision", "no", "--single-process-sps", "5", "--csv", str(tmp_path / "mp.csv"),
           "--tmp-dir", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(line.startswith("RESULT train") for line in proc.stdout.splitlines()) == 1  # rank 0 only
    with open(tmp_path / "mp.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["mode"] for r in rows] == ["eager", "reference-design"]
    for r in rows:
        agg, per = float(r["samples_per_s"]), float(r["samples_per_s_per_device"])
        assert r["world"] == "2" and agg > 0
        assert per == pytest.approx(agg / 2, abs=0.051)
        assert float(r["scaling_eff"]) == pytest.approx(agg / (2 * 5), rel=0.01)
    assert not list(tmp_path.glob("matpac-npy-*"))


# ------------------------------------------------------------------------------------------------ reference design
@pytest.mark.parametrize("mode", ["prob", "logit"])
def test_authors_xent_matches_reference(mode):
    """Their loss arithmetic (softmax, centring, log_softmax in the inputs' dtype) is our loss: to float32 rounding in
    float32, to bf16 rounding in bf16; the gradient too."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(37, 50, generator=g) * 3
    teacher = torch.randn(37, 50, generator=g) * 3
    center = torch.randn(50, generator=g) * 0.1
    a_in, b_in = student.clone().requires_grad_(True), student.clone().requires_grad_(True)
    loss, center_sum, _, _ = centered_softmax_xent_reference(a_in, teacher, center, 0.1, 0.04, mode)
    theirs, p, their_center, temp_student = _peer.authors_xent(b_in, teacher, center, 0.1, 0.04, mode)
    assert theirs.dtype == torch.float32
    torch.testing.assert_close(theirs, loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(their_center, center_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(p, torch.softmax((teacher - center) / 0.04, -1))
    torch.testing.assert_close(temp_student, b_in.detach() / 0.1)
    w = torch.randn(37, generator=g)
    (loss * w).sum().backward()
    (theirs * w).sum().backward()
    torch.testing.assert_close(b_in.grad, a_in.grad, rtol=1e-5, atol=1e-5)
    # bf16 in, bf16 out (no float32 copy), equal to the float32 reference of the same inputs to bf16 rounding
    # (logits of a weight-normed head on normalised features are O(1); x10 after the temperatures' division)
    s16, t16 = (student * 0.1).bfloat16(), (teacher * 0.1).bfloat16()
    theirs16, p16, _, _ = _peer.authors_xent(s16, t16, center.bfloat16(), 0.1, 0.04, mode)
    assert theirs16.dtype == p16.dtype == torch.bfloat16
    ref16 = centered_softmax_xent_reference(s16, t16, center.bfloat16(), 0.1, 0.04, mode)[0]
    torch.testing.assert_close(theirs16.float(), ref16, rtol=3e-2, atol=1e-2)
    # a (B, N, K) batch gives the same loss as its flattened (B·N, K) rows, the centre summed over batch and tokens
    loss3, _, center3, _ = _peer.authors_xent(student.view(1, 37, 50), teacher.view(1, 37, 50), center, 0.1, 0.04,
                                              mode)
    torch.testing.assert_close(loss3, loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(center3, center_sum, rtol=1e-5, atol=1e-5)


def test_fairseq_ema_step_hand_case_and_restore_copy():
    """EMAModule._step_internal on fp32 shadows (t <- d·t + (1 - d)·s), then restore(): the shadows copied into the
    teacher in its own dtype."""
    student = torch.nn.Linear(2, 1)
    teacher = torch.nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[3.0, 5.0]]))
        student.bias.fill_(10.0)
        teacher.weight.copy_(torch.tensor([[1.0, 2.0]]))
        teacher.bias.fill_(0.0)
    shadow = {k: v.detach().float().clone() for k, v in teacher.state_dict().items()}
    teacher = teacher.to(torch.bfloat16)
    _peer.fairseq_ema_step(teacher, shadow, student, 0.9)
    torch.testing.assert_close(shadow["weight"], torch.tensor([[1.2, 2.3]]))
    torch.testing.assert_close(shadow["bias"], torch.tensor([1.0]))
    for k, v in teacher.state_dict().items():
        assert v.dtype == torch.bfloat16 and torch.equal(v, shadow[k].to(torch.bfloat16))
    g = torch.Generator().manual_seed(1)
    a = {k: torch.randn(v.shape, generator=g) for k, v in shadow.items()}
    before = {k: v.clone() for k, v in a.items()}
    _peer.fairseq_ema_step(teacher, a, student, 0.99)
    for k, p in student.named_parameters():
        torch.testing.assert_close(a[k], 0.99 * before[k] + 0.01 * p.detach())


def test_peer_attention_is_timms_written_out_form():
    """timm 0.4.12: attn = (q @ kᵀ) * scale, softmax, @ v, in the model's dtype (ours scales q first)."""
    cfg = get_model_config("tiny", attn_impl="math")
    model = _peer.ReferenceDesignMATPAC(cfg).to(torch.bfloat16)
    attn = model.student_encoder.blocks[0].attn
    assert type(attn) is _peer.TimmAttention and type(model.predictor.decoder_blocks[0].attn) is _peer.TimmAttention
    x = torch.randn(2, 7, cfg.dim, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.no_grad():
        q, k, v = attn.qkv(x).reshape(2, 7, 3, cfg.heads, cfg.dim // cfg.heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (cfg.dim // cfg.heads) ** -0.5).softmax(dim=-1)
        expected = attn.proj((a @ v).transpose(1, 2).reshape(2, 7, cfg.dim))
        out = attn(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
        attn32 = attn.float()
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q, k, v = attn32.qkv(x.float()).reshape(2, 7, 3, cfg.heads, -1).permute(2, 0, 3, 1, 4)
        ours = attn32.proj(sdpa(q, k, v).transpose(1, 2).reshape(2, 7, cfg.dim))
        torch.testing.assert_close(attn32(x.float()), ours, rtol=1e-5, atol=1e-5)
        attn32.impl = "sdpa"  # --reference-attn sdpa: our call
        torch.testing.assert_close(attn32(x.float()), ours, rtol=0, atol=0)


def _peer_trainer(tmp_path, precision, batch=4, **model):
    """The peer on the tiny preset, CPU, no lr warm-up (the first update moves the weights), decays as given."""
    from matpac_fast.train_config import DataConfig, OptimConfig, RunConfig, ScheduleConfig, TrainConfig

    folder = tmp_path / "npy"
    if not folder.exists():
        tt.write_npy_clips(folder, 3 * batch, frames=650, progress=False)
    cfg = TrainConfig(
        run=RunConfig(out=str(tmp_path / "out"), preset="tiny", precision=precision, cpu=True, progress=False,
                      log_every=10**9, ckpt_every=0, seed=0),
        data=DataConfig(shards="synthetic:1", batch_size=batch, workers=0),  # the peer reads the .npy folder
        model={"attn_impl": "math", **model},
        optim=OptimConfig(warmup_epochs=0.0),
        schedule=ScheduleConfig(epochs=1.0, tau_t_warmup_epochs=0.1, ema_reference_batch=0),
    )
    trainer = _peer.ReferenceDesignTrainer(cfg, folder, 0)
    return trainer, [b["lms"] for b in trainer.data.epoch(0)]


@pytest.mark.parametrize("precision, dtype", [("no", torch.float32), ("bf16", torch.bfloat16)])
def test_peer_step_runs_with_low_precision_weights(tmp_path, fresh_accelerate, precision, dtype):
    """fairseq model.half(): every weight, buffer and activation in the run's dtype, no autocast; an fp32 flat master
    copy that the update writes back into the weights."""
    tr, batches = _peer_trainer(tmp_path, precision)
    m = tr.raw_model
    assert {p.dtype for p in m.parameters()} == {dtype} and {b.dtype for b in m.buffers()} == {dtype}
    assert {v.dtype for d in m.ema_fp32.values() for v in d.values()} == {torch.float32}
    master = tr.fp16_optimizer.fp32_params
    assert master.dtype == torch.float32 and master.numel() == sum(p.numel() for p in m.student_parameters())
    seen = []
    hook = m.student_encoder.blocks[0].attn.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    before = [p.detach().clone() for p in m.student_parameters()]
    loss, logged = tr.micro_step(batches[0])
    hook.remove()
    assert seen == [dtype] and not torch.is_autocast_enabled("cpu")
    assert math.isfinite(float(loss)) and tr.step == 1 and tr.overflow_steps == 0
    assert {"correct", "count", "n_diff_target", "cls_perplexity", "var_z_m", "var_z_hat_m", "var_p_m",
            "var_p_hat_m", "var_idx_targ", "var_idx_pred", "t_temp", "ema_decay", "loss_loss_cls",
            "loss_loss_pred"} <= set(logged)
    after = list(m.student_parameters())
    assert all(p.dtype == dtype for p in after) and any(not torch.equal(a, b) for a, b in zip(before, after))
    offset = 0
    for p in after:  # the copy back: each weight is its slice of the fp32 master, rounded to the weights' dtype
        assert torch.equal(p.detach().reshape(-1), master.detach()[offset:offset + p.numel()].to(dtype))
        offset += p.numel()
    assert math.isfinite(float(tr.micro_step(batches[1])[0])) and tr.step == 2


def test_peer_step_is_fairseqs_fp16_optimizer_update(tmp_path, fresh_accelerate):
    """float32: same batch, masks and lr as our model's own forward/backward; the update is fairseq's (flat fp32
    grad, clip to 3, decoupled weight decay on every weight, Adam with eps added before the bias correction), and
    the peer's losses are ours."""
    from matpac_fast.model import MATPAC, StepState

    tr, batches = _peer_trainer(tmp_path, "no")
    ref = MATPAC(tr.model_cfg)
    ref.load_state_dict(tr.raw_model.state_dict())
    vis, mask = tr._masks(4, 0)
    st = tr.peer_step_state()
    loss, stats = ref({"lms": batches[0], "vis_idx": vis, "mask_idx": mask},
                      StepState(tau_t=st.tau_t, mcl_temperature=st.mcl_temperature))
    loss.backward()
    params = ref.student_parameters()
    g = torch.cat([p.grad.reshape(-1) for p in params])
    w = torch.cat([p.detach().reshape(-1) for p in params])
    o, lr = tr.cfg.optim, tr.sched["lr"][0]
    assert lr == o.lr > 0
    clipped = g * min(1.0, o.clip_grad / float(g.norm()))
    m, v = (1 - o.beta1) * clipped, (1 - o.beta2) * clipped**2
    step = lr * math.sqrt(1 - o.beta2) / (1 - o.beta1)
    expected = w - lr * o.weight_decay * w - step * m / (v.sqrt() + o.eps)

    peer_loss, logged = tr.micro_step(batches[0])
    n = tr.model_cfg.n_masked * 4
    assert logged["sample_size"] == n
    torch.testing.assert_close(peer_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["loss_loss_cls"] / n, 0.5 * float(stats["loss_cls"]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logged["loss_loss_pred"] / n, 0.5 * float(stats["loss_pred"]), rtol=1e-5, atol=1e-6)
    # the flat fp32 grad after the step: unscaled (loss scale 128, 1 / sample_size) and clipped
    torch.testing.assert_close(tr.fp16_optimizer.fp32_params.grad, clipped, rtol=1e-4, atol=1e-8)
    got = torch.cat([p.detach().reshape(-1) for p in tr.raw_model.student_parameters()])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # torch's AdamW puts eps after the bias correction: not the authors' update, and told apart here
    adamw = w * (1 - lr * o.weight_decay) - lr / (1 - o.beta1) * m / (v.sqrt() / math.sqrt(1 - o.beta2) + o.eps)
    assert (adamw - expected).abs().max() > 1e-5


def test_peer_unscale_reads_no_tensor_factor_on_the_host(monkeypatch):
    """fairseq's `_unscale_grads` tests `torch.is_tensor(factor) or factor != 1.0`, so a factor made a tensor by
    clipping is never read on the host; the peer compared it with 1.0 (a device-to-host copy the authors avoid),
    which made the peer slower than their code."""
    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))]
    opt = _peer.FP16Optimizer(params, (0.9, 0.98), 1e-6, 0.0)
    opt.fp32_params.grad.fill_(2.0)
    opt._multiply_factor = torch.tensor(0.25)
    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or real_bool(t))
    opt._unscale_grads()
    assert reads == [] and opt._multiply_factor == 1.0
    assert torch.equal(opt.fp32_params.grad, torch.full((5,), 0.5))


def test_peer_ema_runs_in_forward_before_the_update(tmp_path, fresh_accelerate):
    """Update 0 leaves the teachers alone; update 1's forward moves them towards the student of after update 0 with
    the decay scheduled for update 1 (their do_ema_step), in fp32 shadows copied into the teacher."""
    tr, batches = _peer_trainer(tmp_path, "no", ema_start=0.5, ema_end=0.5, head_ema_start=0.7, head_ema_end=0.7)
    m = tr.raw_model
    pairs = [(m.teacher_encoder, m.student_encoder, "teacher_encoder", tr.sched["ema"][1]),
             (m.teacher_head, m.student_head, "teacher_head", tr.sched["head_ema"][1])]
    teachers0 = [{k: p.detach().clone() for k, p in t.named_parameters()} for t, *_ in pairs]
    tr.micro_step(batches[0])
    for (t, *_), t0 in zip(pairs, teachers0):
        assert all(torch.equal(p, t0[k]) for k, p in t.named_parameters())
    shadows = [{k: v.clone() for k, v in m.ema_fp32[name].items()} for _, _, name, _ in pairs]
    students = [{k: p.detach().clone() for k, p in s.named_parameters()} for _, s, *_ in pairs]
    tr.micro_step(batches[1])
    for (t, s, name, d), shadow, student in zip(pairs, shadows, students):
        assert d in (0.5, 0.7)
        for k, p in t.named_parameters():
            want = d * shadow[k] + (1 - d) * student[k]
            torch.testing.assert_close(m.ema_fp32[name][k], want, rtol=1e-6, atol=1e-7)
            assert torch.equal(p, m.ema_fp32[name][k])
        # after update 1 the student moved on; the teacher holds the mix with the student of before that update
        assert any(not torch.equal(student[k], q) for k, q in s.named_parameters())


def test_peer_step_order_and_host_reads_are_the_authors(tmp_path, fresh_accelerate, monkeypatch):
    """forward -> metrics (with .item()) -> EMA (head, encoder) -> criterion reads -> backward -> clip -> Adam ->
    centre."""
    tr, batches = _peer_trainer(tmp_path, "no", ema_start=0.5, ema_end=0.5)
    tr.micro_step(batches[0])  # update 0 runs no EMA
    events = []

    def record(obj, name, label):
        real = getattr(obj, name)

        def wrapped(*a, **k):
            events.append(label)
            return real(*a, **k)

        monkeypatch.setattr(obj, name, wrapped)

    record(_peer, "compute_acc", "metrics")
    record(_peer, "fairseq_ema_step", "ema")
    record(_peer, "criterion_logging", "criterion")
    record(tr.fp16_optimizer, "backward", "backward")
    record(tr.fp16_optimizer, "clip_grad_norm", "clip")
    record(tr.fp16_optimizer.fp32_optimizer, "step", "adam")
    record(tr.raw_model, "apply_center_update", "centre")
    record(torch.Tensor, "item", "item")
    record(torch.Tensor, "__float__", "float")
    record(torch.Tensor, "__bool__", "bool")
    tr.micro_step(batches[1])
    main = [e for e in events if e not in ("item", "float", "bool")]
    assert main == ["metrics", "ema", "ema", "criterion", "backward", "clip", "adam", "centre"], events
    i = events.index
    assert "item" in events[i("metrics"):i("ema")]  # compute_acc's `.item()` comes before the EMA loop
    reads = events[i("criterion"):i("backward")]
    assert reads.count("float") == 7 and reads.count("item") == 2  # 6 compute_var + perplexity; 2 losses
    assert events[i("clip"):i("adam")].count("bool") >= 3  # clip check, overflow check, isfinite


def test_npy_train_data_yields_float32_crops(tmp_path):
    folder = tt.write_npy_clips(tmp_path / "npy", 7, frames=650, progress=False)
    data = _peer.NpyTrainData(folder, batch_size=3, rank=0, world=1, workers=0, pin=False, seed=0)
    assert data.batches_per_epoch == 2
    batches = list(data.epoch(0))
    assert len(batches) == 2
    assert batches[0]["lms"].shape == (3, 1, 80, 608) and batches[0]["lms"].dtype == torch.float32
    clip = np.load(folder / "clip0000000.npy", allow_pickle=False)
    assert clip.dtype == np.float32 and clip.shape == (80, 650)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _peer.NpyTrainData(folder, batch_size=4, rank=0, world=2, workers=0, pin=False, seed=0)


# ------------------------------------------------------------------------------------------------ RESULT arithmetic
def _row(mode, batch, sps, mfu=None):
    return {"mode": mode, "batch": batch, "samples_per_s": sps, "mfu": mfu}


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA L40", 181.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA GeForce RTX 4090", 165.0),
    ("Tesla V100-SXM2-16GB", 125.0), ("NVIDIA A10", None), ("NVIDIA RTX A6000", None),
])
def test_peak_table_matches_whole_names(name, peak):
    """"NVIDIA L40" had no entry and matched "L4" as a substring: its MFU came out against 121 TFLOP/s instead of
    181. Names now match whole words (so "GH200" is not "H200", whatever the table's order)."""
    from matpac_fast.metrics import peak_for_name

    assert peak_for_name(name) == peak


def test_result_line_picks_fastest_mode_and_same_batch_reference():
    rows = [_row("eager", 64, 100.0, 0.1), _row("reference-design", 64, 40.0, 0.04),
            _row("compiled", 256, 300.0, 0.3), _row("reference-design", 256, 60.0, 0.06)]
    line = tt.result_line(rows, "NVIDIA H100 80GB HBM3")
    assert line == ("RESULT train samples_per_s=300.0 mfu=0.3 speedup_vs_reference_design=5.00 "
                    "device=NVIDIA_H100_80GB_HBM3")
    assert tt.result_line([_row("eager", 8, 12.5)], "cpu").endswith("mfu=n/a speedup_vs_reference_design=n/a "
                                                                      "device=cpu")
    # reference-design is the peer, never the winner: without another row every figure is n/a
    only_ref = tt.result_line([_row("reference-design", 8, 10.0)], "x")
    assert only_ref == "RESULT train samples_per_s=n/a mfu=n/a speedup_vs_reference_design=n/a device=x"
    assert RESULT_RE.match(only_ref)


def test_scaling_baseline_lookup(tmp_path):
    env = {"device": "GPU X"}
    row = {"preset": "matpac", "mode": "compiled", "batch": 64, "precision": "bf16", "data": "synthetic",
           "compile_mode": "default", "attn_impl": "sdpa", "stream_dtype": "fp32"}
    path = tmp_path / "base.csv"
    for r in ({"world": 1, "samples_per_s": 1000.0}, {"world": 2, "samples_per_s": 1900.0}):
        tt.append_csv(path, tt.csv_row({**row, **r, "samples_per_s_per_device": 1.0, "step_ms": 1.0,
                                        "data_wait_ms": 0.0, "compute_ms": 1.0, "data_wait_frac": 0.0,
                                        "mfu": None, "peak_mem_MB": 1.0, "gflops_per_sample": 1.0,
                                        "peak_tflops": None, "final_loss": 1.0}, env))
    args = tt.parse_args(["--baseline-csv", str(path), "--device", "cpu"])
    assert tt.baseline_sps(args, env, row) == 1000.0
    assert tt.baseline_sps(args, env, {**row, "batch": 256}) is None
    # a later one-process row with another setting is not this row's baseline (it was taken: the last match won)
    tt.append_csv(path, tt.csv_row({**row, "world": 1, "samples_per_s": 500.0, "data": "shards",
                                    "samples_per_s_per_device": 1.0, "step_ms": 1.0, "data_wait_ms": 0.0,
                                    "compute_ms": 1.0, "data_wait_frac": 0.0, "mfu": None, "peak_mem_MB": 1.0,
                                    "gflops_per_sample": 1.0, "peak_tflops": None, "final_loss": 1.0}, env))
    assert tt.baseline_sps(args, env, {**row, "data": "shards"}) == 500.0
    assert tt.baseline_sps(args, env, row) == 1000.0
    for other in ({"compile_mode": "gemm-autotune"}, {"attn_impl": "triton"}, {"stream_dtype": "amp"}):
        assert tt.baseline_sps(args, env, {**row, **other}) is None
    # an older CSV's empty cell (a column it did not have) does not exclude its row: the committed H200 run
    h200 = tt.parse_args(["--baseline-csv", str(ROOT / "benchmarks" / "results" / "nvidia_h200_772ded2.csv"),
                          "--device", "cpu"])
    ours = {"preset": "matpac", "mode": "compiled+kernels", "batch": 256, "precision": "bf16", "data": "shards",
            "compile_mode": "reduce-overhead", "attn_impl": "sdpa", "stream_dtype": "fp32", "peer": ""}
    assert tt.baseline_sps(h200, {"device": "NVIDIA H200"}, ours) == 3540.8  # its stream_dtype cell is empty
    assert tt.baseline_sps(tt.parse_args(["--single-process-sps", "7", "--device", "cpu"]), env, row) == 7.0


# ------------------------------------------------------------------------------------------------ user errors
@pytest.mark.parametrize("argv, message", [
    (["--modes", "eager,fast"], "unknown --modes entries"),
    (["--batch-sizes", "8,x"], "--batch-sizes must be a comma list of integers"),
    (["--preset", "huge"], "unknown --preset"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--data", "/nonexistent/shards"], "no such shard set"),
    (["--data", "synthetic:x"], "give synthetic:N"),
    (["--workers", "-1"], "--workers must be >= 0"),
    (["--peak-tflops", "-1"], "--peak-tflops and --single-process-sps must be >= 0"),
    (["--precision", "fp16"], "--precision fp16 needs a GPU"),
    # each of these ran every (mode, batch) into a traceback
    (["--data", "synthetic:5", "--batch-sizes", "4,8"], "--data synthetic:5 holds 5 clips, fewer than one global "
                                                        "batch (8): raise N or lower --batch-sizes"),
    (["--attn-impl", "cudnn"], "--attn-impl cudnn needs a CUDA GPU"),
    (["--reference-attn", "efficient", "--modes", "eager,reference-design"], "--reference-attn efficient needs a "
                                                                             "CUDA GPU"),
    # each of these was accepted: a traceback per run, a timed compilation (0.6 samples/s for 221), or no scaling
    # efficiency without a word
    (["--preset", "tiny", "--attn-impl", "triton"], "attn_impl='triton' takes heads 16, 32, 64, 128 wide"),
    (["--modes", "eager,compiled", "--warmup", "0"], "--warmup 0 with compiled would time the compilation itself"),
    (["--baseline-csv", "/nonexistent/one.csv"], "--baseline-csv /nonexistent/one.csv: no such file"),
    (["--inductor", "coordinate_descent_tuning"], "--inductor 'coordinate_descent_tuning': expected KEY=VALUE"),
    (["--inductor", "keep_addmm_fused=false"], "--inductor keep_addmm_fused: not an Inductor option of torch"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        tt.parse_args([*argv, "--device", "cpu"])
    assert message in capsys.readouterr().err + str(e.value.code)


def test_data_folder_that_is_not_a_shard_set_is_refused_up_front(tmp_path, capsys):
    """A folder without sizes.json used to pass, then every non-reference run failed with a traceback."""
    (tmp_path / "shards-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit):
        tt.parse_args(["--data", str(tmp_path), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert "not a usable shard set" in err[-1] and "sizes.json" in err[-1]


def test_data_with_fewer_clips_than_a_batch_is_refused(tmp_path, capsys):
    from matpac_fast.data_fixtures import write_shard_set

    arr = np.zeros((80, 700), np.float16)
    write_shard_set(tmp_path, ((f"c{i}", arr, [0]) for i in range(6)), per_shard=4)
    assert tt.parse_args(["--data", str(tmp_path), "--device", "cpu", "--batch-sizes", "4,6"]).data == str(tmp_path)
    with pytest.raises(SystemExit):
        tt.parse_args(["--data", str(tmp_path), "--device", "cpu", "--batch-sizes", "8"])
    assert "holds 6 clips, fewer than one global batch (8)" in capsys.readouterr().err


def test_csv_with_other_columns_is_refused(tmp_path, capsys):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit, match="other columns"):
        tt.append_csv(path, {k: "" for k in tt.CSV_FIELDS})
    # ... before any run starts: parse_args refuses it
    with pytest.raises(SystemExit):
        tt.parse_args(["--csv", str(path), "--device", "cpu"])
    assert "other columns than this script writes" in capsys.readouterr().err
    reordered = tmp_path / "reordered.csv"
    reordered.write_text(",".join(reversed(tt.CSV_FIELDS[:5])) + "\n")
    with pytest.raises(SystemExit, match="other columns"):
        tt.append_csv(reordered, {k: "" for k in tt.CSV_FIELDS})
    assert path.read_text() == "a,b\n1,2\n"


def test_output_paths_are_checked_before_any_run(tmp_path, capsys):
    """A folder or unwritable --results-md / --csv used to fail after every run was measured, losing the RESULT
    line; an older CSV with a damaged row was refused only at the first append, after one measured run."""
    (tmp_path / "file").write_text("x")
    for argv, message in [
        (["--results-md", str(tmp_path)], f"--results-md {tmp_path} is a folder; give a file path"),
        (["--csv", str(tmp_path)], f"--csv {tmp_path} is a folder; give a file path"),
        (["--results-md", str(tmp_path / "file" / "R.md")], f"{tmp_path / 'file'} is a file, not a folder"),
    ]:
        with pytest.raises(SystemExit):
            tt.parse_args([*argv, "--device", "cpu"])
        assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(SystemExit):
        tt.parse_args(["--csv", str(binary), "--device", "cpu"])
    assert f"--csv {binary} cannot be read as a CSV (UnicodeDecodeError)" in capsys.readouterr().err
    old_fields = [f for f in tt.CSV_FIELDS if f != "peer"]
    damaged = tmp_path / "damaged.csv"
    damaged.write_text(",".join(old_fields) + "\n" + ",".join("v" for _ in old_fields) + "\nonly,three,fields\n")
    with pytest.raises(SystemExit):
        tt.parse_args(["--csv", str(damaged), "--device", "cpu"])
    assert "damaged.csv line 3 has a different number of fields" in capsys.readouterr().err
    assert tt.parse_args(["--results-md", str(tmp_path / "new" / "R.md"), "--device", "cpu"])  # created when written


def test_output_path_is_tried_not_only_asked(monkeypatch, capsys):
    """os.access says yes to root almost everywhere: --csv /proc/x.csv passed the check, the run was measured, and
    the append died with a FileNotFoundError traceback, the figures lost. (os.access is made to say yes here, as it
    does for root, so the test means the same for any user.)"""
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    with pytest.raises(SystemExit):
        tt.parse_args(["--csv", "/proc/matpac-test.csv", "--device", "cpu"])
    assert "--csv /proc/matpac-test.csv: cannot write there (" in capsys.readouterr().err


def test_unwritable_output_path_is_refused(tmp_path, monkeypatch):
    """The tests run as root, which os.access never refuses: the check is exercised with os.access answering no."""
    import _common

    (tmp_path / "old.csv").write_text("")
    monkeypatch.setattr(_common.os, "access", lambda path, mode: False)
    assert _common.output_problem(tmp_path / "old.csv", "--csv") == (
        f"--csv {tmp_path / 'old.csv'}: {tmp_path / 'old.csv'} is not writable; give another path")
    assert _common.output_problem(tmp_path / "a" / "new.md", "--results-md") == (
        f"--results-md {tmp_path / 'a' / 'new.md'}: {tmp_path} is not writable; give another path")


def test_npy_dir_is_checked_before_any_run(tmp_path, capsys):
    folder = tt.write_npy_clips(tmp_path / "npy", 3, frames=650, progress=False)
    argv = ["--preset", "tiny", "--device", "cpu", "--modes", "reference-design", "--npy-dir", str(folder)]
    assert tt.parse_args([*argv, "--batch-sizes", "3"]).npy_dir == folder
    with pytest.raises(SystemExit):
        tt.parse_args([*argv, "--batch-sizes", "4"])
    assert "holds 3 clips, fewer than one global batch (4)" in capsys.readouterr().err
    assert tt.parse_args(["--device", "cpu", "--modes", "eager", "--npy-dir", str(folder), "--batch-sizes", "8"])
    short = tt.write_npy_clips(tmp_path / "short", 3, frames=300, progress=False)  # shorter than the 608-frame crop
    with pytest.raises(SystemExit):
        tt.parse_args(["--preset", "tiny", "--device", "cpu", "--modes", "reference-design", "--npy-dir", str(short),
                       "--batch-sizes", "2"])
    assert "clip0000000.npy is (80, 300); preset tiny needs (80, T) log-mel clips with T >= 608 frames" in (
        capsys.readouterr().err)
    empty = tmp_path / "empty"  # a killed writer's 0-byte files: np.load's EOFError was a traceback
    empty.mkdir()
    for i in range(3):
        (empty / f"clip{i:07d}.npy").write_bytes(b"")
    with pytest.raises(SystemExit):
        tt.parse_args(["--preset", "tiny", "--device", "cpu", "--modes", "reference-design", "--npy-dir", str(empty),
                       "--batch-sizes", "2"])
    assert "cannot read clip0000000.npy as a .npy array (EOFError" in capsys.readouterr().err
    # reference-design alone never reads --data: a small synthetic:N is not its problem
    assert tt.parse_args(["--device", "cpu", "--modes", "reference-design", "--data", "synthetic:2",
                          "--batch-sizes", "8"]).data == "synthetic:2"


def test_tmp_dir_under_a_file_is_a_usage_error(tmp_path, capsys):
    """--tmp-dir naming a file (or a path under one) ended in a NotADirectoryError traceback when the .npy folder
    was made; now a one-line error before any work."""
    f = tmp_path / "f"
    f.write_text("x")
    for tmp in (f, f / "sub"):
        with pytest.raises(SystemExit) as e:
            tt.parse_args(["--preset", "tiny", "--device", "cpu", "--modes", "reference-design", "--batch-sizes", "2",
                           "--tmp-dir", str(tmp)])
        assert e.value.code == 2
        assert f"--tmp-dir {tmp}: {f} is a file, not a folder" in capsys.readouterr().err
    assert tt.parse_args(["--preset", "tiny", "--device", "cpu", "--modes", "reference-design", "--batch-sizes", "2",
                          "--tmp-dir", str(tmp_path / "new")]).tmp_dir == tmp_path / "new"


def test_results_md_is_never_a_csv_of_this_script(tmp_path, capsys):
    """--results-md appended its markdown table to whatever it named: the --csv file itself (same path for both) or
    a train CSV given by mistake, whose later rows and chart then read the table's lines."""
    csv_path, md = tmp_path / "t.csv", tmp_path / "R.md"
    base = ["--preset", "tiny", "--device", "cpu", "--modes", "eager", "--batch-sizes", "2"]
    with pytest.raises(SystemExit):
        tt.parse_args(base + ["--csv", str(csv_path), "--results-md", str(csv_path)])
    assert "is the --csv file too" in capsys.readouterr().err
    csv_path.write_text(",".join(tt.CSV_FIELDS) + "\n")
    with pytest.raises(SystemExit):
        tt.parse_args(base + ["--results-md", str(csv_path)])
    assert "is a CSV of this script" in capsys.readouterr().err
    md.write_text("# Results\n")  # a markdown file is appended to, as before
    assert tt.parse_args(base + ["--csv", str(csv_path), "--results-md", str(md)]).results_md == md


def test_ctrl_c_keeps_finished_rows_and_removes_the_npy_folder(tmp_path, monkeypatch, capsys):
    """Ctrl-C: the finished runs' rows stay in --csv, the user is told what was and was not written, exit 130,
    and the temporary .npy folder is removed, also when the interrupt comes while it is being written."""
    def run_one(args, name, batch, npy_dir, workers):
        if name == "reference-design":
            raise KeyboardInterrupt
        return {**dict.fromkeys(tt.CSV_FIELDS, 1.0), "mode": name, "batch": batch, "world": 1, "mfu": None,
                "peak_tflops": 989.0, "gflops_per_sample": 91.84}

    monkeypatch.setattr(tt, "run_one", run_one)
    csv_path, md = tmp_path / "t.csv", tmp_path / "R.md"
    argv = ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "4", "--modes", "eager,reference-design",
            "--csv", str(csv_path), "--results-md", str(md), "--tmp-dir", str(tmp_path)]
    assert tt.main(argv) == 130
    err = capsys.readouterr().err
    assert f"interrupted: 1 of 2 runs finished; their rows are in {csv_path}; {md} was not written" in err
    with open(csv_path, newline="") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["eager"]
    assert not md.exists() and not list(tmp_path.glob("matpac-npy-*"))

    def write_then_interrupt(folder, n, **_):
        folder.mkdir(parents=True)
        (folder / "clip0000000.npy").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(tt, "write_npy_clips", write_then_interrupt)
    assert tt.main(["--preset", "tiny", "--device", "cpu", "--batch-sizes", "4", "--modes", "reference-design",
                    "--tmp-dir", str(tmp_path)]) == 130
    assert "interrupted: 0 of 1 runs finished; no RESULT line" in capsys.readouterr().err
    assert not list(tmp_path.glob("matpac-npy-*")), "the half-written .npy folder must be removed"


def test_csv_figures_keep_four_significant_digits():
    assert [tt._sig(v) for v in (989.0, 1979.0, 91.8449, 0.146251, 0.1, 0.0, None)] == [
        "989", "1979", "91.84", "0.1463", "0.1", "0", "n/a"]


def test_older_csv_is_upgraded_keeping_its_rows(tmp_path):
    """A CSV from before the newest columns (the committed ones lacked stream_dtype, cpu_tiny also compile_mode and
    attn_impl) gets the current header; old rows keep every value, the new columns are empty."""
    old_fields = [f for f in tt.CSV_FIELDS if f not in ("compile_mode", "attn_impl", "stream_dtype", "peer")]
    path = tmp_path / "old.csv"
    old_row = {f: f"v-{f}" for f in old_fields}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow(old_row)
    assert tt.parse_args(["--csv", str(path), "--device", "cpu"]).csv == path  # accepted up front
    new_row = {k: f"n-{k}" for k in tt.CSV_FIELDS}
    tt.append_csv(path, new_row)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == tt.CSV_FIELDS
    assert rows == [{**{k: "" for k in tt.CSV_FIELDS}, **old_row}, new_row]
    assert not list(tmp_path.glob("*.tmp"))


def test_csv_with_a_few_of_its_columns_is_refused_not_upgraded(tmp_path, capsys):
    """Only a CSV this script wrote is upgraded: every version's header starts with the first version's 27 columns.
    Someone's own summary with a few of the same column names was rewritten in place with the 32-column header."""
    path = tmp_path / "mine.csv"
    text = "mode,batch,samples_per_s\nmine,1,2\n"
    path.write_text(text)
    with pytest.raises(SystemExit):
        tt.parse_args(["--csv", str(path), "--device", "cpu"])
    assert "has other columns than this script writes" in capsys.readouterr().err
    assert path.read_text() == text
    first = tmp_path / "first.csv"  # the first version's header is still an older CSV of this script
    first.write_text(",".join(tt.FIRST_CSV_FIELDS) + "\n")
    assert tt.csv_header_status(first) == "upgrade"


def test_committed_result_csvs_have_the_current_header():
    for path in sorted((ROOT / "benchmarks" / "results").glob("*.csv")):
        if path.name.startswith("kernels_"):
            continue
        assert tt.csv_header_status(path) == "same", path
        assert len(plot_results.read_rows([path])) > 0
        # every committed reference-design row names its peer: the earlier one (every CSV before 9512281's H200
        # run, as benchmarks/RESULTS.md says) or the authors' fairseq step (that run on); the H200 rows of a27f55a
        # (attention kernels) and cb5dc27 (Inductor settings) have no peer row
        with open(path, newline="") as f:
            peers = {r["peer"] for r in csv.DictReader(f) if r["mode"] == "reference-design"}
        earlier = {"cpu_tiny.csv", "nvidia_h200_772ded2.csv", "nvidia_h200_982ac11.csv"}
        no_peer = {"nvidia_h200_a27f55a.csv", "nvidia_h200_cb5dc27.csv"}
        expected = {"earlier"} if path.name in earlier else set() if path.name in no_peer else {_peer.PEER_VERSION}
        assert peers == expected, (path, peers)


# ------------------------------------------------------------------------------------------------ chart
def test_plot_writes_a_png_per_device(tmp_path):
    path = tmp_path / "t.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
        w.writeheader()
        for device in ("GPU A", "GPU B"):
            for mode, sps in (("eager", "100.0"), ("compiled+kernels", "250.5"), ("reference-design", "40.0")):
                for batch in (64, 256):
                    w.writerow({k: "" for k in tt.CSV_FIELDS} | {"device": device, "preset": "matpac", "world": 1,
                                                                 "mode": mode, "batch": batch, "samples_per_s": sps,
                                                                 "mfu": "0.25" if mode == "eager" else "n/a"})
        # the same mode with the bf16 residual stream is its own bar, not a replacement of the default one
        w.writerow({k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": 1, "batch": 256,
                                                     "mode": "compiled+kernels", "samples_per_s": "300.0",
                                                     "mfu": "0.3", "stream_dtype": "amp", "precision": "bf16"})
        # so is a side-by-side run with another attention kernel (it used to replace the default run's bar)
        w.writerow({k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": 1, "batch": 256,
                                                     "mode": "compiled+kernels", "samples_per_s": "240.0",
                                                     "mfu": "0.2", "attn_impl": "cudnn"})
    rows = plot_results.read_rows([path])
    assert len(rows) == 14 and len(plot_results.panels(rows)) == 2
    bars = {(r["device"], r["bar"], r["batch"]): r["samples_per_s"] for r in rows}
    assert bars[("GPU A", "compiled+kernels", 256)] == 250.5
    assert bars[("GPU A", "compiled+kernels · bf16 stream", 256)] == 300.0
    assert bars[("GPU A", "compiled+kernels · cudnn attention", 256)] == 240.0
    # each mode's own default attention adds nothing: sdpa for ours, the written-out math for the faithful peer
    assert plot_results.bar_label({"mode": "eager", "attn_impl": "sdpa"}) == "eager"
    assert plot_results.bar_label({"mode": "reference-design", "attn_impl": "math"}) == "reference-design"
    peer_sdpa = {"mode": "reference-design", "attn_impl": "sdpa"}
    assert plot_results.bar_label(peer_sdpa) == "reference-design · sdpa attention"
    # without autocast the stream setting is a no-op: such a row is the plain mode's
    assert plot_results.bar_label({"mode": "eager", "stream_dtype": "amp", "precision": "no"}) == "eager"
    # an earlier peer's row is never drawn as the current peer's bar
    earlier = {"mode": "reference-design", "peer": "earlier", "precision": "bf16", "stream_dtype": "bf16"}
    assert plot_results.bar_label(earlier) == "reference-design · earlier peer"
    assert plot_results.bar_label({**earlier, "peer": _peer.PEER_VERSION}) == "reference-design"
    out = plot_results.plot(rows, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    bad = tmp_path / "bad.csv"
    bad.write_text("device,mode\nx,y\n")
    with pytest.raises(SystemExit, match="lacks columns"):
        plot_results.read_rows([bad])


def test_plot_cut_short_keeps_the_chart_that_was_there(tmp_path, monkeypatch):
    """The PNG goes to a temporary file renamed over the old one: a save cut short (Ctrl-C, the suite's 20 s cap)
    wrote a truncated PNG over the previous chart."""
    rows = [{"device": "GPU A", "preset": "matpac", "world": "1", "mode": "eager", "batch": 64, "samples_per_s": 10.0,
             "mfu": None, "bar": "eager"}]
    out = plot_results.plot(rows, tmp_path / "c.png")
    before = out.read_bytes()
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # as a plain open() would have made it

    def cut_short(self, fname, **kwargs):
        (open(fname, "wb") if isinstance(fname, str | Path) else fname).write(b"\x89PNG partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(plot_results.plt.Figure, "savefig", cut_short)
    with pytest.raises(KeyboardInterrupt):
        plot_results.plot(rows, out)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png"]  # no temporary file left


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_plot_draws_the_most_recent_row_whatever_the_file_order(tmp_path):
    # A shell glob sorts files by name: the later file on the command line used to win even when it was older.
    paths = {}
    for name, when, sps in (("run_new", "2026-11-26T10:00:00Z", "999.0"), ("run_old", "2020-01-01T00:00:00Z", "111.0")):
        paths[name] = tmp_path / f"{name}.csv"
        with open(paths[name], "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
            w.writeheader()
            w.writerow({**{k: "" for k in tt.CSV_FIELDS}, "time_utc": when, "device": "GPU A", "world": "1",
                        "preset": "matpac", "mode": "eager", "batch": "64", "samples_per_s": sps, "mfu": "n/a"})
    for order in (["run_new", "run_old"], ["run_old", "run_new"]):
        rows = plot_results.read_rows([paths[n] for n in order])
        assert [r["samples_per_s"] for r in rows] == [999.0], order


def test_plot_keeps_synthetic_and_shard_rows_apart(tmp_path):
    """The same mode and batch from shards and from synthetic data are two bars: the later row used to replace the
    other, so the H100 chart lost its best figure (3,551 samples/s, synthetic) to the suite's 3,200 from shards."""
    path = tmp_path / "t.csv"
    base = {k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": "1", "batch": "256",
                                            "mode": "compiled+kernels", "precision": "bf16", "stream_dtype": "amp",
                                            "mfu": "0.3"}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
        w.writeheader()
        w.writerow(base | {"time_utc": "2026-01-01T00:00:00Z", "data": "synthetic", "samples_per_s": "3550.0"})
        w.writerow(base | {"time_utc": "2026-01-01T00:05:00Z", "data": "shards", "samples_per_s": "3200.0"})
        w.writerow(base | {"time_utc": "2026-01-01T00:06:00Z", "data": "per-clip npy", "samples_per_s": "1500.0",
                           "mode": "reference-design", "stream_dtype": "bf16", "peer": _peer.PEER_VERSION})
        # a panel of synthetic rows only keeps its plain labels
        w.writerow(base | {"time_utc": "2026-01-01T00:07:00Z", "data": "synthetic", "samples_per_s": "10.0",
                           "device": "CPU", "mode": "eager", "precision": "no", "stream_dtype": "fp32"})
    bars = {(r["device"], r["bar"]): r["samples_per_s"] for r in plot_results.read_rows([path])}
    assert bars == {("GPU A", "compiled+kernels · bf16 stream"): 3200.0,
                    ("GPU A", "compiled+kernels · bf16 stream · synthetic"): 3550.0,
                    ("GPU A", "reference-design"): 1500.0, ("CPU", "eager"): 10.0}
    out = plot_results.plot(plot_results.read_rows([path]), tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the committed H100 run: its synthetic bf16-stream figure at batch 256 is drawn next to the suite's
    rows = plot_results.read_rows([ROOT / "benchmarks" / "results" / "nvidia_h100_455c577.csv"])
    b256 = {r["bar"]: r["samples_per_s"] for r in rows if r["batch"] == 256}
    assert b256["compiled+kernels · bf16 stream"] == 3199.6
    assert b256["compiled+kernels · bf16 stream · synthetic"] == 3550.6


def test_plot_mfu_cells_that_are_not_numbers_are_left_unlabelled(tmp_path):
    """An MFU cell that is not a finite number (hand-edited, `nan`, text) gives a bar without an MFU line; such a
    cell used to end the chart in a ValueError traceback."""
    path = tmp_path / "t.csv"
    base = {k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": "1", "mode": "eager",
                                            "precision": "bf16", "samples_per_s": "100.0"}
    cells = {"64": "0.3", "128": "n/a", "256": "nan", "512": "about a third", "1024": ""}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
        w.writeheader()
        for batch, mfu in cells.items():
            w.writerow(base | {"batch": batch, "mfu": mfu})
    rows = plot_results.read_rows([path])
    assert {r["batch"]: r["mfu"] for r in rows} == {64: 0.3, 128: None, 256: None, 512: None, 1024: None}
    out = plot_results.plot(rows, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_gives_an_autotuning_compile_mode_its_own_bar(tmp_path):
    """The suite's gemm_autotune row (same mode, batch, data, attention and stream as the baseline beside it) used
    to replace that row's bar, drawn as plain compiled+kernels; default and reduce-overhead still share one bar."""
    path = tmp_path / "t.csv"
    base = {k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": "1", "batch": "256",
                                            "mode": "compiled+kernels", "precision": "bf16", "stream_dtype": "amp",
                                            "data": "synthetic", "attn_impl": "sdpa", "mfu": "0.3"}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
        w.writeheader()
        w.writerow(base | {"time_utc": "2026-01-01T00:00:00Z", "compile_mode": "reduce-overhead",
                           "samples_per_s": "3583.3"})
        w.writerow(base | {"time_utc": "2026-01-01T00:05:00Z", "compile_mode": "gemm-autotune",
                           "samples_per_s": "2800.0"})
        w.writerow(base | {"time_utc": "2026-01-01T00:06:00Z", "compile_mode": "gemm-autotune",
                           "samples_per_s": "2900.0", "attn_impl": "triton"})
    bars = {r["bar"]: r["samples_per_s"] for r in plot_results.read_rows([path])}
    assert bars == {"compiled+kernels · bf16 stream": 3583.3,
                    "compiled+kernels · bf16 stream · gemm-autotune": 2800.0,
                    "compiled+kernels · bf16 stream · triton attention · gemm-autotune": 2900.0}
    assert plot_results.bar_label({"mode": "compiled", "compile_mode": "default"}) == "compiled"
    assert plot_results.bar_label({"mode": "eager", "compile_mode": "gemm-autotune"}) == "eager"  # no compile
    out = plot_results.plot(plot_results.read_rows([path]), tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inductor_options_reach_the_compiled_runs_csv_and_table_only(tmp_path):
    """--inductor: the compiled modes' TrainConfig carries the options (eager and reference-design compile nothing:
    theirs is empty), and so do their CSV cells, the table's heading, the baseline lookup and the chart's bar."""
    args = tt.parse_args(["--device", "cpu", "--preset", "tiny", "--modes", "eager,compiled+kernels",
                          "--inductor", "keep_addmm_fused_for_half_dtypes=false", "--inductor",
                          "coordinate_descent_tuning=true"])
    opts = {"keep_addmm_fused_for_half_dtypes": False, "coordinate_descent_tuning": True}
    assert args.inductor == opts
    assert tt.train_config(args, tt.MODES["compiled+kernels"], 8, "synthetic:64", 0).inductor == opts
    for mode in ("eager", "reference-design"):
        assert tt.train_config(args, tt.MODES[mode], 8, "synthetic:64", 0).inductor == {}
    text = "keep_addmm_fused_for_half_dtypes=False coordinate_descent_tuning=True"
    env = {"device": "CPU X", "driver": "n/a", "torch": "t", "triton": "n/a", "commit": "c", "python": "3"}
    raw = {k: 1.0 for k in ("samples_per_s", "samples_per_s_per_device", "peak_mem_MB", "step_ms", "data_wait_ms",
                            "compute_ms", "gflops_per_sample", "peak_tflops")}
    row = tt.csv_row({**raw, "world": 1, "preset": "tiny", "mode": "compiled+kernels", "batch": 8, "precision": "no",
                      "inductor": text}, env)
    assert row["inductor"] == text
    assert f"compile mode default with inductor options {text}, attention sdpa" in tt.markdown_block([row], env, args)
    # a table without a compiled row ran no compile mode and no Inductor option: its heading said it did
    eager = tt.markdown_block([{**row, "mode": "eager", "inductor": ""}], env, args)
    assert "warm-up, no compiled mode, attention sdpa" in eager and "inductor options" not in eager
    # a one-process row with other inductor options, or none (an empty cell), is not this run's scaling baseline
    path = tmp_path / "one.csv"
    tt.append_csv(path, {**row, "world": "1", "samples_per_s": "100.0", "inductor": "coordinate_descent_tuning=True"})
    tt.append_csv(path, {**row, "world": "1", "samples_per_s": "110.0", "inductor": ""})
    probe = {"preset": "tiny", "mode": "compiled+kernels", "batch": 8, "precision": "no", "inductor": text}
    ns = tt.parse_args(["--device", "cpu", "--baseline-csv", str(path)])
    assert tt.baseline_sps(ns, env, probe) is None
    assert tt.baseline_sps(ns, env, {**probe, "inductor": ""}) == 110.0
    tt.append_csv(path, {**row, "world": "1", "samples_per_s": "90.0"})
    assert tt.baseline_sps(ns, env, probe) == 90.0
    assert plot_results.bar_label({"mode": "compiled+kernels", "inductor": text}) == f"compiled+kernels · {text}"
    assert plot_results.bar_label({"mode": "eager", "inductor": text}) == "eager"


def test_plot_skips_rows_without_a_finite_figure_or_cut_short(tmp_path):
    """samples/s = inf ended the chart in matplotlib's "Axis limits cannot be NaN or Inf", a row cut short (a killed
    writer) in a TypeError traceback; both are skipped like a row without a figure."""
    path = tmp_path / "t.csv"
    base = {k: "" for k in tt.CSV_FIELDS} | {"device": "GPU A", "preset": "matpac", "world": "1", "mode": "eager",
                                            "precision": "bf16", "mfu": "0.1"}
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=tt.CSV_FIELDS)
        w.writeheader()
        w.writerow(base | {"batch": "64", "samples_per_s": "100.0"})
        w.writerow(base | {"batch": "128", "samples_per_s": "inf"})
        w.writerow(base | {"batch": "256", "samples_per_s": "nan"})
    with open(path, "a") as f:
        f.write(",".join(["2026-01-01T00:00:00Z", "GPU A", "1", "matpac", "eager"]) + "\n")  # cut short
        f.write(",".join(["2026-01-01T00:00:00Z", "GPU A", "1", "matpac", "eager", "512", "bf16", "x", "1",
                          "1", "50.0"]) + "\n")  # cut after samples/s: no mfu cell
    rows = plot_results.read_rows([path])
    assert [(r["batch"], r["samples_per_s"]) for r in rows] == [(64, 100.0)]
    assert plot_results.main([str(path), "--out", str(tmp_path / "c.png")]) == 0


def test_plot_bad_paths_are_one_line_errors(tmp_path, capsys):
    """A folder or a binary file as the CSV, an --out that is a folder or whose folder cannot be made: one line each,
    before drawing (each used to end in a traceback)."""
    good = ROOT / "benchmarks" / "results" / "cpu_tiny.csv"
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder.png").mkdir()
    for argv, message in (
        ([str(good), "--out", str(tmp_path / "folder.png")], "is a folder; give a file path"),
        ([str(good), "--out", str(tmp_path / "file" / "c.png")], "cannot create its folder"),
    ):
        with pytest.raises(SystemExit) as e:
            plot_results.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert ": error: --out " in err[-1] and message in err[-1], err
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    for path, message in ((tmp_path, "is not a file"), (binary, "cannot read")):
        with pytest.raises(SystemExit, match=message):
            plot_results.main([str(path), "--out", str(tmp_path / "new" / "c.png")])
    assert not (tmp_path / "new").exists()  # no folder made for a run that draws nothing


# ------------------------------------------------------------------------------------------------ GPU suite
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"


def _suite(*args, **env):
    return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, timeout=120,
                          env={**ENV, "PYTHON": sys.executable, **env})


# The environment check's scripts on stdin (`python - NAMES`: imports, each a start of Python with torch) answered as
# passing, by a stand-in interpreter that runs everything else with the real one. For tests about a later step: the
# check itself runs with the real interpreter in test_suite_skip_runs_only_the_other_steps and the no-CUDA tests.
_CHECK_PASSES = '-|"- "*) exit 0;;'


def test_suite_relative_wheels_dir_is_read_from_the_callers_directory(tmp_path):
    """A relative WHEELS_DIR given from outside the repository: pip was handed it relative to the repository root
    (the suite cds there), found no wheel and the check stopped the suite. A stand-in interpreter reports webdataset
    missing until pip has run, records pip's arguments, and runs nothing else."""
    (tmp_path / "wh").mkdir()
    (tmp_path / "wh" / "webdataset-1.0-py3-none-any.whl").write_bytes(b"")
    log, mark, fake = tmp_path / "pip.txt", tmp_path / "installed", tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'case "$*" in "- webdataset"*) [ -e {mark} ] || echo "webdataset: ImportError: planted";; '
        f'"-m pip install"*) echo "$*" > {log}; touch {mark};; esac\nexit 0\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(SUITE), str(tmp_path / "out"), "wh", "--cpu-dry-run"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=60, env={**ENV, "PYTHON": str(fake)})
    assert "OK    check" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert f"{tmp_path}/wh/webdataset-1.0-py3-none-any.whl" in log.read_text()


def test_suite_usage_and_bad_wheels_dir(tmp_path):
    r = _suite()
    assert r.returncode == 2 and "OUT_DIR" in r.stdout + r.stderr
    r = _suite(str(tmp_path / "out"), str(tmp_path / "no-wheels"))
    assert r.returncode == 2 and "WHEELS_DIR" in r.stderr
    used = tmp_path / "used"
    used.mkdir()
    (used / "train.csv").write_text("earlier results\n")
    r = _suite(str(used))
    assert r.returncode == 2 and "already holds an earlier suite's train.csv" in r.stderr
    assert (used / "train.csv").read_text() == "earlier results\n" and sorted(p.name for p in used.iterdir()) == [
        "train.csv"]
    # a summary.txt from a run that got past the environment check is an earlier suite's: refused, untouched
    ran = tmp_path / "ran"
    ran.mkdir()
    (ran / "summary.txt").write_text("OK    check (3s)\nFAIL  loader: exit 1\n")
    r = _suite(str(ran))
    assert r.returncode == 2 and "already holds an earlier suite's summary.txt" in r.stderr
    assert (ran / "summary.txt").read_text() == "OK    check (3s)\nFAIL  loader: exit 1\n"


def test_suite_usage_names_its_command_lines(tmp_path):
    """The usage printed the header's first lines (prose) once the header grew; an empty OUT_DIR or a file as OUT_DIR
    ended in two lines of mkdir noise."""
    for args in ((), ("",), ("--bogus",)):
        r = _suite(*args)
        assert r.returncode == 2 and "benchmarks/gpu_suite.sh OUT_DIR [WHEELS_DIR]" in r.stderr, r.stderr
        assert "benchmarks/gpu_suite.sh OUT_DIR --cpu-dry-run" in r.stderr
    (tmp_path / "f").write_text("mine")
    r = _suite(str(tmp_path / "f"), "--cpu-dry-run")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: OUT_DIR {tmp_path / 'f'} is a file; give a new or empty folder"]
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("env, message", [
    ({"SUITE_MODES": "eager,foo"}, "SUITE_MODES=eager,foo: unknown mode 'foo'"),
    ({"SUITE_MODES": " , "}, "names no mode"),
    ({"SUITE_SMALL_MODES": "compiled+kernel"}, "SUITE_SMALL_MODES=compiled+kernel: unknown mode"),
    ({"SUITE_BUDGET_S": "abc"}, "SUITE_BUDGET_S=abc: give a whole number >= 1"),
    ({"SUITE_BUDGET_S": "1e3"}, "SUITE_BUDGET_S=1e3: give a whole number >= 1"),  # skipped every step, exit 0
    ({"SUITE_BUDGET_S": "0"}, "SUITE_BUDGET_S=0: give a whole number >= 1"),
    ({"SUITE_STEPS": "0"}, "SUITE_STEPS=0: give a whole number >= 1"),
    ({"SUITE_STEPS": "x"}, "SUITE_STEPS=x: give a whole number >= 1"),
    ({"SUITE_BIG_BATCH": "0"}, "SUITE_BIG_BATCH=0: give a whole number >= 1"),
    ({"SUITE_ATTN_GRAPHS": "yes"}, "SUITE_ATTN_GRAPHS=yes: give 1 (on) or 0 (off)"),
    ({"SUITE_COMPILE_MODE": "fast"}, "SUITE_COMPILE_MODE=fast: give default, reduce-overhead"),
    ({"SUITE_STREAM": "yes"}, "SUITE_STREAM=yes: give 1 (on) or 0 (off)"),
    ({"SUITE_ATTN_TRITON": "2"}, "SUITE_ATTN_TRITON=2: give 1 (on) or 0 (off)"),
    ({"SUITE_PROFILE": "true"}, "SUITE_PROFILE=true: give 1 (on) or 0 (off)"),
    ({"SUITE_GEMM_AUTOTUNE": "on"}, "SUITE_GEMM_AUTOTUNE=on: give 1 (on) or 0 (off)"),
    ({"SUITE_SKIP": "loader,train_b64"}, "SUITE_SKIP=loader,train_b64: unknown step 'train_b64' (steps: loader "),
    ({"SUITE_INDUCTOR": "a=1||b=2"}, "SUITE_INDUCTOR='a=1||b=2' has an empty variant"),
    ({"SUITE_INDUCTOR": "a=1|"}, "SUITE_INDUCTOR='a=1|' ends in |: an empty variant"),
    ({"SUITE_INDUCTOR": "a=1 coordinate_descent_tuning"}, "SUITE_INDUCTOR: 'coordinate_descent_tuning' is not "
                                                          "KEY=VALUE"),
])
def test_suite_settings_are_checked_before_anything_runs(tmp_path, env, message):
    """A bad setting used to surface at the training steps, after the check, loader, attention, GPU-test and kernel
    steps had run (minutes of device time), or as a bash arithmetic error; now one line, nothing run or written."""
    r = _suite(str(tmp_path / "out"), "--cpu-dry-run", **env)
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:]
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert "nothing was run" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("compile_mode", tt.COMPILE_MODES)
def test_suite_accepts_every_mode_of_the_benchmark(tmp_path, compile_mode):
    """The suite's lists of modes and compile modes are train_throughput.py's: every one passes the up-front check
    (which then stops at the next one, the refusal of a used OUT_DIR), blanks and empty entries ignored as --modes
    does."""
    used = tmp_path / "used"
    used.mkdir()
    (used / "train.csv").write_text("earlier results\n")
    modes = " , ".join(tt.MODES) + ","
    r = _suite(str(used), "--cpu-dry-run", SUITE_MODES=modes, SUITE_SMALL_MODES=modes, SUITE_BUDGET_S="30",
               SUITE_STEPS="3", SUITE_STREAM="1", SUITE_ATTN_TRITON="1", SUITE_PROFILE="0",
               SUITE_COMPILE_MODE=compile_mode)
    assert r.returncode == 2 and "already holds an earlier suite's train.csv" in r.stderr, r.stderr


def test_suite_skip_runs_only_the_other_steps(tmp_path):
    """SUITE_SKIP: a GPU session spent on one question (MFU) runs only its steps; training reads synthetic data."""
    out = tmp_path / "out"
    r = _suite(str(out), "--cpu-dry-run", SUITE_SKIP="loader,attention,pytest_gpu,kernels,train_small",
               SUITE_MODES="eager", SUITE_STEPS="1")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    for key in ("loader", "attention", "pytest_gpu", "kernels", "train_small"):
        assert f"SKIP  {key}: in SUITE_SKIP" in summary
    assert "OK    train_b16" in summary and "train_b8" not in summary
    assert "OK    ema" in summary and "RESULT ema plain_ms=" in summary and " max_diff=0 " in summary
    headings = [line for line in (out / "RESULTS.md").read_text().splitlines() if line.startswith("### ")]
    assert len(headings) == 1 and "no compiled mode," in headings[0]  # SUITE_MODES=eager: nothing compiled
    assert "training runs use synthetic data" in summary
    assert "RESULT train " in summary


def _suite_gpu_calls(tmp_path, **env) -> list[list[str]]:
    """The suite's GPU-mode command lines (argv of each benchmark and pytest run) under `env`, recorded by a
    stand-in interpreter that runs none of them: it reports CUDA, and the environment check's scripts on stdin
    (`python - NAMES`: the imports, each a start of Python with torch) as passing; the dry-run tests run that check
    with the real interpreter."""
    log = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/bin/bash\n"
        f'case "$*" in *benchmarks/*|*"-m pytest"*) echo "$*" >> {log}; exit 0;; '
        "*cuda.is_available*) exit 0;; "
        f"{_CHECK_PASSES} esac\n"
        f'exec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(SUITE), str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                       env={**ENV, "PYTHON": str(fake), **env})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    return [c.split() for c in log.read_text().splitlines()]


def _last_opt(argv: list[str], name: str) -> str:
    """The last value given for option `name` (argparse keeps the last)."""
    return [argv[i + 1] for i, a in enumerate(argv) if a == name][-1]


def test_suite_mfu_session_runs_each_candidate_beside_the_bf16_stream_baseline(tmp_path):
    """The GPU-mode command lines of an MFU session, recorded by a stand-in interpreter that runs nothing (it
    reports CUDA and imports the rest with the real one). The attn_triton and gemm_autotune steps ran the fp32 stream
    while the best figure they were to beat used the bf16 one, and the dry run ran gemm_autotune as an eager row
    that ignores the compile mode, so neither step's own path had run anywhere before a GPU session."""
    calls = _suite_gpu_calls(tmp_path, SUITE_STREAM="1", SUITE_ATTN_TRITON="1", SUITE_GEMM_AUTOTUNE="1",
                             SUITE_BUDGET_S="520",
                             SUITE_SKIP="loader,train_big,attention,pytest_gpu,kernels,ema,train_small")
    train = [c for c in calls if any(a.endswith("train_throughput.py") for a in c)]
    assert len(train) == 3 and len(calls) == 3, calls
    opt = _last_opt

    for argv in train:
        assert (opt(argv, "--preset"), opt(argv, "--batch-sizes"), opt(argv, "--modes")) == (
            "matpac", "256", "compiled+kernels")
        assert (opt(argv, "--precision"), opt(argv, "--stream-dtype")) == ("bf16", "amp")
        assert opt(argv, "--data") == "synthetic"
    stream, attn, gemm = train
    assert opt(stream, "--compile-mode") == opt(attn, "--compile-mode") == "reduce-overhead"
    assert opt(gemm, "--compile-mode") == "gemm-autotune"
    assert "--attn-impl" not in stream + gemm and opt(attn, "--attn-impl") == "triton"


ONE_CONFIG = r"^(?:.*BLOCK_K=64,.BLOCK_M=128,.BLOCK_N=128,.*num_stages=3,.num_warps=4.*)?$"


def test_suite_next_mfu_session_runs_inductor_variants_beside_the_triton_attention_step(tmp_path):
    """The next GPU session's first call (benchmarks/RESULTS.md, the suite's header), its GPU-mode command lines
    recorded by a stand-in interpreter: the fastest step measured (Triton attention, bf16 stream), each
    SUITE_INDUCTOR variant as that step plus its options (the last one repeats the baseline), and a profile."""
    variants = (f"max_autotune_gemm=true test_configs.autotune_choice_desc_regex={ONE_CONFIG}"
                "|triton.cudagraphs=true")
    calls = _suite_gpu_calls(tmp_path, SUITE_ATTN_TRITON="1", SUITE_PROFILE="1", SUITE_BUDGET_S="500",
                             SUITE_INDUCTOR=variants,
                             SUITE_SKIP="loader,train_big,attention,pytest_gpu,kernels,train_small")
    scripts = [next((Path(a).name for a in c if a.endswith(".py")), "pytest" if "pytest" in c else "?") for c in calls]
    assert scripts == ["train_throughput.py"] * 3 + ["ema.py", "profile_step.py"], calls
    opt = _last_opt

    attn, first, repeat, ema, profile = calls
    assert (opt(ema, "--preset"), opt(ema, "--device"), opt(ema, "--repeats")) == ("matpac", "cuda", "20")
    for argv in (attn, first, repeat):
        assert (opt(argv, "--batch-sizes"), opt(argv, "--modes"), opt(argv, "--compile-mode")) == (
            "256", "compiled+kernels", "reduce-overhead")
        assert (opt(argv, "--attn-impl"), opt(argv, "--stream-dtype"), opt(argv, "--precision")) == (
            "triton", "amp", "bf16")
    given = [[argv[i + 1] for i, a in enumerate(argv) if a == "--inductor"] for argv in (attn, first, repeat)]
    assert given == [[], ["max_autotune_gemm=true", f"test_configs.autotune_choice_desc_regex={ONE_CONFIG}"],
                     ["triton.cudagraphs=true"]]
    assert (opt(profile, "--stream-dtype"), opt(profile, "--attn-impl")) == ("amp", "triton")
    (tmp_path / "skip").mkdir()
    skip = _suite_gpu_calls(tmp_path / "skip", SUITE_ATTN_TRITON="1", SUITE_INDUCTOR=variants,
                            SUITE_SKIP="loader,train_big,inductor,attention,pytest_gpu,kernels,ema,train_small")
    assert len(skip) == 1 and "--inductor" not in skip[0]


def test_one_config_regex_keeps_cublas_and_one_triton_gemm_configuration():
    """The plan's autotune filter (Inductor matches it against each choice's description with re.search): cuBLAS
    choices have an empty description; Triton templates' descriptions are as in the H200 autotune logs."""
    desc = ("ACC_TYPE='tl.float32', ALLOW_TF32=False, BLOCK_K={k}, BLOCK_M=128, BLOCK_N=128, EVEN_K=True, GROUP_M=8, "
            "USE_FAST_ACCUM=False, num_stages={s}, num_warps={w}")
    keep = ["", desc.format(k=64, s=3, w=4)]
    drop = [desc.format(k=64, s=5, w=8), desc.format(k=32, s=3, w=4)]
    assert [bool(re.search(ONE_CONFIG, d)) for d in keep + drop] == [True, True, False, False]
    assert parse_inductor_options([f"test_configs.autotune_choice_desc_regex={ONE_CONFIG}"]) == {
        "test_configs.autotune_choice_desc_regex": ONE_CONFIG}


def test_suite_notes_processes_left_on_the_gpu_after_a_step(tmp_path):
    """A process still on the GPU after a step (a killed step's leftover, or another user's) slows every later
    figure; the suite says so in its summary, with the load average. A stand-in nvidia-smi plays the GPU: no
    process after the first step, one after the second."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text('#!/bin/bash\ncase "$*" in *compute-apps*) n="$(dirname "$0")/n"; echo x >> "$n"; '
                   '[ "$(wc -l < "$n")" -ge 2 ] && echo "4242, python3, 900 MiB";; '
                   '*) echo "Stand-in GPU, 1.0, 1000 MiB";; esac\n')
    smi.chmod(0o755)
    _suite_gpu_calls(tmp_path, PATH=f"{bin_dir}:{os.environ['PATH']}", SUITE_ATTN_TRITON="1", SUITE_PROFILE="1",
                     SUITE_SKIP="loader,train_big,attention,pytest_gpu,kernels,ema,train_small")
    notes = [line for line in (tmp_path / "out" / "summary.txt").read_text().splitlines() if "still on the GPU" in line]
    assert len(notes) == 1, notes
    assert notes[0].startswith("note: after profile, processes still on the GPU (later figures may be slowed): "
                               "4242, python3, 900 MiB · load average "), notes


def test_suite_second_mfu_call_runs_batch_512_and_times_attention_from_cuda_graphs(tmp_path):
    """The next GPU session's second call (benchmarks/RESULTS.md): the stream and Triton-attention steps at batch 512
    (the best MFU measured), and the attention step with --graphs; they had to be typed by hand on the device."""
    calls = _suite_gpu_calls(tmp_path, SUITE_BIG_BATCH="512", SUITE_STREAM="1", SUITE_ATTN_TRITON="1",
                             SUITE_ATTN_GRAPHS="1", SUITE_SKIP="loader,train_big,pytest_gpu,kernels,ema,train_small")
    scripts = [next((Path(a).name for a in c if a.endswith(".py")), "?") for c in calls]
    assert scripts == ["train_throughput.py", "train_throughput.py", "attention.py"], calls
    stream, attn, timing = calls
    assert _last_opt(stream, "--batch-sizes") == _last_opt(attn, "--batch-sizes") == "512"
    assert "--attn-impl" not in stream and _last_opt(attn, "--attn-impl") == "triton"
    assert "--graphs" in timing and _last_opt(timing, "--batch") == "256"


def test_suite_attn_graphs_in_the_dry_run_says_it_times_eager_calls(tmp_path):
    out = tmp_path / "out"
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/bash\ncase "$*" in {_CHECK_PASSES} esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    r = _suite(str(out), "--cpu-dry-run", SUITE_ATTN_GRAPHS="1", PYTHON=str(fake),
               SUITE_SKIP="loader,train_big,pytest_gpu,kernels,ema,train_small")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert "SUITE_ATTN_GRAPHS=1 needs a CUDA GPU" in summary and "OK    attention" in summary, summary


def test_suite_ctrl_c_stops_the_running_step_at_once(tmp_path):
    """Ctrl-C used to wait for the running step to finish (up to its cap: 240 s for a training step): bash runs a
    trap only between foreground commands, and timeout's own process group never saw the terminal's SIGINT."""
    import contextlib
    import signal
    import time

    pidfile = tmp_path / "step.pid"
    fake = tmp_path / "python"  # the interpreter, except that the kernels step hangs and the check passes
    fake.write_text(f"#!/bin/bash\ncase \"$*\" in *benchmarks/kernels.py*) echo $$ > {pidfile}; exec sleep 300;; "
                    f"{_CHECK_PASSES} esac\nexec {sys.executable} \"$@\"\n")
    fake.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SUITE), str(out), "--cpu-dry-run"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env={**ENV, "PYTHON": str(fake),
                                 "SUITE_SKIP": "loader,train_big,attention,pytest_gpu,train_small"})
    step = None
    try:
        deadline = time.monotonic() + 90
        while not (pidfile.exists() and pidfile.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the kernels step never started:\n{proc.communicate()[0][-3000:]}")
            time.sleep(0.2)
        step = int(pidfile.read_text())
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)  # the suite's shell, as a terminal's Ctrl-C reaches it
        t0 = time.monotonic()
        assert proc.wait(timeout=30) == 130
        assert time.monotonic() - t0 < 10
    finally:
        proc.kill()
        if step is not None:  # on failure: the step's own process group (timeout, sleep) outlives bash
            with contextlib.suppress(ProcessLookupError):
                os.killpg(os.getpgid(step), signal.SIGKILL)
    assert (out / "summary.txt").read_text().strip().endswith("interrupted")
    assert (out / "logs.tar.gz").exists()
    with pytest.raises(ProcessLookupError):  # the step (sleep) is gone with its process group
        for _ in range(50):
            os.kill(step, 0)
            time.sleep(0.1)


def test_suite_refuses_an_out_dir_it_cannot_write(tmp_path):
    """A read-only OUT_DIR used to run every step anyway, each losing its results with a traceback, and leave no
    summary or logs. Root ignores permissions, so there the folder is made read-only by a bind mount."""
    out = tmp_path / "ro"
    out.mkdir()
    cmd = ["bash", str(SUITE), str(out), "--cpu-dry-run"]
    if os.geteuid() == 0:
        ro = ["unshare", "-m", "sh", "-c", 'mount -o bind,ro "$0" "$0" && exec "$@"', str(out)]
        if subprocess.run([*ro, "true"], capture_output=True).returncode != 0:
            pytest.skip("running as root where a private read-only bind mount cannot be made")
        cmd = [*ro, *cmd]
    else:
        out.chmod(0o555)
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                           env={**ENV, "PYTHON": sys.executable})
    finally:
        out.chmod(0o755)
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:]
    assert r.stderr.strip() == f"error: cannot write into OUT_DIR {out} (read-only or no permission); give a " \
        "writable folder"
    assert list(out.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_suite_stops_with_a_clear_message_without_cuda(tmp_path):
    r = _suite(str(tmp_path / "out"))
    assert r.returncode == 2
    assert "sees no CUDA device" in r.stdout
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "FAIL  check" in summary and (tmp_path / "out" / "logs.tar.gz").exists()
    # that folder holds no results: a rerun into it is allowed (it overwrites the two files), not refused
    r = _suite(str(tmp_path / "out"))
    assert r.returncode == 2 and "already holds" not in r.stderr and "sees no CUDA device" in r.stdout
    assert (tmp_path / "out" / "summary.txt").read_text().count("FAIL  check") == 1


def test_suite_names_missing_packages(tmp_path):
    """A Python without the required packages: the suite stops at once and names them."""
    bare = tmp_path / "bare-python"
    bare.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")  # -S: no site-packages
    bare.chmod(0o755)
    r = _suite(str(tmp_path / "out"), PYTHON=str(bare))
    assert r.returncode == 2
    assert "missing Python packages" in r.stdout and "torch: ModuleNotFoundError" in r.stdout


def test_a_failing_mode_keeps_the_other_rows(tmp_path, monkeypatch, capsys):
    """One broken mode (say, a kernel that fails to compile on a new GPU) is reported and the rest still measured."""
    real = tt.run_one

    def run_one(args, name, batch, npy_dir, workers):
        if name == "eager":
            raise RuntimeError("planted failure\nsecond line")
        return real(args, name, batch, npy_dir, workers)

    monkeypatch.setattr(tt, "run_one", run_one)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    csv_path = tmp_path / "t.csv"
    argv = ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "4", "--steps", "1", "--warmup", "0",
            "--modes", "eager,reference-design", "--precision", "no", "--csv", str(csv_path), "--tmp-dir",
            str(tmp_path)]
    assert tt.main(argv) == 1
    out = capsys.readouterr().out
    assert "eager B=4    FAILED (eager B=4: RuntimeError: planted failure)" in out
    assert "failed runs (traceback above):\n  eager B=4: RuntimeError: planted failure" in out
    with open(csv_path, newline="") as f:
        assert [r["mode"] for r in csv.DictReader(f)] == ["reference-design"]
    # the only row left is the peer: no winner, every RESULT figure n/a (never reference-design at 1.00x)
    assert "best: none" in out
    last = out.strip().splitlines()[-1]
    assert RESULT_RE.match(last) and last.startswith(
        "RESULT train samples_per_s=n/a mfu=n/a speedup_vs_reference_design=n/a "), last


def test_every_mode_failing_is_an_error(tmp_path, monkeypatch, capsys):
    def run_one(*_):
        raise RuntimeError("planted")

    monkeypatch.setattr(tt, "run_one", run_one)
    argv = ["--preset", "tiny", "--device", "cpu", "--batch-sizes", "4", "--steps", "1", "--modes", "eager",
            "--precision", "no"]
    assert tt.main(argv) == 1
    assert "error: every run failed:\n  eager B=4: RuntimeError: planted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ diagnostics
def test_attention_benchmark_cpu_smoke():
    """benchmarks/attention.py on CPU: backends CPU lacks are n/a, the others timed, the RESULT line parsable."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--preset", "tiny", "--batch", "2", "--reps", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = re.search(r"^RESULT attention default_ms=(\S+) best=(\w+) best_ms=(\S+) speedup=(\S+)$", proc.stdout, re.M)
    assert m, proc.stdout[-2000:]
    assert "cudnn on student: n/a" in proc.stderr
    lines = proc.stdout.splitlines()
    header = lines[0].split()
    assert header[:3] == ["shape", "B,H,N,hd", "layers"] and header[-3:] == ["(ms", "per", "call)"], lines[0]
    impls = header[3:-3]
    assert {"sdpa", "flash", "math", "cudnn"} <= set(impls), impls
    rows = {ln.split()[0]: ln.split() for ln in lines[1:] if ln.split() and ln.split()[0] in
            ("student", "teacher", "predictor")}
    assert set(rows) == {"student", "teacher", "predictor"}, proc.stdout[-2000:]
    total = [ln for ln in lines if ln.startswith("per step")]
    assert len(total) == 1, proc.stdout[-2000:]
    per_step = dict(zip(impls, map(float, total[0].split()[-len(impls):]), strict=True))
    na = {i for i in impls if re.search(rf"^  {i} on \w+: n/a ", proc.stderr, re.M)}
    assert "cudnn" in na and not {"sdpa", "math"} & na, na  # CPU has the default and the math fallback
    timed = {i: t for i, t in per_step.items() if i not in na}
    for impl in impls:  # a backend that ran has a finite positive time, one that could not is nan (never a number)
        ran = math.isfinite(per_step[impl]) and per_step[impl] > 0
        assert ran if impl in timed else math.isnan(per_step[impl]), (impl, per_step)
        if impl in timed:  # the per-step figure is the per-call times weighted by the layer counts
            calls = [(int(r[2]), float(r[3 + impls.index(impl)])) for r in rows.values()]
            assert per_step[impl] == pytest.approx(sum(n * t for n, t in calls), abs=0.002 * sum(n for n, _ in calls))
    default_ms, best, best_ms, speedup = float(m.group(1)), m.group(2), float(m.group(3)), float(m.group(4))
    assert default_ms == per_step["sdpa"]
    assert best in timed and best_ms == timed[best] == min(timed.values()), (best, best_ms, timed)
    assert speedup == pytest.approx(default_ms / best_ms, abs=0.01)  # 2 printed decimals, of 3-decimal times
    assert re.search(r"^device cpu · .* · timing: wall clock$", proc.stdout, re.M), proc.stdout[-500:]


def test_attention_benchmark_graphs_needs_cuda():
    """--graphs (CUDA-graph replay) cannot run on CPU: a one-line usage error before any timing, not a traceback."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: --graphs runs there")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "attention.py"), "--preset", "tiny", "--batch", "2", "--graphs"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and proc.stdout == "", (proc.stdout, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1].endswith("error: --graphs needs a CUDA GPU (CUDA graphs); on CPU "
                                                          "leave it out"), proc.stderr
    assert "Traceback" not in proc.stderr


def test_profile_step_cpu_smoke(tmp_path):
    trace = tmp_path / "not" / "yet" / "t.json"  # its folder is created (it used to print "wrote" and write nothing)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "profile_step.py"), "--preset", "tiny", "--device", "cpu",
           "--precision", "no", "--mode", "eager", "--batch", "4", "--steps", "1", "--warmup", "1", "--top", "3",
           "--trace", str(trace)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {trace}" in proc.stdout and trace.stat().st_size > 0
    assert "top 3 host ops by self CPU time" in proc.stdout
    # no GPU: no "GPU busy 0.00 ms/step (0.0% of wall)", which read as a measured idle GPU
    m = re.search(r"^RESULT profile wall_ms=(\S+) gpu_busy_ms=nan gemm_ms=nan attention_ms=nan$", proc.stdout, re.M)
    assert m and float(m.group(1)) > 0, proc.stdout[-2000:]
    assert "no GPU in this run" in proc.stdout and "GPU busy" not in proc.stdout


def test_profile_kernel_classes():
    import profile_step

    assert profile_step.classify("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert profile_step.classify("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "gemm"
    assert profile_step.classify("triton_poi_fused_gelu_view_40") == "triton/inductor"
    assert profile_step.classify("_attn_bwd_dkdv_kernel") == "attention"  # packed_attention's, not an inductor one
    assert profile_step.classify("void at::native::multi_tensor_apply_kernel<FusedOptimizerTensorListMetadata>") == (
        "optimizer+ema")
    assert profile_step.classify("Memcpy HtoD (Pinned -> Device)") == "copy/memset"
    assert profile_step.classify("some_unknown_kernel_name") == "other"
