"""Why SynerNet's fused pseudo-label scores what it does: a decomposition on a trained run's validation images.

    OMP_NUM_THREADS=1 .venv/bin/python tools/fusion_audit.py RUN_DIR [--checkpoint final.pt] [--max_images 0]
        [--conf_min_protos N] [--json out.json]

(`load_learner` appends to the run folder's env.json and log.txt: point RUN_DIR at a copy holding config.json and
checkpoints/ to keep a finished run as it is.)

No training: loads the run's config and checkpoint (`synernet.engine.runs.load_learner`), rebuilds for every validation image
what `SynerNetMethod.eval_labels` builds (Y_B, Y_P, the training-time confidence matrix of prototype votes anchored
where Y_B and Y_P agree) and reports, against the masks (analysis only):
- the pixel shares of {reliable, uncertain} x {consensus fg, consensus bg} and, in each, the truth's foreground share
  and how often Y_B, Y_P, the consensus and the fused label are right;
- how many images have a foreground anchor at all (without one every token votes background);
- the mIoU of several fusion rules for labels (`_rule`), of both branches' labels, of P's label with the code's
  ignore band, and of the decoders (seg, seg_b, seg_p), each on the pixels it labels; and the branches' and the
  fused label's mIoU in the images with and without a foreground anchor.
"""
from __future__ import annotations
import argparse, json, sys
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from synernet.engine.runs import load_learner                                         # noqa: E402
from synernet.ops.cam import multi_scale_cam                                        # noqa: E402
from synernet.ops.confidence import (confidence_matrix, proto_votes, anchor_labels, anchor_from_logits,  # noqa: E402
                                 token_centre_labels, fusion_labels)
from synernet.ops.branches import cross_pseudo_labels                               # noqa: E402
from synernet.data.transforms import denormalize                                     # noqa: E402
from synernet.ops.metrics import Confusion, scores, fg_scores                       # noqa: E402


_RULES = ("spec", "consensus", "spec_blend", "broad_rel", "broad_all")

def _rule(yb, yp, conf, r):
    """Fusion rules for labels: 'spec' = `fusion_labels` (d.3.5: reliable & z != 0 -> Y_B, reliable & z = 0 -> Y_P,
    uncertain -> 255); 'consensus' = z on reliable pixels; 'spec_blend' = 'spec' with uncertain pixels blended
    (Y_B where w_fg > 1/2, else Y_P); 'broad_rel' = Y_B on reliable pixels; 'broad_all' = Y_B."""
    conf = conf.resize(yb.shape[-2:])
    spec = torch.where(conf.consensus != 0, yb, yp)
    if r == "spec": return fusion_labels(yb, yp, conf)
    if r == "consensus": return torch.where(conf.reliable, conf.consensus, 255)
    blend = torch.where(conf.fg_support > 0.5, yb, yp)
    if r == "spec_blend": return torch.where(conf.reliable, spec, blend)
    if r == "broad_rel": return torch.where(conf.reliable, yb, 255)
    if r == "broad_all": return yb
    raise ValueError(r)


