"""Parity of the `synernet_code` preset (compatibility mode) with the SynerNet authors' du_head step (`deformer_step`).

`tests/fixtures/deformer_step/deformer_step.npz` (or `$SYNERNET_FIXTURES_ROOT/deformer_step/`) holds, computed with
the authors' own code (its README describes every key):

- function cases (`function_case_names`): the spatial BCE's ROI mask, the per-image thresholds, the spatial BCE and
  its gradient with respect to the logits, and the PTC token labels, on crafted inputs with their edge cases. Each
  goes through the project's own function (`synernet.ops.branches`, `synernet.ops.cam.token_labels`);
- step cases (`case_names`): one whole iteration of the dual-branch recipe from the same stored initial weights. The
  test builds the `synernet_code` preset in its compatibility mode (`synernet.methods.synernet.SYNERNET_CODE_COMPAT`)
  at the fixture's sizes, loads the weights through the authors' name map (`load_deformer_state_dict`), starts the
  optimiser and its schedule at the case's iteration with the stored AdamW moments, runs the project's own iteration
  (`synernet.engine.learner.train_iteration`, the code path of `Learner.fit`) and compares both branches' outputs, the
  ROI mask and thresholds, both cross-fed pseudo-labels, the token labels, every named loss and the total, each
  group's learning rate, every gradient and every parameter after the update.

Only the sizes come from the fixture (`vit_*`, `decoder_dim`); every other hyper-parameter of the fixture is checked
against what the preset already holds, so a preset that drifts from the recipe fails here. Cases are dispatched on the
keys they hold (no case name, shape or value is hard-coded) and a key that no check consumes fails the test.
"""
import types

import numpy as np
import pytest
import torch

from _parity import assert_close as _close, assert_grads, assert_labels as _labels, assert_params_after, load_family
import synernet.methods.synernet  # noqa: F401  (registers the method and the presets)
from synernet.ops.branches import per_image_thresholds, sbce_roi, spatial_bce_loss
from synernet.ops.cam import token_labels
from synernet.core.config import make_config
from synernet.engine.learner import METHODS, train_iteration
from synernet.methods.synernet import SYNERNET_CODE_COMPAT, deformer_name, load_deformer_state_dict
from synernet.models.toco import set_adamw_state

FAMILY = "deformer_step"
PRESET = "synernet_code"

# ------------------------------------------------------------------------------------------------ hyper-parameters
# the sizes of the fixture's small network: the only values the test sets (fixture name -> config key, conversion)
SIZES = {"patch_size": ("vit_patch_size", int), "embed_dim": ("vit_embed_dim", int), "depth": ("vit_depth", int),
         "num_heads": ("vit_num_heads", int), "mlp_ratio": ("vit_mlp_ratio", float),
         "vit_img_size": ("vit_img_size", int), "decoder_width": ("decoder_dim", int)}
