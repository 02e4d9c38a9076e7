"""The related mechanisms BMP (Zhu et al., TNNLS 2024), PSS (arXiv 2112.05351) and AMR (Qin et al., AAAI 2022) as
switchable components of the ToCo and SynerNet methods: the sanity check of each (notebooks 60_bmp, 61_pss, 62_amr),
switched-off mechanisms leave the host's run bit-identical, every preset trains end to end with its named losses in
the metric lines and its label maps in the summary, and a run with all three mechanisms resumes exactly. Tiny
settings throughout (batch 2, 2-4 iterations, the demo encoder)."""
import json

import pytest
import torch
import torch.nn.functional as F

from synernet.core.config import ConfigError, make_config
from synernet.data.datasets import dataset_info
from synernet.engine.learner import Learner
from synernet.models.toco import ToCoNet
import synernet.methods.toco as tm
import synernet.methods.synernet as sm
from synernet.engine.hooks import MECHANISMS
from synernet.addons.bmp import BMP, GatedDecoder, s2c_targets, s2c_loss
from synernet.addons.pss import PSS, SupportNet
from synernet.addons.amr import AMR, CompBranch, cam_consistency
from synernet.engine.hooks import capture_inputs

TINY = dict(max_iters=2, batch_size=2, log_every=1, eval_every=0, ckpt_every=0, eval_max_images=2, final_eval="single",
            progress=False, seg_start=0, cam_scales=(1.0, 0.5), deterministic=True)
# cam_reuse_forward=False: a SynerNet host without mechanisms reuses its forward's scale-1.0 CAMs (equal up to float
# rounding, tests/test_step_speedups.py), a host with one runs the full CAM pass; the bit-for-bit checks compare the
# same path
SYN = dict(sbce_start=1, cam_reuse_forward=False)


def _run(preset, path, **kw):
    "Train `preset` with tiny settings; returns (learner, summary, metric lines with losses)."
    lrn = Learner(make_config(preset, out_dir=str(path), **{**TINY, **kw}))
    s = lrn.fit()
    lines = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines()]
    return lrn, s, [m for m in lines if "loss_total" in m]


def _losses(lines): return [{k: v for k, v in m.items() if k.startswith("loss_")} for m in lines]


def _state(lrn, name="net"): return {k: v.clone() for k, v in lrn.method.net(name).state_dict().items()}


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a: assert torch.equal(a[k], b[k]), k


def test_registry_and_presets():
    assert {"bmp", "pss", "amr"} <= set(MECHANISMS)
    for name, host in [("bmp", "toco"), ("pss", "toco"), ("amr", "toco"), ("synernet_bmp", "synernet"),
                       ("synernet_pss", "synernet"), ("synernet_amr", "synernet")]:
        c = make_config(name)
        assert c.method == ("toco" if host == "toco" else "synernet")
        mech = name.split("_")[-1]
        assert c[mech] and not any(c[m] for m in ("bmp", "pss", "amr") if m != mech)
        assert not make_config(host)[mech]
    import synernet.addons  # noqa: F401  (the package import registers every add-on: nothing else to call)
    assert {"bmp", "pss", "amr"} <= set(MECHANISMS)


# ---------------------------------------------------------------- switched off = the host, bit for bit
@pytest.mark.parametrize("preset,host,off", [
    ("bmp", "toco", dict(bmp=False)),
    ("pss", "toco", dict(pss=False)),
    ("amr", "toco", dict(amr=False)),
    ("synernet_pss", "synernet", dict(pss=False, **SYN)),
])
def test_switched_off_is_the_host(preset, host, off, tmp_path):
    a, _, la = _run(host, tmp_path / "host", **(SYN if host == "synernet" else {}))
    b, _, lb = _run(preset, tmp_path / "off", **off)
    assert b.method.mechs == [] and set(b.method.modules) == {"net"}
    assert _losses(la) == _losses(lb)
    _same_state(_state(a), _state(b))


@pytest.mark.parametrize("host,neutral", [
    ("toco", dict(bmp=True, w_bmp_s2c=0.0, bmp_gate_decoder=False, bmp_bsp=False)),          # BMP's sanity check
    ("toco", dict(pss=True, pss_support="self", w_pss_rcm=0.0, w_pss_mam=0.0)),               # PSS's sanity check
    ("synernet", dict(bmp=True, w_bmp_s2c=0.0, bmp_gate_decoder=False, bmp_bsp=False, **SYN)),
])
def test_neutral_settings_are_the_host(host, neutral, tmp_path):
    "A mechanism that is on but has every effect switched off runs the host's numbers exactly (through the hooks)."
    a, _, la = _run(host, tmp_path / "host", **(SYN if host == "synernet" else {}))
    b, _, lb = _run(host, tmp_path / "neutral", **neutral)
    assert len(b.method.mechs) == 1
    assert _losses(la) == _losses(lb)
    _same_state(_state(a), _state(b))


