"""Whole-iteration parity of the `toco` preset with ToCo's own training step (fixture family `toco_step`).

Each case of `tests/fixtures/toco_step/toco_step.npz` (or `$SYNERNET_FIXTURES_ROOT/toco_step/`) is one iteration of
ToCo's VOC training loop computed with ToCo's own code from the same stored initial weights (its README describes every
key). This test builds the `toco` preset at the fixture's sizes through config keys alone, loads the weights through
the ToCo name map (`synernet.models.toco.load_toco_state_dict`), starts the optimiser and schedule at the case's iteration with
the stored AdamW moments, gives the local-crop sampler ToCo's drawn corners, and runs the project's own iteration
(`synernet.engine.learner.train_iteration`, the code path of `Learner.fit`). It then compares every stored quantity: network
outputs, ROI mask and crop flags, both pseudo-label maps, each named loss and the total, each group's learning rate,
every gradient (and which parameters get none), the group gradient norms, every parameter after the update and the
teacher head after its EMA update.

Nothing depends on case names, shapes or values: cases are dispatched on the keys they hold, and a key that no check
consumes fails the test (another fixture set of the same format must pass unchanged).
"""
import types

import numpy as np
import pytest
import torch

from _parity import assert_close as _close, assert_grads, assert_labels as _labels, assert_params_after, load_family
import synernet.methods.toco  # noqa: F401  (registers the method and the preset)
import synernet.methods.dskd  # noqa: F401  (the DSKD presets built on the same step)
from synernet.core.config import make_config
from synernet.engine.learner import METHODS, train_iteration
from synernet.models.toco import load_toco_state_dict, set_adamw_state, toco_name

FAMILY = "toco_step"

# fixture hyper-parameter -> config key (value converted by the function)
HP_TO_CONFIG = {
    "lr": ("lr", float), "warmup_lr": ("warmup_ratio", float), "wt_decay": ("weight_decay", float),
    "power": ("poly_power", float), "max_iters": ("max_iters", int), "warmup_iters": ("warmup_iters", int),
    "high_thre": ("high_thre", float), "low_thre": ("low_thre", float), "bkg_thre": ("bkg_thre", float),
    "w_ptc": ("w_ptc", float), "w_ctc": ("w_ctc", float), "w_seg": ("w_seg", float), "temp": ("ctc_temp", float),
    "momentum": ("ctc_head_momentum", float), "aux_layer": ("aux_layer", int),
    "local_crop_size": ("ctc_crop_size", int), "ncrops": ("ctc_crop_num", lambda v: int(v) - 2),
    "par_num_iter": ("par_iters", int), "par_dilations": ("par_dilations", lambda v: tuple(int(x) for x in v)),
    "cam_scales": ("cam_scales", lambda v: tuple(float(x) for x in v)),
    "patch_size": ("vit_patch_size", int), "embed_dim": ("vit_embed_dim", int), "depth": ("vit_depth", int),
    "num_heads": ("vit_num_heads", int), "mlp_ratio": ("vit_mlp_ratio", float), "vit_img_size": ("vit_img_size", int),
    "decoder_width": ("decoder_dim", int), "ctc_hidden": ("proj_hidden", int), "ctc_bottleneck": ("proj_bottleneck", int),
    "ctc_out": ("proj_dim", int),
    # ToCo switches the segmentation loss on for n > seg_switch_iter; here it is on from seg_start on
    "seg_switch_iter": ("seg_start", lambda v: int(v) + 1),
}
# fixture hyper-parameters that are not config keys: each is checked against what the built network/optimiser uses
HP_CHECKED = {"beta1", "beta2", "eps", "ln_eps", "decoder_dilation", "ignore_index", "num_classes", "w_reg"}

# stored per-case output -> (trace key of the step, kind)
TRACED = {
    "cls": ("cls_logits", "logits"), "cls_aux": ("cls_aux_logits", "logits"), "fmap": ("feat", "logits"),
    "segs": ("seg_logits", "logits"), "out_t": ("proj_teacher", "logits"), "out_s": ("proj_student", "logits"),
    "cams_aux": ("cam_aux", "logits"), "roi_mask": ("roi", "labels"), "flags": ("crop_flags", "labels"),
    "refined_pseudo_label": ("seg_labels", "labels"), "pseudo_label_aux": ("token_labels", "labels"),
}
LOSSES = {"cls_loss": "cls", "cls_loss_aux": "aux", "ptc_loss": "ptc", "ctc_loss": "ctc", "seg_loss": "seg"}
INPUTS = {"n_iter", "inputs", "crop_global2", "crop_local_src", "cls_label", "img_box", "crop_pos", "crop_fallback"}

