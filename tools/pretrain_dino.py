"""Issue 16's self-distillation attempt: pretrain the demo encoder on the things corpus without labels, with a DINO
loss on the class token (2 global 64 px crops, 4 local 32 px crops, EMA teacher, centring, 512 prototypes) plus an
iBOT loss on the patch tokens (30 % of each global crop's patches hidden from the student, which predicts the
teacher's prototype distribution of those patches on the unmasked crop). Resumes from WORK/last.pt (written every
250 steps; a resumed run draws other crops after the resume point);
writes the teacher's encoder to WORK/teacher.safetensors (loadable with `--weights_file`).
Measured result and reading: nbs/73_pretrain.ipynb, "Two objectives that keep the tokens local".
usage: OMP_NUM_THREADS=1 python tools/pretrain_dino.py WORK STEPS [BATCH]   (1200 steps of 32: 38 min on one thread)"""
import sys, math, copy, time, json
from pathlib import Path
import torch, torch.nn as nn, torch.nn.functional as F
from synernet.experiments.pretrain import (PretrainNet, corpus_batch, TRAIN, param_groups, lr_at, save_encoder, _atomic_save,
                               hide_patches)

torch.set_num_threads(1)
work = Path(sys.argv[1]); steps = int(sys.argv[2]); bs = int(sys.argv[3]) if len(sys.argv) > 3 else 32
work.mkdir(parents=True, exist_ok=True)
K, G, L = 512, 64, 32           # prototypes, global / local crop sides
N_LOCAL, MASK = 4, 0.3

class Head(nn.Module):
    def __init__(s, d=192, h=384, b=64, k=K):
        super().__init__()
        s.mlp = nn.Sequential(nn.Linear(d, h), nn.GELU(), nn.Linear(h, h), nn.GELU(), nn.Linear(h, b))
        s.last = nn.Parameter(torch.randn(k, b) * 0.02)
    def forward(s, x):
        z = F.normalize(s.mlp(x), dim=-1)
        return z @ F.normalize(s.last, dim=-1).T

class Net(nn.Module):
    def __init__(s):
        super().__init__()
        s.pn = PretrainNet("vit_tiny_p8_demo", G)
        s.head = Head()
    def forward(s, x):
        o = s.pn.enc(x)
        return s.head(o.cls), s.head(o.tokens)

def crops(x, side, scale, gen):
    B, _, H, W = x.shape; out = []
    for i in range(B):
        a = float(torch.empty(1).uniform_(*scale, generator=gen)) * H * W
        r = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)))
        h = int(min(H, round(math.sqrt(a / r)))); w = int(min(W, round(math.sqrt(a * r))))
        t = int(torch.randint(0, H - h + 1, (1,), generator=gen)); l = int(torch.randint(0, W - w + 1, (1,), generator=gen))
        c = F.interpolate(x[i:i + 1, :, t:t + h, l:l + w], size=(side, side), mode="bilinear", align_corners=False)
        if torch.rand(1, generator=gen) < 0.5: c = c.flip(-1)
        c = c * float(torch.empty(1).uniform_(0.8, 1.2, generator=gen))     # mild brightness (hue is a class cue)
        out.append(c)
    return torch.cat(out)

torch.manual_seed(0)
stu = Net(); tea = copy.deepcopy(stu); [p.requires_grad_(False) for p in tea.parameters()]
opt = torch.optim.AdamW(param_groups(stu, 0.04), lr=5e-4)
c_cls = torch.zeros(K); c_pat = torch.zeros(K)
step, hist, t0 = 0, [], time.time()
ck = work / "last.pt"
if ck.is_file():
    st = torch.load(ck, weights_only=False)
    stu.load_state_dict(st["stu"]); tea.load_state_dict(st["tea"]); opt.load_state_dict(st["opt"])
    c_cls, c_pat, step, hist = st["c_cls"], st["c_pat"], st["step"], st["hist"]; t0 -= st["secs"]
gen = torch.Generator().manual_seed(1234 + step)
lr, tt, ts = 5e-4, 0.04, 0.1
P = stu.pn.enc.patch_size[0]
ce = lambda q, s: -(q * F.log_softmax(s / ts, -1)).sum(-1)    # teacher probabilities q, student logits s
while step < steps:
    for g in opt.param_groups: g["lr"] = lr_at(step, steps, lr, 100)
    m = 1 - (1 - 0.99) * (math.cos(math.pi * step / steps) + 1) / 2
    x, _ = corpus_batch(TRAIN, step * bs, bs, 96, "things")
    gl = [crops(x, G, (0.35, 1.0), gen) for _ in range(2)]
    lo = [crops(x, L, (0.08, 0.35), gen) for _ in range(N_LOCAL)]
    with torch.no_grad():
        tc, tp = zip(*[tea(v) for v in gl])
        pc = [F.softmax((t - c_cls) / tt, -1) for t in tc]
        pp = [F.softmax((t - c_pat) / tt, -1) for t in tp]
    loss_c, n_c, loss_p = 0.0, 0, 0.0
    for vi, v in enumerate(gl):
        hide = torch.rand(bs, (G // P) ** 2, generator=gen) < MASK
        sc, sp = stu(hide_patches(v, hide, P))
        for ti in range(2):
            if ti != vi: loss_c = loss_c + ce(pc[ti], sc).mean(); n_c += 1
        loss_p = loss_p + ce(pp[vi], sp)[hide].mean() / 2
    for v in lo:
        sc, _ = stu(v)
        for ti in range(2): loss_c = loss_c + ce(pc[ti], sc).mean(); n_c += 1
    loss = loss_c / n_c + loss_p
    opt.zero_grad(set_to_none=True); loss.backward()
    torch.nn.utils.clip_grad_norm_(stu.parameters(), 3.0); opt.step()
    with torch.no_grad():
        for a, b in zip(tea.parameters(), stu.parameters()): a.mul_(m).add_(b.detach(), alpha=1 - m)
        c_cls = 0.9 * c_cls + 0.1 * torch.cat(tc).mean(0)
        c_pat = 0.9 * c_pat + 0.1 * torch.cat(tp).flatten(0, 1).mean(0)
    step += 1
    if step % 25 == 0:              # teacher entropy and prototypes in use on the first global crop: collapse watch
        ent = float(-(pc[0] * (pc[0] + 1e-9).log()).sum(-1).mean()); used = int(pc[0].argmax(-1).unique().numel())
        hist.append(dict(step=step, loss=loss.item(), lc=float(loss_c.detach()) / n_c, lp=loss_p.item(), ent=ent,
                         used=used, secs=round(time.time() - t0)))
        print(json.dumps(hist[-1]), flush=True)
    if step % 250 == 0 or step == steps:
        _atomic_save(dict(stu=stu.state_dict(), tea=tea.state_dict(), opt=opt.state_dict(), c_cls=c_cls, c_pat=c_pat,
                          step=step, hist=hist, secs=time.time() - t0), ck)
save_encoder(tea.pn, work / "teacher.safetensors", dict(objective="dino_ibot", steps=steps))
print("saved", work / "teacher.safetensors")
