"""CAM post-processing, PAR and pseudo-label refinement: properties and independent loop references.

Reference parity with ToCo's own outputs is in _ref_cam.py (run by test_reference.py); here the same functions are
checked against plain per-pixel / per-image loops written from the rules of ToCo's `utils/camutils.py`
(`multi_scale_cam2`, `cam_to_label`, `refine_cams_with_bkg_v2`) and `model/PAR.py`, and against their invariants
(flip equivariance; PAR scales a constant mask by 1.01 per iteration and keeps channel sums of probabilities equal).
"""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synernet.ops.cam import box_mask, cam_to_label, cam_to_roi_mask, multi_scale_cam, token_labels
from synernet.core.config import make_config
from synernet.ops.par import DIRECTIONS, PAR, refine_cams_with_bkg

D64 = torch.float64


# --------------------------------------------------------------------------------------------------- references
def cam_to_label_loop(cam, y, box, bkg, high, low, ignore_mid, ii=255):
    "Per-pixel reading of ToCo's `cam_to_label` (utils/camutils.py) in numpy, the box applied as a Python slice."
    B, C, H, W = cam.shape
    out = np.full((B, H, W), ii)
    for b in range(B):
        lab = np.zeros((H, W), int)
        for i, j in itertools.product(range(H), range(W)):
            v = [y[b, c] * cam[b, c, i, j] for c in range(C)]
            m, k = max(v), int(np.argmax(v))
            L = k + 1 if m > bkg else 0
            if ignore_mid:
                if m <= high: L = ii
                if m <= low: L = 0
            lab[i, j] = L
        r0, r1, c0, c1 = box[b]
        out[b, r0:r1, c0:c1] = lab[r0:r1, c0:c1]
    return out


def par_loop(img, mask, dilations, num_iter, w1=0.3, w2=0.01):
    "Per-pixel PAR (ToCo's model/PAR.py) in numpy float64, exact sqrt(2); mask already at image size."
    C, H, W = img.shape
    offs = [(d * dy, d * dx) for d in dilations for dy, dx in DIRECTIONS]
    pos = np.array([d * (np.sqrt(2) if dy and dx else 1.0) for d in dilations for dy, dx in DIRECTIONS])
    sm = lambda v: np.exp(v - v.max()) / np.exp(v - v.max()).sum()
    pb = sm(-(pos / (pos.std(ddof=1) + 1e-8) / w1) ** 2)
    at = lambda i, j, dy, dx: (min(max(i + dy, 0), H - 1), min(max(j + dx, 0), W - 1))
    A = np.zeros((H, W, len(offs)))
    for i, j in itertools.product(range(H), range(W)):
        nb = np.array([img[(slice(None),) + at(i, j, dy, dx)] for dy, dx in offs])          # [48, C]
        s = nb.std(axis=0, ddof=1)
        a = -((np.abs(nb - img[:, i, j]) / (s + 1e-8) / w1) ** 2).mean(axis=1)
        A[i, j] = sm(a) + w2 * pb
    M = mask.copy()
    for _ in range(num_iter):
        new = np.zeros_like(M)
        for i, j in itertools.product(range(H), range(W)):
            for n, (dy, dx) in enumerate(offs):
                new[(slice(None), i, j)] += A[i, j, n] * M[(slice(None),) + at(i, j, dy, dx)]
        M = new
    return M


def refine_loop(par, images, cams, y, box, high, low, down=2, ii=255):
    """ToCo's per-image refinement (`refine_cams_with_bkg_v2`, utils/camutils.py) as a loop over images, softmax over
    present keys only."""
    B, C, H, W = cams.shape
    h, w = H // down, W // down
    img = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    runs = []
    for tau in (high, low):
        X = F.interpolate(torch.cat([torch.full((B, 1, H, W), tau, dtype=cams.dtype), cams], 1), size=(h, w),
                          mode="bilinear", align_corners=False)
        L = torch.full((B, H, W), ii, dtype=torch.long)
        for b in range(B):
            keys = torch.tensor([0] + [c + 1 for c in range(C) if y[b, c] > 0])
            R = par(img[b:b + 1], X[b, keys][None].softmax(1))
            R = F.interpolate(R, size=(H, W), mode="bilinear", align_corners=False)
            lab = keys[R.argmax(1)[0]]
            r0, r1, c0, c1 = box[b]
            L[b, r0:r1, c0:c1] = lab[r0:r1, c0:c1]
        runs.append(L)
    hi, lo = runs
    Y = hi.clone(); Y[hi == 0] = ii; Y[(hi == 0) & (lo == 0)] = 0
    return Y, hi, lo