# the README's tolerances per implementation precision
TOL = {
    torch.float64: dict(logits=dict(atol=1e-9, rtol=0), loss=dict(rtol=1e-9, atol=0), grad=dict(atol=1e-10, rtol=1e-8),
                        param=dict(atol=1e-12, rtol=1e-10), lr=dict(atol=1e-12, rtol=1e-10), labels_frac=0.0),
    torch.float32: dict(logits=dict(atol=1e-4, rtol=0), loss=dict(rtol=1e-4, atol=0), grad=dict(atol=1e-6, rtol=1e-3),
                        param=dict(atol=1e-6, rtol=0), lr=dict(atol=1e-6, rtol=0), labels_frac=0.001),
}


(CASES,), GLOB = load_family(FAMILY)


def config_from_fixture(glob):
    hp = {k[len("hp__"):]: v for k, v in glob.items() if k.startswith("hp__")}
    unknown = set(hp) - set(HP_TO_CONFIG) - HP_CHECKED
    assert not unknown, f"fixture hyper-parameters this test does not map or check: {sorted(unknown)}"
    over = {key: conv(hp[name]) for name, (key, conv) in HP_TO_CONFIG.items() if name in hp}
    # the `toco` preset (compatibility mode) at VOC paper scale, at the fixture's sizes; random init is replaced by
    # the fixture's weights
    cfg = make_config("toco", dataset="voc", scale="paper", backbone="vit_base_patch16_224", pretrained=False,
                      drop_path=0.0, **over)
    return cfg, hp


def build(glob, dtype):
    cfg, hp = config_from_fixture(glob)
    C = int(hp["num_classes"]) - 1
    info = types.SimpleNamespace(num_classes=C, class_names=[f"c{i}" for i in range(C + 1)])
    method = METHODS[cfg.method](cfg, info, torch.device("cpu"))
    net = method.core.to(dtype)
    method.par.to(dtype)
    weights = {k[len("weights__"):]: torch.from_numpy(v) for k, v in glob.items() if k.startswith("weights__")}
    skipped = load_toco_state_dict(net, {k: v.to(dtype) for k, v in weights.items()})
    assert all(toco_name(s) is None for s in skipped)
    # hyper-parameters that are not config keys
    opt = method.configure_optimizers()[0][0]
    if "beta1" in hp:
        assert opt.defaults["betas"] == (float(hp["beta1"]), float(hp["beta2"]))
    if "eps" in hp:
        assert opt.defaults["eps"] == float(hp["eps"])
    if "ln_eps" in hp:
        assert all(m.eps == float(hp["ln_eps"]) for m in net.backbone.modules() if isinstance(m, torch.nn.LayerNorm))
    if "decoder_dilation" in hp:
        assert net.decoder.conv6.dilation == (int(hp["decoder_dilation"]),) * 2
    if "ignore_index" in hp:
        assert int(hp["ignore_index"]) == 255
    if "w_reg" in hp:  # the energy (reg) loss needs ToCo's compiled filter; the fixture switches it off
        assert float(hp["w_reg"]) == 0.0, "the fixture uses the energy loss, which this preset does not have"
    return cfg, method, weights


def _ours(toco):
    n = toco_name(toco)
    return n


