#!/usr/bin/env python
"""Where a training step's time and FLOPs go, part by part, for each preset at demo and/or paper scale.

    python tools/profile_step.py                          # demo scale, presets toco, dskd_gc, synernet
    python tools/profile_step.py --paper --presets toco   # also paper scale (ViT-B at 448, batch 2, random weights)
    python tools/profile_step.py --iters 3 --warmup 1 --flops

Each (preset, scale) runs in a fresh process through the real learner and its real iteration
(`synernet.engine.learner.train_iteration`): nothing is re-implemented here. The parts are found by wrapping, for the
duration of the measurement only, the functions the method's step calls (the CAM pass, the forward, PAR pseudo-labels,
GC, each loss, the EMA, ...; the table `PARTS` below), `Tensor.backward` and the optimisers' `step`, and by timing
`next(loader)` for data loading and augmentation. Times are exclusive (a part's time excludes the parts it calls);
FLOPs come from `torch.utils.flop_counter.FlopCounterMode` in a separate pass (it slows the step), also exclusive.
Every loss is switched on from the first iteration (`seg_start=0`, ...) so that every part is measured.

Writes `reports/benchmark_<device>.json` (key `profile`; other keys of the file are kept) and the stacked-bar figure
`reports/fig_step_profile_<device>.png`.

Before/after in one run: `--variant NAME:key=value,key=value` (repeatable) runs every (preset, scale) once per variant,
e.g. `--variant before:cam_reuse_forward=false,bcam_attn_mean=false --variant after:` (a key a preset does not read
changes nothing there).

The floor: each process also times the machine's matrix products (torch.matmul, fp32, the same threads) after the
step, a ViT-B MLP product at paper scale (3530 x 768 by 768 x 3072: two 448 images at scale 1.5, 1765 tokens each) and
a 4096^3 product; with `--flops` each row then gets its achieved GFLOP/s and the lower bound FLOPs / best product
rate, the time the step would take if every FLOP ran as fast as this machine's best matrix product.
"""
import argparse, contextlib, functools, importlib, json, os, re, subprocess, sys, tempfile, time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# module -> {function name in that module's namespace: part}; "Class.method" wraps a method of a class of the module
PARTS = {
    "synernet.methods.toco": {"toco_forward": "forward", "refine_cams_with_bkg": "PAR labels",
                             "token_labels": "labels", "cam_to_roi_mask": "labels", "cls_loss": "loss: cls",
                             "ptc_loss": "loss: ptc", "ctc_loss": "loss: ctc", "seg_loss": "loss: seg"},
    "synernet.models.toco": {"ToCoNet.forward_proj": "forward: CTC views"},
    # the hosts (toco, synernet) run their multi-scale CAM pass through the add-on hook point (synernet.engine.hooks)
    "synernet.engine.hooks": {"Step.ms_pass": "cam pass"},
    "synernet.ops.losses": {"LocalCropSampler.__call__": "labels"},
    "synernet.methods.dskd": {"multi_scale_cam": "cam pass", "dskd_forward": "forward", "gaussian_correction": "GC",
                      "token_labels": "labels", "punc_roi": "labels", "cls_loss": "loss: cls", "ptc_loss": "loss: ptc",
                      "seg_loss": "loss: seg", "punc_loss": "loss: punc", "ema_update": "EMA"},
    "synernet.methods.synernet": {"synernet_forward": "forward",
                                 "cross_pseudo_labels": "PAR labels", "token_labels": "labels", "sbce_roi": "labels",
                                 "per_image_thresholds": "labels", "cls_loss": "loss: cls", "ptc_loss": "loss: ptc",
                                 "seg_loss": "loss: seg", "spatial_bce_loss": "loss: sbce",
                                 "class_token_sim_loss": "loss: csim", "fusion_labels": "labels"},
}
ORDER = ["data", "cam pass", "forward", "forward: CTC views", "labels", "PAR labels", "GC", "loss: cls", "loss: ptc",
         "loss: ctc", "loss: seg", "loss: punc", "loss: sbce", "loss: csim", "backward", "optimiser", "EMA", "other"]
ALWAYS_ON = dict(seg_start=0, contrast_start=0, sbce_start=0, proto_start=0, seg_label_final_start=0)


