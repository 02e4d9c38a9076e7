"""Reference parity of the losses and the evaluation metrics with ToCo (fixture families `label_to_aff_mask`,
`ptc_loss`, `seg_loss`, `ctc_loss`, `evaluate_scores`; see tests/fixtures/toco/README.md).

Protocol: see test_reference.py. Each check runs the case in float64 (autograd in float64, the README's f64
tolerances) and again on float32-cast inputs (the README's f32 tolerances). Nothing here depends on case names,
shapes or values: the case's own fields decide what is checked.
"""
import numpy as np
import torch
import torch.nn.functional as F

from synernet.ops.losses import label_to_aff_mask, ptc_loss, seg_loss, ctc_loss
from synernet.ops.metrics import Confusion, confusion_matrix, scores, pseudo_scores

DTYPES = (torch.float64, torch.float32)


def _close(got, want, atol=0.0, rtol=0.0, what=""):
    got = got.detach().double().cpu().numpy() if isinstance(got, torch.Tensor) else np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
        err = np.nanmax(np.abs(got - want)) if got.size else 0.0
        raise AssertionError(f"{what}: max abs diff {err:.3g} exceeds atol {atol:g} / rtol {rtol:g}")


def _grad_of(fn, *xs):
    xs = [x.clone().requires_grad_(True) for x in xs]
    out = fn(*xs)
    grads = torch.autograd.grad(out, xs, allow_unused=True) if out.requires_grad else [None] * len(xs)
    return out.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


# --- label_to_aff_mask ---------------------------------------------------------------------------------------
def run_aff(case, glob, name):
    labels = torch.from_numpy(case["labels"])
    aff = label_to_aff_mask(labels)
    assert aff.dtype == torch.int64, f"{name}: aff dtype {aff.dtype}"
    assert torch.equal(aff, aff.transpose(1, 2)), f"{name}: mask not symmetric"
    np.testing.assert_array_equal(aff.numpy(), case["aff"], err_msg=f"label_to_aff_mask/{name}")


# --- ptc_loss ------------------------------------------------------------------------------------------------
PTC_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-6, 1e-7)}   # loss atol, gradient atol


def run_ptc(case, glob, name):
    labels = torch.from_numpy(case["labels"])
    aff = label_to_aff_mask(labels)
    if "aff" in case:
        np.testing.assert_array_equal(aff.numpy(), case["aff"], err_msg=f"ptc_loss/{name}: aff")
    n_pos, n_neg = int((aff == 1).sum()), int((aff == 0).sum())
    assert (n_pos, n_neg) == (int(case["n_pos"]), int(case["n_neg"])), \
        f"ptc_loss/{name}: pair counts {(n_pos, n_neg)} != {(int(case['n_pos']), int(case['n_neg']))}"
    for dt in DTYPES:
        loss, (grad,) = _grad_of(lambda t: ptc_loss(t, labels), torch.from_numpy(case["tokens"]).to(dt))
        assert loss.dtype == dt and grad.dtype == dt
        atol_l, atol_g = PTC_TOL[dt]
        _close(loss, case["loss"], atol=atol_l, what=f"ptc_loss/{name}/{dt}: loss")
        _close(grad, case["grad"], atol=atol_g, what=f"ptc_loss/{name}/{dt}: grad")
        if n_pos == 0 and n_neg == 0:      # nothing valid: exactly 0.5, exactly zero gradient
            assert loss.item() == 0.5 and grad.abs().max().item() == 0.0, f"ptc_loss/{name}/{dt}: not exactly 0.5 / 0"


# --- seg_loss ------------------------------------------------------------------------------------------------
SEG_TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-7)}   # loss rtol, gradient atol


def run_seg(case, glob, name):
    ign = int(glob["ignore_index"])
    label = torch.from_numpy(case["label"])
    want = float(case["loss"])
    for dt in DTYPES:
        pred = torch.from_numpy(case["pred"]).to(dt)
        rtol, atol_g = SEG_TOL[dt]
        raw, (g_raw,) = _grad_of(lambda x: seg_loss(x, label, nan_guard=False, ignore_index=ign), pred)
        guarded, (g_guard,) = _grad_of(lambda x: seg_loss(x, label, nan_guard=True, ignore_index=ign), pred)
        if np.isnan(want):                 # quirk q4: ToCo's NaN without the guard
            assert torch.isnan(raw), f"seg_loss/{name}/{dt}: expected ToCo's NaN with nan_guard=False, got {raw}"
            assert torch.isfinite(guarded) and torch.isfinite(g_guard).all(), f"seg_loss/{name}/{dt}: guard gave NaN"
            # the single available part is the plain CE over every labelled pixel; nothing labelled -> 0, no gradient
            if (label != ign).any():
                ref, (g_ref,) = _grad_of(lambda x: F.cross_entropy(x, label, ignore_index=ign), pred)
                _close(guarded, ref, rtol=rtol, what=f"seg_loss/{name}/{dt}: guarded value")
                _close(g_guard, g_ref, atol=atol_g, what=f"seg_loss/{name}/{dt}: guarded grad")
            else:
                assert guarded.item() == 0.0 and g_guard.abs().max().item() == 0.0, f"seg_loss/{name}/{dt}: not 0"
        else:
            for got, g in ((raw, g_raw), (guarded, g_guard)):
                _close(got, want, rtol=rtol, what=f"seg_loss/{name}/{dt}: loss")
                if "grad" in case:
                    _close(g, case["grad"], atol=atol_g, what=f"seg_loss/{name}/{dt}: grad")