def smooth_cams(B, C, H, W, seed, grid=5):
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(B, C, grid, grid, generator=g, dtype=D64), size=(H, W), mode="bilinear",
                         align_corners=False)


# ------------------------------------------------------------------------------------------------- cam_to_label
@pytest.mark.parametrize("ignore_mid,thr", [(True, (0.5, 0.7, 0.25)), (False, (0.5, 0.7, 0.25)),
                                            (True, (0.8, 0.6, 0.3))])   # bkg > high: order of the rules matters
def test_cam_to_label_matches_loop(ignore_mid, thr):
    rng = np.random.default_rng(0)
    cam = np.round(rng.random((3, 3, 9, 11)) * 20) / 20                      # many values exactly at thresholds
    cam += np.arange(3)[None, :, None, None] * 2 ** -16                       # no argmax ties
    y = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 1]], float)
    box = np.array([[0, 9, 0, 11], [2, 7, 3, 30], [12, 20, 0, 11]])           # full, clamped end, start past edge
    V, L = cam_to_label(torch.tensor(cam), torch.tensor(y), torch.tensor(box), *thr, ignore_mid=ignore_mid)
    np.testing.assert_array_equal(L.numpy(), cam_to_label_loop(cam, y, box, *thr, ignore_mid))
    np.testing.assert_array_equal(V.numpy(), y[:, :, None, None] * cam)
    np.testing.assert_array_equal(cam_to_label(torch.tensor(cam), torch.tensor(y), bkg_thre=thr[0]).numpy(),
                                  cam_to_label_loop(cam, y, [[0, 9, 0, 11]] * 3, thr[0], 1, 0, False))


# the token counts of ToCo's cam_to_label for four boxes: tokens kept for a constant CAM of 0.9 on the 28x28 grid
TOKEN_TABLE = [([0, 448, 0, 448], 784, 784), ([10, 300, 0, 448], 504, 504), ([40, 300, 0, 448], 0, 448),
               ([0, 448, 100, 400], 0, 532)]


@pytest.mark.parametrize("box,n_compat,n_scaled", TOKEN_TABLE)
def test_token_count_table(box, n_compat, n_scaled):
    cam = torch.zeros(1, 2, 28, 28); cam[:, 0] = 0.9
    y, b = torch.tensor([[1., 0.]]), torch.tensor([box])
    for mode, n in (("toco_compat", n_compat), ("scaled", n_scaled)):
        assert (token_labels(cam, y, b, mode=mode) != 255).sum().item() == n
        assert (cam_to_label(cam, y, b, ignore_mid=True, box_mode=mode)[1] != 255).sum().item() == n
    # the config default is the fixed mode; ToCo's compat mode is a preset choice
    assert make_config("base").ptc_box_mode == "scaled"