# ---------------------------------------------------------------- BMP's sanity check
def test_bmp_s2c_gradients_reach_classifier_and_encoder_not_decoder():
    torch.manual_seed(0)
    net = ToCoNet(3, make_config("base"))
    net.decoder = GatedDecoder(net.decoder, net.classifier)
    x, y = torch.randn(2, 3, 48, 48), torch.tensor([[1., 1, 0], [0, 1, 1]])
    out = net(x)
    up = lambda t: F.interpolate(t, size=(48, 48), mode="bilinear", align_corners=False)
    Ys = s2c_targets(up(out.seg.detach()), y, None, sigma_s=0.0)
    assert (Ys != 255).any()
    s2c_loss(up(net.cam_logits(out.feat)), Ys).backward()
    assert net.classifier.weight.grad.abs().sum() > 0
    assert sum(p.grad.abs().sum() for p in net.backbone.parameters() if p.grad is not None) > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.decoder.parameters())


def test_bmp_s2c_targets_follow_the_rule():
    seg = torch.zeros(1, 4, 2, 3)
    seg[0, :, 0, 0] = torch.tensor([0., 5, 0, 0])     # confident class 1
    seg[0, :, 0, 1] = torch.tensor([5., 0, 0, 0])     # confident background -> ignored
    seg[0, :, 0, 2] = torch.tensor([0., 0, 0, 5])     # confident class 3, not in the label -> ignored (masked)
    seg[0, :, 1, 0] = torch.tensor([0., 0.5, 0, 0])   # unsure -> ignored
    y = torch.tensor([[1., 1, 0]])
    assert s2c_targets(seg, y, sigma_s=0.75).tolist() == [[[1, 255, 255], [255, 255, 255]]]
    assert s2c_targets(seg, y, sigma_s=0.75, mask_labels=False)[0, 0, 2] == 3


@pytest.mark.parametrize("preset", ["bmp", "synernet_bmp"])
def test_bmp_end_to_end(preset, tmp_path):
    lrn, s, lines = _run(preset, tmp_path / "r", bmp_bsp_start=1, **(SYN if "synernet" in preset else {}))
    keys = [""] if preset == "bmp" else ["b", "p"]
    dec = [lrn.method.mech_branches()[k].decoder for k in keys]
    assert all(isinstance(d, GatedDecoder) for d in dec)
    assert all("loss_bmp_s2c" in m and m["w_bmp_s2c"] == 0.1 for m in lines)
    assert all(0 <= m["bmp_ys_valid"] <= 1 and 0 <= m.get("bmp_ys_agree", 0) <= 1 for m in lines)
    for k in keys:
        name = f"bmp_label_{k}_miou" if k else "bmp_label_miou"
        assert 0 <= s["metrics"][name] <= 100
    assert s["pseudo_label_miou"] is not None and s["seg_miou"] is not None


def test_bsp_replaces_the_targets_after_its_start(monkeypatch):
    "Before bmp_bsp_start the decoder learns the host's label; from it on, the BSP label."
    cfg = make_config("bmp", bmp_bsp_start=1, seg_start=0, cam_scales=(1.0,))
    torch.manual_seed(0)
    meth = tm.ToCoMethod(cfg, dataset_info(cfg), torch.device("cpu"))
    seen = []
    real = tm.seg_loss
    monkeypatch.setattr(tm, "seg_loss", lambda logits, labels, **kw: seen.append(labels.clone()) or real(logits, labels, **kw))
    host = []
    real_pl = meth.pseudo_labels
    monkeypatch.setattr(meth, "pseudo_labels", lambda *a: host.append(real_pl(*a)) or host[-1])
    B, H = 2, 48
    batch = dict(img=torch.randn(B, 3, H, H), cls_label=torch.tensor([[1., 1] + [0] * 6] * B),
                 img_box=torch.tensor([[0, H, 0, H]] * B))
    for n in (0, 1):
        w = {**meth.loss_weights(n), "ctc": 0.0}
        meth.training_step(batch, n, w)
    assert torch.equal(seen[0], host[0])
    assert not torch.equal(seen[1], host[1])