# --- ctc_loss ------------------------------------------------------------------------------------------------
CTC_TOL = {torch.float64: (0.0, 1e-10, 1e-12), torch.float32: (1e-6, 1e-4, 1e-6)}   # loss atol, rtol; grad atol


def run_ctc(case, glob, name):
    flags = torch.from_numpy(case["flags"])
    assert int(case["ncrops"]) == flags.shape[1], f"ctc_loss/{name}: ncrops != flags.shape[1]"
    temp = float(case["temp"])
    for dt in DTYPES:
        s, t = torch.from_numpy(case["student"]).to(dt), torch.from_numpy(case["teacher"]).to(dt)
        for fl in (flags, flags.to(dt)):   # ToCo holds the flags as floats; ours may be int
            loss, (gs, gt) = _grad_of(lambda a, b: ctc_loss(a, b, fl, temp=temp), s, t)
            atol, rtol, atol_g = CTC_TOL[dt]
            _close(loss, case["loss"], atol=atol, rtol=rtol, what=f"ctc_loss/{name}/{dt}: loss")
            _close(gs, case["grad_student"], atol=atol_g, what=f"ctc_loss/{name}/{dt}: grad_student")
            _close(gt, case["grad_teacher"], atol=atol_g, what=f"ctc_loss/{name}/{dt}: grad_teacher")


# --- evaluate_scores -----------------------------------------------------------------------------------------
MAX_MAPS = 1000


def run_scores(case, glob, name):
    K, n = int(case["num_classes"]), int(case["n_maps"])
    keys = {k for k in case if k.startswith(("gt_", "pred_"))}
    assert keys == {f"{p}_{i}" for i in range(n) for p in ("gt", "pred")}, f"evaluate_scores/{name}: map keys {keys}"
    gts, preds = [case[f"gt_{i}"] for i in range(n)], [case[f"pred_{i}"] for i in range(n)]

    def check(res, hist, what):
        np.testing.assert_array_equal(np.asarray(hist, np.float64), case["hist"], err_msg=f"{what}: hist")
        for k in ("pAcc", "mAcc", "iou", "miou"):
            _close(res[k], case[k], rtol=1e-12, what=f"{what}: {k}")

    # pseudo_scores equals ToCo's `scores` when no prediction is 255, and is ToCo's `pseudo_scores` otherwise
    ps = pseudo_scores(gts, preds, K)
    check(ps, ps["hist"], f"evaluate_scores/{name}: pseudo_scores")
    plain_valid = all(((p >= 0) & (p < K))[(g >= 0) & (g < K)].all() for g, p in zip(gts, preds))
    for device_maps in (False, True):     # numpy maps and torch maps through the accumulator
        c = Confusion(K)
        try:
            for g, p in zip(gts, preds):
                c.update(torch.from_numpy(g), torch.from_numpy(p)) if device_maps else c.update(g, p)
        except ValueError:
            assert not plain_valid, f"evaluate_scores/{name}: valid maps rejected"
            continue
        assert plain_valid, f"evaluate_scores/{name}: predictions outside [0, K) at labelled pixels were accepted"
        check(c.scores(), c.counts.numpy(), f"evaluate_scores/{name}: Confusion")
        check(scores(sum(confusion_matrix(g, p, K) for g, p in zip(gts, preds))), c.counts.numpy(),
              f"evaluate_scores/{name}: confusion_matrix + scores")


CHECKS = {
    "label_to_aff_mask": dict(fields={"labels", "aff"}, globals=set(), run=run_aff),
    "ptc_loss": dict(fields={"tokens", "labels", "aff", "loss", "grad", "n_pos", "n_neg"}, globals=set(), run=run_ptc),
    "seg_loss": dict(fields={"pred", "label", "loss", "grad"}, globals={"ignore_index"}, run=run_seg),
    "ctc_loss": dict(fields={"student", "teacher", "flags", "ncrops", "temp", "loss", "grad_student", "grad_teacher"},
                     globals=set(), run=run_ctc),
    "evaluate_scores": dict(fields={"num_classes", "n_maps", "hist", "pAcc", "mAcc", "iou", "miou"}
                            | {f"{p}_{i}" for i in range(MAX_MAPS) for p in ("gt", "pred")},
                            globals=set(), run=run_scores),
}
