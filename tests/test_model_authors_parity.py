"""Our forward against the authors' arithmetic (github.com/aurianworld/matpac, training_matpac/models/model.py and
cls_head.py), re-expressed here on our modules: shuffled (not sorted) visible/masked order with an `ids_restore`
unshuffle in the predictor, MAE's sin-cos table built from a w-first meshgrid, the fairseq criterion's
(0.5·Σ L_cls + 0.5·Σ L_pred) / sample_size, the probability centre statistic. model.py and masking.py name the
sorted masks a harmless deviation (only the order of per-token outputs differs); this checks it, gradients included,
for MATPAC and MATPAC++ (soft and hard assignment)."""

import math

import pytest
import torch
import torch.nn.functional as F

from matpac_fast.config import get_model_config
from matpac_fast.model import MATPAC, StepState
from matpac_fast.pos_embed import sincos_2d

torch.set_num_threads(1)


def _mae_table(dim: int, n_f: int, n_t: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed with a zero CLS row, in float64: meshgrid(w, h), first half of the channels
    from grid[0] (the time index), second half from grid[1] (the frequency index)."""
    grid = torch.stack(torch.meshgrid(torch.arange(n_t, dtype=torch.float64), torch.arange(n_f, dtype=torch.float64),
                                      indexing="xy"))  # (2, n_f, n_t): [0] = time, [1] = frequency

    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([one(dim // 2, grid[0]), one(dim // 2, grid[1])], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table])


@pytest.mark.parametrize("dim", [768, 512, 64])
def test_positional_table_is_maes(dim):
    ours = sincos_2d(dim, 5, 38)[0]
    torch.testing.assert_close(ours, _mae_table(dim, 5, 38).float(), rtol=0, atol=0)


def _authors_loss(m: MATPAC, lms, ids_shuffle, tau_t: float, mcl_t: float):
    """(loss, centre statistic (K,)) as the authors' forward_cls_pred + Cls_Loss + ModelCriterion compute them."""
    cfg = m.cfg
    n_keep = cfg.n_visible
    x = m.patch_embed((lms - cfg.norm_mean) / cfg.norm_std) + m.pos_embed[:, 1:]
    b, n, d = x.shape
    ids_restore = ids_shuffle.argsort(dim=1)
    take = lambda t, idx: torch.gather(t, 1, idx[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    x_vis, x_msk = take(x, ids_shuffle[:, :n_keep]), take(x, ids_shuffle[:, n_keep:])
    cls = (m.cls_token + m.pos_embed[:, :1]).expand(b, -1, -1)
    z_v = m.student_encoder(torch.cat([cls, x_vis], 1))
    p = m.predictor
    y = p.decoder_embed(z_v)
    y_ = take(torch.cat([y[:, 1:], p.mask_token.expand(b, n - n_keep, -1)], 1), ids_restore)  # unshuffle
    y = torch.cat([y[:, :1], y_], 1) + p.decoder_pos_embed
    for blk in p.decoder_blocks:
        y = blk(y)
    y = take(p.decoder_norm(y)[:, 1:], ids_shuffle)[:, n_keep:]  # masked positions, in shuffled order
    with torch.no_grad():
        z_m = m.teacher_encoder(torch.cat([cls, x_msk], 1))[:, 1:]
    t = F.normalize(z_m, dim=-1)
    if cfg.mcl_heads > 1:
        z_hat = torch.stack([h(y) for h in p.mcl_heads], dim=2)
        per_head = 2 - 2 * (t.unsqueeze(2) * F.normalize(z_hat, dim=-1)).sum(-1)
        best = per_head.min(dim=-1)[1]
        if mcl_t > cfg.mcl_t_min:
            l_pred = (torch.softmax(-per_head / mcl_t, dim=2).detach() * per_head).sum(-1)
        else:
            l_pred = per_head.min(dim=-1)[0]
        z_hat = torch.gather(z_hat, 2, best[..., None, None].expand(-1, -1, 1, d)).squeeze(2)
    else:
        z_hat = p.decoder_pred(y)
        l_pred = 2 - 2 * (t * F.normalize(z_hat, dim=-1)).sum(-1)
    p_t = F.softmax((m.teacher_head(z_m) - m.center) / tau_t, dim=-1).reshape(-1, cfg.n_prototypes)
    l_cls = -(p_t * F.log_softmax(m.student_head(z_hat).reshape(-1, cfg.n_prototypes) / cfg.tau_s, -1)).sum(-1)
    sample_size = l_cls.numel()
    loss = (0.5 * l_cls.sum() + 0.5 * l_pred.reshape(-1).sum()) / sample_size
    return loss, p_t.sum(0) / sample_size


@pytest.mark.parametrize("mcl_heads, mcl_t", [(1, 0.1), (3, 0.05), (3, 1e-5)])
def test_forward_loss_gradients_and_centre_match_the_authors_shuffled_order(mcl_heads, mcl_t):
    torch.manual_seed(0)
    m = MATPAC(get_model_config("tiny", mcl_heads=mcl_heads))
    with torch.no_grad():
        m.center.normal_()  # a centre that matters
    g = torch.Generator().manual_seed(1)
    cfg, b = m.cfg, 3
    lms = torch.randn(b, 1, cfg.n_mels, cfg.crop_frames, generator=g) * 4 - 7
    ids_shuffle = torch.rand(b, cfg.n_patches, generator=g).argsort(dim=1)
    vis = ids_shuffle[:, : cfg.n_visible].sort(dim=1).values
    mask = ids_shuffle[:, cfg.n_visible :].sort(dim=1).values
    tau_t = 0.05

    loss, stats = m({"lms": lms, "vis_idx": vis, "mask_idx": mask}, StepState(tau_t=tau_t, mcl_temperature=mcl_t))
    loss.backward()
    ours = {k: q.grad.clone() for k, q in m.named_parameters() if q.grad is not None}
    m.zero_grad(set_to_none=True)
    ref, centre = _authors_loss(m, lms, ids_shuffle, tau_t, mcl_t)
    ref.backward()
    theirs = {k: q.grad for k, q in m.named_parameters() if q.grad is not None}

    assert math.isclose(loss.item(), ref.item(), rel_tol=1e-5)
    torch.testing.assert_close(stats["center_batch"], centre, rtol=1e-4, atol=1e-6)
    assert set(ours) == set(theirs) and set(ours) == {k for k, q in m.named_parameters() if q.requires_grad}
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-3, atol=1e-6, msg=k)