# the recipe: each fixture hyper-parameter -> what the preset's config must hold for it
_i = int
RECIPE = {
    "lr": lambda c, hp: _close_num(c.lr, hp["lr"] * hp["lr_mult_backbone"], "lr (backbone group)"),
    "lr_mult_backbone": None, "lr_mult_heads": lambda c, hp: _close_num(c.lr * c.head_lr_mult,
                                                                       hp["lr"] * hp["lr_mult_heads"], "head lr"),
    "warmup_lr": lambda c, hp: _close_num(c.warmup_ratio, hp["warmup_lr"], "warmup_ratio"),
    "wt_decay": lambda c, hp: _close_num(c.weight_decay, hp["wt_decay"], "weight_decay"),
    "power": lambda c, hp: _close_num(c.poly_power, hp["power"], "poly_power"),
    "max_iters": lambda c, hp: _eq(c.max_iters, _i(hp["max_iters"]), "max_iters"),
    "warmup_iters": lambda c, hp: _eq(c.warmup_iters, _i(hp["warmup_iters"]), "warmup_iters"),
    "high_thre": lambda c, hp: _close_num(c.high_thre, hp["high_thre"], "high_thre"),
    "low_thre": lambda c, hp: _close_num(c.low_thre, hp["low_thre"], "low_thre"),
    "bkg_thre": lambda c, hp: _close_num(c.bkg_thre, hp["bkg_thre"], "bkg_thre"),
    "w_ptc": lambda c, hp: _close_num(c.w_ptc, hp["w_ptc"], "w_ptc"),
    "w_seg": lambda c, hp: _close_num(c.w_seg, hp["w_seg"], "w_seg"),
    "w_sim": lambda c, hp: _close_num(c.w_csim if c.csim_loss else 0.0, hp["w_sim"], "w_csim"),
    "w_sbce": lambda c, hp: _close_num(c.w_sbce if c.pcam_spatial_bce else 0.0, hp["w_sbce"], "w_sbce"),
    # the code's `n > v` is the first iteration v + 1
    "seg_start_after": lambda c, hp: _eq(c.seg_start, _i(hp["seg_start_after"]) + 1, "seg_start"),
    "sbce_start_after": lambda c, hp: _eq(c.sbce_start, _i(hp["sbce_start_after"]) + 1, "sbce_start"),
    "uncertain_region_thre": lambda c, hp: _close_num(c.sbce_u, hp["uncertain_region_thre"], "sbce_u"),
    "aux_layer": lambda c, hp: _eq(c.aux_layer % _i(hp["depth"]), _i(hp["aux_layer"]) % _i(hp["depth"]), "aux_layer"),
    "par_num_iter": lambda c, hp: _eq(c.par_iters, _i(hp["par_num_iter"]), "par_iters"),
    "par_dilations": lambda c, hp: _eq(tuple(c.par_dilations), tuple(int(v) for v in hp["par_dilations"]),
                                       "par_dilations"),
    "cam_scales": lambda c, hp: _eq(tuple(c.cam_scales), tuple(float(v) for v in hp["cam_scales"]), "cam_scales"),
    "qkv_bias": lambda c, hp: _eq(not c.def_compat_qkv, bool(hp["qkv_bias"]), "qkv bias (def_compat_qkv)"),
    "top_k_pool": lambda c, hp: _eq((c.pool, 5) if c.pool == "top5" else (c.pool, c.pool_k),
                                    ("top5" if _i(hp["top_k_pool"]) == 5 else "topk", _i(hp["top_k_pool"])), "pool"),
    "ignore_index": lambda c, hp: _eq(255, _i(hp["ignore_index"]), "ignore index"),
}
# checked against the built network / optimiser (build)
BUILT = {"beta1", "beta2", "eps", "ln_eps", "decoder_dilation", "num_classes"}

# ---------------------------------------------------------------------------------------------- per-case outputs
# stored output -> (trace key of the step, kind); `b1` is branch B ('b'), `b2` branch P ('p')
TRACED = {
    "b1_cls": ("cls_logits_b", "logits"), "b2_cls": ("cls_logits_p", "logits"),
    "b1_cls_aux": ("cls_aux_logits_b", "logits"), "b2_cls_aux": ("cls_aux_logits_p", "logits"),
    "b1_segs": ("seg_logits_b", "logits"), "b2_segs": ("seg_logits_p", "logits"),
    "b1_fmap": ("feat_b", "logits"), "b2_fmap": ("feat_p", "logits"),
    "b1_cls_token": ("cls_token_b", "logits"), "b2_cls_token": ("cls_token_p", "logits"),
    "b2_cam_12th": ("cam_logits_p", "logits"),
    "b1_cams": ("cam_b", "cams"), "b1_cams_aux": ("cam_aux_b", "cams"),
    "b2_cams": ("cam_p", "cams"), "b2_cams_aux": ("cam_aux_p", "cams"),
    "b2_roi_mask": ("sbce_roi", "labels"), "per_pic_thre": ("sbce_phi", "thresholds"),
    # Y_B = Refine(0.7 M_B + 0.3 M_P) supervises decoder P; Y_P = Refine(0.7 M_P + 0.3 M_B) supervises decoder B
    "b1_refined_pseudo_label": ("seg_labels_b", "labels"), "b2_refined_pseudo_label": ("seg_labels_p", "labels"),
    "b1_pseudo_label_aux": ("token_labels_b", "labels"), "b2_pseudo_label_aux": ("token_labels_p", "labels"),
}
# stored loss -> the step's named loss (or, for the class-token similarity's two halves, its traced term)
LOSSES = {"b1_cls_loss": "cls_b", "b2_cls_loss": "cls_p", "b1_cls_loss_aux": "aux_b", "b2_cls_loss_aux": "aux_p",
          "b1_ptc_loss": "ptc_b", "b2_ptc_loss": "ptc_p", "b1_seg_loss": "seg_b", "b2_seg_loss": "seg_p",
          "b2_spacial_bce_loss": "sbce"}