@torch.no_grad()
def audit(run_dir, checkpoint: str = "final.pt", max_images: int = 0, conf_min_protos: int | None = None) -> dict:
    lrn = load_learner(run_dir, checkpoint)
    if conf_min_protos is not None:                  # the method reads its own config
        lrn.cfg = lrn.method.cfg = lrn.cfg.replace(conf_min_protos=conf_min_protos)
    m, c = lrn.method, lrn.cfg
    lrn._set_train(False)
    K = lrn.info.num_classes + 1
    confs, cnt, n_img = {}, defaultdict(float), 0
    def add(name, gt, lab, pseudo=True):
        confs.setdefault(name, Confusion(K, drop_ignored_pred=pseudo)).update(gt, lab)
    for s in lrn.val_loader:
        if max_images and n_img >= max_images: break
        img, mask, y = s["img"], s["mask"], s["cls_label"]
        size = mask.shape[-2:]
        if c.val_resize: img = F.interpolate(img, size=(c.val_resize,) * 2, mode="bilinear", align_corners=False)
        near = lambda t: F.interpolate(t[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()
        M_b, A_b, M_p, A_p = multi_scale_cam(m.cam_fn, img, c.cam_scales)
        Y_B, Y_P = m.pseudo_labels(img, M_b, M_p, y, None)
        _, Y_Pi = cross_pseudo_labels(m.par, denormalize(img), M_b, M_p, y, None, c.mix_weights, c.bcam_ignore_band,
                                      "ignore", c.high_thre, c.low_thre, c.refine_down_scale)
        pr = m.predict(img, size, with_conf=True)
        alpha = anchor_labels(Y_B, Y_P, pr["hw"])
        cnt["images"] += len(img)
        cnt["images_fg_anchor"] += float((alpha > 0).any(1).sum())
        cnt["anchor_tokens"] += float((alpha >= 0).sum()); cnt["fg_anchor_tokens"] += float((alpha > 0).sum())
        cnt["tokens"] += alpha.numel()
        tb, tp = token_centre_labels(Y_B, pr["hw"]).flatten(1), token_centre_labels(Y_P, pr["hw"]).flatten(1)
        cnt["yb_fg_tokens"] += float((tb > 0).sum()); cnt["yp_fg_tokens"] += float((tp > 0).sum())
        tconf = confidence_matrix(proto_votes(pr["feats"], alpha, K, c.conf_min_protos), pr["hw"])
        labs = {f"fused_{r}": _rule(Y_B, Y_P, tconf, r) for r in _RULES}
        labs.update(b=Y_B, p=Y_P, p_ignore_band=Y_Pi, seg=pr["fused"].argmax(1), seg_b=pr["b"].argmax(1),
                    seg_p=pr["p"].argmax(1),
                    fused_p_ignore_band=fusion_labels(Y_B, Y_Pi, tconf))
        labs = {k: (v if v.shape[-2:] == size else near(v)) for k, v in labs.items()}
        cnt["inf_images_fg_anchor"] += float((anchor_from_logits(pr["p"], pr["b"]) > 0).any(1).sum())
        for k, v in labs.items(): add(k, mask, v)
        has = (alpha > 0).any(1)[:, None, None]            # images with a foreground anchor vs without
        for k in ("b", "p", "fused_spec"):
            add(f"{k}@fg_anchor", torch.where(has, mask, 255), labs[k])
            add(f"{k}@no_fg_anchor", torch.where(has, 255, mask), labs[k])
        # the decomposition, at the mask's resolution
        cm = tconf.resize(size)
        valid = mask != 255
        gt_fg = mask > 0
        fused = labs["fused_spec"]
        for part, where in (("rel_fg", cm.reliable & (cm.consensus > 0)), ("rel_bg", cm.reliable & (cm.consensus == 0)),
                            ("uncertain", ~cm.reliable)):
            w = where & valid
            cnt[f"{part}_n"] += float(w.sum()); cnt[f"{part}_gt_fg"] += float((w & gt_fg).sum())
            for name, lab in (("yb", labs["b"]), ("yp", labs["p"]), ("z", cm.consensus), ("fused", fused)):
                cnt[f"{part}_{name}_ok"] += float((w & (lab == mask)).sum())
                cnt[f"{part}_{name}_ok_on_gt_fg"] += float((w & gt_fg & (lab == mask)).sum())
            cnt[f"{part}_yb_fg"] += float((w & (labs["b"] > 0)).sum())
        cnt["valid_n"] += float(valid.sum()); cnt["gt_fg_n"] += float((valid & gt_fg).sum())
        n_img += len(img)
    out = dict(run_dir=str(run_dir), checkpoint=checkpoint, images=int(cnt["images"]), labels={})
    for k, cf in confs.items():
        h = cf.counts
        sc, fg = scores(h), fg_scores(h)
        out["labels"][k] = dict(miou=100 * sc["miou"], fg_recall=100 * fg["fg_recall"],
                                fg_precision=100 * fg["fg_precision"], labelled=100 * float(h.sum()) / cnt["valid_n"])
    out["anchors"] = dict(inference_images_with_fg_anchor=100 * cnt["inf_images_fg_anchor"] / cnt["images"],
                          images_with_fg_anchor=100 * cnt["images_fg_anchor"] / cnt["images"],
                          anchor_tokens=100 * cnt["anchor_tokens"] / cnt["tokens"],
                          fg_anchor_tokens=100 * cnt["fg_anchor_tokens"] / cnt["tokens"],
                          yb_fg_tokens=100 * cnt["yb_fg_tokens"] / cnt["tokens"],
                          yp_fg_tokens=100 * cnt["yp_fg_tokens"] / cnt["tokens"])
    parts = {}
    for part in ("rel_fg", "rel_bg", "uncertain"):
        n, f = cnt[f"{part}_n"], cnt[f"{part}_gt_fg"]
        d = dict(share=100 * n / cnt["valid_n"], gt_fg_share=100 * f / max(n, 1),
                 share_of_all_gt_fg=100 * f / max(cnt["gt_fg_n"], 1), yb_fg_share=100 * cnt[f"{part}_yb_fg"] / max(n, 1))
        for name in ("yb", "yp", "z", "fused"):
            d[f"{name}_acc"] = 100 * cnt[f"{part}_{name}_ok"] / max(n, 1)
            d[f"{name}_acc_on_gt_fg"] = 100 * cnt[f"{part}_{name}_ok_on_gt_fg"] / max(f, 1)
        parts[part] = d
    out["parts"] = parts
    return out


def show(res: dict) -> str:
    L = [f"{res['run_dir']} ({res['checkpoint']}), {res['images']} validation images"]
    L.append("label                      mIoU  fg_rec  fg_prec  labelled")
    for k, v in res["labels"].items():
        L.append(f"{k:24s} {v['miou']:6.1f} {v['fg_recall']:7.1f} {v['fg_precision']:8.1f} {v['labelled']:9.1f}")
    L.append("anchors: " + ", ".join(f"{k} {v:.1f}%" for k, v in res["anchors"].items()))
    L.append("part        share  gt_fg  of_all_fg  Y_B_fg | acc: Y_B   Y_P     z fused | on gt fg: Y_B   Y_P     z fused")
    for p, d in res["parts"].items():
        L.append(f"{p:10s} {d['share']:6.1f} {d['gt_fg_share']:6.1f} {d['share_of_all_gt_fg']:10.1f} {d['yb_fg_share']:7.1f}"
                 f" |    {d['yb_acc']:6.1f}{d['yp_acc']:6.1f}{d['z_acc']:6.1f}{d['fused_acc']:6.1f}"
                 f" |        {d['yb_acc_on_gt_fg']:6.1f}{d['yp_acc_on_gt_fg']:6.1f}{d['z_acc_on_gt_fg']:6.1f}"
                 f"{d['fused_acc_on_gt_fg']:6.1f}")
    return "\n".join(L)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir"); ap.add_argument("--checkpoint", default="final.pt")
    ap.add_argument("--max_images", type=int, default=0); ap.add_argument("--conf_min_protos", type=int, default=None)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    r = audit(a.run_dir, a.checkpoint, a.max_images, a.conf_min_protos)
    print(show(r))
    if a.json: Path(a.json).write_text(json.dumps(r, indent=2))
