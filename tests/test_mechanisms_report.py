"""tools/mechanisms_report.py (issue 24): rows, mean +- std over seeds, sign counts and verdicts from run folders."""
import json, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import mechanisms_report as mr


def fake_run(d, preset, seed, metrics, cfg=None, lines=()):
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps(dict(preset=preset, seed=seed, metrics=metrics)))
    (d / "config.json").write_text(json.dumps(dict(max_iters=800, **(cfg or {}))))
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return d


def test_rows_values_and_verdicts(tmp_path):
    runs = [fake_run(tmp_path / f"s{k}", "synernet", k,
                     dict(b_cam_fg_recall_b_minus_p=v, b_cam_fg_precision_p_minus_b=-1.0, b_cam_miou=30.0 + k),
                     lines=[dict(step=400, val_b_cam_miou=32.0), dict(step=600, val_b_cam_miou=10.0)])
            for k, v in enumerate((4.0, 6.0, -1.0))]
    runs.append(fake_run(tmp_path / "g", "dskd_gc", 0, dict(gc_cam_max_rh_in_bg=0.7, gc_cam_max_rh_in_band=0.2,
                                                            gc_label_miou_gain=5.0, gc_cam_max_miou_gain=-2.0),
                         cfg=dict(gc_confidence="cam_max")))
    rows, md = mr.build(runs)
    by = {r["mechanism"]: r for r in rows}
    b = by["SynerNet: B-CAM broad"]
    assert (b["n"], b["mean"], b["k"], b["verdict"]) == (3, 3.0, 2, "holds")
    assert b["std"] == pytest.approx(((1 + 9 + 16) / 2) ** 0.5)
    assert by["SynerNet: P-CAM precise"]["verdict"] == "does not hold"
    c = by["no collapse: b_cam"]                          # final 30, 31, 32 against 32 at step 400 (half of 800)
    assert (c["mean"], c["k"], c["verdict"]) == (-1.0, 1, "does not hold")
    g = by["GC: where R_h lies"]                          # the configured reading's keys, not the other one's
    assert g["mean"] == pytest.approx(0.9) and g["verdict"] == "holds"
    assert by["GC: label quality"]["mean"] == -2.0
    assert by["SynerNet: fusion (decoders)"]["verdict"] == "n/a"
    assert md.count("\n") == len(rows) + 2 and "| SynerNet: B-CAM broad |" in md