SIM_TERMS = {"b1_sim_loss": "csim_b", "b2_sim_loss": "csim_p"}         # csim = their sum

# the README's tolerances per implementation precision (`../toco_step/README.md` section 4)
TOL = {
    torch.float64: dict(logits=dict(atol=1e-9, rtol=0), loss=dict(rtol=1e-9, atol=0), grad=dict(atol=1e-10, rtol=1e-8),
                        param=dict(atol=1e-12, rtol=1e-10), lr=dict(atol=1e-12, rtol=1e-10), labels_frac=0.0),
    torch.float32: dict(logits=dict(atol=1e-4, rtol=0), loss=dict(rtol=1e-4, atol=0), grad=dict(atol=1e-6, rtol=1e-3),
                        param=dict(atol=1e-6, rtol=0), lr=dict(atol=1e-6, rtol=0), labels_frac=0.001),
}
# the stored CAMs are float32-rounded (for diagnosis): the float64 replay is held to that rounding, the float32 one to
# the logits' tolerance; the thresholds are fractions the code computes in float32
CAM_TOL = {torch.float64: dict(atol=1e-7, rtol=1e-6), torch.float32: dict(atol=1e-4, rtol=0)}
THRE_TOL = dict(atol=1e-6, rtol=0)


def _eq(got, want, what):
    assert got == want, f"the preset's {what} is {got!r}, the authors' recipe {want!r}"


def _close_num(got, want, what):
    assert abs(float(got) - float(want)) <= 1e-12 * max(1.0, abs(float(want))), \
        f"the preset's {what} is {got!r}, the authors' recipe {float(want)!r}"


(STEPS, FUNCS), GLOB = load_family(FAMILY, ("case_names", "function_case_names"))
HP = {k[len("hp__"):]: v for k, v in GLOB.items() if k.startswith("hp__")}


def config(preset=PRESET, extra=None, check=True, compat=True):
    "The preset at VOC paper scale (in compatibility mode), at the fixture's sizes (+ `extra`); the recipe checked."
    unknown = set(HP) - set(SIZES) - set(RECIPE) - BUILT
    assert not unknown, f"fixture hyper-parameters this test does not map or check: {sorted(unknown)}"
    sizes = {key: conv(HP[name]) for name, (key, conv) in SIZES.items() if name in HP}
    # the confidence votes' blocks (paper fusion; unused by du_head's step) must exist in the fixture's encoder
    depth = sizes.get("vit_depth", 12)
    sizes["conf_layers"] = tuple(range(max(1, depth - 3), depth + 1))
    cfg = make_config(preset, dataset="voc", scale="paper", backbone="vit_base_patch16_224", pretrained=False,
                      drop_path=0.0, **{**(SYNERNET_CODE_COMPAT if compat else {}), **sizes, **(extra or {})})
    for name, fn in RECIPE.items():
        if check and name in HP and fn is not None:
            fn(cfg, HP)
    return cfg


