"""Backbone, ToCo network, parameter groups and lr schedules (ToCo's model/model_seg_neg.py,
model/backbone/vit.py, the EMA projection head of forward_proj, utils/optimizer.py; quirks q6/q8).

Fast tests use the demo encoder or a 12-block tiny ViT at small inputs; the paper-scale test (ViT-B/16 at 448) is
marked slow: run it with `pytest -m slow tests/test_model.py`.
"""
import math
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from synernet.core.config import ConfigError, make_config
from synernet.models.backbone import (PAPER_BACKBONE, WeightsUnavailableError, build_backbone, build_vit, ViTBackbone,
                               resize_pos_embed, to2d)
from synernet.models.toco import (CTCHead, LargeFOV, ToCoNet, WarmupLR, build_optimizer, cosine_warmup_factor,
                           lr_param_groups, pool_tokens, poly_warmup_factor)

TINY12 = "vit_tiny_patch16_224"     # 12 blocks like ViT-B, width 192: ToCo's block indexing at a small cost


def _net(**kw):
    torch.manual_seed(0)
    return ToCoNet(3, make_config("base"), **kw)


def _hooked(vit, x, blocks):
    seen = {}
    hs = [vit.blocks[i].register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, o)) for i in blocks]
    try:
        with torch.no_grad(): ref = vit.forward_features(x)
    finally:
        for h in hs: h.remove()
    return ref, seen


