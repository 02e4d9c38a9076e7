"""Build `reports/mechanisms.md` (issue 24): one row per mechanism of DSKD+GC and SynerNet, from run folders.

Each row names the paper's claim, the validation diagnostic that measures it (logged by the methods into
`metrics.jsonl` and `summary.json`; see nbs/41_learner.ipynb, "Validation diagnostics"), its mean +- std over the runs
(seeds) that have it, how many runs have the claimed sign, and the verdict: `holds` when the seed mean meets the claim,
`does not hold` when it does not, `n/a` when no run logged it. The claims are read as signs (B's recall above P's,
fused no worse than the better branch, ...), so no threshold is tuned here. The "no collapse" rows compare the last
validation with the one at half of training (`--eval_every` must put one there).

Usage: `python tools/mechanisms_report.py RUN_DIR [RUN_DIR ...] [--out reports/mechanisms.md]`
"""
import argparse, json, math
from pathlib import Path

# (mechanism, claim, diagnostic (how it is computed), value(run) -> float | None, claim met by value v)
def _m(key):
    return lambda r: r["metrics"].get(key)

def _gc(suffix):
    "The GC diagnostic of the run's configured confidence reading."
    return lambda r: r["metrics"].get(f"gc_{r['config'].get('gc_confidence', 'cam_max')}_{suffix}")

def _sum(*fs):
    def f(r):
        v = [g(r) for g in fs]
        return None if any(x is None for x in v) else sum(v)
    return f

def _diff(a, b):
    return lambda r: None if a(r) is None or b(r) is None else a(r) - b(r)

def _half(name):
    "Final minus half-way validation mIoU of the map `name` (metrics.jsonl)."
    def f(r):
        val = [l for l in r["lines"] if f"val_{name}_miou" in l]
        final = r["metrics"].get(f"{name}_miou")
        half = [l for l in val if l["step"] <= r["config"].get("max_iters", 0) / 2]
        return None if final is None or not half else final - half[-1][f"val_{name}_miou"]
    return f

ROWS = [
    ("GC: where R_h lies", "R_h mostly in background and at object boundaries",
     "share of R_h in background + boundary band (`gc_<reading>_rh_in_bg` + `_rh_in_band`)",
     _sum(_gc("rh_in_bg"), _gc("rh_in_band")), lambda v: v > 0.5),
    ("GC: label quality", "corrected pseudo-labels no worse than the labels GC corrects",
     "pseudo-label mIoU after - before GC, on the pixels each labels (`gc_<reading>_miou_gain`, points)",
     _gc("miou_gain"), lambda v: v >= 0),
    ("GC: background", "better background (the paper's headline)",
     "background IoU after - before GC (`gc_<reading>_bg_iou_gain`, points)", _gc("bg_iou_gain"), lambda v: v >= 0),
    ("DSKD: expansion, coverage", "the expansion stage raises CAM recall",
     "teacher - student CAM foreground recall (`dskd_cam_fg_recall_teacher_minus_student`, points)",
     _m("dskd_cam_fg_recall_teacher_minus_student"), lambda v: v > 0),
    ("DSKD: expansion, precision", "... without losing precision",
     "teacher - student CAM foreground precision (`dskd_cam_fg_precision_teacher_minus_student`, points)",
     _m("dskd_cam_fg_precision_teacher_minus_student"), lambda v: v >= 0),
    ("SynerNet: B-CAM broad", "B covers more foreground than P",
     "B - P CAM foreground recall (`b_cam_fg_recall_b_minus_p`, points)", _m("b_cam_fg_recall_b_minus_p"), lambda v: v > 0),
    ("SynerNet: P-CAM precise", "P localises more precisely than B",
     "P - B CAM foreground precision (`b_cam_fg_precision_p_minus_b`, points)", _m("b_cam_fg_precision_p_minus_b"),
     lambda v: v > 0),
    ("SynerNet: confidence matrix", "consistently classified pixels are the reliable ones",
     "accuracy of the fused prediction on reliable - uncertain pixels (`conf_reliable_seg_acc` - `conf_uncertain_seg_acc`)",
     _diff(_m("conf_reliable_seg_acc"), _m("conf_uncertain_seg_acc")), lambda v: v > 0),
    ("SynerNet: fusion (decoders)", "the fused prediction is better than either branch",
     "fused - better decoder mIoU (`fusion_seg_gain`, points)", _m("fusion_seg_gain"), lambda v: v >= 0),
    ("SynerNet: fusion (pseudo-labels)", "fused pseudo-labels at least as good as the better branch's",
     "fused - better branch pseudo-label mIoU, on the pixels each labels (`fusion_pseudo_label_gain`)",
     _m("fusion_pseudo_label_gain"), lambda v: v >= 0),
]
for _name in ("cam", "pseudo_label", "b_cam", "p_cam", "b_pseudo_label", "p_pseudo_label"):
    ROWS.append((f"no collapse: {_name}", "mIoU at the end at least its value at half of training",
                 f"final - half-way `{_name}_miou` (points)", _half(_name), lambda v: v >= 0))

def load_run(d) -> dict:
    d = Path(d)
    s = json.loads((d / "summary.json").read_text())
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()] if (d / "metrics.jsonl").is_file() else []
    return dict(dir=str(d), metrics=s.get("metrics", {}), config=cfg, preset=s.get("preset"), seed=s.get("seed"), lines=lines)

def build(run_dirs) -> tuple[list[dict], str]:
    "(rows, markdown): one row per mechanism with values over the runs that logged it."
    runs = [load_run(d) for d in run_dirs]
    out = []
    for mech, claim, diag, f, ok in ROWS:
        got = [(r, f(r)) for r in runs]
        vals = [v for _, v in got if v is not None and not (isinstance(v, float) and math.isnan(v))]
        presets = sorted({r["preset"] for r, v in got if v is not None})
        if not vals:
            out.append(dict(mechanism=mech, claim=claim, diagnostic=diag, n=0, mean=None, std=None, k=0, verdict="n/a",
                            presets=presets)); continue
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
        out.append(dict(mechanism=mech, claim=claim, diagnostic=diag, n=len(vals), mean=mean, std=std,
                        k=sum(bool(ok(v)) for v in vals), verdict="holds" if ok(mean) else "does not hold",
                        presets=presets))
    md = ["| mechanism | the paper's claim | diagnostic | value (mean ± std) | runs with the claimed sign | verdict | presets |",
          "|---|---|---|---|---|---|---|"]
    for r in out:
        val = "–" if r["mean"] is None else f"{r['mean']:.2f} ± {r['std']:.2f}"
        md.append(f"| {r['mechanism']} | {r['claim']} | {r['diagnostic']} | {val} | {r['k']}/{r['n']} | {r['verdict']} | "
                  f"{', '.join(p for p in r['presets'] if p) or '–'} |")
    return out, "\n".join(md) + "\n"

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="run folders (summary.json, config.json, metrics.jsonl)")
    ap.add_argument("--out", default=None, help="write the markdown table here (default: print it)")
    a = ap.parse_args(argv)
    _, md = build(a.runs)
    head = f"# Mechanisms: does each one do its published job?\n\nBuilt by `python tools/mechanisms_report.py` from {len(a.runs)} run folder(s).\n\n"
    if a.out: Path(a.out).write_text(head + md)
    print(md)

if __name__ == "__main__":
    main()