def build(dtype, preset=PRESET, extra=None, check=True, compat=True, weights=True):
    "The method of `config(...)` in `dtype`, with the fixture's weights loaded through the name map (`weights`)."
    cfg = config(preset, extra, check, compat)
    C = int(HP["num_classes"]) - 1
    info = types.SimpleNamespace(num_classes=C, class_names=[f"c{i}" for i in range(C + 1)])
    method = METHODS[cfg.method](cfg, info, torch.device("cpu"))
    net = method.core.to(dtype)
    method.par.to(dtype)
    if weights:
        sd = {k[len("weights__"):]: torch.from_numpy(v).to(dtype) for k, v in GLOB.items() if k.startswith("weights__")}
        skipped = load_deformer_state_dict(net, sd)
        assert all(deformer_name(s) is None for s in skipped)
    opt = method.configure_optimizers()[0][0]
    if not (check and compat):
        return cfg, method
    if "beta1" in HP:
        assert opt.defaults["betas"] == (float(HP["beta1"]), float(HP["beta2"]))
    if "eps" in HP:
        assert opt.defaults["eps"] == float(HP["eps"])
    norms = [m for br in (net.b, net.p) for m in br.backbone.modules() if isinstance(m, torch.nn.LayerNorm)]
    if "ln_eps" in HP:
        assert norms and all(m.eps == float(HP["ln_eps"]) for m in norms), "LayerNorm eps differs from the code's"
    if "decoder_dilation" in HP:
        assert all(br.decoder.conv6.dilation == (int(HP["decoder_dilation"]),) * 2 for br in (net.b, net.p))
    if "num_classes" in HP:
        assert net.b.decoder.conv8.out_channels == int(HP["num_classes"])
    return cfg, method


# ------------------------------------------------------------------------------------------------ function cases
def _fragile(score, thresholds, dtype):
    "Entries whose float64 score lies within float32 resolution of a threshold (none in a float64 replay)."
    if dtype == torch.float64:
        return None
    return np.any([np.abs(score - t) <= 1e-6 for t in thresholds], axis=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(FUNCS))
def test_function_case(name, dtype):
    case, tol, seen = FUNCS[name], TOL[dtype], set()

    def take(k):
        seen.add(k)
        return case[k]

    cam64, y64 = np.asarray(take("cam"), np.float64), np.asarray(take("cls_label"), np.float64)
    cam, y = torch.from_numpy(cam64).to(dtype), torch.from_numpy(y64).to(dtype)
    hi, lo, u = float(HP["high_thre"]), float(HP["low_thre"]), float(HP["uncertain_region_thre"])
    # each function is called on the code's own inputs, so one difference shows where it arises
    if "roi_mask" in case:
        roi = sbce_roi(cam, y, hi, lo)
        m = (cam64 * y64[:, :, None, None] + 1e-8 * y64[:, :, None, None]).max(1)       # the code's ROI score
        _labels(roi, take("roi_mask"), f"{name}/roi_mask", 0.0, _fragile(m, (hi, lo), dtype))
    if "per_pic_thre" in case:                 # column 0 is unused by the code
        roi_code = torch.from_numpy(np.asarray(case["roi_mask"])).long()
        _close(per_image_thresholds(roi_code, y, u), take("per_pic_thre")[:, 1:], f"{name}/per_pic_thre", **THRE_TOL)
    if "logits" in case:
        z = torch.from_numpy(take("logits")).to(dtype).requires_grad_(True)
        loss = spatial_bce_loss(z, y, torch.from_numpy(np.asarray(case["per_pic_thre"])[:, 1:]))
        loss.backward()
        if "spatial_bce" in case:
            _close(loss, take("spatial_bce"), f"{name}/spatial_bce", **tol["loss"])
        if "spatial_bce_grad" in case:
            _close(z.grad, take("spatial_bce_grad"), f"{name}/spatial_bce_grad", **tol["grad"])
    if "pseudo_label_resized" in case:
        box = torch.from_numpy(take("img_box")).long()
        bkg = float(HP["bkg_thre"])
        tl = token_labels(cam, y, box, int(HP["patch_size"]), cam.shape[-2:], "scaled", bkg, hi, lo)
        m = (cam64 * y64[:, :, None, None]).max(1)
        _labels(tl, take("pseudo_label_resized"), f"{name}/pseudo_label_resized", 0.0, _fragile(m, (bkg, hi, lo), dtype))
    unchecked = set(case) - seen
    assert not unchecked, f"{name}: fixture keys this test does not check: {sorted(unchecked)}"


# ---------------------------------------------------------------------------------------------------- step cases
def _batch(case, take, dtype):
    t = lambda k: torch.from_numpy(np.asarray(take(k))).to(dtype)
    return dict(img=t("inputs"), cls_label=t("cls_label"), img_box=torch.from_numpy(take("img_box")).long())