class Profiler:
    "Exclusive wall time and FLOPs per part; parts nest (a stack)."
    def __init__(self, flops: bool, sync):
        self.flops, self.sync = flops, sync
        self.time, self.flop = defaultdict(float), defaultdict(float)
        self.stack = []               # [part, t0, child_time, flop_mode, child_flops]

    @contextlib.contextmanager
    def part(self, name):
        from torch.utils.flop_counter import FlopCounterMode
        self.sync()
        mode = FlopCounterMode(display=False) if self.flops else None
        fr = [name, time.perf_counter(), 0.0, mode, 0.0]
        self.stack.append(fr)
        try:
            if mode is not None:
                with mode: yield
            else: yield
        finally:
            self.sync()
            self.stack.pop()
            dt = time.perf_counter() - fr[1]
            self.time[name] += dt - fr[2]
            f = float(mode.get_total_flops()) if mode is not None else 0.0
            self.flop[name] += f - fr[4]
            if self.stack:
                self.stack[-1][2] += dt
                self.stack[-1][4] += f

    def wrap(self, fn, name):
        @functools.wraps(fn)
        def w(*a, **k):
            with self.part(name): return fn(*a, **k)
        return w


def install(prof, lrn):
    "Wrap the parts of the step; returns an undo function."
    import torch
    undo = []
    def patch(obj, attr, new):
        old = getattr(obj, attr); setattr(obj, attr, new); undo.append((obj, attr, old))
    for modname, fns in PARTS.items():
        mod = importlib.import_module(modname)
        for fname, part in fns.items():
            if "." in fname:
                cls, meth = fname.split(".")
                patch(getattr(mod, cls), meth, prof.wrap(getattr(getattr(mod, cls), meth), part))
            elif hasattr(mod, fname):
                patch(mod, fname, prof.wrap(getattr(mod, fname), part))
    patch(torch.Tensor, "backward", prof.wrap(torch.Tensor.backward, "backward"))
    for o, _ in lrn.optims:
        patch(o, "step", prof.wrap(o.step, "optimiser"))
    m = lrn.method
    patch(m, "after_step", prof.wrap(m.after_step, "EMA"))
    return lambda: [setattr(o, a, v) for o, a, v in reversed(undo)]


def gemm_rates(reps: int = 3) -> dict:
    "GFLOP/s of fp32 torch.matmul on this machine and thread count: the ViT-B MLP product at paper scale, 4096^3."
    import torch
    out = {}
    for name, (m, k, n) in dict(vit_mlp_3530x768x3072=(3530, 768, 3072), square_4096=(4096, 4096, 4096)).items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter(); a @ b; best = min(best, time.perf_counter() - t0)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def floor(row) -> dict | None:
    "The step's GFLOPs, achieved GFLOP/s and lower-bound seconds at the best measured matrix-product rate."
    if not row.get("flops") or not row.get("gemm_gflops_per_s"): return None
    gf = sum(row["flops"].values()) / 1e9
    ceil = max(row["gemm_gflops_per_s"].values())
    return dict(gflops=gf, achieved_gflops_per_s=gf / row["seconds_per_iter"], gemm_ceiling_gflops_per_s=ceil,
                lower_bound_s=gf / ceil, seconds_per_iter=row["seconds_per_iter"],
                share_of_ceiling=gf / row["seconds_per_iter"] / ceil)


def base_settings(preset, scale, out_dir, batch):
    "The config keys every profiled step shares: no evaluation or checkpoints, every loss on, paper scale at 448."
    from synernet.core.config import CONFIG_KEYS
    kw = dict(preset=preset, dataset="synthetic", scale=scale, out_dir=out_dir, max_iters=10 ** 6, progress=False,
              seg_loss_nan_guard=True, eval_every=0, ckpt_every=0, final_eval="none")
    kw.update({k: v for k, v in ALWAYS_ON.items() if k in CONFIG_KEYS})
    if scale == "paper": kw.update(pretrained=False, batch_size=batch or 2, crop_size=448)
    elif batch: kw.update(batch_size=batch)
    return kw