# ---------------------------------------------------------------- PSS's sanity check
@pytest.mark.parametrize("preset,extra", [("pss", dict(pss_rcm_bank=True, pss_mam_scale_attn=True)),
                                          ("synernet_pss", dict(SYN)),
                                          ("pss", dict(pss_support="self", pss_mam_one_sided=True))])
def test_pss_end_to_end(preset, extra, tmp_path):
    lrn, s, lines = _run(preset, tmp_path / "r", **extra)
    meth = lrn.method
    assert {"loss_pss_rcm", "loss_pss_mam"} <= set(lines[-1])
    for k in ("pss_protos", "pss_pos_cos", "pss_region_frac", "pss_mam_area"): assert k in lines[-1], k
    if extra.get("pss_support") == "self":
        assert "pss_support" not in meth.modules
        return
    sup = meth.modules["pss_support"]
    assert isinstance(sup, SupportNet) and not sup.training
    assert all(p.grad is None and not p.requires_grad for p in sup.parameters())
    names = ["pss_cam"] if preset == "pss" else ["pss_cam_b", "pss_cam_p"]
    for n in names: assert 0 <= s["metrics"][f"{n}_miou"] <= 100
    # the teacher moves slowly: one more EMA step is exactly m * theta_s + (1 - m) * theta_m
    mech = meth.mechs[0]
    old = [a.detach().clone() for a, _ in mech.pairs]
    mech.after_step(2)
    m = meth.cfg.pss_ema_m
    for (a, p), o in zip(mech.pairs, old): torch.testing.assert_close(a, m * o + (1 - m) * p.detach())
    drift = max(float((a - p.detach()).abs().max()) for a, p in mech.pairs)
    assert 0 < drift < 0.05


# ---------------------------------------------------------------- AMR's sanity check
@pytest.mark.parametrize("depth", [0, 2])
def test_amr_identity_gates_track_the_spotlight(depth):
    torch.manual_seed(0)
    net = ToCoNet(3, make_config("base")).eval()
    cb = CompBranch(net, 3, depth=depth).eval()
    cb.classifier.weight.data.copy_(net.classifier.weight.data)
    for m in cb.amms: m.identity = True
    x = torch.randn(2, 3, 40, 56)
    with torch.no_grad(), capture_inputs({"": net.backbone.blocks[min(cb.start, 5)].norm1}) as cap:
        out = net(x)
        z = cap.get()[""] if depth else out.feat
        zc, Ac = cb(z, out.feat.shape[-2:])
    A = net.cam_logits(out.feat)
    torch.testing.assert_close(Ac, A, atol=1e-4, rtol=1e-4)
    assert float(cam_consistency(A, Ac).detach()) < 1e-4


def test_amr_depth_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="amr_comp_depth=7"):
        Learner(make_config("amr", out_dir=str(tmp_path / "a"), amr_comp_depth=7, **TINY))


@pytest.mark.parametrize("preset,extra", [("amr", {}), ("synernet_amr", dict(SYN)),
                                          ("amr", dict(amr_comp_depth=0, amr_gauss_stats="batch",
                                                       amr_gauss_peak_norm=False, amr_cps_detach_spot=True))])
def test_amr_end_to_end(preset, extra, tmp_path):
    lrn, s, lines = _run(preset, tmp_path / "r", **extra)
    meth = lrn.method
    assert "amr" in meth.trainable and len(lrn.optims) == 2
    last = lines[-1]
    assert {"loss_cls_comp", "loss_amr_cons"} <= set(last)
    assert last["w_cls_comp"] == 1.0 and last["w_amr_cons"] == 0.05
    for g in ("gch", "gsp"):
        assert 0 < last[f"amr_{g}_min"] <= last[f"amr_{g}_mean"] <= last[f"amr_{g}_max"]
        if extra.get("amr_gauss_peak_norm", True): assert last[f"amr_{g}_max"] <= 1
    assert 0 <= last["amr_area_spot"] <= 1 and 0 <= last["amr_area_comp"] <= 1
    sfx = [""] if preset == "amr" else ["_b", "_p"]
    for k in sfx:
        for n in ("amr_cam", "amr_fused_cam"): assert 0 <= s["metrics"][f"{n}{k}_miou"] <= 100
    ck = torch.load(tmp_path / "r" / "checkpoints" / "final.pt", weights_only=False)
    assert "amr" in ck["modules"] and len(ck["optims"]) == 2