def _moments(case):
    src = {**{k: x for k, x in GLOB.items() if k.startswith("adam_exp_avg")},
           **{k: x for k, x in case.items() if k.startswith("adam_exp_avg")}}
    m = {deformer_name(k[len("adam_exp_avg__"):]): torch.from_numpy(x) for k, x in src.items()
         if k.startswith("adam_exp_avg__")}
    v = {deformer_name(k[len("adam_exp_avg_sq__"):]): torch.from_numpy(x) for k, x in src.items()
         if k.startswith("adam_exp_avg_sq__")}
    assert set(m) == set(v) and None not in m
    return m, v


def run_step(method, case, take, dtype):
    "The project's own iteration on the case's batch, from the injected optimiser state: (losses, weights, total, grads)."
    n = int(take("n_iter"))
    optims = method.configure_optimizers()
    opt, sched = optims[0]
    if n > 0:
        m, v = _moments(case)
        assert m, f"iteration {n} > 0 without AdamW moments"
        set_adamw_state(opt, n, m, v)
        sched.start_at(n)
    method.trace = {}
    grads = {}

    def on_backward(meth):
        for pn, p in meth.core.named_parameters():
            grads[pn] = None if p.grad is None else p.grad.detach().clone()

    losses, weights, total = train_iteration(method, optims, _batch(case, take, dtype), n, on_backward=on_backward)
    return opt, losses, weights, total, grads


def replay(name, case, dtype, preset=PRESET, extra=None):
    tol = TOL[dtype]
    cfg, method = build(dtype, preset, extra)
    assert cfg.preset == preset
    net = method.core
    seen = set()

    def take(k):
        seen.add(k)
        return case[k]

    # the four groups: the code's names, less the parameters it never uses, are this network's, group for group;
    # this network's CTC heads (group 2 here, absent in du_head) get no gradient, so AdamW leaves them alone
    unused = {str(s) for s in GLOB["unused_names"]}
    opt0 = method.configure_optimizers()[0][0]
    for k, g in enumerate(opt0.param_groups):
        want = {deformer_name(str(s)) for s in GLOB[f"group{k}_names"] if str(s) not in unused}
        ours = {n for n in g["names"] if ".proj_head" not in n}
        assert ours == want, f"{name}: group {k} differs: {sorted(ours ^ want)[:6]}"
    if "redraws" in case:               # how many batches the fixture's generator rejected: nothing to replay
        take("redraws")
    opt, losses, weights_n, total, grads = run_step(method, case, take, dtype)
    tr = method.trace

    # traced intermediates
    for key, (tk, kind) in TRACED.items():
        if key not in case:
            continue
        want = take(key)
        assert tk in tr, f"{name}: the step did not produce {tk!r} (for {key!r})"
        if kind == "labels":
            _labels(tr[tk], want, f"{name}/{key}", tol["labels_frac"])
        elif kind == "thresholds":                                   # column 0 is unused by the code
            _close(tr[tk], want[:, 1:], f"{name}/{key}", **THRE_TOL)
        elif kind == "cams":
            _close(tr[tk], want, f"{name}/{key}", **CAM_TOL[dtype])
        else:
            _close(tr[tk], want, f"{name}/{key}", **tol["logits"])
    # losses, the two halves of the class-token similarity, and the weighted total
    for key, ln in LOSSES.items():
        if key in case:
            assert ln in losses, f"{name}: the step did not compute {ln!r} (for {key!r})"
            _close(losses[ln], take(key), f"{name}/{key}", **tol["loss"])
    for key, tk in SIM_TERMS.items():
        if key in case:
            _close(tr[tk], take(key), f"{name}/{key}", **tol["loss"])
    if all(k in case for k in SIM_TERMS):
        _close(losses["csim"], sum(case[k] for k in SIM_TERMS), f"{name}/csim = sim_1 + sim_2", **tol["loss"])
    _close(total, take("loss"), f"{name}/loss (weighted total, phase weights {weights_n})", **tol["loss"])
    # the learning rate each group used
    _close([g["lr"] for g in opt.param_groups], take("lr"), f"{name}/lr", **tol["lr"])
    # gradients: every stored one, and none elsewhere
    seen |= assert_grads(case, grads, deformer_name, name, tol["grad"], "the code")
    # parameters after the update
    seen |= assert_params_after(case, dict(net.state_dict()), deformer_name, name, tol["param"])
    unchecked = set(case) - seen - {k for k in case if k.startswith("adam_exp_avg")}
    assert not unchecked, f"{name}: fixture keys this test does not check: {sorted(unchecked)}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", sorted(STEPS))
