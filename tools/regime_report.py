"""The proving-ground report (issue 16): switch runs, encoder comparisons and method orderings, from run folders.

Every run folder under the given roots (with `config.json` and `summary.json`) is described by its preset and the
settings in which its configuration differs from that preset's defaults for its data set (paths, seed and logging
aside), so no run is named by hand. Three tables come out, each built only from the runs that exist:

- **switches**: for each preset, each variant (a set of differing settings) against the preset's default run with
  the same seed and the same encoder: the mIoU of every map and the paired difference (variant minus default);
- **encoders**: for each preset, runs that differ only in the encoder (`pretrained`, `weights_file`) against the
  from-scratch run of the same seed;
- **orderings**: the default runs of the presets given with `--methods`, per seed and their mean +- std, and each
  pair's per-seed difference (how many seeds have the sign of the mean).

Usage: `python tools/regime_report.py RUN_ROOT [RUN_ROOT ...] [--methods toco dskd_gc synernet] [--out FILE]`
"""
import argparse, json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IGNORED = {"out_dir", "data_root", "seed", "log_every", "eval_every", "ckpt_every", "progress", "log_level",
           "num_workers", "tensorboard", "device", "label_file"}
ENCODER = {"pretrained", "weights_file"}
MAPS = [("cam_miou", "CAM"), ("aux_cam_miou", "aux CAM"), ("b_cam_miou", "B-CAM"), ("p_cam_miou", "P-CAM"),
        ("pseudo_label_miou", "pseudo-label"), ("pseudo_label_gc_miou", "GC label"), ("seg_miou", "seg"),
        ("seg_miou_ms_crf", "seg MS+CRF")]


def default_config(preset: str, dataset: str) -> dict:
    from synernet.core.config import make_config
    cfg = make_config(preset, dataset=dataset)
    return {k: cfg[k] for k in cfg._values}


def _norm(v):
    return tuple(_norm(x) for x in v) if isinstance(v, (list, tuple)) else v


def load_runs(roots) -> list[dict]:
    runs, defaults = [], {}
    for root in roots:
        for f in sorted(Path(root).rglob("summary.json")):
            d = f.parent
            if not (d / "config.json").is_file(): continue
            cfg, s = json.loads((d / "config.json").read_text()), json.loads(f.read_text())
            key = (cfg["preset"], cfg["dataset"])
            if key not in defaults: defaults[key] = default_config(*key)
            ref = defaults[key]
            diff = {k: v for k, v in cfg.items() if k not in IGNORED and k in ref and _norm(v) != _norm(ref[k])}
            enc = {k: diff.pop(k) for k in list(diff) if k in ENCODER}
            if not enc.get("pretrained", ref["pretrained"]): enc = {}
            elif "weights_file" in enc: enc = dict(weights="/".join(Path(enc["weights_file"]).parts[-2:]))  # folder/file
            else: enc = dict(weights="committed")
            m = {**s.get("metrics", {}), **s}            # the learner nests the branch maps under 'metrics'
            runs.append(dict(dir=str(d), preset=cfg["preset"], seed=cfg["seed"], diff=diff, enc=enc,
                             metrics={k: m[k] for k, _ in MAPS if isinstance(m.get(k), (int, float))},
                             seconds=s.get("train_seconds")))
    return runs