def test_amr_fused_labels(monkeypatch):
    "The pseudo-label is made from (1 - beta) spotlight + beta compensation CAM."
    cfg = make_config("amr", seg_start=0, cam_scales=(1.0,), amr_fuse_beta=0.25)
    torch.manual_seed(0)
    meth = tm.ToCoMethod(cfg, dataset_info(cfg), torch.device("cpu"))
    got = {}
    def fake(img, cam, y, box):
        got["cam"] = cam
        return torch.zeros(cam.shape[0], *cam.shape[-2:], dtype=torch.long)
    monkeypatch.setattr(meth, "pseudo_labels", fake)
    from synernet.engine.hooks import Step
    B, H = 2, 48
    x, y, box = torch.randn(B, 3, H, H), torch.tensor([[1., 1] + [0] * 6] * B), torch.tensor([[0, H, 0, H]] * B)
    w = {**meth.loss_weights(0), "ctc": 0.0}
    meth.core.eval(); meth.mechs[0].comp().eval()
    S = Step(meth, x, y, box, 0, w)
    cam, _ = S.ms_pass(x, cfg.cam_scales)
    meth.training_step(dict(img=x, cls_label=y, img_box=box), 0, w)
    torch.testing.assert_close(got["cam"], 0.75 * cam + 0.25 * S.ms["amr"][0])
    assert (S.ms["amr"][0] - cam).abs().max() > 1e-3


# ---------------------------------------------------------------- all three at once; exact resume
@pytest.mark.parametrize("host,extra", [("toco", {}), ("synernet", dict(SYN, shared_encoder=True))])
def test_all_three_together(host, extra, tmp_path):
    lrn, s, lines = _run(host, tmp_path / "r", bmp=True, pss=True, amr=True, bmp_bsp_start=0, seg_loss_nan_guard=True,
                         **extra)
    assert [m.name for m in lrn.method.mechs] == ["amr", "bmp", "pss"]          # name order, whatever the imports
    assert {"loss_bmp_s2c", "loss_pss_rcm", "loss_pss_mam", "loss_cls_comp", "loss_amr_cons"} <= set(lines[-1])


def test_resume_is_exact_with_all_three(tmp_path, monkeypatch):
    "EMA SupportNet, prototype bank, the compensation module and its optimiser: 2 + 2 iterations = 4 iterations."
    kw = dict(TINY, max_iters=4, ckpt_every=2, bmp=True, pss=True, amr=True, pss_rcm_bank=True, bmp_bsp_start=1,
              seg_loss_nan_guard=True)
    straight = Learner(make_config("toco", out_dir=str(tmp_path / "a"), **kw))
    straight.fit()
    real = tm.ToCoMethod.training_step
    def killer(self, batch, n, w):
        if n == 3: raise KeyboardInterrupt("simulated kill")
        return real(self, batch, n, w)
    monkeypatch.setattr(tm.ToCoMethod, "training_step", killer)
    with pytest.raises(KeyboardInterrupt):
        Learner(make_config("toco", out_dir=str(tmp_path / "b"), **kw)).fit()
    monkeypatch.setattr(tm.ToCoMethod, "training_step", real)
    resumed = Learner(make_config("toco", out_dir=str(tmp_path / "b"), **kw))
    assert resumed.start_iter == 2
    resumed.fit()
    for name in ("net", "pss_support", "amr"): _same_state(_state(straight, name), _state(resumed, name))
    pa, pb = (next(m for m in l.method.mechs if m.name == "pss") for l in (straight, resumed))
    assert torch.equal(pa.bank, pb.bank) and torch.equal(pa.seen, pb.seen)
    la = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lb] == [1, 2, 3, 4]
    assert _losses(la) == _losses(lb)


@pytest.mark.parametrize("switch", ["bmp", "pss", "amr"])
def test_switch_on_a_method_without_mechanisms_fails(switch, tmp_path):
    "DSKD does not host the mechanisms: switching one on there is a clear error, not silently ignored."
    with pytest.raises(ConfigError, match=f"{switch} is a switch of the 'toco' and 'synernet' methods"):
        Learner(make_config("dskd", out_dir=str(tmp_path / "r"), **{**TINY, switch: True}))
    assert not (tmp_path / "r").exists()          # refused before the run folder is written


def test_demo_guards_toco_seg_loss_paper_keeps_it():
    "ToCo's exact seg loss (NaN for a batch without background or foreground) at paper scale; guarded on the tiny demo."
    from synernet.engine.runs import build_config
    for p in ("toco", "pss", "bmp", "amr"):
        assert build_config(preset=p).seg_loss_nan_guard, p
    assert [build_config(preset=p, dataset=d).seg_loss_nan_guard for p in ("toco", "pss") for d in ("voc", "coco")] \
        == [False] * 4