def replay(name, case, dtype):
    tol = TOL[dtype]
    cfg, method, weights = build(GLOB, dtype)
    net = method.core
    seen = set()

    def take(k):
        seen.add(k)
        return case[k]

    def t(k):
        return torch.from_numpy(np.asarray(take(k))).to(dtype)

    n = int(take("n_iter"))
    optims = method.configure_optimizers()
    opt, sched = optims[0]
    # the four groups: ToCo's names (less the parameters that get no gradient) are this network's, group for group
    no_grad = {str(s) for s in take("no_grad_names")}
    for k, g in enumerate(opt.param_groups):
        want = {_ours(str(s)) for s in GLOB[f"group{k}_names"] if str(s) not in no_grad}
        assert set(g["names"]) == want, f"{name}: group {k} differs: {sorted(set(g['names']) ^ want)[:6]}"
    # the optimiser as after n updates, with ToCo's moments
    # (the moments are case-independent keys; a case may also carry its own)
    src = {**{k: x for k, x in GLOB.items() if k.startswith("adam_exp_avg")},
           **{k: x for k, x in case.items() if k.startswith("adam_exp_avg")}}
    m = {_ours(k[len("adam_exp_avg__"):]): torch.from_numpy(x) for k, x in src.items() if k.startswith("adam_exp_avg__")}
    v = {_ours(k[len("adam_exp_avg_sq__"):]): torch.from_numpy(x) for k, x in src.items()
         if k.startswith("adam_exp_avg_sq__")}
    seen |= {k for k in case if k.startswith("adam_exp_avg")}
    assert set(m) == set(v) and None not in m
    if n > 0:
        assert m, f"{name}: iteration {n} > 0 without AdamW moments"
        set_adamw_state(opt, n, m, v)
        sched.start_at(n)
    # the batch as ToCo's loop holds it, and the local-crop corners its sampler drew
    x = t("inputs")
    batch = dict(img=x, cls_label=t("cls_label"), img_box=torch.from_numpy(take("img_box")).long(),
                 crops=[x, t("crop_global2"), t("crop_local_src")])
    corners = torch.from_numpy(take("crop_pos")).long()
    method.crop_sampler.give(corners)
    method.trace = {}
    grads = {}

    def on_backward(meth):
        for pn, p in meth.core.named_parameters():
            grads[pn] = None if p.grad is None else p.grad.detach().clone()

    losses, weights_n, total = train_iteration(method, optims, batch, n, on_backward=on_backward)
    tr = method.trace

    # the sampler's candidates and ToCo's permutation give exactly the injected corners
    from synernet.ops.losses import crop_candidates
    cs, K = cfg.ctc_crop_size, cfg.ctc_crop_num
    cand = crop_candidates(tr["roi"], K, cs)
    nw = batch["crops"][2].shape[-1] - 2 * (cs // 2)
    fallback = take("crop_fallback")
    for i in range(cand.shape[0]):
        pos = cand[i].nonzero()[:, 0]
        perm = torch.from_numpy(take(f"randperm_{i}")).long()
        assert len(perm) == len(pos), f"{name}: image {i} has {len(pos)} crop candidates, ToCo {len(perm)}"
        pick = pos[perm[:K]]
        assert torch.equal(torch.stack([pick // nw, pick % nw], -1), corners[i]), f"{name}: image {i} corners"
        assert bool(fallback[i]) == bool((tr["roi"][i, cs // 2: -(cs // 2), cs // 2: -(cs // 2)] <= 1).sum() < K)
    for k in case:
        if k.startswith("randperm_"):
            seen.add(k)

    # traced intermediates
    for key, (tk, kind) in TRACED.items():
        if key not in case:
            continue
        want = take(key)
        assert tk in tr, f"{name}: the step did not produce {tk!r} (for {key!r})"
        if kind == "labels":
            _labels(tr[tk], want, f"{name}/{key}", tol["labels_frac"])
        else:
            _close(tr[tk], want, f"{name}/{key}", **tol["logits"])
    # losses, their phase weights and the total
    for key, ln in LOSSES.items():
        if key in case:
            _close(losses[ln], take(key), f"{name}/{key}", **tol["loss"])
    if "reg_loss" in case:
        assert float(take("reg_loss")) == 0.0
    _close(total, take("loss"), f"{name}/loss (weighted total, phase weights {weights_n})", **tol["loss"])
    # learning rate each group used
    _close([g["lr"] for g in opt.param_groups], take("lr"), f"{name}/lr", **tol["lr"])
    # gradients
    seen |= assert_grads(case, grads, _ours, name, tol["grad"], "ToCo")
    for tn in no_grad:
        ours = _ours(tn)
        assert ours is None or grads.get(ours) is None, f"{name}: {tn} gets a gradient here, not in ToCo"
    for k, g in enumerate(opt.param_groups):
        key = f"grad_norm_group{k}"
        if key in case:
            norm = torch.sqrt(sum((grads[pn].double() ** 2).sum() for pn in g["names"]))
            _close(norm, take(key), f"{name}/{key}", **tol["grad"])
    # parameters after the update, and the teacher head after its EMA
    seen |= assert_params_after(case, dict(net.state_dict()), _ours, name, tol["param"],
                                ("after__", "teacher_after__"))
    unchecked = set(case) - seen
    assert not unchecked, f"{name}: fixture keys this test does not check: {sorted(unchecked)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_toco_step(name, dtype):
    torch.manual_seed(0)
    replay(name, CASES[name], dtype)


def test_case_independent_keys_are_known():
    known = ("hp__", "weights__", "group", "adam_exp_avg__", "adam_exp_avg_sq__")
    assert all(k.startswith(known) for k in GLOB), sorted(k for k in GLOB if not k.startswith(known))


# ---------------------------------------------------------------------------------------------------------------------
# Presets built on ToCo's step reproduce the `toco` step when their own terms are off
#
# DSKD keeps ToCo's network (its teacher), labels and losses, and replaces CTC by its own terms (class-token head,
# L_sim, L_PUNC) and GC. With those switched off (and ToCo's CTC off on the `toco` side), the two presets must compute
# the same losses, gradients and updated parameters of the shared ToCo network from the same weights, moments and
# batch. Both run the project's own iteration; the `toco` side is the one checked against ToCo above.

OWN_TERMS_OFF = {
    "dskd": dict(w_tok=0.0, w_sim=0.0, w_punc=0.0, gc_enable=False),
    "dskd_gc": dict(w_tok=0.0, w_sim=0.0, w_punc=0.0, gc_enable=False),
}
# settings in which the presets differ by design, set equal for the comparison (the schedule, PTC's box, the NaN guard)
COMMON = dict(lr_schedule="poly", ptc_box_mode="toco_compat", seg_loss_nan_guard=False, inactive_losses="skip",
              w_ctc=0.0)


def _toco_net(method):
    root = method.net("net")
    return root if hasattr(root, "decoder") else root.teacher.net


def _preset_step(preset, case, dtype, extra):
    base, hp = config_from_fixture(GLOB)
    over = {k: base[k] for name, (k, _) in HP_TO_CONFIG.items() if name in hp}
    cfg = make_config(preset, dataset="voc", scale="paper", backbone=base.backbone, pretrained=False, drop_path=0.0,
                      **{**over, **COMMON, **extra})
    C = int(hp["num_classes"]) - 1
    info = types.SimpleNamespace(num_classes=C, class_names=[f"c{i}" for i in range(C + 1)])
    method = METHODS[cfg.method](cfg, info, torch.device("cpu"))
    for m in method.modules.values():
        m.to(dtype)
    method.par.to(dtype)
    net = _toco_net(method)
    mine = net.state_dict()
    weights = {k[len("weights__"):]: torch.from_numpy(v).to(dtype) for k, v in GLOB.items() if k.startswith("weights__")}
    load_toco_state_dict(net, {k: v for k, v in weights.items() if toco_name(k) is None or toco_name(k) in mine})
    optims = method.configure_optimizers()
    opt, sched = optims[0]
    n = int(case["n_iter"])
    prefix = {id(p): n_ for n_, p in method.net("net").named_parameters()}
    rel = {n_: prefix[id(p)] for n_, p in net.named_parameters()}        # name in the ToCo net -> name in the optimiser
    if n > 0:
        m = {rel[toco_name(k[len("adam_exp_avg__"):])]: torch.from_numpy(v) for k, v in GLOB.items()
             if k.startswith("adam_exp_avg__") and toco_name(k[len("adam_exp_avg__"):]) in rel}
        v = {rel[toco_name(k[len("adam_exp_avg_sq__"):])]: torch.from_numpy(x) for k, x in GLOB.items()
             if k.startswith("adam_exp_avg_sq__") and toco_name(k[len("adam_exp_avg_sq__"):]) in rel}
        set_adamw_state(opt, n, m, v)
        sched.start_at(n)
    x = torch.from_numpy(case["inputs"]).to(dtype)
    batch = dict(img=x, cls_label=torch.from_numpy(case["cls_label"]).to(dtype),
                 img_box=torch.from_numpy(case["img_box"]).long(),
                 crops=[x, torch.from_numpy(case["crop_global2"]).to(dtype), torch.from_numpy(case["crop_local_src"]).to(dtype)])
    grads = {}

    def on_backward(meth):
        for pn, p in net.named_parameters():
            grads[pn] = None if p.grad is None else p.grad.detach().clone()

    losses, weights_n, total = train_iteration(method, optims, batch, n, on_backward=on_backward)
    return losses, weights_n, total, grads, {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("preset", sorted(OWN_TERMS_OFF))
@pytest.mark.parametrize("name", sorted(CASES))
def test_preset_with_own_terms_off_is_the_toco_step(preset, name):
    case, dtype = CASES[name], torch.float64
    ref = _preset_step("toco", case, dtype, {})
    got = _preset_step(preset, case, dtype, OWN_TERMS_OFF[preset])
    shared = ("cls", "aux", "ptc", "seg")
    for k in shared:
        assert (k in ref[0]) == (k in got[0]), f"{preset}/{name}: loss {k} computed on one side only"
        if k in ref[0]:
            _close(got[0][k], ref[0][k].detach().numpy(), f"{preset}/{name}/{k}", rtol=1e-12)
            assert ref[1][k] == got[1][k], f"{preset}/{name}: phase weight of {k}: {got[1][k]} vs {ref[1][k]}"
    _close(got[2], ref[2].detach().numpy(), f"{preset}/{name}/total", rtol=1e-12)
    for pn, g in ref[3].items():
        if pn not in got[3]:
            continue                                        # parameters the preset does not have (the CTC teacher head)
        assert (g is None) == (got[3][pn] is None), f"{preset}/{name}: {pn} gets a gradient on one side only"
        if g is not None:
            _close(got[3][pn], g.numpy(), f"{preset}/{name}/grad {pn}", atol=1e-13, rtol=1e-10)
    for pn, p in ref[4].items():
        if pn in got[4]:
            _close(got[4][pn], p.numpy(), f"{preset}/{name}/after {pn}", atol=1e-14, rtol=1e-12)


# ---------------------------------------------------------------------------------------------------------------------
# Speed-ups of the step that must change nothing: the CAM pass reusing the forward's scale-1.0 CAM (cam_reuse_forward)

@pytest.mark.parametrize("name", sorted(CASES))
def test_cam_reuse_changes_no_loss_or_gradient(name):
    "fp32: the step with and without reusing the forward's CAM gives the same losses, labels and gradients."
    res = {}
    for reuse in (True, False):
        cfg, method, weights = build(GLOB, torch.float32)
        method.cfg = cfg.replace(cam_reuse_forward=reuse)
        case = CASES[name]
        x = torch.from_numpy(case["inputs"]).float()
        batch = dict(img=x, cls_label=torch.from_numpy(case["cls_label"]).float(),
                     img_box=torch.from_numpy(case["img_box"]).long(),
                     crops=[x, torch.from_numpy(case["crop_global2"]).float(),
                            torch.from_numpy(case["crop_local_src"]).float()])
        method.crop_sampler.give(torch.from_numpy(case["crop_pos"]).long())
        method.trace, grads = {}, {}
        optims = method.configure_optimizers()
        losses, _, total = train_iteration(method, optims, batch, int(case["n_iter"]), on_backward=lambda m: grads.update(
            {k: p.grad.clone() for k, p in m.core.named_parameters() if p.grad is not None}))
        res[reuse] = losses, total, grads, method.trace
    (l1, _, g1, tr1), (l0, _, g0, tr0) = res[True], res[False]
    assert set(l1) == set(l0) and set(g1) == set(g0)
    for k in l1:
        _close(l1[k], l0[k].detach().numpy(), f"{name}/{k}", rtol=1e-4)
    for k in g1:
        _close(g1[k], g0[k].numpy(), f"{name}/grad {k}", atol=1e-6, rtol=1e-3)
    for k in ("roi", "token_labels", "seg_labels"):
        if k in tr0:
            _labels(tr1[k], tr0[k].numpy(), f"{name}/{k}", 0.001)
