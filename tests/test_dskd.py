"""DSKD (Bai et al., Journal of Image and Graphics 2025): L_sim (-1 for a student equal to the flipped teacher), L_PUNC
(0 on an empty region, the entropy of q for equal logits) and the student EMA (momentum 0.996 rising to 1), the two
stages of the method, every switch of its ambiguities and of GC's through one training step, exact resume of the
method's extra state, and 3-iteration runs of the `dskd` and `dskd_gc` presets on the synthetic set (also through the
papermill training notebook)."""
import json, math, subprocess, sys
from pathlib import Path

import pytest
import torch

from synernet.core.config import make_config, seed_everything
import synernet.methods.dskd  # noqa: F401
from synernet.methods.dskd import (DSKDMethod, DSKDNet, DSKDPlan, dskd_forward, ema_momentum, ema_update, flip_tokens,
                           pseudo_label_study, punc_loss, punc_roi, sim_loss)
from synernet.engine.learner import Learner, unwrap

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(proj_dim=64, proj_hidden=64, proj_bottleneck=32, decoder_dim=32)


class Info:
    num_classes, class_names = 3, ["background", "a", "b", "c"]


def fake_batch(B=2, S=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.zeros(B, 3); y[:, 0] = 1; y[1, 2] = 1
    return dict(img=torch.randn(B, 3, S, S, generator=g), cls_label=y, img_box=torch.tensor([[0, S, 0, S]] * B))


def method(**kw):
    base = dict(dskd_warmup=1, seg_start=1, max_iters=6, cam_scales=(1.0,), warmup_iters=2, gc_min_pixels=16, **SMALL)
    cfg = make_config("dskd_gc", **{**base, **kw})
    seed_everything(0)
    return DSKDMethod(cfg, Info(), torch.device("cpu"))


def step(m, n, batch):
    opts = getattr(m, "_opts", None) or m.configure_optimizers()
    m._opts = opts
    w = m.loss_weights(n)
    L = m.training_step(batch, n, w)
    total = sum(w[k] * v for k, v in L.items() if w.get(k))
    for o, _ in opts: o.zero_grad(set_to_none=True)
    total.backward()
    idx = m.active_optimizers(n)
    for o, s in (opts if idx is None else [opts[i] for i in idx]): s.step(); o.step()
    m.after_step(n)
    return L, w


# --------------------------------------------------------------------------------------------------- item 32
def _symmetrise(bb):
    with torch.no_grad():
        w = bb.patch_embed.proj.weight; w.copy_((w + w.flip(-1)) / 2)
        g = bb.pos_embed[:, 1:].reshape(1, *bb.grid, -1); g.copy_((g + g.flip(2)) / 2)


def test_sim_loss_item32():
    cfg = make_config("base", **SMALL)
    torch.manual_seed(0)
    net = DSKDNet(3, cfg)
    _symmetrise(net.teacher.net.backbone); _symmetrise(net.student.backbone)
    x = torch.randn(2, 3, 32, 32); x = x + x.flip(-1)
    for layers in ((-3,), (1, 3, 5)):
        out = dskd_forward(net, x, DSKDPlan(sim_layers=layers))
        assert abs(out["sim"].item() + 1) < 1e-5
    # an unsymmetrised network on a random image is far from -1 but within [-1, 1]
    out = dskd_forward(DSKDNet(3, cfg), torch.randn(2, 3, 32, 32), DSKDPlan())
    assert -1 < out["sim"].item() < -0.0 and out["sim"].item() > -0.999
    # token scaling invariance and the range
    t, s = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    assert torch.allclose(sim_loss([t * 7.0], [s * 0.01]), sim_loss([t], [s]), atol=1e-6)
    assert -1 <= sim_loss([t], [s]).item() <= 1
    # gradients: both networks in stage A; only the teacher when the student is an EMA (sim_in_stage_b)
    for student_grad in (True, False):
        net = DSKDNet(3, cfg)
        out = dskd_forward(net, torch.randn(2, 3, 32, 32), DSKDPlan(student_grad=student_grad,
                                                                     student_tok=student_grad))
        out["sim"].backward()
        gt = net.teacher.net.backbone.blocks[2].mlp.fc1.weight.grad
        gs = net.student.backbone.blocks[2].mlp.fc1.weight.grad
        assert gt is not None and gt.abs().sum() > 0
        assert (gs is not None and gs.abs().sum() > 0) if student_grad else gs is None


def test_flip_alignment_matches_image_flip():
    "Tokens of the flipped image, flipped back, equal the tokens of the image for a flip-equivariant network."
    cfg = make_config("base", **SMALL)
    torch.manual_seed(1)
    net = DSKDNet(3, cfg)
    _symmetrise(net.teacher.net.backbone)
    x = torch.randn(1, 3, 32, 32)
    bb = net.teacher.net.backbone
    a, b = bb(x).tokens, bb(x.flip(-1)).tokens
    assert torch.allclose(flip_tokens(b, (4, 4)), a, atol=1e-4)


# --------------------------------------------------------------------------------------------------- item 33
def test_punc_loss_item33():
    g = torch.randn(0, 1024, requires_grad=True)
    v = punc_loss(g, g.detach())
    assert v.item() == 0 and not torch.isnan(v)
    v.backward()                                  # an empty ROI still gives a usable (zero) graph
    z = torch.randn(6, 32)
    for tau in (0.1, 1.0):
        q = (z / tau).softmax(-1)
        assert torch.allclose(punc_loss(z, z, None, tau, tau), -(q * q.log()).sum(-1).mean(), atol=1e-5)
    # literal mode at init: the projector's cosines make both softmaxes nearly uniform over 1024 entries
    cfg = make_config("base", proj_dim=1024, proj_hidden=2048, proj_bottleneck=256)
    torch.manual_seed(0)
    net = DSKDNet(3, cfg)
    x = torch.randn(2, 3, 32, 32)
    roi = torch.zeros(2, 4, 4, dtype=torch.bool); roi[:, 1:3] = True
    out = dskd_forward(net, x, DSKDPlan(student_grad=False, sim=False, student_tok=False, punc_roi=roi))
    assert out["g_t"].shape == (16, 1024)
    lit = punc_loss(out["g_t"], out["g_s"], None, 1.0, 1.0).item()
    assert abs(lit - math.log(1024)) < 0.05, lit
    # the default (sharpened) temperatures give a loss well away from log(1024)
    assert abs(punc_loss(out["g_t"], out["g_s"], None, 0.04, 0.1).item() - math.log(1024)) > 0.05


def test_punc_roi_is_strict_and_boxed():
    cam = torch.tensor([0.2, 0.21, 0.69, 0.7]).view(1, 1, 1, 4).expand(1, 1, 4, 4).clone()
    roi = punc_roi(cam, torch.ones(1, 1), (4, 4))
    assert roi[0, 0].tolist() == [False, True, True, False]
    roi = punc_roi(cam, torch.ones(1, 1), (2, 2), box=torch.tensor([[0, 32, 0, 16]]), patch=16,
                   low=0.0, high=1.0)
    assert roi[0].tolist() == [[True, False], [True, False]]


# --------------------------------------------------------------------------------------------------- item 34
def test_ema_item34():
    assert ema_momentum(2000, 2000, 20000) == pytest.approx(0.996, abs=1e-12)
    assert ema_momentum(20000, 2000, 20000) == pytest.approx(1.0, abs=1e-12)
    assert ema_momentum(19999, 2000, 20000) < 1.0
    ms = [ema_momentum(n, 2000, 20000) for n in range(2000, 20000, 100)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
    a, b = torch.tensor([0.0, 2.0]), torch.tensor([4.0, 4.0])
    ema_update([(a, b)], 0.5)
    assert torch.equal(a, torch.tensor([2.0, 3.0]))
    # the method's update: average at m = 0.5, frozen weight_g untouched
    m = method(ema_m0=0.5, ema_schedule="linear", max_iters=1000, dskd_warmup=1)
    pair = m.pair
    with torch.no_grad():
        for p in pair.teacher.parameters(): p.add_(torch.randn_like(p))
    g_t = pair.teacher.net.proj_head.last_layer.parametrizations.weight.original0
    g_s = pair.student.proj.last_layer.parametrizations.weight.original0
    assert not torch.equal(g_t, g_s)                       # perturbed above; the EMA must not touch it
    before = {id(s): (s.clone(), t.clone()) for s, t in pair.ema_pairs()}
    g_before, pos_before = g_s.clone(), pair.student.backbone.pos_embed.clone()
    m.after_step(1)                                        # k = 0: m = 0.5
    for s, t in pair.ema_pairs():
        s0, t0 = before[id(s)]
        assert torch.allclose(s, (s0 + t0) / 2, atol=1e-6)
    assert torch.equal(g_s, g_before) and torch.equal(pair.student.backbone.pos_embed, pos_before)
    assert m.window["ema_momentum"] == [0.5]


# --------------------------------------------------------------------------------------------------- the stages
def test_stage_a_then_b():
    m = method()
    b = fake_batch()
    S, T = m.pair.student, m.pair.teacher
    s0 = [p.clone() for p in S.backbone.parameters()]
    L, w = step(m, 0, b)                                   # stage A: both optimisers
    assert set(L) == {"cls", "aux", "tok", "ptc", "sim"} and w["punc"] == 0 and w["seg"] == 0
    assert any(not torch.equal(a, p) for a, p in zip(s0, S.backbone.parameters())), "student trained in stage A"
    assert m._opts[1][1].t == 1 and m._opts[0][1].t == 1
    pairs = m.pair.ema_pairs()
    s1 = [s.clone() for s, _ in pairs]
    L, w = step(m, 1, b)                                   # stage B: teacher optimiser, student = EMA
    assert set(L) == {"cls", "aux", "tok", "ptc", "punc", "seg"} and w["sim"] == 0
    assert m._opts[1][1].t == 1, "the student's scheduler is not stepped in stage B"
    mom = ema_momentum(1, 1, 6)
    for (s, t), old in zip(pairs, s1):
        assert torch.allclose(s, mom * old + (1 - mom) * t, atol=1e-6)
    ex = m.log_extras()
    for k in ("gc_frac_high", "gc_frac_uncertain", "gc_frac_to_bg", "gc_frac_to_ignore", "gc_frac_copied",
              "gc_gmm_mean_lo", "gc_gmm_mean_hi", "gc_gmm_weight_lo", "gc_skipped", "gc_labelled_after",
              "punc_roi_frac", "ema_momentum", "punc_center_norm"):
        assert k in ex, k
    assert ex["gc_images"] == 2 and m.log_extras().keys() == {"punc_center_norm"}   # the window was cleared
    tot = m.summary_extras()
    assert tot["gc_images"] == 2 and tot["gc_frac_high"] == pytest.approx(ex["gc_frac_high"])


def test_punc_centre_update():
    m = method()
    b = fake_batch()
    step(m, 0, b)
    w = m.loss_weights(1)
    m.training_step(b, 1, w)
    s, k = m._pending_center
    assert k > 0
    c0 = m.center.clone()
    m.after_step(1)
    assert torch.allclose(m.center, 0.9 * c0 + 0.1 * s / k, atol=1e-6)


@pytest.mark.parametrize("flags", [
    dict(dskd_view_swap=True), dict(dskd_shared_tok_head=True), dict(punc_literal=True),
    dict(punc_roi_cam="final", punc_low=0.0, punc_high=1.0), dict(punc_roi_res="pixel"),
    dict(dskd_label_cam="student_final"), dict(dskd_label_cam="teacher_aux"), dict(gc_apply="before_par"),
    dict(gc_feat="aux"), dict(gc_feat="proj"), dict(gc_stride="pixel", gc_tau=0.9), dict(gc_tau_mode="adaptive"),
    dict(gc_fit="batch"), dict(gc_confidence="label"), dict(gc_only_ignored=True),
    dict(sim_layers=(1, 3, 5), sim_reduce="sum_layers", sim_in_stage_b=True),
    dict(ema_schedule="linear", ema_copy_at_switch=True), dict(student_sched="stageA_cosine"), dict(gc_enable=False),
])
def test_every_switch_runs_a_step_of_each_stage(flags):
    m = method(**flags)
    b = fake_batch(seed=3)
    for n in (0, 1):
        L, w = step(m, n, b)
        for k, v in L.items(): assert torch.isfinite(v), (k, v)
    if flags.get("sim_in_stage_b"): assert "sim" in L
    if flags.get("dskd_shared_tok_head"): assert m.pair.student.tok_head is None
    if flags.get("gc_enable", True): assert "gc_frac_high" in m.log_extras()
    labels = m.eval_labels(b["img"], b["cls_label"], (40, 40))
    assert ("pseudo_label_gc" in labels) == flags.get("gc_enable", True)
    assert "student_cam" in labels                        # teacher vs student CAM: a DSKD diagnostic at every validation
    for r in ("label", "cam_max"):                        # GC under each confidence reading (the configured one: pseudo_label_gc)
        name = "pseudo_label_gc" if r == m.cfg.gc_confidence else f"pseudo_label_gc_{r}"
        assert (name in labels) == flags.get("gc_enable", True), name
    for name, (lab, _) in labels.items(): assert lab.shape == (2, 40, 40), name


def test_copy_at_switch():
    m = method(ema_copy_at_switch=True, dskd_warmup=1)
    step(m, 0, fake_batch())
    assert all(torch.equal(s, t) for s, t in m.pair.ema_pairs())


def test_bad_config():
    from synernet.core.config import ConfigError
    with pytest.raises(ConfigError, match="punc_low"):
        method(punc_low=0.8, punc_high=0.7)
    with pytest.raises(ConfigError, match="Valid choices"):
        make_config("dskd_gc", dskd_label_cam="student")


# --------------------------------------------------------------------------------------------------- learner runs
TINY = dict(max_iters=3, batch_size=2, log_every=1, eval_every=0, eval_max_images=2, final_eval="single",
            progress=False, crop_size=64, val_resize=64, cam_scales=(1.0, 0.5), dskd_warmup=1, seg_start=1,
            num_workers=0)


@pytest.mark.parametrize("preset", ["dskd", "dskd_gc"])
def test_preset_runs_end_to_end(tmp_path, preset):
    s = Learner(make_config(preset, out_dir=str(tmp_path / "r"), **TINY)).fit()
    assert s["method"] == "dskd" and s["iters"] == 3 and s["seg_miou"] is not None
    lines = [json.loads(l) for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2, 3]
    assert "loss_sim" in lines[0] and "loss_punc" not in lines[0]
    assert "loss_punc" in lines[1] and "loss_seg" in lines[1] and "loss_sim" not in lines[1]
    assert ("gc_frac_high" in lines[1]) == (preset == "dskd_gc")
    assert ("pseudo_label_gc_miou" in s["metrics"]) == (preset == "dskd_gc")
    # the mechanism diagnostics (issue 24), at the final validation
    for k in ("cam_fg_recall", "student_cam_fg_precision", "pseudo_label_labelled", "pseudo_label_bg_iou",
              "dskd_cam_fg_recall_teacher_minus_student"):
        assert k in s["metrics"], k
    for k in ("gc_label_rh_in_bg", "gc_cam_max_ru_in_band", "gc_cam_max_miou_gain", "gc_label_miou_gain",
              "pseudo_label_gc_label_labelled"):
        assert (k in s["metrics"]) == (preset == "dskd_gc"), k


def test_gc_diagnostics_known_answers():
    "Hand-built validation maps: R_h / R_u locations, changed pixels and GC's gains come out as counted by hand."
    m = method(gc_confidence="cam_max")
    gt = torch.zeros(1, 8, 8, dtype=torch.long); gt[0, 2:6, 2:6] = 1; gt[0, 0, 7] = 255     # object rows/cols 2-5
    Y = gt.masked_fill(gt == 255, 0)
    Rh = torch.zeros(1, 8, 8, dtype=torch.bool); Rh[0, 0, :2] = True; Rh[0, 3, 3] = True    # 2 bg + 1 interior
    Ru = torch.zeros(1, 8, 8, dtype=torch.bool); Ru[0, 2, 2] = True; Ru[0, 0, 7] = True     # 1 band + 1 ignored truth
    Yc = Y.clone(); Yc[0, 0, :2] = 255; Yc[0, 3, 3] = 255; Yc[0, 2, 2] = 0                 # 4 valid pixels changed
    g = dict(Y=Yc, Rh=Rh, Ru=Ru, gmm_mean_lo=0.2, gmm_mean_hi=0.9, gmm_weight_lo=0.3)
    m._eval_keep = dict(Y=Y, width=1, gc={"label": g})          # the reading that is not configured: map pseudo_label_gc_label
    sums = {k: float(v) for k, v in m.eval_diagnostics(gt).items()}
    assert (sums["gc_valid"], sums["gc_label_rh_bg"], sums["gc_label_rh_interior"]) == (63, 2, 1)
    assert (sums["gc_label_ru_band"], sums["gc_label_ru_bg"], sums["gc_label_changed"]) == (1, 0, 4)
    res = dict(pseudo_label_miou=80.0, pseudo_label_bg_iou=90.0, pseudo_label_gc_label_miou=85.0,
               pseudo_label_gc_label_bg_iou=88.0, cam_fg_recall=70.0, student_cam_fg_recall=60.0,
               cam_fg_precision=50.0, student_cam_fg_precision=55.0)
    d = m.diagnostic_scores(sums, res)
    assert d["gc_label_rh_in_bg"] == pytest.approx(2 / 3) and d["gc_label_rh_in_interior"] == pytest.approx(1 / 3)
    assert d["gc_label_ru_in_band"] == 1.0 and d["gc_label_rh_frac"] == pytest.approx(3 / 63)
    assert d["gc_label_changed_frac"] == pytest.approx(4 / 63) and d["gc_label_gmm_mean_lo"] == 0.2
    assert (d["gc_label_miou_gain"], d["gc_label_bg_iou_gain"]) == (5.0, -2.0)
    assert (d["dskd_cam_fg_recall_teacher_minus_student"], d["dskd_cam_fg_precision_teacher_minus_student"]) == (10.0, -5.0)
    assert "gc_cam_max_rh_frac" not in d


class _Killed(DSKDMethod):
    kill_at = None
    def training_step(self, batch, n, w):
        if n == _Killed.kill_at: raise KeyboardInterrupt("simulated kill")
        return super().training_step(batch, n, w)


def _run(out, kill_at=None):
    cfg = make_config("dskd_gc", out_dir=str(out), deterministic=True, ckpt_every=2,
                      **{**TINY, "max_iters": 4, "final_eval": "none", "log_every": 2})
    _Killed.kill_at = kill_at
    lrn = Learner(cfg, _Killed)
    try: lrn.fit()
    except KeyboardInterrupt: return None
    return lrn


def test_resume_is_exact(tmp_path):
    "Killed at iteration 3 (after the checkpoint of iteration 1) and resumed: same weights, PUNC centre and GC RNG."
    a = _run(tmp_path / "a")
    assert _run(tmp_path / "b", kill_at=3) is None
    b = _run(tmp_path / "b")
    assert b.start_iter == 2
    for (na, pa), (nb, pb) in zip(a.method.pair.state_dict().items(), b.method.pair.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    assert a.method.center.abs().sum() > 0 and torch.equal(a.method.center, b.method.center)
    assert torch.equal(a.method.gen.get_state(), b.method.gen.get_state())
    la = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(la, lb):
        assert x["step"] == y["step"]
        for k in ("loss_total", "gc_frac_high", "punc_center_norm"):
            if k in x: assert x[k] == pytest.approx(y[k], rel=1e-6), k


def test_papermill_train_notebook(tmp_path):
    "`papermill nbs/train.ipynb out.ipynb -p preset dskd_gc` on the synthetic set, tiny settings."
    params = dict(preset="dskd_gc", out_dir=tmp_path / "run", max_iters=3, batch_size=2, log_every=1, eval_every=0,
                  eval_max_images=2, final_eval="single", crop_size=64, val_resize=64, dskd_warmup=1, seg_start=1,
                  progress=False)
    args = [sys.executable, "-m", "papermill", str(REPO / "nbs" / "train.ipynb"), str(tmp_path / "out.ipynb"),
            "--no-progress-bar", "-k", "python3"]
    for k, v in params.items(): args += ["-p", k, str(v)]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["method"] == "dskd" and s["iters"] == 3 and "pseudo_label_gc_miou" in s["metrics"]
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert "gc_frac_to_bg" in last and "gc_gmm_mean_lo" in last


def test_pseudo_label_study():
    "The offline before/after-GC study equals a direct computation from `eval_outputs` on the same images."
    from synernet.ops.metrics import pseudo_scores
    m = method()
    g = torch.Generator().manual_seed(5)
    items = [dict(img=torch.randn(3, 40, 48, generator=g), mask=torch.randint(0, 4, (40, 48), generator=g),
                  cls_label=torch.tensor([1., 0, 1])) for _ in range(3)]
    items[0]["mask"][:5] = 255
    r = pseudo_label_study(m, items, batch_size=2, size=32, keep_examples=2)
    assert r["images"] == 3 and len(r["examples"]) == 2 and r["gc"]["images"] == 3
    img = torch.stack([torch.nn.functional.interpolate(it["img"][None], size=(32, 32), mode="bilinear",
                                                       align_corners=False)[0] for it in items])
    ups, labs = dict(before=[], after=[]), dict(before=0, after=0)
    for sl in (slice(0, 2), slice(2, 3)):
        e = m.eval_outputs(img[sl], torch.stack([it["cls_label"] for it in items[sl]]), gc=True)
        for k, Y in (("before", e["Y"]), ("after", e["Yc"])):
            for L in Y:
                U = torch.nn.functional.interpolate(L[None, None].float(), size=(40, 48), mode="nearest")[0, 0].long()
                ups[k].append(U[None]); labs[k] += int((U != 255).sum())
    gts = [it["mask"][None] for it in items]
    for k in ("before", "after"):
        assert r[f"miou_{k}"] == pytest.approx(100 * pseudo_scores(gts, ups[k], 4)["miou"])
        assert r[f"labelled_{k}"] == pytest.approx(labs[k] / (3 * 40 * 48))