# --- backbone ----------------------------------------------------------------------------------------------------
def test_forward_equals_timm_on_both_attention_paths():
    torch.manual_seed(0)
    vit = build_vit(TINY12).eval()
    bb = ViTBackbone(vit).eval()
    x = torch.randn(2, 3, 224, 224)
    ref, seen = _hooked(vit, x, [9, 11])
    with torch.no_grad():
        fused = bb(x, aux_blocks=(-3, 9, -1))
        expl = bb(x, aux_blocks=(9,), attn_blocks=range(12))
    for o in (fused, expl):
        torch.testing.assert_close(o.cls, ref[:, 0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(o.tokens, ref[:, 1:], atol=2e-5, rtol=1e-4)
    assert sorted(fused.blocks) == [9, 11] and fused.attn == {}          # -3 and 9 are the same block
    torch.testing.assert_close(fused.block(-3), seen[9][:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(expl.block(9), seen[9][:, 1:], atol=1e-5, rtol=1e-5)
    a = expl.attention(-1)
    assert a.shape == (2, 3, 197, 197) and sorted(expl.attn) == list(range(12))
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 197))


def test_attention_map_is_softmax_of_scaled_qk():
    torch.manual_seed(1)
    bb = build_backbone("vit_tiny_p8_demo").eval()
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        o = bb(x, attn_blocks=(2,))
        z = torch.cat([bb.cls_token, bb.patch_embed.proj(x).flatten(2).transpose(1, 2)], 1) + bb.pos_embed_for((4, 6))
        for blk in bb.blocks[:2]: z = blk(z)                        # timm's own Block forward
        qkv = bb.blocks[2].attn.qkv(bb.blocks[2].norm1(z))[0].reshape(-1, 3, 3, 64)   # [N+1, (q,k,v), heads, 64]
        q, k = qkv[:, 0].transpose(0, 1).double().numpy(), qkv[:, 1].transpose(0, 1).double().numpy()
    logits = q @ k.transpose(0, 2, 1) / 8.0                             # 1 / sqrt(64)
    ref = np.exp(logits - logits.max(-1, keepdims=True))
    ref /= ref.sum(-1, keepdims=True)
    assert o.attention(2).shape == (1, 3, 25, 25)
    np.testing.assert_allclose(o.attention(2)[0].double().numpy(), ref, atol=1e-6)


def test_non_square_input_resizes_pos_embed_bicubically():
    torch.manual_seed(0)
    vit = build_vit(TINY12).eval()
    bb = ViTBackbone(vit).eval()
    x = torch.randn(1, 3, 320, 480)
    with torch.no_grad():
        o = bb(x)
    assert o.hw == (20, 30) and o.tokens.shape == (1, 600, 192) and o.feat().shape == (1, 192, 20, 30)
    grid = vit.pos_embed[:, 1:].detach().reshape(1, 14, 14, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(20, 30), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(bb.pos_embed_for((20, 30))[:, 1:], want)
    torch.testing.assert_close(bb.pos_embed_for((20, 30))[:, 0], vit.pos_embed[:, 0])
    # the whole forward equals timm's on a copy whose stored grid is the resized one
    vit2 = build_vit(TINY12).eval()
    vit2.load_state_dict(vit.state_dict())
    vit2.pos_embed = nn.Parameter(bb.pos_embed_for((20, 30)).detach())
    vit2.patch_embed.img_size, vit2.patch_embed.grid_size = (320, 480), (20, 30)
    with torch.no_grad(): ref = vit2.forward_features(x)
    torch.testing.assert_close(o.tokens, ref[:, 1:], atol=2e-5, rtol=1e-4)
    # token order is row-major: token r*w+q is the patch at row r, column q
    x2 = torch.zeros(1, 3, 320, 480); x2[..., 16 * 3:16 * 4, 16 * 7:16 * 8] = 5.0
    with torch.no_grad():
        emb = bb.patch_embed.proj(x2).flatten(2).transpose(1, 2)[0]
    changed = (emb - emb[0]).abs().sum(-1) > 1e-4
    assert changed.nonzero().flatten().tolist() == [3 * 30 + 7]


def test_pos_embed_frozen_and_class_token_trained():
    bb = build_backbone("vit_tiny_p8_demo")
    assert bb.pos_embed.requires_grad is False and bb.cls_token.requires_grad is True
    assert build_backbone("vit_tiny_p8_demo", freeze_pos_embed=False).pos_embed.requires_grad is True
    x = torch.randn(1, 3, 32, 32)
    bb(x).cls.sum().backward()
    assert bb.pos_embed.grad is None and bb.cls_token.grad is not None


def test_block_indices_are_checked():
    bb = build_backbone("vit_tiny_p8_demo")
    with pytest.raises(ConfigError, match=r"valid indices are -6\.\.5"):
        bb(torch.randn(1, 3, 16, 16), aux_blocks=(9,))
    with pytest.raises(ConfigError, match="aux_layer=9 is out of range"):
        _net(aux_layer=9)                       # the COCO paper value on the 6-block demo encoder
    with pytest.raises(ValueError, match="smaller than one"):
        bb(torch.randn(1, 3, 4, 16))


def test_def_compat_qkv_and_local_weight_files(tmp_path):
    torch.manual_seed(3)
    src = build_vit("vit_tiny_p8_demo")
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    save_file(sd, str(tmp_path / "w.safetensors"))
    torch.save(sd, tmp_path / "w.pth")
    for f in ("w.safetensors", "w.pth"):
        got = build_backbone("vit_tiny_p8_demo", weights_file=tmp_path / f).state_dict()
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in got), f
    compat = build_backbone("vit_tiny_p8_demo", weights_file=tmp_path / "w.safetensors", def_compat_qkv=True)
    got = compat.state_dict()
    assert set(sd) - set(got) == {f"blocks.{i}.attn.qkv.bias" for i in range(6)} and set(got) <= set(sd)
    assert all(torch.equal(got[k], sd[k]) for k in got)
    assert all(m.eps == 1e-5 for m in compat.modules() if isinstance(m, nn.LayerNorm))
    std = build_backbone("vit_tiny_p8_demo")
    assert all(m.eps == 1e-6 for m in std.modules() if isinstance(m, nn.LayerNorm))
    assert all(b.attn.qkv.bias is not None for b in std.blocks)
    # the compat model computes without the biases: differs from the source, equals the source with zeroed biases
    x = torch.randn(1, 3, 32, 32)
    zero = build_backbone("vit_tiny_p8_demo", weights_file=tmp_path / "w.safetensors").eval()
    with torch.no_grad():
        for b in zero.blocks: b.attn.qkv.bias.zero_()
        for m in zero.modules():
            if isinstance(m, nn.LayerNorm): m.eps = 1e-5
        torch.testing.assert_close(compat.eval()(x).tokens, zero(x).tokens)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_backbone("vit_tiny_p8_demo", weights_file=tmp_path / "missing.pth")


def _no_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)


def test_missing_download_fails_fast_offline(monkeypatch, tmp_path):
    _no_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="weights_file=") as e:
        build_backbone(PAPER_BACKBONE, pretrained=True)
    assert time.monotonic() - t0 < 5, "must fail in seconds, not after the hub's retries"
    assert "HF_HUB_OFFLINE" in str(e.value) and "timm/vit_base_patch16_224.orig_in21k_ft_in1k" in str(e.value)
    with pytest.raises(WeightsUnavailableError):         # the config path (paper-scale VOC) fails the same way
        ToCoNet(20, make_config("base", dataset="voc"))


