"""Reference parity with ToCo for the CAM notebooks (synernet.ops.cam, synernet.ops.par); see test_reference.py.

Families: cam_to_label, cam_to_roi_mask2, multi_scale_cam2, par, refine_cams_with_bkg_v2. Each check runs in
float64 and in float32 with the tolerances of the fixtures README (section 3). Nothing below depends on case names
or shapes: which path a case takes is decided by the fields it has.
"""
import numpy as np
import torch
import torch.nn.functional as F

from synernet.ops.cam import cam_to_label, cam_to_roi_mask, multi_scale_cam, token_labels, valid_cam
from synernet.ops.par import PAR, refine_cams_with_bkg

DTYPES = (torch.float64, torch.float32)
# ToCo's token grid is that of ViT-B/16: the README defines `img_box_scaled = img_box // 16`.
TOCO_PATCH = 16
# ToCo's PAR dilations (the refine family runs PAR with them; the par family stores its own).
TOCO_DILATIONS = (1, 2, 4, 8, 12, 24)
FRAGILE_MARGIN = 1e-5


def _t(a, dtype=None):
    t = torch.from_numpy(np.asarray(a).copy())
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def _eq(got, want, what):
    got = got.cpu().numpy() if torch.is_tensor(got) else np.asarray(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = got != want
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.size} entries differ, first at {np.argwhere(bad)[0]}"


def _close(got, want, atol, what):
    got = got.detach().cpu().double().numpy()
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max() if got.size else 0.0
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"


# ---------------------------------------------------------------------------------------------------- cam_to_label
def run_cam_to_label(case, glob, name):
    ii = int(case["ignore_index"])
    for dt in DTYPES:
        tag = f"cam_to_label/{name}/{dt}"
        cam, y = _t(case["cam"], dt), _t(case["cls_label"], dt)
        vtol = 1e-12 if dt == torch.float64 else 1e-6
        if "label_compat" in case:                                   # token grid, quirk q3
            kw = dict(bkg_thre=float(case["bkg_thre"]), high_thre=float(case["high_thre"]),
                      low_thre=float(case["low_thre"]), ignore_index=ii)
            box, box_s = case["img_box"], case["img_box_scaled"]
            _eq(box_s, np.floor_divide(box, TOCO_PATCH), f"{tag}: stored img_box_scaled vs img_box // {TOCO_PATCH}")
            assert bool(case.get("ignore_mid", True)), f"{tag}: token labels are defined with ignore_mid=True"
            V, lc = cam_to_label(cam, y, _t(box), ignore_mid=True, box_mode="toco_compat", **kw)
            _close(V, case["valid_cam"], vtol, f"{tag}: valid_cam")
            _eq(lc, case["label_compat"], f"{tag}: label, box_mode='toco_compat'")
            _eq(cam_to_label(cam, y, _t(box), ignore_mid=True, box_mode="pixel", **kw)[1], case["label_compat"],
                f"{tag}: label, box_mode='pixel' (same slicing as toco_compat)")
            _, ls = cam_to_label(cam, y, _t(box), ignore_mid=True, box_mode="scaled", patch=TOCO_PATCH, **kw)
            _eq(ls, case["label_scaled"], f"{tag}: label, box_mode='scaled'")
            _eq(cam_to_label(cam, y, _t(box_s), ignore_mid=True, **kw)[1], case["label_scaled"],
                f"{tag}: label with the pre-scaled box")
            for mode, lab, n in (("toco_compat", "label_compat", "n_valid_compat"),
                                 ("scaled", "label_scaled", "n_valid_scaled")):
                tl = token_labels(cam, y, _t(box), patch=TOCO_PATCH, mode=mode, **kw)
                _eq(tl, case[lab], f"{tag}: token_labels mode={mode!r}")
                _eq((tl != ii).sum((1, 2)), case[n], f"{tag}: {n}")
        elif "img_box" in case:                                      # training rule
            V, L = cam_to_label(cam, y, _t(case["img_box"]), bkg_thre=float(case["bkg_thre"]),
                                high_thre=float(case["high_thre"]), low_thre=float(case["low_thre"]),
                                ignore_mid=bool(case.get("ignore_mid", False)), ignore_index=ii)
            _close(V, case["valid_cam"], vtol, f"{tag}: valid_cam")
            _close(valid_cam(cam, y), case["valid_cam"], vtol, f"{tag}: valid_cam()")
            _eq(L, case["label"], f"{tag}: label")
        else:                                                        # validation rule: label only
            L = cam_to_label(cam, y, bkg_thre=float(case["bkg_thre"]), ignore_index=ii)
            assert torch.is_tensor(L), f"{tag}: without a box cam_to_label must return the label map alone"
            _eq(L, case["label"], f"{tag}: label")


# ------------------------------------------------------------------------------------------------ cam_to_roi_mask2
def run_roi(case, glob, name):
    for dt in DTYPES:
        roi = cam_to_roi_mask(_t(case["cam"], dt), _t(case["cls_label"], dt), float(case["hig_thre"]),
                              float(case["low_thre"]))
        _eq(roi, case["roi"], f"cam_to_roi_mask2/{name}/{dt}: roi")