def one(preset, scale, iters, warmup, flops, batch, sets=(), variant=""):
    import torch
    from synernet.engine.runs import build_config
    from synernet.engine.learner import Learner, train_iteration, _to
    with tempfile.TemporaryDirectory() as d:
        kw = base_settings(preset, scale, d, batch)
        kw.update(dict(s.split("=", 1) for s in sets))
        cfg = build_config(**kw)
        lrn = Learner(cfg)
        dev = lrn.device
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        it = iter(lrn.train_loader)
        lrn._set_train(True)
        res = {}
        for pass_flops in ([False, True] if flops else [False]):
            prof = Profiler(pass_flops, sync)
            undo = install(prof, lrn)
            total_t, n_meas, each = 0.0, 0, []
            try:
                w0 = 0 if pass_flops else warmup         # FLOPs need no warm-up: one counted iteration
                for n in range(w0 + (1 if pass_flops else iters)):
                    measured = n >= w0
                    if n == w0: prof.time.clear(); prof.flop.clear()
                    t0 = time.perf_counter()
                    with prof.part("data"):
                        batch_ = {k: _to(v, dev) for k, v in next(it).items()}
                    with prof.part("other"):
                        train_iteration(lrn.method, lrn.optims, batch_, n, cfg.grad_clip, lrn.autocast)
                    sync()
                    if measured:
                        dt = time.perf_counter() - t0; total_t += dt; n_meas += 1; each.append(dt)
            finally:
                undo()
            k = "flops" if pass_flops else "seconds"
            src = prof.flop if pass_flops else prof.time
            res[k] = {p: v / max(n_meas, 1) for p, v in src.items() if v}
            if not pass_flops: res["seconds_per_iter"], res["seconds_each_iter"] = total_t / n_meas, each
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
        if dev.type == "cpu" and flops and scale == "paper": res["gemm_gflops_per_s"] = gemm_rates()
        row = dict(preset=preset, scale=scale, variant=variant or ",".join(sets), settings=list(sets),
                   backbone=cfg.backbone, crop_size=cfg.crop_size, batch_size=cfg.batch_size, iters=iters,
                   warmup=warmup, device_name=name, **res)
        fl = floor(row)
        if fl: row["floor"] = fl
        return row


def interleaved(preset, scale, iters, warmup, flops, batch, sets, variants):
    """All `variants` ([(name, [key=value, ...]), ...]) of one (preset, scale) in ONE process on ONE model: the
    iterations alternate between the variants' configs (the method reads its config at every step), so a change of
    the machine's load during the run hits every variant alike. Rows as `one` returns them."""
    import torch
    from synernet.engine.runs import build_config
    from synernet.engine.learner import Learner, train_iteration, _to
    with tempfile.TemporaryDirectory() as d:
        kw = base_settings(preset, scale, d, batch)
        kw.update(dict(kv.split("=", 1) for kv in sets))
        cfgs = [build_config(**{**kw, **dict(kv.split("=", 1) for kv in vs)}) for _, vs in variants]
        lrn = Learner(cfgs[0])
        dev, m = lrn.device, lrn.method
        sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
        it = iter(lrn.train_loader)
        lrn._set_train(True)
        V = len(variants)
        acc = [dict(seconds=defaultdict(float), flops=defaultdict(float), each=[]) for _ in range(V)]
        n = 0
        for pass_flops in ([False, True] if flops else [False]):
            prof = Profiler(pass_flops, sync)
            undo = install(prof, lrn)
            try:
                rounds = 1 if pass_flops else warmup + iters
                for r in range(rounds):
                    measured = pass_flops or r >= warmup
                    order = range(V) if r % 2 == 0 else reversed(range(V))      # ABBA: a drift cancels
                    for v in order:
                        m.cfg = cfgs[v]
                        prof.time.clear(); prof.flop.clear()
                        t0 = time.perf_counter()
                        with prof.part("data"):
                            batch_ = {k: _to(x, dev) for k, x in next(it).items()}
                        with prof.part("other"):
                            train_iteration(m, lrn.optims, batch_, n, cfgs[v].grad_clip, lrn.autocast)
                        sync(); n += 1
                        dt = time.perf_counter() - t0
                        if not measured: continue
                        src = prof.flop if pass_flops else prof.time
                        for k, x in src.items(): acc[v]["flops" if pass_flops else "seconds"][k] += x
                        if not pass_flops: acc[v]["each"].append(dt)
            finally:
                undo()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{torch.get_num_threads()}threads"
        gemm = gemm_rates() if dev.type == "cpu" and flops and scale == "paper" else None
        rows = []
        for (vname, vs), a, cfg in zip(variants, acc, cfgs):
            row = dict(preset=preset, scale=scale, variant=vname, settings=list(sets) + list(vs), backbone=cfg.backbone,
                       crop_size=cfg.crop_size, batch_size=cfg.batch_size, iters=iters, warmup=warmup,
                       interleaved=[x for x, _ in variants], device_name=name,
                       seconds={k: x / iters for k, x in a["seconds"].items() if x},
                       seconds_per_iter=sum(a["each"]) / len(a["each"]), seconds_each_iter=a["each"])
            if flops: row["flops"] = {k: x for k, x in a["flops"].items() if x}
            if gemm: row["gemm_gflops_per_s"] = gemm
            fl = floor(row)
            if fl: row["floor"] = fl
            rows.append(row)
        return rows