def test_missing_download_fails_fast_without_network(monkeypatch, tmp_path):
    _no_cache(monkeypatch, tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # discard port: nothing listens
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="cannot be reached") as e:
        build_backbone("deit_base_patch16_224", pretrained=True)
    assert time.monotonic() - t0 < 5 and "weights_file=" in str(e.value)


def test_hub_check_is_bounded_when_the_network_hangs(monkeypatch):
    import socket
    from synernet.models.backbone import check_hub_reachable
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    def hang(*a, **k):                     # a lookup that does not return in time (then fails, as a real one would)
        time.sleep(10); raise OSError("timed out")
    monkeypatch.setattr(socket, "create_connection", hang)
    t0 = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="no answer within 0.5 s"):
        check_hub_reachable(PAPER_BACKBONE, timeout=0.5)
    assert time.monotonic() - t0 < 2


def test_cached_weights_are_loaded_without_network(monkeypatch, tmp_path):
    "A file in the torch hub cache is used as a local file: no hub check, even offline."
    _no_cache(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch.manual_seed(5)
    src = build_vit(TINY12)
    from timm.models import get_pretrained_cfg
    ck = tmp_path / "torch" / "hub" / "checkpoints"; ck.mkdir(parents=True)
    name = "deit_tiny_patch16_224"                       # same shapes as vit_tiny; its checkpoint url is a .pth
    torch.save(src.state_dict(), ck / get_pretrained_cfg(name).url.rsplit("/", 1)[1])
    got = build_backbone(name, pretrained=True).state_dict()
    ref = src.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in got)


# --- ToCo network ------------------------------------------------------------------------------------------------
def test_decoder_and_projection_head_sizes():
    dec = LargeFOV(768, 21)
    assert sum(p.numel() for p in dec.parameters()) == 5_908_992
    assert not any("bias" in n for n, _ in dec.named_parameters())
    assert [m.dilation for m in dec.modules() if isinstance(m, nn.Conv2d)] == [(5, 5), (5, 5), (1, 1)]
    torch.manual_seed(0)
    head = CTCHead(768, 1024)
    assert sum(p.numel() for p in head.parameters()) == 6_558_976
    assert sum(p.numel() for p in head.parameters() if not p.requires_grad) == 1024
    out = head(torch.randn(32, 768) * 10)
    assert out.shape == (32, 1024) and out.abs().max() <= 1 + 1e-6
    assert 1.7 < out.norm(dim=1).mean() < 2.3
    w = [m.weight for m in head.mlp if isinstance(m, nn.Linear)]
    assert all(abs(x.std().item() - 0.02) < 0.001 for x in w)   # trunc-normal std 0.02 (cut at +-2, i.e. not at all)
    assert all(torch.count_nonzero(m.bias) == 0 for m in head.mlp if isinstance(m, nn.Linear))


