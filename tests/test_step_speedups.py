"""Issue 18: the SynerNet step's speed-ups change no loss and no gradient (fp32, float rounding only).

`cam_reuse_forward` (the CAM pass takes the training forward's own scale-1.0 CAMs of the unflipped image) and
`bcam_attn_mean` (B-CAM reads the head-averaged attention, computed a block of query rows at a time without gradient,
instead of every head's attention) are each switched on against the step with both off, on demo-size models with
three CAM scales and every loss on from the first iteration. The encoders start from the committed demo weights: from
random weights B's attention is almost uniform, its propagated CAM almost flat, and the per-class min-max
normalisation magnifies float rounding (1e-7) to 2e-3 in the B-CAM, enough to move a few pseudo-label pixels across a
threshold (seen: 6 of 16384 pixels of Y_B with both speed-ups on).
"""
import numpy as np
import pytest
import torch

import synernet.methods.synernet as sm
from synernet.methods.dskd import DSKDMethod
from synernet.models.backbone import build_backbone, head_mean_attention
from synernet.core.config import make_config
from synernet.data.datasets import dataset_info
from synernet.engine.learner import train_iteration

ALL_ON = dict(seg_start=0, sbce_start=0, contrast_start=0, cam_scales=(1.0, 0.5, 1.5), pretrained=True)


def _step(preset, method=sm.SynerNetMethod, **flags):
    "One training iteration of `preset` from seed-0 weights on a fixed batch: (losses, gradients, trace)."
    cfg = make_config(preset, **{**ALL_ON, **flags})
    torch.manual_seed(0)
    meth = method(cfg, dataset_info(cfg), torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    B, H = 2, 64
    batch = dict(img=torch.randn(B, 3, H, H, generator=g), cls_label=torch.tensor([[1., 0, 1, 0, 0, 0, 0, 0],
                                                                                  [0., 1, 0, 0, 0, 0, 0, 0]]),
                 img_box=torch.tensor([[0, H, 0, H], [8, 56, 0, 64]]))
    meth.trace, grads = {}, {}
    optims = meth.configure_optimizers()
    losses, _, _ = train_iteration(meth, optims, batch, 0, on_backward=lambda m: grads.update(
        {k: p.grad.clone() for k, p in m.modules["net"].named_parameters() if p.grad is not None}))
    return losses, grads, meth.trace


def _same_losses_and_grads(l1, g1, l0, g0):
    "The same losses (rtol 1e-4) and gradients (rtol 1e-3, atol 1e-6) from two runs of one step."
    assert set(l1) == set(l0) and set(g1) == set(g0) and len(g0) > 0
    for k in l0:
        np.testing.assert_allclose(l1[k].item(), l0[k].item(), rtol=1e-4, atol=1e-6, err_msg=k)
    for k in g0:
        np.testing.assert_allclose(g1[k].numpy(), g0[k].numpy(), rtol=1e-3, atol=1e-6, err_msg=f"grad {k}")


@pytest.mark.parametrize("preset,flags", [
    ("synernet", dict(cam_reuse_forward=True)),
    ("synernet", dict(bcam_attn_mean=True)),
    ("synernet", dict(cam_reuse_forward=True, bcam_attn_mean=True)),
    ("synernet_code", dict(cam_reuse_forward=True)),
])
def test_speedup_changes_no_loss_or_gradient(preset, flags):
    "fp32: the step with a speed-up on and with every speed-up off: same losses, CAMs, labels and gradients."
    off = dict(cam_reuse_forward=False, bcam_attn_mean=False)
    l1, g1, t1 = _step(preset, **{**off, **flags})
    l0, g0, t0 = _step(preset, **off)
    _same_losses_and_grads(l1, g1, l0, g0)
    for k in ("cam_b", "cam_aux_b", "cam_p", "cam_aux_p"):
        np.testing.assert_allclose(t1[k].numpy(), t0[k].numpy(), atol=1e-4, err_msg=k)
    for k in ("seg_labels_b", "seg_labels_p", "token_labels_b", "token_labels_p"):
        assert (t1[k] != t0[k]).float().mean() <= 0.001, k


@pytest.mark.parametrize("flags", [dict(dskd_warmup=10), dict(dskd_warmup=0), dict(dskd_warmup=0, dskd_view_swap=True),
                                   dict(dskd_warmup=10, dskd_label_cam="student_final")])
def test_dskd_cam_reuse_changes_no_loss_or_gradient(flags):
    """fp32, DSKD + GC in stage A (student trained) and B (L_PUNC on an ROI of the CAMs), with the view swap and with
    student pseudo-labels: the teacher's CAM pass reusing the forward's scale-1.0 CAMs (both halves; the image alone
    with the view swap) gives the same losses, labels and gradients."""
    l1, g1, t1 = _step("dskd_gc", DSKDMethod, seg_start=0, cam_reuse_forward=True, **flags)
    l0, g0, t0 = _step("dskd_gc", DSKDMethod, seg_start=0, cam_reuse_forward=False, **flags)
    _same_losses_and_grads(l1, g1, l0, g0)


def test_head_mean_attention_is_the_explicit_mean():
    "Row blocks of any size give the explicit path's head mean and output; the kept blocks' output is unchanged."
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 37, 8, generator=g) for _ in range(3))
    a = ((q * 0.3) @ k.transpose(-2, -1)).softmax(-1)
    for rows in (5, 16, 37):
        m, o = head_mean_attention(q, k, 0.3, v, rows=rows)
        assert m.shape == (2, 1, 37, 37)
        torch.testing.assert_close(m, a.mean(1, keepdim=True), atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(o, a @ v, atol=1e-6, rtol=1e-5)
    bb = build_backbone("vit_tiny_p8_demo").train()
    x = torch.randn(2, 3, 40, 48, generator=g)
    with torch.no_grad():
        full, mean = bb(x, attn_blocks=(-2, -1)), bb(x, attn_blocks=(-2, -1), attn_mean=True)
    torch.testing.assert_close(mean.tokens, full.tokens, atol=1e-5, rtol=1e-5)
    for i in full.attn:
        torch.testing.assert_close(mean.attn[i], full.attn[i].mean(1, keepdim=True), atol=1e-7, rtol=1e-6)
    out = bb(x, attn_blocks=(-1,), attn_mean=True)          # with gradient: the fused output, a detached mean
    assert not out.attn[5].requires_grad and out.tokens.requires_grad
    torch.testing.assert_close(out.tokens, full.tokens, atol=1e-5, rtol=1e-5)
