"""SynerNet (Wang et al., Neural Networks 2026; the authors' DEFormer code, `spacial-bce` branch): the spatial BCE's
per-image threshold and its positive tokens, the confidence matrix and the fusion (identical votes adopt one
prediction; the fixed 0.3 / 0.7 fusion of the authors' inference script), the B-CAM attention invariants, the routing
of the cross pseudo-labels, and short end-to-end runs of both presets on the synthetic set (tiny settings)."""
import json, math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synernet.core.config import ConfigError, make_config
from synernet.ops.branches import (attention_affinity, attention_propagate, per_image_thresholds, sbce_targets,
                               spatial_bce_loss, sbce_roi)
from synernet.ops.confidence import confidence_matrix, fuse_probs, fuse_logits, fusion_labels, proto_votes
from synernet.ops.infer import ms_flip_logits
import synernet.methods.synernet as sm
from synernet.engine.learner import Learner
from synernet.data.datasets import dataset_info


# ---------------------------------------------------- spatial-BCE thresholds (the authors' get_per_pic_thre)
def _phi_loop(roi, labels, u):
    "per_image_thresholds written as the spec reads, with Python loops over pixels."
    out = np.zeros(labels.shape)
    for b in range(roi.shape[0]):
        r = roi[b].ravel().tolist()
        hw = len(r)
        u_frac = sum(v == -1 for v in r) / hw
        conf = {c: sum(v == c for v in r) / hw for c in set(r) if c >= 0}
        n = len(conf)
        for c, k in conf.items(): out[b, c] = min(k + u * u_frac / (n + 1e-6), 0.99)
    return out


def test_sbce_thresholds_g7_37():
    roi = torch.full((2, 50, 40), -2)
    roi[0, :5] = 0; roi[0, 5:15] = -1                        # 10 % class 0, 20 % uncertain, rest background
    roi[1, :10, :20] = 3; roi[1, 10:20, :8] = 1; roi[1, 30:] = -1
    y = torch.tensor([[1., 1, 0, 0], [0, 1, 1, 1]])
    phi = per_image_thresholds(roi, y, u=0.2)
    assert abs(phi[0, 0].item() - 0.14) < 1e-6 and phi[0, 1].item() == 0.0
    np.testing.assert_allclose(phi.numpy(), _phi_loop(roi.numpy(), y.numpy(), 0.2), atol=1e-6)
    z = torch.randperm(4 * 784).float().reshape(1, 4, 28, 28)   # distinct logits
    T = sbce_targets(z, y[:1], phi[:1])
    assert T[0, 0].sum().item() == round(0.14 * 784) + 1 == 111
    assert T[0, 1].sum().item() == 1 and T[0, 1].flatten()[z[0, 1].flatten().argmax()]   # no confident pixel: top-1
    assert T[0, 2:].sum().item() == 0                                                      # not in the label


def test_sbce_roi_and_loss_sets():
    cam = torch.zeros(1, 2, 2, 2); cam[0, 0] = torch.tensor([[0.8, 0.5], [0.1, 0.7]])
    assert sbce_roi(cam, torch.tensor([[1., 0.]])).tolist() == [[[0, -1], [-2, -1]]]
    # all tokens negative for an image whose only label class is pushed down everywhere but its top token
    z = torch.zeros(1, 1, 1, 4, requires_grad=True)
    with torch.no_grad(): z[0, 0, 0] = torch.tensor([3., 0, 0, 0])
    loss = spatial_bce_loss(z, torch.ones(1, 1), torch.zeros(1, 1))
    sp = F.softplus
    ref = 0.1 * sp(torch.tensor(0.)) + 0.9 * sp(torch.tensor(-3.))     # Neg: logits 0 -> 0; Pos: logit 3 -> 1
    assert abs(loss.item() - ref.item()) < 1e-6