def test_token_labels_scaled_is_box_floor_div_patch():
    rng = np.random.default_rng(1)
    cam = torch.tensor(rng.random((4, 3, 14, 14)))
    y = torch.ones(4, 3)
    box = torch.tensor([[0, 224, 0, 224], [17, 200, 33, 224], [0, 100, 150, 224], [230, 240, 0, 224]])
    for patch in (16, 8):
        want = cam_to_label(cam, y, box // patch, ignore_mid=True)[1]
        assert torch.equal(token_labels(cam, y, box, patch=patch, mode="scaled"), want)
    assert (token_labels(cam, y, box, mode="toco_compat")[[0]] ==
            cam_to_label(cam[[0]], y[[0]], box[[0]], ignore_mid=True)[1]).all()


def test_roi_mask_codes():
    cam = torch.tensor([[[[0.0, 0.25, 0.26, 0.69, 0.7, 0.9]], [[0.95, 0.0, 0.0, 0.0, 0.0, 0.0]]]])
    assert cam_to_roi_mask(cam, torch.tensor([[1., 0.]]), 0.7, 0.25).tolist() == [[[0, 0, 1, 1, 2, 2]]]
    assert cam_to_roi_mask(cam, torch.tensor([[1., 1.]]), 0.7, 0.25).tolist() == [[[2, 0, 1, 1, 2, 2]]]


def test_bad_boxes_are_refused():
    cam, y = torch.rand(2, 3, 8, 8), torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"\[B,4\]"): cam_to_label(cam, y, torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=">= 0"): box_mask(torch.tensor([[0, 4, -2, 4]]), 8, 8)
    with pytest.raises(ValueError, match="integers"): box_mask(torch.tensor([[0, 4.5, 0, 4]]), 8, 8)
    with pytest.raises(ValueError, match="box_mode"): cam_to_label(cam, y, torch.zeros(2, 4, dtype=torch.long),
                                                                  box_mode="tokens")


# ---------------------------------------------------------------------------------------------- multi_scale_cam
class ConvCam(torch.nn.Module):
    "A small non-symmetric conv net whose token grid drops trailing pixels (stride 8, 5x5 kernel)."
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w1 = torch.randn(6, 3, 5, 5, generator=g, dtype=D64)
        self.w2 = torch.randn(4, 6, 1, 1, generator=g, dtype=D64)
        self.w3 = torch.randn(4, 6, 1, 1, generator=g, dtype=D64)

    def __call__(self, x):
        f = F.relu(F.conv2d(x, self.w1, stride=8))
        return F.conv2d(f, self.w2), F.conv2d(f, self.w3)


def test_multi_scale_cam_flip_equivariance_and_range():
    net, x = ConvCam(), torch.rand(2, 3, 50, 66, generator=torch.Generator().manual_seed(0), dtype=D64)
    for scales in ((1.0, 0.5, 1.5), (1.0, 0.75), (1.25,)):
        a = multi_scale_cam(net, x, scales)
        b = multi_scale_cam(net, x.flip(-1), scales)
        assert len(a) == 2 and a[0].shape == (2, 4, 50, 66)
        for u, v in zip(a, b):
            torch.testing.assert_close(v, u.flip(-1), atol=1e-10, rtol=0)
            assert (u >= 0).all() and (u < 1).all()
            assert torch.equal(u.amin((-2, -1)), torch.zeros(2, 4, dtype=D64))


def test_multi_scale_cam_is_sum_over_scales():
    "Against a direct transcription of a.3 with scale 1.0 forced first; one batched forward per scale."
    net, x = ConvCam(), torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1), dtype=D64)
    calls = []
    def fn(t):
        calls.append(t.shape); return net(t)
    got = multi_scale_cam(fn, x, (0.5, 1.5))
    assert [s[0] for s in calls] == [2, 2, 2] and calls[0][-2:] == (40, 56) and calls[1][-2:] == (20, 28)
    tot = 0
    for s in (1.0, 0.5, 1.5):
        xs = F.interpolate(x, size=(int(s * 40), int(s * 56)), mode="bilinear", align_corners=False)
        up = lambda t: F.interpolate(net(t)[0], size=(40, 56), mode="bilinear", align_corners=False)
        tot = tot + F.relu(torch.maximum(up(xs), up(xs.flip(-1)).flip(-1)))
    tot = tot - tot.amin((-2, -1), keepdim=True)
    torch.testing.assert_close(got[0], tot / (tot.amax((-2, -1), keepdim=True) + 1e-5), atol=1e-12, rtol=0)
    assert not got[0].requires_grad


# ------------------------------------------------------------------------------------------------------------ PAR
@pytest.mark.parametrize("dilations,num_iter,shape", [((1, 2, 4, 8, 12, 24), 3, (6, 7)), ((1, 3), 5, (9, 8))])
def test_par_matches_pixel_loop(dilations, num_iter, shape):
    g = torch.Generator().manual_seed(2)
    img = torch.randint(0, 256, (1, 3) + shape, generator=g).to(D64) / 255
    mask = torch.rand((1, 2) + shape, generator=g, dtype=D64)
    got = PAR(dilations, num_iter).to(D64)(img, mask)[0].numpy()
    want = par_loop(img[0].numpy(), mask[0].numpy(), dilations, num_iter)
    np.testing.assert_allclose(got, want, atol=1e-8, rtol=0)      # float32 vs exact sqrt(2): < 1e-9


