"""Losses and metrics: closed forms, independent loop references, crop-sampler properties, the seg-loss NaN guard,
confusion matrix against sklearn, distributed accumulation. Reference parity with ToCo is in _ref_losses.py."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix as sk_confusion_matrix, f1_score

from synernet.core.config import make_config
from synernet.ops.losses import cls_loss, label_to_aff_mask, ptc_loss, crop_from_roi, ctc_loss, seg_loss
from synernet.ops.metrics import Confusion, confusion_matrix, scores, pseudo_scores, multilabel_f1, per_class_table

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --- config ---------------------------------------------------------------------------------------------------
def test_config_keys():
    voc, demo = make_config("base", dataset="voc"), make_config("base")
    assert (voc.seg_loss_nan_guard, voc.ctc_temp, voc.ctc_crop_num, voc.ctc_crop_size, voc.ctc_fill_thre) == \
        (True, 0.5, 8, 96, 0.2)
    assert demo.ctc_crop_size == 32
    with pytest.raises(ValueError, match="ctc_fill_thre"):
        make_config("base", ctc_fill_thre=3)


# --- classification -------------------------------------------------------------------------------------------
def test_cls_loss_is_mean_binary_cross_entropy():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(4, 20, generator=g, dtype=torch.float64), (torch.rand(4, 20, generator=g) < 0.2).double()
    ref = F.binary_cross_entropy(torch.sigmoid(z), y)
    assert torch.allclose(cls_loss(z, y), ref, atol=1e-12)


# --- PTC ------------------------------------------------------------------------------------------------------
def _ptc_numpy(tokens, labels):
    "Loop-free NumPy transcription of a.7 through the explicit aff mask (independent of the torch code path)."
    B, D, h, w = tokens.shape
    f = tokens.reshape(B, D, h * w).transpose(0, 2, 1)
    f = f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-8)
    S = np.abs(f @ f.transpose(0, 2, 1))
    aff = label_to_aff_mask(torch.from_numpy(labels)).numpy()
    pos, neg = aff == 1, aff == 0
    return 0.5 * (1 - S[pos].sum() / (pos.sum() + 1)) + 0.5 * S[neg].sum() / (neg.sum() + 1)


def test_ptc_closed_forms():
    lab = torch.tensor([[[1, 1], [0, 255]]])
    assert math.isclose(ptc_loss(torch.ones(1, 8, 2, 2), lab).item(), 0.5 * (1 - 2 / 3) + 0.5 * 4 / 5, abs_tol=1e-7)
    onehot = torch.eye(4, dtype=torch.float64).reshape(1, 4, 2, 2)
    assert ptc_loss(onehot, torch.ones(1, 2, 2, dtype=torch.long)).item() == 0.5     # all positive, |cos| = 0
    assert ptc_loss(onehot, torch.tensor([[[0, 1], [2, 3]]])).item() == 0.5          # all negative, |cos| = 0
    t = torch.randn(2, 6, 3, 3, dtype=torch.float64, requires_grad=True)
    loss = ptc_loss(t, torch.full((2, 3, 3), 255))
    loss.backward()
    assert loss.item() == 0.5 and t.grad.abs().max().item() == 0.0
    # sign invariance of |cos|: flipping some tokens changes nothing
    x = torch.randn(1, 6, 3, 3, dtype=torch.float64)
    lab = torch.randint(0, 3, (1, 3, 3))
    flip = torch.where(torch.rand(1, 1, 3, 3) < 0.5, -1.0, 1.0).double()
    assert torch.allclose(ptc_loss(x, lab), ptc_loss(x * flip, lab), atol=1e-14)


def test_ptc_seeded_golden():
    # ToCo's get_masked_ptc_loss (model/losses.py) on seeded inputs: the value its code gives (depends on torch's CPU
    # RNG stream; regenerate if the pinned torch changes)
    torch.manual_seed(0)
    f = torch.randn(2, 16, 4, 4)
    l = torch.randint(0, 3, (2, 4, 4))
    l[0, 0, 0] = 255
    assert math.isclose(ptc_loss(f, l).item(), 0.4990744, abs_tol=1e-6)


def test_ptc_matches_numpy_reference_and_gradcheck():
    g = torch.Generator().manual_seed(3)
    for B, D, h, w in ((2, 5, 3, 4), (3, 8, 5, 5)):
        x = torch.randn(B, D, h, w, generator=g, dtype=torch.float64)
        lab = torch.randint(0, 4, (B, h, w), generator=g)
        lab[torch.rand(B, h, w, generator=g) < 0.25] = 255
        assert math.isclose(ptc_loss(x, lab).item(), _ptc_numpy(x.numpy(), lab.numpy()), rel_tol=1e-12)
    x = torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 3, (2, 3, 3), generator=g)
    lab[0, 1, 1] = 255
    assert torch.autograd.gradcheck(lambda t: ptc_loss(t, lab), (x,), eps=1e-6, atol=1e-7)


def test_aff_mask_properties():
    lab = torch.randint(0, 3, (2, 4, 5))
    lab[0, 0, :] = 255
    aff = label_to_aff_mask(lab)
    assert aff.shape == (2, 20, 20) and torch.equal(aff, aff.transpose(1, 2))
    assert (aff.diagonal(dim1=1, dim2=2) == 255).all()
    l = lab.flatten(1)
    for b in range(2):
        for i in range(20):
            for j in range(20):
                want = 255 if i == j or l[b, i] == 255 or l[b, j] == 255 else int(l[b, i] == l[b, j])
                assert aff[b, i, j] == want


# --- crop_from_roi --------------------------------------------------------------------------------------------
def _find_window(img, crop):
    "All (h0, w0) where `crop` [C,s,s] equals the window of `img` [C,H,W] (brute force, independent of the sampler)."
    s = crop.shape[-1]
    win = img.unfold(1, s, 1).unfold(2, s, 1)                     # [C, H-s+1, W-s+1, s, s]
    eq = (win == crop[:, None, None]).flatten(-2).all(-1).all(0)
    return [tuple(p) for p in eq.nonzero().tolist()]


@pytest.mark.parametrize("device", DEVICES)
def test_crop_from_roi_properties(device):
    g = torch.Generator().manual_seed(0)
    B, H, W, s, K = 3, 48, 40, 12, 6
    imgs = torch.randn(B, 3, H, W, generator=g).to(device)        # continuous values: every window is unique
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    roi = torch.zeros(B, H, W, dtype=torch.long)
    r = ((yy - 20) ** 2 + (xx - 22) ** 2).float().sqrt()
    roi[0] = (r < 14).long() + (r < 8).long()                     # object with an uncertain ring
    roi[1] = 1                                                    # all uncertain: every crop positive
    roi[2] = 2                                                    # all confident: no candidate -> every position
    roi[2, 6 + 3, 6 + 3] = 1                                      # ... except one (< K candidates -> fallback)
    roi = roi.to(device)
    crops, flags = crop_from_roi(imgs, roi, crop_num=K, crop_size=s, generator=g)
    assert len(crops) == K and all(c.shape == (B, 3, s, s) for c in crops)
    assert flags.shape == (B, K + 2) and (flags[:, :2] == 1).all()
    m = s // 2
    for b in range(B):
        seen = set()
        for k in range(K):
            pos = _find_window(imgs[b].cpu(), crops[k][b].cpu())
            assert len(pos) == 1, "a crop must be exactly one image window"
            h0, w0 = pos[0]
            assert 0 <= h0 < H - 2 * m and 0 <= w0 < W - 2 * m
            if b < 2:
                assert roi[b, h0 + m, w0 + m] <= 1, "crop centred on confident foreground"
            fill = roi[b, h0:h0 + s, w0:w0 + s].sum().item() / s ** 2
            assert flags[b, 2 + k].item() == int(fill > 0.2)
            seen.add((h0, w0))
        assert len(seen) == K, "corners are drawn without replacement"
    assert (flags[1, 2:] == 1).all()
    # image 2 has 1 candidate < K: the fallback draws K distinct corners from all positions, so >= K-1 are centred on
    # confident foreground
    centres = [_find_window(imgs[2].cpu(), crops[k][2].cpu())[0] for k in range(K)]
    assert sum(int(roi[2, h + m, w + m] == 2) for h, w in centres) >= K - 1
    assert flags[2, 2:].sum() == K                                # roi ~2 everywhere: fill > 0.2


def test_crop_from_roi_candidates_and_reproducibility():
    H = W = 64
    s, K = 16, 8
    imgs = torch.arange(H * W, dtype=torch.float64).reshape(1, 1, H, W).expand(1, 3, H, W).contiguous()
    roi = torch.full((1, H, W), 2, dtype=torch.long)
    roi[0, 20:30, 12:22] = 1                                      # exactly 100 candidate centres
    allowed = {(h - 8, w - 8) for h in range(20, 30) for w in range(12, 22)}
    hits = {c: 0 for c in allowed}
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        _, flags, corners = crop_from_roi(imgs, roi, K, s, generator=gen, return_corners=True)
        cs = {tuple(c) for c in corners[0].tolist()}
        assert cs <= allowed and len(cs) == K
        for c in cs:
            hits[c] += 1
    # uniform over the candidates: each is drawn Binomial(200, 0.08) times (mean 16, sd 3.8)
    assert min(hits.values()) >= 3 and max(hits.values()) <= 35
    a = crop_from_roi(imgs, roi, K, s, generator=torch.Generator().manual_seed(5), return_corners=True)[2]
    b = crop_from_roi(imgs, roi, K, s, generator=torch.Generator().manual_seed(5), return_corners=True)[2]
    assert torch.equal(a, b)
    # fewer than K candidates: every position is a candidate
    roi2 = torch.full((1, H, W), 2, dtype=torch.long)
    roi2[0, 30, 30] = 0
    _, _, corners = crop_from_roi(imgs, roi2, K, s, generator=torch.Generator().manual_seed(0), return_corners=True)
    assert len({tuple(c) for c in corners[0].tolist()}) == K


def test_crop_from_roi_toco_scale_and_fill_threshold():
    # ToCo's cam_to_roi_mask2 / crop_from_roi_neg (utils/camutils.py): a 448 image, roi 2 in [100:300]^2, 1 in the
    # ring [80:320]^2, 0 elsewhere
    roi = torch.zeros(1, 448, 448, dtype=torch.long)
    roi[0, 80:320, 80:320] = 1
    roi[0, 100:300, 100:300] = 2
    assert [int((roi == v).sum()) for v in (0, 1, 2)] == [143104, 17600, 40000]
    imgs = torch.randn(1, 3, 448, 448)
    crops, flags, corners = crop_from_roi(imgs, roi, 8, 96, generator=torch.Generator().manual_seed(0),
                                          return_corners=True)
    assert len(crops) == 8 and crops[0].shape == (1, 3, 96, 96) and flags.shape == (1, 10)
    for k, (h0, w0) in enumerate(corners[0].tolist()):
        assert torch.equal(crops[k][0], imgs[0, :, h0:h0 + 96, w0:w0 + 96]) and roi[0, h0 + 48, w0 + 48] <= 1
        assert flags[0, 2 + k] == int(roi[0, h0:h0 + 96, w0:w0 + 96].sum() / 9216 > 0.2)
    # the boundary is "<= thre -> negative": a crop with fill exactly 0.25 is negative at thre 0.25
    roi = torch.zeros(1, 8, 8, dtype=torch.long)
    roi[0, ::2, ::2] = 1                                          # every 2x2 block holds one 1: fill 1/4 everywhere
    _, flags = crop_from_roi(torch.zeros(1, 1, 8, 8), roi, 4, 4, fill_thre=0.25)
    assert (flags[0, 2:] == 0).all()
    _, flags = crop_from_roi(torch.zeros(1, 1, 8, 8), roi, 4, 4, fill_thre=0.24)
    assert (flags[0, 2:] == 1).all()


def test_crop_from_roi_bad_input():
    with pytest.raises(ValueError, match="same size"):
        crop_from_roi(torch.zeros(1, 3, 32, 32), torch.zeros(1, 16, 16), 2, 8)
    with pytest.raises(ValueError, match="lower ctc_crop_size"):
        crop_from_roi(torch.zeros(1, 3, 32, 32), torch.zeros(1, 32, 32), 2, 32)


# --- CTC ------------------------------------------------------------------------------------------------------
def _ctc_loop(student, teacher, flags, temp):
    "ToCo's CTCLoss_neg (model/losses.py), one image at a time, in the exp/ratio form."
    B, V = flags.shape
    total = 0.0
    for i in range(B):
        S, T = student[torch.arange(V) * B + i], teacher[torch.arange(2) * B + i]
        E = torch.exp(T @ S.T / temp)
        neg = E[:, flags[i] == 0].sum(1)
        l = -torch.log(1 / (1 + neg + 1e-4))
        for v in range(V):
            if flags[i, v]:
                l = l - torch.log(E[:, v] / (E[:, v] + neg + 1e-4))
        total = total + (l[0] + l[1]) / 2 / (float(flags[i].sum()) + 1e-4)
    return total / B


def test_ctc_matches_loop_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    B, V, D = 4, 7, 12
    flags = (torch.rand(B, V, generator=g) < 0.6).long()
    flags[:, :2] = 1
    flags[0, 2:] = 0                                              # every local crop negative
    flags[1, 2:] = 1                                              # no negative
    for temp in (0.5, 1.0):
        s = 0.4 * torch.randn(V * B, D, generator=g, dtype=torch.float64)
        t = 0.4 * torch.randn(2 * B, D, generator=g, dtype=torch.float64)
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
        a, b = ctc_loss(s1, t1, flags, temp), _ctc_loop(s2, t2, flags, temp)
        a.backward(); b.backward()
        assert math.isclose(a.item(), b.item(), rel_tol=1e-12)
        assert torch.allclose(s1.grad, s2.grad, atol=1e-13) and torch.allclose(t1.grad, t2.grad, atol=1e-13)


def test_ctc_seeded_golden_and_no_negative_case():
    # ToCo's CTCLoss_neg (model/losses.py) on seeded inputs: the value its code gives (depends on torch's CPU RNG stream)
    torch.manual_seed(0)
    s, t = torch.randn(20, 16) * 0.3, torch.randn(4, 16) * 0.3
    flags = torch.tensor([[1, 1, 1, 0, 1, 1, 1, 0, 1, 1], [1, 1, 1, 1, 1, 0, 1, 1, 1, 1]])
    assert math.isclose(ctc_loss(s, t, flags, 0.5).item(), 0.8838784, abs_tol=1e-6)
    assert math.isclose(ctc_loss(s, t, torch.ones(2, 10), 0.5).item(), 1.6466e-4, rel_tol=1e-3)


def test_ctc_large_logits_stay_finite():
    # ToCo's exp/ratio form overflows in float32 for large T.S/temp; the log-domain form does not
    s = torch.full((10, 4), 10.0)
    t = torch.full((2, 4), 10.0, requires_grad=True)
    loss = ctc_loss(s, t, torch.tensor([[1, 1, 1, 0, 1, 0, 1, 1, 1, 1]]), 0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(t.grad).all()
    # every logit is 800: each of the 8 positives gives log 3, the for-else term log(1 + 2 e^800) = 800 + log 2
    assert math.isclose(loss.item(), (8 * math.log(3) + 800 + math.log(2)) / 8.0001, rel_tol=1e-6)


def test_ctc_bad_shapes():
    with pytest.raises(ValueError, match="expected student"):
        ctc_loss(torch.zeros(19, 4), torch.zeros(4, 4), torch.ones(2, 10))


# --- seg loss -------------------------------------------------------------------------------------------------
def test_seg_loss_by_hand_and_nan_guard():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6, 6, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (2, 6, 6), generator=g)
    y[:, 0] = 255
    lp = x.log_softmax(1)
    nll = -lp.gather(1, y.clamp(max=3)[:, None])[:, 0]
    bg, fg = y == 0, (y > 0) & (y < 255)
    by_hand = 0.5 * (nll[bg].mean() + nll[fg].mean())
    assert torch.allclose(seg_loss(x, y), by_hand, atol=1e-13)
    assert torch.allclose(seg_loss(x, y, nan_guard=False), by_hand, atol=1e-13)
    # q4: no foreground -> NaN without the guard, the background CE alone with it
    only_bg = torch.where(y == 0, 0, 255)
    assert torch.isnan(seg_loss(x, only_bg, nan_guard=False))
    assert torch.allclose(seg_loss(x, only_bg), nll[bg].mean(), atol=1e-13)
    only_fg = torch.where(fg, y, 255)
    assert torch.isnan(seg_loss(x, only_fg, nan_guard=False))
    assert torch.allclose(seg_loss(x, only_fg), nll[fg].mean(), atol=1e-13)
    # the guarded loss's gradient flows only through the available part
    (gx,) = torch.autograd.grad(seg_loss(x, only_bg), x)
    assert torch.isfinite(gx).all() and (gx[:, :, 0] == 0).all()
    # nothing labelled: a graph-connected zero
    z = seg_loss(x, torch.full_like(y, 255))
    assert z.item() == 0.0 and z.requires_grad
    (gz,) = torch.autograd.grad(z, x)
    assert (gz == 0).all()


def test_seg_loss_ignores_custom_index():
    x = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (1, 4, 4))
    y[0, 0] = 255
    assert torch.allclose(seg_loss(x, y), seg_loss(x, torch.where(y == 255, 7, y), ignore_index=7))


# --- metrics --------------------------------------------------------------------------------------------------
def test_confusion_matrix_hand_example():
    # ToCo's evaluate.scores (utils/evaluate.py) by hand: pAcc 5/7, mAcc 5/9, IoU [0.75, 0.5, 0], mIoU 5/12
    gts = [np.array([[0, 1], [2, 255]]), np.array([[1, 1], [0, 0]])]
    preds = [np.array([[0, 1], [1, 0]]), np.array([[1, 0], [0, 0]])]
    hist = sum(confusion_matrix(g, p, 3) for g, p in zip(gts, preds))
    np.testing.assert_array_equal(hist, [[3, 0, 0], [1, 2, 0], [0, 1, 0]])
    s = scores(hist)
    assert math.isclose(s["pAcc"], 5 / 7) and math.isclose(s["mAcc"], 5 / 9) and math.isclose(s["miou"], 5 / 12)
    np.testing.assert_allclose(s["iou"], [0.75, 0.5, 0.0])
    c = Confusion(21)
    for g, p in zip(gts, preds):
        c.update(g, p)
    assert math.isclose(c.scores()["miou"], 5 / 12)
    assert math.isclose(scores(confusion_matrix(np.array([[0, 0], [1, 1]]), np.array([[0, 2], [1, 1]]), 3))["miou"], 0.75)


@pytest.mark.parametrize("device", DEVICES)
def test_confusion_matrix_vs_sklearn(device):
    rng = np.random.default_rng(0)
    K = 7
    c = Confusion(K)
    gts, preds = [], []
    for shape in ((13, 17), (2, 9, 11), (40,)):
        gt = rng.integers(0, K, shape)
        gt[rng.random(shape) < 0.2] = 255
        pred = rng.integers(0, K, shape)
        agree = (rng.random(shape) < 0.5) & (gt != 255)
        pred[agree] = gt[agree]                                   # a realistic, diagonal-heavy matrix
        gts.append(gt); preds.append(pred)
        m = gt != 255
        want = sk_confusion_matrix(gt[m], pred[m], labels=list(range(K)))
        np.testing.assert_array_equal(confusion_matrix(gt, pred, K), want)
        got = confusion_matrix(torch.from_numpy(gt).to(device), torch.from_numpy(pred).to(device), K)
        assert got.device.type == device
        np.testing.assert_array_equal(got.cpu().numpy(), want)
        c.update(torch.from_numpy(gt).to(device), torch.from_numpy(pred).to(device))
    assert c.counts.device.type == device
    allm = np.concatenate([g.ravel() for g in gts]) != 255
    want = sk_confusion_matrix(np.concatenate([g.ravel() for g in gts])[allm],
                               np.concatenate([p.ravel() for p in preds])[allm], labels=list(range(K)))
    np.testing.assert_array_equal(c.counts.cpu().numpy(), want)
    # scores against an independent per-class computation
    s = c.scores()
    for k in range(K):
        g, p = np.concatenate([x.ravel() for x in gts])[allm], np.concatenate([x.ravel() for x in preds])[allm]
        inter, union = ((g == k) & (p == k)).sum(), ((g == k) | (p == k)).sum()
        assert math.isclose(s["iou"][k], inter / union)


def test_scores_nan_rules_and_pseudo_scores():
    h = np.zeros((4, 4), np.int64)
    h[0, 0], h[1, 1], h[1, 0], h[0, 3] = 5, 3, 1, 2               # class 2 absent everywhere, class 3 only predicted
    s = scores(h)
    assert np.isnan(s["iou"][2]) and s["iou"][3] == 0.0
    assert math.isclose(s["miou"], (5 / 8 + 3 / 4) / 2)           # class 3 predicted but absent from GT: excluded
    assert math.isclose(s["mAcc"], (5 / 7 + 3 / 4) / 2)
    assert np.isnan(scores(np.zeros((3, 3)))["miou"])
    gt = [np.array([0, 1, 1, 2, 255]), np.array([[2, 2], [0, 1]])]
    pr = [np.array([0, 255, 1, 255, 1]), np.array([[2, 255], [1, 1]])]
    ps = pseudo_scores(gt, pr, 3)
    keep = [(g != 255) & (p != 255) for g, p in zip(gt, pr)]
    want = sk_confusion_matrix(np.concatenate([g[k] for g, k in zip(gt, keep)]),
                               np.concatenate([p[k] for p, k in zip(pr, keep)]), labels=[0, 1, 2])
    np.testing.assert_array_equal(ps["hist"], want)
    with pytest.raises(ValueError, match="drop_ignored_pred"):
        Confusion(3).update(gt[0], pr[0])


def test_bad_label_maps_raise():
    with pytest.raises(ValueError, match="is num_classes right"):
        confusion_matrix(np.array([0, 21]), np.array([0, 1]), 21)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), 3)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, -1]), 3)


def test_multilabel_f1_vs_sklearn():
    rng = np.random.default_rng(1)
    z, y = rng.normal(size=(40, 20)), (rng.random((40, 20)) < 0.15).astype(np.float32)
    y[0], z[0] = 0, -1                                            # nothing true and nothing predicted
    y[1], z[1] = 0, 1                                             # nothing true, everything predicted
    want = [f1_score(t, p > 0, zero_division=0) for p, t in zip(z, y)]
    np.testing.assert_allclose(multilabel_f1(z, y), want, atol=1e-12)
    assert math.isclose(multilabel_f1(torch.tensor(z[3]), torch.tensor(y[3])), want[3])


def test_per_class_table():
    s = scores(np.array([[3, 0, 0], [1, 2, 0], [0, 1, 0]]))
    t = per_class_table({"CAM": s, "Seg": s}, ["bg", "a", "b"])
    assert list(t.columns) == ["CAM", "Seg"] and list(t.index) == ["bg", "a", "b", "mean"]
    np.testing.assert_allclose(t["CAM"].values, [75, 50, 0, 100 * 5 / 12])
    with pytest.raises(ValueError, match="class names"):
        per_class_table(s, ["bg"])


def _dist_worker(rank, world, port, out):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        rng = np.random.default_rng(rank)
        gt, pred = rng.integers(0, 5, (20, 20)), rng.integers(0, 5, (20, 20))
        c = Confusion(5).update(torch.from_numpy(gt), torch.from_numpy(pred))
        local = c.counts.clone()
        red = c.all_reduce()
        assert torch.equal(c.counts, local), "all_reduce must not change the local counts"
        torch.save(dict(local=local, reduced=red.counts), os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_confusion_all_reduce_two_processes(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    total = r[0]["local"] + r[1]["local"]
    assert not torch.equal(r[0]["local"], r[1]["local"])
    assert torch.equal(r[0]["reduced"], total) and torch.equal(r[1]["reduced"], total)
