#!/usr/bin/env python
"""The checks to run in the few minutes a GPU is lent: speed, memory, numerics and a real run, in one script.

    bash tools/gpu_check.sh                 # on a GPU machine (about 5-8 minutes on one H100)
    bash tools/gpu_check.sh --dry-run       # the same sequence on the CPU with tiny shapes (the test suite runs it)

Steps (each is timed; a failing step is recorded with its error and the script goes on):
1. environment: GPU, driver, torch, CUDA, bf16 support;
2. paper-scale steps of `toco`, `dskd_gc` and `synernet` at 448 px with the papers' per-GPU batch (VOC: ToCo 2 per
   GPU in its 2-GPU runs, SynerNet 4 per GPU) on random weights, in bf16: seconds per step, images/s, peak memory,
   the step's FLOPs (counted with `torch.utils.flop_counter`) and model FLOP utilisation against the GPU's bf16 peak;
3. bf16 vs fp32: the losses of the same first batch from the same initial weights, with and without autocast;
4. memory: SynerNet's two ViT-B at 448 with 2 images per GPU must fit in 24 GB (peak allocated);
5. a short real training run of `toco` on the synthetic set at paper scale: killed after its first checkpoint and
   started again with the same command, it must resume from the checkpoint and finish with finite losses;
6. with two or more GPUs: a 2-process NCCL run of the same.
Writes `reports/benchmark_<gpu>.json` (key `gpu_check`) unless `--out` is given.
"""
import argparse, json, math, os, re, signal, subprocess, sys, tempfile, time, traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

#: dense bf16 peak of known GPUs (TFLOP/s, without sparsity), for the model FLOP utilisation
BF16_PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
                    "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}
PER_GPU_BATCH = {"toco": 2, "dskd_gc": 2, "synernet": 4}


def peak_tflops(name: str):
    for k in sorted(BF16_PEAK_TFLOPS, key=len, reverse=True):
        if k.lower() in name.lower(): return BF16_PEAK_TFLOPS[k]
    return None