# ------------------------------------------------------------------------------------------------ multi_scale_cam2
class StubNet(torch.nn.Module):
    "The fixtures' stand-in for ToCo's network: patch conv + ReLU, two bias-free 1x1 heads."
    def __init__(self, glob, dtype):
        super().__init__()
        self.patch = int(glob["model_patch"])
        self.pw, self.pb = _t(glob["model_patch_w"], dtype), _t(glob["model_patch_b"], dtype)
        self.cw, self.aw = _t(glob["model_cls_w"], dtype), _t(glob["model_aux_w"], dtype)

    def cams(self, x):
        f = F.relu(F.conv2d(x, self.pw, self.pb, stride=self.patch))
        return F.conv2d(f, self.cw), F.conv2d(f, self.aw)


def run_msc(case, glob, name):
    for dt, atol in ((torch.float64, 1e-9), (torch.float32, 1e-5)):
        net = StubNet(glob, dt)
        cam, aux = multi_scale_cam(net.cams, _t(glob["x"], dt), tuple(float(s) for s in case["scales"]))
        assert cam.dtype == dt
        _close(cam, case["cam"], atol, f"multi_scale_cam2/{name}/{dt}: cam")
        _close(aux, case["cam_aux"], atol, f"multi_scale_cam2/{name}/{dt}: cam_aux")


# ------------------------------------------------------------------------------------------------------------- par
def run_par(case, glob, name):
    dil = tuple(int(d) for d in glob["dilations"])
    for dt, atol in ((torch.float64, 1e-8), (torch.float32, 2e-5)):
        par = PAR(dilations=dil, num_iter=int(case["num_iter"])).to(dt)
        _close(par.pos, glob["pos"], 1e-12, f"par/{name}/{dt}: pos")
        out = par(_t(case["img"], dt), _t(case["mask"], dt))
        assert out.dtype == dt
        _close(out, case["out"], atol, f"par/{name}/{dt}: out")


# ----------------------------------------------------------------------------------------- refine_cams_with_bkg_v2
def run_refine(case, glob, name):
    ii = int(case["ignore_index"])
    mh, ml = case["margin_high"], case["margin_low"]
    robust_h, robust_l = mh >= FRAGILE_MARGIN, ml >= FRAGILE_MARGIN
    robust = robust_h & robust_l
    assert robust.mean() > 0.99, f"refine/{name}: too many fragile pixels ({int((~robust).sum())}) for a biting check"
    box = _t(case["img_box"])
    inside = np.zeros(robust.shape, bool)
    for b, (r0, r1, c0, c1) in enumerate(case["img_box"]): inside[b, r0:r1, c0:c1] = True
    par = PAR(TOCO_DILATIONS, num_iter=int(case["num_iter"]))
    for dt in DTYPES:
        tag = f"refine_cams_with_bkg_v2/{name}/{dt}"
        imgs, cam, y = _t(case["images"], dt), _t(case["cam"], dt), _t(case["cls_label"], dt)
        cams = _t(case["cams"], dt)
        _close(valid_cam(cam, y), case["cams"], 0.0, f"{tag}: stored cams == cls_label * cam")
        kw = dict(high_thre=float(case["high_thre"]), low_thre=float(case["low_thre"]),
                  down_scale=int(case["down_scale"]), ignore_index=ii)
        lab = refine_cams_with_bkg(par, imgs, cams, y, box, **kw).numpy()
        assert lab.shape == case["label"].shape, f"{tag}: shape {lab.shape}"
        _eq(lab[robust], case["label"][robust], f"{tag}: label on robust pixels")
        _eq(lab[~inside], np.full((~inside).sum(), ii), f"{tag}: 255 outside the box")
        for mode, full, rob in (("high", "label_high_full", robust_h), ("low", "label_low_full", robust_l)):
            got = refine_cams_with_bkg(par, imgs, cams, y, None, mode=mode, **kw).numpy()
            _eq(got[rob], case[full][rob], f"{tag}: mode={mode!r} without a box vs {full}")
            boxed = refine_cams_with_bkg(par, imgs, cams, y, box, mode=mode, **kw).numpy()
            _eq(boxed[rob], np.where(inside, case[full], ii)[rob], f"{tag}: mode={mode!r} with the box")


CHECKS = {
    "cam_to_label": dict(
        fields={"cam", "cls_label", "bkg_thre", "high_thre", "low_thre", "ignore_index", "ignore_mid", "img_box",
                "valid_cam", "label", "img_box_scaled", "label_compat", "label_scaled", "n_valid_compat",
                "n_valid_scaled"},
        globals=set(), run=run_cam_to_label),
    "cam_to_roi_mask2": dict(fields={"cam", "cls_label", "hig_thre", "low_thre", "roi"}, globals=set(), run=run_roi),
    "multi_scale_cam2": dict(
        fields={"scales", "cam", "cam_aux"},
        globals={"model_patch_w", "model_patch_b", "model_cls_w", "model_aux_w", "model_patch", "x"}, run=run_msc),
    "par": dict(fields={"img", "mask", "num_iter", "out"}, globals={"pos", "dilations"}, run=run_par),
    "refine_cams_with_bkg_v2": dict(
        fields={"images", "cam", "cams", "cls_label", "img_box", "high_thre", "low_thre", "ignore_index",
                "down_scale", "num_iter", "label", "label_high_full", "label_low_full", "margin_high", "margin_low"},
        globals=set(), run=run_refine),
}