# ---------------------------------------------------------------- confidence matrix and fusion
def test_confidence_identical_votes_g7_38():
    torch.manual_seed(0)
    K, hw = 5, (3, 4)
    cls = torch.randint(0, K, (2, 12))
    votes = cls[:, None].expand(2, 8, 12)
    cm = confidence_matrix(votes, hw)
    assert cm.reliable.all() and (cm.confidence == 1).all() and torch.equal(cm.consensus.flatten(1), cls)
    qb = torch.rand(2, K, *hw).softmax(1); qp = torch.rand(2, K, *hw).softmax(1)
    fused = fuse_probs(qb, qp, cm)
    fg = (cls != 0).reshape(2, 1, *hw)
    assert torch.equal(fused, torch.where(fg, qb, qp))                      # direct adoption, no blending
    # w_fg = 0.5 (4 background and 4 foreground votes) and one-hot predictions on different classes
    half = torch.tensor([0, 0, 0, 0, 2, 2, 2, 2])[None, :, None].expand(1, 8, 12)
    cm = confidence_matrix(half, hw)
    assert not cm.reliable.any() and torch.allclose(cm.fg_support, torch.full((1, *hw), 0.5))
    qb = F.one_hot(torch.full((1, *hw), 3), K).permute(0, 3, 1, 2).float()
    qp = F.one_hot(torch.full((1, *hw), 1), K).permute(0, 3, 1, 2).float()
    fused = fuse_probs(qb, qp, cm)
    assert torch.allclose(fused[:, 3], torch.full((1, *hw), 0.5)) and torch.allclose(fused[:, 1], torch.full((1, *hw), 0.5))
    assert (fused.argmax(1) == 1).all()                                     # tie -> lower class id (first maximum)
    assert (fusion_labels(torch.full((1, *hw), 3), torch.full((1, *hw), 1), cm) == 255).all()


def test_background_only_anchors_give_no_reliable_pixel():
    """Issue 24: an image whose two labels agree on background alone has one prototype, so every vote is background
    and, read literally, every token is reliably background, objects included (62 % of the v3 validation images in
    runs/v3/synernet-scratch-seed0: its fused pseudo-label was Y_P there). With `conf_min_protos=2` (the default)
    such an image abstains: no reliable pixel, its fused label is 255; an image with two classes still votes."""
    f = F.normalize(torch.cat([torch.tensor([1., 0.1]).expand(6, 2), torch.tensor([0.1, 1.]).expand(6, 2)]), dim=-1)
    f = f[None].expand(2, 12, 2)
    alpha = torch.full((2, 12), -1); alpha[:, 0] = 0; alpha[1, 11] = 3      # image 0: background anchors only
    hw = (3, 4)
    y_b, y_p = torch.full((2, *hw), 3), torch.zeros(2, *hw, dtype=torch.long)
    literal = confidence_matrix(proto_votes([f, f], alpha, 5, min_protos=1), hw)
    assert literal.reliable[0].all() and (fusion_labels(y_b, y_p, literal)[0] == 0).all()
    cm = confidence_matrix(proto_votes([f, f], alpha, 5, min_protos=make_config("synernet").conf_min_protos), hw)
    assert not cm.reliable[0].any() and (cm.consensus[0] == 255).all() and (fusion_labels(y_b, y_p, cm)[0] == 255).all()
    assert torch.equal(cm.consensus[1], literal.consensus[1]) and cm.reliable[1].all()
    assert cm.consensus[1].flatten().tolist() == [0] * 6 + [3] * 6


def test_prototype_votes_follow_features():
    "Two clusters of features: the votes of every layer follow the cluster, whatever the anchors' share."
    f = torch.cat([torch.tensor([1., 0.1]).expand(6, 2), torch.tensor([0.1, 1.]).expand(6, 2)])[None]
    f = F.normalize(f + 0.01 * torch.randn_like(f), dim=-1)
    alpha = torch.full((1, 12), -1); alpha[0, 0] = 0; alpha[0, 11] = 4
    v = proto_votes([f, f], alpha, 5)
    assert v[0, 0].tolist() == [0] * 6 + [4] * 6 and torch.equal(v[0, 0], v[0, 1])