def _key(r):
    return f"{r['preset']}/{r['scale']}" + (f" [{r['variant']}]" if r.get("variant") else "")


def figure(rows, path, absolute: bool = False):
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in ORDER if any(p in r.get("seconds", {}) for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.6 * len(rows) + 2.5), sharey=True)
    labels = [_key(r).replace("/", " / ") for r in rows]
    cmap = plt.get_cmap("tab20")
    units = ((axes[0], "seconds", "seconds per step", 1.0), (axes[1], "flops", "GFLOPs per step", 1e9)) if absolute \
        else ((axes[0], "seconds", "share of the step's time", None), (axes[1], "flops", "share of the step's FLOPs", None))
    for ax, key, unit, scale in units:
        left = [0.0] * len(rows)
        for j, p in enumerate(parts):
            vals = []
            for r in rows:
                d = r.get(key, {}); tot = sum(d.values()) or 1.0
                vals.append(d.get(p, 0.0) / scale if scale else d.get(p, 0.0) / tot)
            ax.barh(labels, vals, left=left, color=cmap(j % 20), label=p)
            left = [a + b for a, b in zip(left, vals)]
        ax.set_xlabel(unit)
        if not absolute: ax.set_xlim(0, 1)
        if absolute and key == "flops":
            for y, r in enumerate(rows):
                if "floor" in r: ax.plot([r["floor"]["gflops"]] * 2, [y - 0.4, y + 0.4], color="k", lw=0.8)
    axes[1].legend(bbox_to_anchor=(1.02, 1), loc="upper left", fontsize=8)
    xmax = max(sum(r["seconds"].values()) for r in rows) if absolute else 1.0
    for r, y in zip(rows, range(len(rows))):
        txt = f"{r['seconds_per_iter']:.2f} s"
        if absolute and "floor" in r: txt += f" (floor {r['floor']['lower_bound_s']:.1f} s)"
        axes[0].text(1.01 * xmax, y, txt, va="center", fontsize=8)
    if absolute: axes[0].set_xlim(0, 1.35 * xmax)
    plt.suptitle(f"Where one training step goes ({rows[0]['device_name']})")
    plt.tight_layout(); plt.savefig(path, dpi=110); plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="toco,dskd_gc,synernet")
    ap.add_argument("--paper", action="store_true", help="also paper scale (ViT-B, 448, batch 2, random weights)")
    ap.add_argument("--only-paper", action="store_true", help="paper scale only")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--flops", action="store_true", help="also count FLOPs (one more iteration, slower)")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config key for every run, e.g. --set cam_reuse_forward=false (the step before a speed-up)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="run every (preset, scale) once per variant, e.g. before:cam_reuse_forward=false")
    ap.add_argument("--note", default="", help="a note stored with the profile (e.g. what else ran on the machine)")
    ap.add_argument("--replace", action="store_true", help="the profile's rows become this run's (default: merged)")
    ap.add_argument("--absolute", action="store_true", help="figure in seconds and GFLOPs instead of shares")
    ap.add_argument("--out", default="")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--_variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--interleave", action="store_true",
                    help="the variants of a (preset, scale) in one process, their iterations alternating (ABBA)")
    ap.add_argument("--_variants", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a._one:
        sets = [kv for kv in a.set if kv]
        if a._variants:
            vs = [(n, [kv for kv in v.split(",") if kv]) for n, v in (x.split(":", 1) for x in json.loads(a._variants))]
            for row in interleaved(a._one[0], a._one[1], a.iters, a.warmup, a.flops, a.batch, sets, vs):
                print("PROFILE " + json.dumps(row), flush=True)
            return
        print("PROFILE " + json.dumps(one(a._one[0], a._one[1], a.iters, a.warmup, a.flops, a.batch, sets,
                                          a._variant)), flush=True)
        return
    scales = ["paper"] if a.only_paper else (["demo", "paper"] if a.paper else ["demo"])
    rows = []
    variants = [v.split(":", 1) for v in a.variant] or [["", ""]]
    if any(len(v) != 2 for v in variants): ap.error("--variant takes NAME:KEY=VALUE,KEY=VALUE (settings may be empty)")
    for p in a.presets.split(","):
        for s in scales:
          for vname, vsets in (variants[:1] if a.interleave else variants):
            cmd = [sys.executable, __file__, "--_one", p, s, "--iters", str(a.iters), "--warmup", str(a.warmup)]
            if a.flops: cmd.append("--flops")
            if a.batch: cmd += ["--batch", str(a.batch)]
            for kv in a.set + [kv for kv in vsets.split(",") if kv]: cmd += ["--set", kv]
            if a.interleave:                          # every variant in the one process: its keys are not common
                cmd = cmd[:cmd.index("--_one") + 3 + 4] + (["--flops"] if a.flops else []) + \
                    (["--batch", str(a.batch)] if a.batch else []) + [x for kv in a.set for x in ("--set", kv)] + \
                    ["--_variants", json.dumps(a.variant)]
            elif vname: cmd += ["--_variant", vname]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            lines = [l for l in r.stdout.splitlines() if l.startswith("PROFILE ")]
            if r.returncode or not lines:
                print(f"{p}/{s} FAILED:\n{r.stderr[-3000:]}", file=sys.stderr); sys.exit(1)
            for line in lines:
                row = json.loads(line[8:]); rows.append(row)
                top = sorted(row["seconds"].items(), key=lambda kv: -kv[1])[:4]
                print(f"{_key(row)}: {row['seconds_per_iter']:.3f} s/iter; " +
                      ", ".join(f"{k} {v:.3f} s" for k, v in top), file=sys.stderr)
    dev = re.sub(r"[^A-Za-z0-9._-]+", "_", rows[0]["device_name"])
    print(f"\n| preset | scale | part | seconds | share | GFLOPs |\n|---|---|---|---|---|---|")
    for r in rows:
        tot = sum(r["seconds"].values())
        for p in ORDER:
            if p in r["seconds"]:
                print(f"| {r['preset']} | {r['scale']}{' ' + r['variant'] if r.get('variant') else ''} | {p} | {r['seconds'][p]:.4f} | {100 * r['seconds'][p] / tot:.1f}% | "
                      f"{r.get('flops', {}).get(p, 0) / 1e9:.2f} |")
    if any("floor" in r for r in rows):
        print("\n| preset | scale | variant | s/step | GFLOPs | achieved GF/s | best GEMM GF/s | lower bound s | share |"
              "\n|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            f = r.get("floor")
            if f: print(f"| {r['preset']} | {r['scale']} | {r.get('variant', '')} | {f['seconds_per_iter']:.2f} | "
                        f"{f['gflops']:.0f} | {f['achieved_gflops_per_s']:.1f} | {f['gemm_ceiling_gflops_per_s']:.1f} | "
                        f"{f['lower_bound_s']:.2f} | {100 * f['share_of_ceiling']:.0f}% |")
    out = Path(a.out) if a.out else REPO / "reports" / f"benchmark_{dev}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    prof = {} if a.replace else {_key(r): r for r in doc.get("profile", {}).get("rows", [])}
    prof.update({_key(r): r for r in rows})
    doc["profile"] = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=" ".join(sys.argv),
                          note=a.note or doc.get("profile", {}).get("note", ""), rows=list(prof.values()))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    fig = out.with_name(f"fig_step_profile_{dev}.png")
    figure(list(prof.values()), fig, a.absolute)
    print(f"\nwritten: {out}, {fig}")


if __name__ == "__main__":
    main()