def _label(diff: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "default"


def _enc(enc: dict) -> str:
    return enc.get("weights", "from scratch")


def _cols(rows) -> list:
    return [(k, n) for k, n in MAPS if any(k in r["metrics"] for r in rows)]


def _fmt(v, signed=False) -> str:
    return "" if v is None else (f"{v:+.1f}" if signed else f"{v:.1f}")


def mean_std(xs):
    "(mean, sample std (0 for one value), n) of the values that exist; (None, None, 0) when none does."
    from synernet.experiments.tables import mean_std as tables_mean_std
    m, sd, n = tables_mean_std(xs)
    return (None, None, 0) if not n else (m, sd if n > 1 else 0.0, n)


def switches(runs) -> str:
    out = []
    for preset in sorted({r["preset"] for r in runs}):
        rs = [r for r in runs if r["preset"] == preset]
        cols = _cols(rs)
        rows = []
        for r in rs:
            if not r["diff"]: continue
            base = [b for b in rs if not b["diff"] and b["seed"] == r["seed"] and b["enc"] == r["enc"]]
            if not base: continue
            b = base[0]
            rows.append(f"| {_label(r['diff'])} | {_enc(r['enc'])} | {r['seed']} | " + " | ".join(
                f"{_fmt(b['metrics'].get(k))} -> {_fmt(r['metrics'].get(k))} "
                f"({_fmt(None if k not in r['metrics'] or k not in b['metrics'] else r['metrics'][k] - b['metrics'][k], True)})"
                for k, _ in cols) + " |")
        if rows:
            out += [f"### `{preset}`: each switch against the default run (same seed, same encoder)", "",
                    "| variant | encoder | seed | " + " | ".join(n for _, n in cols) + " |",
                    "|---|---|---:|" + "---|" * len(cols), *rows, ""]
    return "\n".join(out)


def encoders(runs) -> str:
    out = []
    for preset in sorted({r["preset"] for r in runs}):
        rs = [r for r in runs if r["preset"] == preset and not r["diff"]]
        cols = _cols(rs)
        rows = []
        for r in rs:
            if not r["enc"]: continue
            base = [b for b in rs if not b["enc"] and b["seed"] == r["seed"]]
            if not base: continue
            b = base[0]
            rows.append(f"| {_enc(r['enc'])} | {r['seed']} | " + " | ".join(
                f"{_fmt(b['metrics'].get(k))} -> {_fmt(r['metrics'].get(k))}" for k, _ in cols) + " |")
        if rows:
            out += [f"### `{preset}`: pretrained encoder against from scratch (same seed)", "",
                    "| encoder | seed | " + " | ".join(n for _, n in cols) + " |",
                    "|---|---:|" + "---|" * len(cols), *rows, ""]
    return "\n".join(out)


def orderings(runs, methods) -> str:
    base = {(r["preset"], r["seed"]): r for r in runs if not r["diff"] and not r["enc"]}
    methods = [m for m in methods if any(p == m for p, _ in base)]
    if not methods: return ""
    seeds = sorted({s for p, s in base if p in methods})
    pick = lambda m, s: base.get((m, s))
    # the pseudo-label a method trains its decoder on, and its segmentation
    label_key = lambda m: "pseudo_label_gc_miou" if m == "dskd_gc" else "pseudo_label_miou"
    cam_key = lambda m: "b_cam_miou" if m.startswith("synernet") else "cam_miou"
    keys = [("CAM", cam_key), ("pseudo-label", label_key), ("seg", lambda m: "seg_miou"),
            ("seg MS+CRF", lambda m: "seg_miou_ms_crf")]
    out = ["### Methods from scratch, per seed (CAM: B-CAM for SynerNet; pseudo-label: after GC for DSKD+GC)", "",
           "| method | " + " | ".join(f"{n} s{s}" for n, _ in keys for s in seeds) + " | " +
           " | ".join(f"{n} mean +- std" for n, _ in keys) + " |",
           "|---|" + "---:|" * (len(keys) * (len(seeds) + 1))]
    for m in methods:
        cells = []
        for n, kf in keys:
            cells += [_fmt((pick(m, s) or {}).get("metrics", {}).get(kf(m))) for s in seeds]
        for n, kf in keys:
            mu, sd, k = mean_std([(pick(m, s) or {}).get("metrics", {}).get(kf(m)) for s in seeds])
            cells.append("" if mu is None else f"{mu:.1f} +- {sd:.1f} (n={k})")
        out.append(f"| `{m}` | " + " | ".join(cells) + " |")
    out += ["", "Paired per seed (second minus first; in brackets: seeds with the sign of the mean):", "",
            "| pair | " + " | ".join(n for n, _ in keys) + " |", "|---|" + "---|" * len(keys)]
    for i, a in enumerate(methods):
        for b in methods[i + 1:]:
            cells = []
            for n, kf in keys:
                d = [pick(b, s)["metrics"][kf(b)] - pick(a, s)["metrics"][kf(a)] for s in seeds
                     if pick(a, s) and pick(b, s) and kf(a) in pick(a, s)["metrics"] and kf(b) in pick(b, s)["metrics"]]
                mu, sd, k = mean_std(d)
                cells.append("" if mu is None else
                             f"{mu:+.1f} +- {sd:.1f} ({sum((x > 0) == (mu > 0) for x in d)}/{k})")
            out.append(f"| `{b}` - `{a}` | " + " | ".join(cells) + " |")
    return "\n".join(out + [""])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("roots", nargs="+")
    ap.add_argument("--methods", nargs="*", default=["toco", "dskd_gc", "synernet"])
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    runs = load_runs(a.roots)
    if not runs: raise SystemExit(f"no finished runs (config.json + summary.json) under {a.roots}")
    text = "\n".join(["# The proving ground: switches, encoders, orderings", "",
                      f"Built by `python tools/regime_report.py {' '.join(a.roots)}` from {len(runs)} run folders; "
                      "synthetic val, mIoU (%). Arrows read default -> variant.", "",
                      switches(runs), encoders(runs), orderings(runs, a.methods)])
    if a.out: Path(a.out).write_text(text); print(f"wrote {a.out}")
    else: print(text)


if __name__ == "__main__":
    main()