# ------------------------------------------ fixed fusion (the authors' Dcrf-voc-infer-du_head.py)
def test_fixed_fusion_reproduces_du_head_inference_g7_39():
    torch.manual_seed(0)
    W1, W2 = torch.randn(4, 3), torch.randn(4, 3)
    x = torch.randn(2, 3, 40, 48)
    scales = (1.0, 1.5, 1.25)
    dec = lambda W, t: torch.einsum("kc,bchw->bkhw", W, F.avg_pool2d(t, 8))
    got = ms_flip_logits(lambda t: fuse_logits(dec(W1, t), dec(W2, t), "fixed", weights=(0.3, 0.7)), x, scales, flip=False)
    best = None
    for s in scales:
        xs = x if s == 1.0 else F.interpolate(x, size=(int(40 * s), int(48 * s)), mode="bilinear", align_corners=False)
        l1 = F.interpolate(dec(W1, xs), size=(40, 48), mode="bilinear", align_corners=False).numpy()
        l2 = F.interpolate(dec(W2, xs), size=(40, 48), mode="bilinear", align_corners=False).numpy()
        cur = 0.3 * l1 + 0.7 * l2
        best = cur if best is None else np.maximum(best, cur)
    np.testing.assert_allclose(got.numpy(), best, atol=1e-5)
    assert np.array_equal(got.argmax(1).numpy(), best.argmax(1))


# ---------------------------------------------------------------- B-CAM attention propagation
def test_attention_operator_is_row_stochastic_on_a_real_encoder():
    from synernet.models.toco import ToCoNet
    torch.manual_seed(0)
    net = ToCoNet(3, make_config("base")).eval()
    with torch.no_grad(): enc = net.encode(torch.randn(2, 3, 64, 80), attn_blocks=range(-4, 0))
    A = attention_affinity([enc.attn[i] for i in sorted(enc.attn)])
    N = 8 * 10
    assert A.shape == (2, N, N) and (A >= 0).all()
    assert torch.allclose(A.sum(-1), torch.ones(2, N), atol=1e-5)
    # symmetric before the row normalisation: A_ij d_i = A_ji d_j with d the row sums of the symmetrised mean
    Abar = sum(enc.attn[i][:, :, 1:, 1:].mean(1) for i in sorted(enc.attn)) / 4
    S = 0.5 * (Abar + Abar.transpose(1, 2))
    d = S.sum(-1, keepdim=True)
    assert torch.allclose(A * d, (A * d).transpose(1, 2), atol=1e-6)
    uni = torch.full((2, 3, 8, 10), 0.42)
    assert torch.allclose(attention_propagate(uni, A, 2), uni, atol=1e-6)     # a uniform CAM stays uniform
    cam = torch.rand(2, 3, 8, 10)
    P = attention_propagate(cam, A, 3)
    ref = torch.einsum("bij,bcj->bci", torch.linalg.matrix_power(A.double(), 3), cam.flatten(2).double())
    assert torch.allclose(P.flatten(2).double(), ref, atol=1e-5)
    assert torch.allclose(P.flatten(2).sum(-1), (cam.flatten(2) @ A.transpose(1, 2) @ A.transpose(1, 2)
                                                 @ A.transpose(1, 2)).sum(-1), atol=1e-5)


# ---------------------------------------------------------------- cross-supervision routing
TINY = dict(max_iters=3, batch_size=2, log_every=1, eval_every=0, ckpt_every=0, eval_max_images=2,
            final_eval="single", progress=False, seg_start=0, sbce_start=1, cam_scales=(1.0, 0.5))