def step(report, name, fn):
    t0 = time.time()
    try:
        report[name] = dict(ok=True, **fn())
    except Exception as e:  # record and go on: the next step may still work
        report[name] = dict(ok=False, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
    report[name]["seconds"] = round(time.time() - t0, 1)
    print(f"[gpu_check] {name}: {'ok' if report[name]['ok'] else 'FAILED ' + report[name]['error']} "
          f"({report[name]['seconds']} s)", flush=True)


def env_step(dry):
    import torch
    out = dict(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
               device_count=torch.cuda.device_count(), cpu_count=os.cpu_count(), dry_run=dry)
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(0), bf16=torch.cuda.is_bf16_supported(),
                   memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
        try:
            out["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError): out["driver"] = None
    return out


def speed_step(dry, presets):
    import profile_step
    rows = {}
    for p in presets:
        scale = "demo" if dry else "paper"
        r = profile_step.one(p, scale, iters=1 if dry else 3, warmup=0 if dry else 1, flops=True,
                             batch=None if dry else PER_GPU_BATCH[p], sets=() if dry else ("amp=on",))
        flops = sum(r["flops"].values())
        peak = peak_tflops(r["device_name"])
        rows[p] = dict(scale=scale, batch_size=r["batch_size"], crop_size=r["crop_size"],
                       seconds_per_step=round(r["seconds_per_iter"], 4),
                       images_per_second=round(r["batch_size"] / r["seconds_per_iter"], 3),
                       tflops_per_step=round(flops / 1e12, 4),
                       mfu=round(flops / r["seconds_per_iter"] / (peak * 1e12), 4) if peak else None,
                       seconds_by_part={k: round(v, 4) for k, v in r["seconds"].items()},
                       device_name=r["device_name"])
    return dict(rows=rows)


def _learner(preset, dry, d, **kw):
    from synernet.engine.runs import build_config
    from synernet.engine.learner import Learner
    from profile_step import ALWAYS_ON
    from synernet.core.config import CONFIG_KEYS
    base = dict(preset=preset, dataset="synthetic", out_dir=d, max_iters=10, progress=False, eval_every=0,
                ckpt_every=0, final_eval="none", seg_loss_nan_guard=True, seed=0)
    base.update({k: v for k, v in ALWAYS_ON.items() if k in CONFIG_KEYS})   # every loss on from the first step
    if not dry: base.update(scale="paper", pretrained=False, crop_size=448, batch_size=2)
    return Learner(build_config(**{**base, **kw}))


def bf16_step(dry):
    import torch
    from synernet.engine.learner import _to
    out = {}
    for amp in ("off", "on"):
        if amp == "on" and not torch.cuda.is_available() and not dry: continue
        with tempfile.TemporaryDirectory() as d:
            lrn = _learner("toco", dry, d, amp=amp if not dry else "off")
            lrn._set_train(True)
            batch = {k: _to(v, lrn.device) for k, v in next(iter(lrn.train_loader)).items()}
            w = lrn.method.loss_weights(0)
            with lrn.autocast():
                losses = lrn.method.training_step(batch, 0, w)
            out[amp] = {k: float(v.detach()) for k, v in losses.items()}
    if "on" in out:
        out["max_relative_difference"] = max(abs(out["on"][k] - out["off"][k]) / max(abs(out["off"][k]), 1e-12)
                                             for k in out["off"])
    return out


def memory_step(dry):
    import torch
    from synernet.engine.learner import train_iteration, _to
    with tempfile.TemporaryDirectory() as d:
        lrn = _learner("synernet", dry, d, amp="off" if dry else "on")
        lrn._set_train(True)
        if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
        batch = {k: _to(v, lrn.device) for k, v in next(iter(lrn.train_loader)).items()}
        train_iteration(lrn.method, lrn.optims, batch, 0, 0.0, lrn.autocast)
        from synernet.engine.learner import peak_memory_mb
        mb = peak_memory_mb(lrn.device)
    return dict(preset="synernet", batch_per_gpu=lrn.cfg.batch_size, crop_size=lrn.cfg.crop_size,
                peak_memory_gb=round(mb / 1024, 2), fits_24gb=bool(mb / 1024 < 24.0) if not dry else None)


def _train_cmd(d, dry, nproc=1):
    args = ["--preset", "toco", "--dataset", "synthetic", "--out_dir", d, "--max_iters", "6", "--ckpt_every", "3",
            "--eval_every", "0", "--final_eval", "none", "--progress", "false", "--seg_start", "2",
            "--seg_loss_nan_guard", "true"]
    if not dry: args += ["--scale", "paper", "--pretrained", "false", "--crop_size", "448", "--batch_size",
                         str(2 * nproc)]
    if nproc > 1: args += ["--nproc", str(nproc)]
    return [sys.executable, "-m", "synernet.train", *args]


def run_step(dry, nproc=1):
    with tempfile.TemporaryDirectory() as d:
        cmd = _train_cmd(d, dry, nproc)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
        ck = Path(d) / "checkpoints" / "latest.pt"
        t0, killed = time.time(), False
        while p.poll() is None and time.time() - t0 < 400:
            if ck.exists():
                os.killpg(p.pid, signal.SIGKILL); killed = True; break
            time.sleep(0.2)
        p.wait()
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if r.returncode: raise RuntimeError(f"resumed run failed ({r.returncode}): {(r.stdout + r.stderr)[-1500:]}")
        metrics = [json.loads(l) for l in (Path(d) / "metrics.jsonl").read_text().splitlines() if l.strip()]
        losses = [m["loss_total"] for m in metrics if "loss_total" in m]
        log = (Path(d) / "log.txt").read_text()
        resumed = "resumed from" in log
        if not all(math.isfinite(v) for v in losses): raise RuntimeError(f"non-finite loss: {losses}")
        if killed and not resumed: raise RuntimeError("the second start did not resume from the checkpoint")
        return dict(nproc=nproc, killed_after_first_checkpoint=killed, resumed=resumed, final_losses=losses[-3:],
                    finished=(Path(d) / "summary.json").exists())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, demo scale, one iteration per step")
    ap.add_argument("--out", default="")
    ap.add_argument("--presets", default="toco,dskd_gc,synernet")
    a = ap.parse_args()
    import torch
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("[gpu_check] no CUDA device: run with --dry-run for the CPU rehearsal", file=sys.stderr); sys.exit(2)
    report = dict(time=time.strftime("%Y-%m-%dT%H:%M:%S%z"), command=" ".join(sys.argv))
    t0 = time.time()
    step(report, "environment", lambda: env_step(dry))
    step(report, "speed", lambda: speed_step(dry, a.presets.split(",")))
    step(report, "bf16_vs_fp32", lambda: bf16_step(dry))
    step(report, "memory_24gb", lambda: memory_step(dry))
    step(report, "train_resume", lambda: run_step(dry))
    if not dry and torch.cuda.device_count() >= 2:
        step(report, "nccl_2_process", lambda: run_step(dry, nproc=2))
    report["total_seconds"] = round(time.time() - t0, 1)
    name = report["environment"].get("gpu") or f"cpu-{torch.get_num_threads()}threads"
    out = Path(a.out) if a.out else REPO / "reports" / f"benchmark_{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.json"
    doc = json.loads(out.read_text()) if out.exists() else {}
    doc["gpu_check" + ("_dry_run" if dry else "")] = report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    failed = [k for k, v in report.items() if isinstance(v, dict) and v.get("ok") is False]
    print(f"[gpu_check] {'all steps ok' if not failed else 'FAILED: ' + ', '.join(failed)} in "
          f"{report['total_seconds']} s; written {out}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