def test_forward_shapes_and_gmp_before_linear_map():
    net = _net().eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        o = net(x)
    assert o.cls_logits.shape == (2, 3) and o.cls_aux_logits.shape == (2, 3)
    assert o.seg.shape == (2, 4, 8, 6) and o.feat.shape == (2, 192, 8, 6) and o.aux_feat.shape == (2, 192, 8, 6)
    f, fa = o.feat.double().numpy(), o.aux_feat.double().numpy()
    W, Wa = (m.weight[:, :, 0, 0].detach().double().numpy() for m in (net.classifier, net.aux_classifier))
    np.testing.assert_allclose(o.cls_logits.numpy(), f.reshape(2, 192, -1).max(-1) @ W.T, atol=1e-5)
    np.testing.assert_allclose(o.cls_aux_logits.numpy(), fa.reshape(2, 192, -1).max(-1) @ Wa.T, atol=1e-5)
    cam_peak = np.einsum("cd,bdn->bcn", W, f.reshape(2, 192, -1)).max(-1)
    assert np.abs(o.cls_logits.numpy() - cam_peak).max() > 1e-2     # GMP precedes the linear map: not the CAM's max
    # aux tokens: pre-LN output of block -3 (= 3 of 6), not the final LN tokens
    torch.testing.assert_close(o.aux_feat, to2d(o.backbone.block(3), o.backbone.hw))
    torch.testing.assert_close(o.feat, o.backbone.feat())
    torch.testing.assert_close(o.seg, net.decoder(o.feat))


def test_top5_and_topk_pooling():
    net = _net(pool="top5").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        o = net(x)
    f = o.feat.flatten(2).double().numpy()
    W = net.classifier.weight[:, :, 0, 0].detach().double().numpy()
    np.testing.assert_allclose(o.cls_logits.numpy(), np.sort(f, -1)[..., -5:].mean(-1) @ W.T, atol=1e-5)
    t = torch.randn(2, 4, 3, 3)
    np.testing.assert_allclose(pool_tokens(t, "topk", 9).numpy(), t.flatten(2).mean(-1).numpy(), atol=1e-6)
    assert torch.equal(pool_tokens(t, "topk", 1), pool_tokens(t, "gmp"))
    with pytest.raises(ValueError, match="at least k=10"):
        pool_tokens(t, "topk", 10)


def test_cams_skip_the_decoder_and_equal_the_full_forward():
    net = _net().eval()
    x = torch.randn(2, 3, 64, 64)
    calls = []
    h = net.decoder.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        cam, cam_aux = net.cams(x)
    assert calls == []
    with torch.no_grad():
        o = net(x)
    h.remove()
    assert calls == [1]
    W, Wa = net.classifier.weight[:, :, 0, 0], net.aux_classifier.weight[:, :, 0, 0]
    torch.testing.assert_close(cam, torch.einsum("cd,bdhw->bchw", W, o.feat), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam_aux, torch.einsum("cd,bdhw->bchw", Wa, o.aux_feat), atol=1e-5, rtol=1e-5)
    c2, ca2 = net.cam_logits(o.feat, o.aux_feat)
    assert torch.equal(cam, c2) and torch.equal(cam_aux, ca2)
    assert cam.min() < 0     # raw maps, no ReLU