@pytest.mark.parametrize("cross", [True, False])
def test_cross_supervision_routes_labels(cross, monkeypatch):
    cfg = make_config("synernet", cross_supervision=cross, cam_scales=(1.0,), seg_start=0)
    info = dataset_info(cfg)
    torch.manual_seed(0)
    meth = sm.SynerNetMethod(cfg, info, torch.device("cpu"))
    B, H = 2, 32
    yb, yp = torch.full((B, H, H), 1), torch.full((B, H, H), 2)
    yb[:, :4] = 0; yp[:, -4:] = 0
    monkeypatch.setattr(meth, "pseudo_labels", lambda *a, **k: (yb, yp))
    seen, calls = {}, []
    for k in "bp":
        meth.core.branch(k).decoder.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o))
    real = sm.seg_loss
    monkeypatch.setattr(sm, "seg_loss", lambda logits, labels, **kw: calls.append((logits, labels)) or real(logits, labels, **kw))
    batch = dict(img=torch.randn(B, 3, H, H), cls_label=torch.tensor([[1., 1] + [0] * 6] * B),
                 img_box=torch.tensor([[0, H, 0, H]] * B))
    w = meth.loss_weights(0)
    L = meth.training_step(batch, 0, w)
    assert len(calls) == 2
    up = lambda t: F.interpolate(t, size=(H, H), mode="bilinear", align_corners=False)
    owner = {}
    for logits, labels in calls:
        k = next(k for k in "bp" if torch.equal(logits, up(seen[k])))
        owner[k] = labels
    want = dict(b=yp, p=yb) if cross else dict(b=yb, p=yp)
    assert torch.equal(owner["b"], want["b"]) and torch.equal(owner["p"], want["p"])
    assert torch.isclose(L["seg_p"], real(up(seen["p"]), want["p"], nan_guard=True))


def test_bad_settings_fail_early(tmp_path):
    with pytest.raises(ConfigError, match="bcam_attn_layers=7"):
        Learner(make_config("synernet", out_dir=str(tmp_path / "a"), bcam_attn_layers=7, **TINY))
    with pytest.raises(ValueError, match="out of range for a 6-block"):
        Learner(make_config("synernet", out_dir=str(tmp_path / "b"), conf_layers=(7, 10, 11, 12), **TINY))


# ---------------------------------------------------------------- end to end on the synthetic set
PER_BRANCH = ("b_cam", "p_cam", "b_aux_cam", "p_aux_cam", "b_pseudo_label", "p_pseudo_label", "seg_b", "seg_p", "seg")


@pytest.mark.parametrize("preset,extra", [
    ("synernet_code", {}),
    ("synernet", dict(fusion_in_training=True, proto_contrast=True, proto_start=0)),
    ("synernet", dict(shared_encoder=True, conf_mode="cam", max_iters=2)),
])
def test_end_to_end(preset, extra, tmp_path):
    cfg = make_config(preset, out_dir=str(tmp_path / "run"), **{**TINY, **extra})
    s = Learner(cfg).fit()
    for k in PER_BRANCH: assert 0 <= s["metrics"][f"{k}_miou"] <= 100, k
    assert s["cam_miou"] == s["metrics"]["b_cam_miou"] and s["seg_miou"] == s["metrics"]["seg_miou"]
    assert s["pseudo_label_miou"] == s["metrics"]["b_pseudo_label_miou"]
    assert ("seg_reliable_miou" in s["metrics"]) == (cfg.fusion == "confidence")
    # the mechanism diagnostics (issue 24), with every fusion rule
    for k in ("b_cam_fg_recall", "p_cam_fg_precision", "b_cam_fg_recall_b_minus_p", "b_cam_fg_precision_p_minus_b",
              "conf_reliable_frac", "conf_uncertain_seg_acc", "fusion_seg_gain", "fused_pseudo_label_labelled",
              "fusion_pseudo_label_gain", "fusion_pseudo_label_gain_same_pixels"):
        assert k in s["metrics"], k
    assert ("bcam_affinity_entropy" in s["metrics"]) == cfg.bcam_attn_prop
    if cfg.bcam_attn_prop: assert 0 < s["metrics"]["bcam_affinity_entropy"] <= 1 + 1e-9
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {k for m in lines for k in m if k.startswith("loss_")}
    expect = {"cls_b", "cls_p", "aux_b", "aux_p", "ptc_b", "ptc_p", "csim", "seg_b", "seg_p", "sbce"}
    if extra.get("proto_contrast"): expect |= {"proto"}
    if extra.get("fusion_in_training"): expect |= {"seg_fuse"}
    assert losses == {f"loss_{k}" for k in expect | {"total"}}
    assert any("sbce_phi_mean" in m for m in lines)
    assert all(math.isfinite(m["loss_total"]) for m in lines if "loss_total" in m)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=False)
    assert ck["method"]["banks"].shape[:2] == (2, 8)