def test_step_case(name, dtype):
    torch.manual_seed(0)
    replay(name, STEPS[name], dtype)


def test_case_independent_keys_are_known():
    known = ("hp__", "weights__", "group", "adam_exp_avg__", "adam_exp_avg_sq__", "unused_names")
    assert all(k.startswith(known) for k in GLOB), sorted(k for k in GLOB if not k.startswith(known))
    assert STEPS or FUNCS, "the fixture holds no case"


# ---------------------------------------------------------------------------------------------------------------------
# Item 6: the `synernet` preset (the paper's design) with its paper switches off is the `synernet_code` step
#
# The switches are found, not listed by hand: every key in which the two presets differ must be one of them, and
# with the switches at the code's values the configs are equal; the whole fixture is then replayed through `synernet`.
PAPER_SWITCHES = ("bcam_attn_prop", "bcam_attn_layers", "bcam_power", "bcam_ignore_band", "pcam_ignore_band",
                  "conf_mode", "fusion", "fusion_in_training", "infer_flip", "preset")


def paper_switches_off():
    code, paper = config(PRESET)._values, config("synernet")._values
    differ = {k for k in code if code[k] != paper[k]}
    assert differ <= set(PAPER_SWITCHES), f"the paper preset also differs in {sorted(differ - set(PAPER_SWITCHES))}"
    off = {k: code[k] for k in differ if k != "preset"}
    assert {k: v for k, v in config("synernet", off)._values.items() if k != "preset"} == \
        {k: v for k, v in code.items() if k != "preset"}
    return off


def test_paper_preset_with_its_switches_off_has_the_code_config():
    off = paper_switches_off()
    # what the paper adds over the authors' code: the B-CAM propagation, the band resolutions and the confidence fusion
    assert {"bcam_attn_prop", "bcam_ignore_band", "pcam_ignore_band", "fusion"} <= set(off), sorted(off)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_paper_preset_with_its_switches_off_is_the_code_step(name):
    off = paper_switches_off()
    torch.manual_seed(0)
    replay(name, STEPS[name], torch.float64, preset="synernet", extra=off)


# ---------------------------------------------------------------------------------------------------------------------
# README section 5: where the code fails, the project's step stays finite and does not raise (both modes)
#
# The CAMs without gradient are given (the method's `cam_fn`), so the condition is reached for sure; every output with
# gradient is the network's own. Each test also checks that its condition was actually reached.
MODES = {"compat": True, "default": False}
PATCH = int(HP.get("patch_size", 16))          # a 4x4 token grid: 16 tokens, top-5 pooling still possible