def test_par_invariants():
    # float64: the affinities reach 1e-25 and below, which float32 keeps only while denormals are not flushed (a run
    # started earlier in the same process flushes them in the threads it creates)
    g = torch.Generator().manual_seed(4)
    img = torch.rand(2, 3, 20, 26, generator=g, dtype=D64)
    for n, w2 in ((10, 0.01), (4, 0.05), (0, 0.01)):
        par = PAR(num_iter=n, w2=w2).to(D64)
        torch.testing.assert_close(par(img, torch.full((2, 3, 20, 26), 0.5, dtype=D64)),
                                   torch.full((2, 3, 20, 26), 0.5 * (1 + w2) ** n, dtype=D64), atol=1e-5, rtol=0)
        prob = torch.rand(2, 4, 10, 13, generator=g, dtype=D64).softmax(1)
        torch.testing.assert_close(par(img, prob).sum(1), torch.full((2, 20, 26), (1 + w2) ** n, dtype=D64), atol=1e-5,
                                   rtol=0)
    assert abs(PAR().to(D64)(img, torch.full((2, 1, 20, 26), 0.5, dtype=D64)).mean().item() - 0.5523111) < 1e-5
    A = PAR().to(D64).affinity(img)
    assert A.shape == (2, 48, 20, 26) and (A > 0).all()
    torch.testing.assert_close(A.sum(1), torch.full((2, 20, 26), 1.01, dtype=D64), atol=1e-6, rtol=0)


def test_par_flip_equivariance():
    g = torch.Generator().manual_seed(5)
    img, mask = torch.rand(2, 3, 22, 30, generator=g, dtype=D64), torch.rand(2, 3, 11, 15, generator=g, dtype=D64)
    par = PAR().to(D64)
    out = par(img, mask)
    for dims in ((-1,), (-2,), (-2, -1)):
        torch.testing.assert_close(par(img.flip(dims), mask.flip(dims)), out.flip(dims), atol=1e-10, rtol=0)


def test_par_upsamples_with_align_corners_true_and_is_batch_independent():
    g = torch.Generator().manual_seed(6)
    img, mask = torch.rand(3, 3, 16, 20, generator=g, dtype=D64), torch.rand(3, 2, 5, 7, generator=g, dtype=D64)
    up = F.interpolate(mask, size=(16, 20), mode="bilinear", align_corners=True)
    torch.testing.assert_close(PAR(num_iter=0)(img, mask), up, atol=0, rtol=0)
    par = PAR().to(D64)
    whole = par(img, mask)
    for b in range(3):
        torch.testing.assert_close(par(img[b:b + 1], mask[b:b + 1]), whole[b:b + 1], atol=1e-13, rtol=0)


def test_par_from_config():
    par = PAR.from_config(make_config("base", par_dilations="1,2", par_iters=3, par_w1=0.5, par_w2=0.0))
    assert (par.dilations, par.num_iter, par.w1, par.w2, len(par.offsets)) == ((1, 2), 3, 0.5, 0.0, 16)
    with pytest.raises(ValueError, match="num_iter"): PAR(num_iter=-1)


# ------------------------------------------------------------------------------------------------------- refine
def test_refine_row_num_iter_0():
    """`refine_cams_with_bkg_v2` of ToCo with PAR(num_iter=0): the thresholds alone. Class 1 has 0.9 / 0.5 / 0.1 on
    columns 0-3 / 4-7 / 8-11, class 2 0.8 on 12-15, box to column 14; row 5 as ToCo's function gives it (column 12
    is an edge effect of the x2 resampling, 14-15 are outside the box)."""
    cams = torch.zeros(1, 2, 16, 16)
    cams[0, 0, :, 0:4], cams[0, 0, :, 4:8], cams[0, 0, :, 8:12], cams[0, 1, :, 12:16] = 0.9, 0.5, 0.1, 0.8
    lab = refine_cams_with_bkg(PAR(num_iter=0), torch.rand(1, 3, 16, 16), cams, torch.tensor([[1., 1.]]),
                               torch.tensor([[0, 16, 0, 14]]))
    assert lab[0, 5].tolist() == [1, 1, 1, 1, 255, 255, 255, 255, 0, 0, 0, 0, 255, 2, 255, 255]
    assert (lab == lab[:, 5:6]).all()                                           # every row is the same