def test_diagnostics_known_answers():
    "Hand-built confidence matrix, fused prediction and truth: the diagnostics come out as counted by hand."
    from synernet.ops.confidence import ConfidenceMap
    meth = sm.SynerNetMethod.__new__(sm.SynerNetMethod)
    gt = torch.tensor([[[0, 0, 1, 1], [0, 255, 1, 1]]])
    rel = torch.tensor([[[True, True, True, False], [False, False, True, True]]])
    z = torch.tensor([[[0, 1, 1, 1], [0, 0, 1, 0]]])
    seg = torch.tensor([[[0, 0, 1, 0], [1, 1, 1, 0]]])
    meth._eval_keep = dict(conf=ConfidenceMap(z, rel.float(), rel, rel.float()), seg=seg)
    sums = {k: float(v) for k, v in meth.eval_diagnostics(gt).items()}
    # reliable valid pixels: (0,0) (0,1) (0,2) (1,2) (1,3); uncertain valid: (0,3) (1,0)
    assert (sums["conf_reliable_n"], sums["conf_reliable_seg_ok"], sums["conf_reliable_consensus_ok"]) == (5, 4, 3)
    assert (sums["conf_uncertain_n"], sums["conf_uncertain_seg_ok"], sums["conf_uncertain_consensus_ok"]) == (2, 0, 2)
    res = dict(b_cam_fg_recall=80.0, p_cam_fg_recall=60.0, b_cam_fg_precision=50.0, p_cam_fg_precision=70.0,
               seg_miou=60.0, seg_b_miou=55.0, seg_p_miou=58.0, fused_pseudo_label_miou=70.0,
               b_pseudo_label_miou=72.0, p_pseudo_label_miou=65.0)
    d = meth.diagnostic_scores(sums, res)
    assert (d["b_cam_fg_recall_b_minus_p"], d["b_cam_fg_precision_p_minus_b"]) == (20.0, 20.0)
    assert d["conf_reliable_frac"] == pytest.approx(5 / 7)
    assert (d["conf_reliable_seg_acc"], d["conf_uncertain_seg_acc"]) == (80.0, 0.0)
    assert (d["conf_reliable_consensus_acc"], d["conf_uncertain_consensus_acc"]) == (60.0, 100.0)
    assert (d["fusion_seg_gain"], d["fusion_pseudo_label_gain"]) == (2.0, -2.0)
    assert "fusion_pseudo_label_gain_same_pixels" not in d
    d = meth.diagnostic_scores(sums, dict(res, b_pseudo_label_on_fused_miou=75.0, p_pseudo_label_on_fused_miou=60.0))
    assert d["fusion_pseudo_label_gain_same_pixels"] == -5.0      # against B on the pixels the fused label labels
    assert "b_pseudo_label_fg_recall_b_minus_p" not in d


# ---------------------------------------------------------------- memory at paper scale (GPU only)
@pytest.mark.slow
def test_paper_memory_fits_24gb(tmp_path):
    if not torch.cuda.is_available(): pytest.skip("needs a GPU: the 24 GB budget is a GPU-memory budget")
    from synernet.engine.runs import build_config, train
    cfg = build_config(preset="synernet", dataset="synthetic", scale="paper", pretrained=False, batch_size=2,
                       crop_size=448, max_iters=3, log_every=1, eval_every=0, ckpt_every=0, final_eval="none",
                       progress=False, seg_start=0, sbce_start=0, out_dir=str(tmp_path / "r"))
    _, s = train(cfg)
    assert s["peak_memory_mb"] < 24 * 1024, s["peak_memory_mb"]