def test_forward_proj_ema_order_and_efficient_path():
    net = _net()
    torch.manual_seed(7)
    with torch.no_grad():
        for p in net.proj_head.parameters():
            if p.requires_grad: p.add_(0.05 * torch.randn_like(p))
    g = [torch.randn(2, 3, 48, 48) for _ in range(2)]
    loc = [torch.randn(2, 3, 16, 16) for _ in range(4)]
    s0 = {n: p.detach().clone() for n, p in net.proj_head.named_parameters()}
    t0 = {n: p.detach().clone() for n, p in net.proj_head_t.named_parameters()}
    res = {}
    for eff in (False, True):
        with torch.no_grad():
            for n, p in net.proj_head_t.named_parameters(): p.copy_(t0[n])
        net.efficient = eff
        net.zero_grad()
        out_t, out_s = net.forward_proj(g, loc)
        loss = (out_t.detach() * out_s[:4]).sum() + out_s[4:].pow(2).sum() + (out_t * 0).sum()
        loss.backward()
        res[eff] = (out_t.detach(), out_s.detach(),
                    {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
        for n, p in net.proj_head_t.named_parameters():      # EMA with momentum 0.9, done before use
            torch.testing.assert_close(p, 0.9 * t0[n] + (1 - 0.9) * s0[n], atol=0, rtol=0)
        assert all(p.grad is None for p in net.proj_head_t.parameters())
        assert not out_t.requires_grad
    (ta, sa, ga), (tb, sb, gb) = res[False], res[True]
    assert ta.shape == (4, 256) and sa.shape == (12, 256)
    torch.testing.assert_close(ta, tb, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(sa, sb, atol=1e-6, rtol=1e-5)
    assert set(ga) == set(gb) and any(k.startswith("backbone.") for k in ga)
    for k in ga: torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=1e-4)
    # teacher = EMA head on global class tokens; student rows ordered [g0, g1, l0..l3] in blocks of B = 2
    net.eval()
    with torch.no_grad():
        cls = [net.backbone(v).cls for v in g + loc]
        torch.testing.assert_close(tb, net.proj_head_t(torch.cat(cls[:2])), atol=1e-6, rtol=1e-5)
        for i, c in enumerate(cls):
            torch.testing.assert_close(sb[2 * i:2 * i + 2], net.proj_head(c), atol=1e-6, rtol=1e-5)


# --- optimiser -------------------------------------------------------------------------------------------------
def test_parameter_groups_follow_toco():
    net = _net()
    groups = net.param_groups(6e-5, 10.0, 0.01)
    names = [set(g["names"]) for g in groups]
    assert [g["group"] for g in groups] == ["encoder", "encoder_norm", "heads", "decoder"]
    np.testing.assert_allclose([g["lr"] for g in groups], [6e-5, 6e-5, 6e-4, 6e-4], rtol=1e-15)
    assert all(g["weight_decay"] == 0.01 for g in groups)
    enc = {f"backbone.{n}" for n, p in net.backbone.named_parameters() if p.requires_grad}
    assert names[0] | names[1] == enc and not names[0] & names[1]
    assert all("norm" in n for n in names[1]) and not any("norm" in n for n in names[0])
    assert {"backbone.cls_token", "backbone.patch_embed.proj.weight", "backbone.blocks.0.attn.qkv.bias"} <= names[0]
    assert {"backbone.norm.weight", "backbone.blocks.5.norm2.bias"} <= names[1]
    assert "backbone.pos_embed" not in names[0] | names[1]
    assert {n.split(".")[0] for n in names[2]} == {"classifier", "aux_classifier", "proj_head"}
    assert {n.split(".")[0] for n in names[3]} == {"decoder"}
    assert not any("original0" in n for n in names[2])               # frozen g of the weight norm
    allp = set().union(*names)
    assert not any(n.startswith("proj_head_t") for n in allp)
    want = {n for n, p in net.named_parameters() if p.requires_grad}
    assert allp == want
    with pytest.raises(ConfigError, match="in no optimiser group"):
        lr_param_groups(net, ["backbone"], ["classifier"], ["decoder"], exclude=["proj_head_t"])


def test_build_optimizer_and_the_lr_of_the_first_updates():
    net = _net()
    cfg = make_config("base", dataset="voc", scale="demo", warmup_iters=4, max_iters=10)
    opt, sched = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.9, 0.999) and opt.defaults["eps"] == 1e-8
    x = torch.randn(2, 3, 32, 32)
    p = net.classifier.weight
    lrs = []
    for t in range(6):
        before = p.detach().clone()
        net.zero_grad()
        o = net(x)
        (o.cls_logits.sum() + o.cls_aux_logits.sum() + o.seg.mean()).backward()
        lrs.append(sched.step())
        opt.step()
        if t == 0:   # first AdamW update: p(1 - lr*wd) - lr * g / (|g| + eps)
            g = p.grad
            torch.testing.assert_close(p.detach(), before * (1 - lrs[0][2] * 0.01) - lrs[0][2] * g / (g.abs() + 1e-8))
    for t, row in enumerate(lrs):
        f = poly_warmup_factor(t, 4, 10, cfg.warmup_ratio, cfg.poly_power)
        np.testing.assert_allclose(row, [cfg.lr * f, cfg.lr * f, 10 * cfg.lr * f, 10 * cfg.lr * f], rtol=1e-12)


def test_schedules_as_pure_functions():
    w, T, r, pw = 1500, 20000, 1e-6, 0.9
    for t in [0, 1, 199, 1499, 1500, 1501, 9999, 19999, 20000, 30000]:
        tt = min(t, T - 1)
        poly = (1 - (1 - tt / w) * (1 - r)) if tt < w else (1 - tt / T) ** pw
        cos = (1 - (1 - tt / w) * (1 - r)) if tt < w else 0.5 * (1 + np.cos(np.pi * (tt - w) / (T - w)))
        assert poly_warmup_factor(t, w, T, r, pw) == pytest.approx(poly, rel=1e-14)
        assert cosine_warmup_factor(t, w, T, r) == pytest.approx(cos, rel=1e-12, abs=1e-15)
    # ToCo's PolyWarmupAdamW: group-0 lr after n step() calls
    for n, v in [(1, 6.0e-11), (200, 7.960052e-06), (1501, 5.593438e-05), (10000, 3.215610e-05), (20000, 8.076520e-09)]:
        assert 6e-5 * poly_warmup_factor(n - 1, w, T, r, pw) == pytest.approx(v, rel=1e-6)
    # the cosine schedule (ToCo's CosWarmupAdamW, fixed for NumPy >= 1.24): after warm-up is lr0 * (0.5 + 0.5 cos(pi (t - w) / (T - w)))
    assert cosine_warmup_factor(w, w, T, r) == 1.0
    assert cosine_warmup_factor((w + T) // 2, w, T, r) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 9250 / 18500))


@pytest.mark.parametrize("schedule", ["poly", "cosine"])
def test_scheduler_resume_matches_uninterrupted(schedule):
    def make():
        ps = [nn.Parameter(torch.zeros(1)) for _ in range(2)]
        return torch.optim.AdamW([dict(params=[ps[0]], lr=1e-3), dict(params=[ps[1]], lr=1e-2)])
    o1 = make(); s1 = WarmupLR(o1, max_iters=50, warmup_iters=10, schedule=schedule)
    full = [s1.step() for _ in range(50)]
    o2 = make(); s2 = WarmupLR(o2, max_iters=50, warmup_iters=10, schedule=schedule)
    first = [s2.step() for _ in range(17)]
    sd = s2.state_dict()
    o3 = make(); s3 = WarmupLR(o3, max_iters=50, warmup_iters=10, schedule=schedule)
    s3.load_state_dict(sd)
    assert [g["lr"] for g in o3.param_groups] == first[-1]
    assert first + [s3.step() for _ in range(33)] == full
    with pytest.raises(ConfigError, match="schedule differs"):
        WarmupLR(make(), max_iters=50, warmup_iters=11, schedule=schedule).load_state_dict(sd)


def test_config_keys_and_presets():
    d = make_config("base")
    assert (d.backbone, d.pretrained, d.lr, d.warmup_iters, d.lr_schedule) == ("vit_tiny_p8_demo", False, 1e-4, 50, "poly")
    v = make_config("base", dataset="voc")
    assert (v.backbone, v.pretrained, v.weights_file, v.aux_layer, v.pool, v.def_compat_qkv, v.drop_path) == \
        (PAPER_BACKBONE, True, "", -3, "gmp", False, 0.0)
    assert (v.lr, v.head_lr_mult, v.weight_decay, v.warmup_iters, v.warmup_ratio, v.poly_power, v.ctc_head_momentum) \
        == (6e-5, 10.0, 0.01, 1500, 1e-6, 0.9, 0.9)
    assert (v.decoder_dim, v.proj_dim, v.proj_hidden, v.proj_bottleneck) == (512, 1024, 2048, 256)
    assert make_config("base", dataset="coco").aux_layer == 9
    with pytest.raises(ConfigError, match="not a timm model name"):
        make_config("base", backbone="vit_huge_nonsense")
    with pytest.raises(ConfigError, match="Unknown model argument 'aux_layers'"):
        _net(aux_layers=2)
    with pytest.raises(ConfigError, match="Valid choices"):
        _net(pool="mean")
    assert _net(aux_layer="-2").aux_layer == 4       # coerced like a command-line value


def test_demo_network_learns_a_batch():
    "A few AdamW steps on one batch lower the classification loss: gradients flow through every group."
    net = _net()
    cfg = make_config("base", warmup_iters=0, lr=1e-3)
    opt, sched = build_optimizer(net, cfg)
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([[1., 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    losses = []
    for _ in range(8):
        o = net(x)
        loss = F.multilabel_soft_margin_loss(o.cls_logits, y) + F.multilabel_soft_margin_loss(o.cls_aux_logits, y)
        ot, os_ = net.forward_proj([x, x.flip(-1)], [x[..., :16, :16]])
        loss = loss + 0.1 * o.seg.logsumexp(1).mean() + 0.1 * (1 - (ot * os_[:8]).sum(-1)).mean()
        opt.zero_grad(); loss.backward()
        assert all(p.grad is not None for g in opt.param_groups for p in g["params"])
        sched.step(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


# --- paper scale ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_paper_scale_vit_b_448():
    import resource
    torch.manual_seed(0)
    t0 = time.perf_counter()
    net = ToCoNet(20, make_config("base", dataset="voc", pretrained=False))
    t_build = time.perf_counter() - t0
    n = lambda m, trainable=None: sum(p.numel() for p in m.parameters() if trainable is None or p.requires_grad == trainable)
    assert n(net.decoder) == 5_908_992
    assert n(net.proj_head) == 6_558_976 and n(net.proj_head, False) == 1024
    assert n(net.backbone) == 85_798_656 and net.backbone.depth == 12 and net.aux_layer == 9
    assert net.backbone.pos_embed.requires_grad is False and net.backbone.blocks[0].attn.qkv.bias is not None
    x = torch.randn(1, 3, 448, 448)
    t0 = time.perf_counter()
    o = net(x)
    (o.cls_logits.sum() + o.cls_aux_logits.sum() + o.seg.mean()).backward()
    t_fb = time.perf_counter() - t0
    assert o.cls_logits.shape == (1, 20) and o.seg.shape == (1, 21, 28, 28) and o.feat.shape == (1, 768, 28, 28)
    groups = net.param_groups()
    missing = [nm for g in groups if g["group"] != "heads" for nm, p in zip(g["names"], g["params"]) if p.grad is None]
    assert missing == []                                   # the projection head gets gradients from forward_proj only
    cam, cam_aux = net.cams(torch.randn(1, 3, 320, 480))
    assert cam.shape == cam_aux.shape == (1, 20, 20, 30)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"\nViT-B ToCo at 448: build {t_build:.1f} s, forward+backward {t_fb:.1f} s, peak RSS {rss:.2f} GiB")
