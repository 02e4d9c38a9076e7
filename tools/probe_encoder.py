"""Frozen-encoder probe on the WSSS synthetic set (issue 16): a linear multi-label classifier on max-pooled final
tokens, trained with image labels only, then its CAMs on val (ReLU, per-class max-normalised, background = a
threshold) scored as mIoU against the val masks; the from-scratch initial encoder against the pretrained one.
Usage: OMP_NUM_THREADS=1 python tools/probe_encoder.py [--root SYNTHETIC_ROOT] [--weights none FILE ...]
(about 1.5 minutes per encoder on one thread). `--weights none` = the random initialisation (pretrained=False);
the default compares it with the committed demo weights."""
import sys, json, time
import numpy as np, torch, torch.nn.functional as F
from PIL import Image
from pathlib import Path
from synernet.models.backbone import build_backbone
from synernet.data.transforms import IMAGENET_MEAN, IMAGENET_STD
torch.set_num_threads(1)
import argparse
from synernet.core.config import make_config
from synernet.data.datasets import default_root
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--root", default="", help="synthetic set folder (default: the demo's, which `make demo` writes)")
ap.add_argument("--weights", nargs="*", default=["none", "committed"],
                help="encoders to probe: 'none' (random init), 'committed' (synernet/weights), or .safetensors files")
ap.add_argument("--block", type=int, default=None,
                help="probe the pre-LayerNorm tokens of this block (e.g. 2 or -3, ToCo's auxiliary layer) instead of "
                     "the final tokens")
args = ap.parse_args() if __name__ == "__main__" else ap.parse_args([])
root = Path(args.root) if args.root else default_root(make_config("base", dataset="synthetic"))
if not (root / "cls_labels_onehot.npy").is_file(): sys.exit(f"no synthetic set at {root}: run a demo first")
labels = np.load(root / "cls_labels_onehot.npy", allow_pickle=True).item()
S = 96

def load(split):
    names = (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()
    X, Y, M = [], [], []
    for n in names:
        im = Image.open(root / "JPEGImages" / f"{n}.jpg").convert("RGB")
        X.append(np.asarray(im.resize((S, S), Image.BILINEAR), np.float32) / 255)
        Y.append(labels[n]); M.append(np.asarray(Image.open(root / "SegmentationClassAug" / f"{n}.png")))
    x = torch.from_numpy(np.stack(X)).permute(0, 3, 1, 2)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, torch.tensor(np.stack(Y)).float(), M

@torch.no_grad()
def feats(bb, x):
    bb.eval(); out = []
    for i in range(0, len(x), 50):
        if args.block is None: out.append(bb(x[i:i + 50]).tokens)
        else: out.append(bb(x[i:i + 50], aux_blocks=(args.block,)).block(args.block))
    return torch.cat(out)                                   # [N, 144, D]

def probe(tr, ytr, va, yva, Mva, seed=0):
    torch.manual_seed(seed)
    C = ytr.shape[1]
    W = torch.zeros(C, tr.shape[-1], requires_grad=True); b = torch.zeros(C, requires_grad=True)
    opt = torch.optim.Adam([W, b], lr=1e-2)
    mu, sd = tr.mean((0, 1)), tr.std((0, 1)) + 1e-5
    trn, van = (tr - mu) / sd, (va - mu) / sd
    for it in range(300):
        logits = (trn @ W.T).amax(1) + b
        loss = F.binary_cross_entropy_with_logits(logits, ytr) + 1e-4 * (W ** 2).sum()
        opt.zero_grad(); loss.backward(); opt.step()
    with torch.no_grad():
        lv = (van @ W.T).amax(1) + b
        from sklearn.metrics import average_precision_score
        mAP = average_precision_score(yva.numpy(), lv.numpy(), average="macro")
        cam = (van @ W.T).relu()                              # [N, 144, C]
        g = int(round(cam.shape[1] ** 0.5))
        cam = cam.view(len(va), g, g, C).permute(0, 3, 1, 2)
        cam = cam / (cam.amax((2, 3), keepdim=True) + 1e-5)
    res = {}
    for thr in (0.3, 0.4, 0.5, 0.6):
        inter = np.zeros(C + 1); union = np.zeros(C + 1)
        for i, m in enumerate(Mva):
            H, Wd = m.shape
            c = F.interpolate(cam[i:i + 1], size=(H, Wd), mode="bilinear", align_corners=False)[0]
            c = c * yva[i].view(C, 1, 1)                      # image labels known (as in CAM evaluation)
            full = torch.cat([torch.full((1, H, Wd), thr), c]).argmax(0).numpy()
            v = m != 255
            for k in range(C + 1):
                p, t = (full == k) & v, (m == k) & v
                inter[k] += (p & t).sum(); union[k] += (p | t).sum()
        res[thr] = float(100 * np.mean(inter / np.maximum(union, 1)))
    return dict(mAP=100 * mAP, cam_miou=res)

if __name__ == "__main__":
    t0 = time.time()
    xtr, ytr, _ = load("train"); xva, yva, Mva = load("val")
    out = {}
    for w in args.weights:
        name, kw = (("random init (pretrained=False)", dict(pretrained=False)) if w == "none" else
                    ("committed weights", dict(pretrained=True)) if w == "committed" else
                    (w, dict(pretrained=True, weights_file=w)))
        torch.manual_seed(0)
        bb = build_backbone("vit_tiny_p8_demo", **kw)
        out[name] = probe(feats(bb, xtr), ytr, feats(bb, xva), yva, Mva)
        print(name, json.dumps(out[name]), f"{time.time() - t0:.0f} s", flush=True)