def _step_with_cams(compat, make_cam, n_of, H=None, extra=None, y=None, seed=0):
    torch.manual_seed(seed)
    H = H or 4 * PATCH
    # the whole CAM pass is the crafted one: not the forward's own scale-1.0 CAMs (cam_reuse_forward)
    extra = dict(extra or {}, cam_reuse_forward=False)
    cfg, method = build(torch.float64, extra=extra, check=False, compat=compat, weights=False)
    C = method.core.num_classes

    def cam_fn(x):
        a = make_cam(x, C)
        a = torch.cat([a, a.flip(-1)])      # the flipped half, flipped: the flip fusion keeps the crafted map
        return a, a, a, a

    method.cam_fn = cam_fn
    n = n_of(cfg)
    optims = method.configure_optimizers()
    if n > 0:
        optims[0][1].start_at(n)
    if y is None:
        y = torch.zeros(2, C, dtype=torch.float64)
        y[0, 3] = y[1, 5] = y[1, 7] = 1
    x = torch.randn(2, 3, H, H, dtype=torch.float64)
    batch = dict(img=x, cls_label=y, img_box=torch.tensor([[0, H, 0, H], [PATCH // 2, H - PATCH // 2, PATCH, H]]))
    method.trace = {}
    losses, weights, total = train_iteration(method, optims, batch, n)
    assert torch.isfinite(total), f"total {float(total)} (losses {({k: float(v) for k, v in losses.items()})})"
    for k, v in losses.items():
        assert torch.isfinite(v), f"loss {k} = {float(v)} (weight {weights[k]})"
    for p in method.core.parameters():
        assert torch.isfinite(p).all()
    return cfg, method, losses, weights, method.trace


PHASES = {"first": lambda c: 0, "seg": lambda c: c.seg_start, "sbce": lambda c: c.sbce_start}


@pytest.mark.parametrize("phase", sorted(PHASES))
@pytest.mark.parametrize("mode", sorted(MODES))
def test_no_foreground_pixel_in_the_pseudo_labels(mode, phase):
    "Flat CAMs: every pseudo-label pixel is background or ignored; the code's seg loss averages over no pixel (NaN)."
    flat = lambda x, C: torch.zeros(x.shape[0] // 2, C, x.shape[-2] // PATCH, x.shape[-1] // PATCH, dtype=x.dtype)
    cfg, method, losses, weights, tr = _step_with_cams(MODES[mode], flat, PHASES[phase])
    if "seg_b" in losses:          # computed (weighted, or times 0 in compatibility mode before its phase)
        for k in ("seg_labels_b", "seg_labels_p"):
            assert not ((tr[k] > 0) & (tr[k] != 255)).any(), f"{k} holds a foreground pixel: the case is not reached"
        assert float(losses["seg_b"].detach()) > 0 and float(losses["seg_p"].detach()) > 0     # the background term
    else:
        assert not MODES[mode] and weights["seg_b"] == 0


def _confident_but_one_token(x, C):
    "A CAM at its maximum everywhere but one token at the centre, at the largest scale only (the others flat)."
    h, w = x.shape[-2] // PATCH, x.shape[-1] // PATCH
    a = torch.ones(x.shape[0] // 2, C, h, w, dtype=x.dtype)
    if x.shape[-1] > _confident_but_one_token.H:
        a[:, :, h // 2, w // 2] = 0.0
    return a


@pytest.mark.parametrize("mode", sorted(MODES))
def test_threshold_at_its_cap_on_a_small_grid(mode):
    "phi reaches its cap 0.99 on a 4x4 grid: the code's index round(0.99 * 16) = 16 is out of range (IndexError)."
    _confident_but_one_token.H = H = 4 * PATCH
    cfg, method, losses, weights, tr = _step_with_cams(MODES[mode], _confident_but_one_token, PHASES["sbce"], H,
                                                       extra=dict(sbce_u=1.0))
    N = (H // PATCH) ** 2
    phi = tr["sbce_phi"].double()
    assert (torch.round(phi.float() * N) >= N).any(), f"no threshold reaches the end of the grid: {phi.max()}"
    _close(phi.max(), 0.99, "the threshold's cap", atol=1e-7)          # min(conf + u u_frac / n_cls, 0.99)
    assert weights["sbce"] > 0 and torch.isfinite(losses["sbce"])
    # the index is clamped to the last token: every token of such a class is positive
    assert tr["sbce_targets"].any(1).all(-1).any()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_token_positive(mode):
    "Every token of an image is positive for a labelled class: the code's negative term averages over none (NaN)."
    _confident_but_one_token.H = H = 4 * PATCH
    cfg, method, losses, weights, tr = _step_with_cams(MODES[mode], _confident_but_one_token, PHASES["sbce"], H)
    N = (H // PATCH) ** 2
    phi = tr["sbce_phi"]
    assert (torch.round(phi.float() * N) < N).all(), "a threshold at the end of the grid: that is the other case"
    assert tr["sbce_targets"].any(1).all(-1).all(), "an image has a negative token: the case is not reached"
    assert weights["sbce"] > 0 and torch.isfinite(losses["sbce"])
    # the empty negative set contributes 0: the loss is 0.9 x the positive term alone
    z = tr["cam_logits_p"].flatten(2)
    T = tr["sbce_targets"].to(z.dtype)
    pos = torch.nn.functional.binary_cross_entropy_with_logits(z, T, reduction="none").mean((1, 2))
    _close(losses["sbce"], (cfg.sbce_pos_weight * pos).mean(), "sbce with no negative token", rtol=1e-12)