def test_refine_batched_equals_per_image_loop_and_label_set():
    B, C, H, W = 5, 6, 40, 48
    g = torch.Generator().manual_seed(7)
    y = torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 1, 0, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1],
                      [0, 0, 1, 0, 0, 1]], dtype=D64)
    cams = smooth_cams(B, C, H, W, 8) * y[:, :, None, None]
    images = torch.randint(0, 256, (B, 3, H, W), generator=g).to(D64) / 255
    box = torch.tensor([[0, 40, 0, 48], [3, 30, 5, 48], [0, 40, 10, 41], [10, 99, 0, 20], [50, 60, 0, 48]])
    par = PAR().to(D64)
    Y, hi, lo = refine_loop(par, images, cams, y, box.tolist(), 0.7, 0.25)
    assert torch.equal(refine_cams_with_bkg(par, images, cams, y, box), Y)
    assert torch.equal(refine_cams_with_bkg(par, images, cams, y, box, mode="high"), hi)
    assert torch.equal(refine_cams_with_bkg(par, images, cams, y, box, mode="low"), lo)
    inside = box_mask(box, H, W)
    assert (Y[~inside] == 255).all() and not inside[4].any()
    for b in range(B):
        allowed = {0, 255} | {c + 1 for c in range(C) if y[b, c] > 0}
        assert set(Y[b].unique().tolist()) <= allowed
        assert set(hi[b][inside[b]].unique().tolist()) <= allowed - {255}
    assert len(set(Y[inside].unique().tolist())) > 3                                  # the check is not vacuous
    # the three regions: class where hi has one; 0 only where both runs say background
    assert ((Y == hi) | (Y == 255) | ((Y == 0) & (hi == 0) & (lo == 0))).all()
    assert ((hi != 0) | (lo != 0) | ~inside == (Y != 0)).all()


def test_refine_float32_and_unlabelled_cams_are_masked():
    "Absent classes cannot win even with a large raw CAM (the valid-key softmax), in float32 too."
    B, C, H, W = 2, 3, 32, 32
    cams = smooth_cams(B, C, H, W, 9).float()
    y = torch.tensor([[0., 1., 0.], [0., 0., 0.]])
    cams[:, 0] = 1.0                                                               # absent class 1 everywhere high
    lab = refine_cams_with_bkg(PAR(), torch.rand(B, 3, H, W), cams, y, None)
    assert set(lab[0].unique().tolist()) <= {0, 2, 255} and set(lab[1].unique().tolist()) == {0}
    with pytest.raises(ValueError, match="cls_label"): refine_cams_with_bkg(PAR(), torch.rand(B, 3, H, W), cams,
                                                                            torch.ones(B, C + 1), None)


def test_low_precision_inputs_are_upcast():
    "bfloat16 CAMs (e.g. from an autocast region) are processed in float32, close to the float32 result."
    g = torch.Generator().manual_seed(10)
    img, mask = torch.rand(1, 3, 16, 16, generator=g), torch.rand(1, 2, 8, 8, generator=g).softmax(1)
    out = PAR()(img, mask.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, PAR()(img, mask.bfloat16().float()), atol=1e-6, rtol=0)
    net = ConvCam()
    fn = lambda t: tuple(a.bfloat16() for a in net(t.double()))
    got = multi_scale_cam(fn, torch.rand(1, 3, 32, 32, generator=g))
    assert got[0].dtype == torch.float32 and (got[0] < 1).all()
    cams = smooth_cams(1, 2, 16, 16, 11)
    lab = refine_cams_with_bkg(PAR(), img, cams.bfloat16(), torch.ones(1, 2), None)
    assert lab.dtype == torch.long
