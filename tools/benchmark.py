#!/usr/bin/env python
"""Training speed and peak memory of every registered preset, on whatever device runs this script.

    python tools/benchmark.py                 # demo scale (the CPU-sized model and crops), 5 measured iterations
    python tools/benchmark.py --paper         # also paper scale: ViT-B, crop 448, batch 2, pretrained=False
    python tools/benchmark.py --iters 20 --warmup 3 --presets toco

Each (preset, scale) runs in a fresh process (so the peak memory is its own) on the synthetic data set through the
real learner (data loading, CAMs, all losses of the phase in force, optimiser step). Images/second is measured over
the iterations after `--warmup`, from the per-iteration metric lines. Peak memory: CUDA max allocated on a GPU, the
process's max RSS on a CPU (includes ~400 MB of Python and torch). Prints a Markdown table and writes
reports/benchmark_<device>.json. The segmentation phase is switched on from the first iteration (`seg_start=0`) so
that every loss of the method is timed (with the NaN-guarded segmentation loss, which costs the same: an untrained
network's first pseudo-labels can lack background or foreground, where ToCo's loss divides by zero).
"""
import argparse, json, os, re, subprocess, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def one(preset: str, scale: str, iters: int, warmup: int, batch: int | None) -> dict:
    from synernet.engine.runs import build_config, train
    import torch
    with tempfile.TemporaryDirectory() as d:
        kw = dict(preset=preset, dataset="synthetic", scale=scale, out_dir=d, max_iters=iters + warmup, log_every=1,
                  eval_every=0, ckpt_every=0, final_eval="none", progress=False, seg_start=0,
                  seg_loss_nan_guard=True,   # random weights from step 0: ToCo's unguarded loss may be NaN (same cost)
                  allow_silent_losses="all")   # a few timed steps: later phases (DSKD's PUNC, SynerNet's BCE) never start
        if scale == "paper": kw.update(pretrained=False, batch_size=batch or 2, crop_size=448)
        elif batch: kw.update(batch_size=batch)
        cfg = build_config(**kw)
        lrn, s = train(cfg)
        t = [m["time"] for m in lrn.run.read_metrics() if "loss_total" in m]
        dt = (t[-1] - t[warmup - 1]) / iters if warmup >= 1 else s["train_seconds"] / iters
        dev = lrn.device
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu-{os.cpu_count()}threads"
        return dict(preset=preset, scale=scale, method=cfg.method, backbone=cfg.backbone, crop_size=cfg.crop_size,
                    batch_size=cfg.batch_size, iters=iters, seconds_per_iter=round(dt, 4),
                    images_per_second=round(cfg.batch_size / dt, 3), peak_memory_mb=s["peak_memory_mb"],
                    device=str(dev), device_name=name, torch_threads=torch.get_num_threads())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=5, help="measured iterations per preset")
    ap.add_argument("--warmup", type=int, default=2, help="iterations before the measurement (not timed)")
    ap.add_argument("--paper", action="store_true", help="also run the paper scale (ViT-B, 448, batch 2)")
    ap.add_argument("--presets", default="", help="comma-separated presets (default: every registered one)")
    ap.add_argument("--batch", type=int, default=None, help="override the batch size (default: demo preset / 2)")
    ap.add_argument("--out", default="", help="JSON file (default reports/benchmark_<device>.json)")
    ap.add_argument("--_one", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.iters < 1 or a.warmup < 1: ap.error("--iters and --warmup must be >= 1")
    if a._one:
        print("BENCH " + json.dumps(one(a._one[0], a._one[1], a.iters, a.warmup, a.batch)), flush=True); return
    from synernet.core.config import PRESETS
    presets = a.presets.split(",") if a.presets else [p for p in PRESETS if p != "base" and not p.startswith("_")]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown: ap.error(f"unknown presets {unknown}; registered: {sorted(PRESETS)}")
    rows = []
    for p in presets:
        for scale in ("demo", "paper") if a.paper else ("demo",):
            cmd = [sys.executable, __file__, "--_one", p, scale, "--iters", str(a.iters), "--warmup", str(a.warmup)]
            if a.batch: cmd += ["--batch", str(a.batch)]
            t0 = time.time()
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH ")), None)
            if r.returncode or line is None:
                print(f"{p}/{scale} FAILED (exit {r.returncode}):\n{r.stderr[-2000:]}", file=sys.stderr)
                rows.append(dict(preset=p, scale=scale, error=r.stderr[-500:])); continue
            row = json.loads(line[6:]); row["wall_seconds"] = round(time.time() - t0, 1); rows.append(row)
            print(f"{p}/{scale}: {row['images_per_second']} img/s, {row['peak_memory_mb']} MB", file=sys.stderr)
    ok = [r for r in rows if "error" not in r]
    dev = ok[0]["device_name"] if ok else "unknown"
    print(f"\nDevice: {dev}; {a.iters} measured iterations after {a.warmup} warm-up, synthetic data\n")
    print("| preset | scale | backbone | crop | batch | s/iter | images/s | peak memory (MB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r: print(f"| {r['preset']} | {r['scale']} | failed | | | | | |"); continue
        print(f"| {r['preset']} | {r['scale']} | {r['backbone']} | {r['crop_size']} | {r['batch_size']} | "
              f"{r['seconds_per_iter']:.3f} | {r['images_per_second']:.2f} | {r['peak_memory_mb']:.0f} |")
    out = Path(a.out) if a.out else REPO / "reports" / f"benchmark_{re.sub(r'[^A-Za-z0-9._-]+', '_', dev)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), iters=a.iters, warmup=a.warmup,
                                   rows=rows), indent=2))
    print(f"\nwritten: {out}")
    sys.exit(1 if len(ok) < len(rows) else 0)


if __name__ == "__main__":
    main()
