"""The table builder on tiny fake run folders (every table's shape and values, checked against numpy), unfinished
and broken folders, reference rows kept apart; the sweep's skip/resume logic; and one real tiny sweep (grid `smoke`,
2 iterations, 1 seed) through the papermill notebooks nbs/ablation.ipynb and nbs/tables.ipynb."""
import json, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synernet.data.datasets import VOC_CLASSES
from synernet.experiments.sweep import plan, job_status, is_finished, run_sweep, grid_cells
from synernet.experiments.tables import (PAPER_RESULTS, collect_runs, label_sources, ablation_table, thresholds_table,
                             loss_weights_table, comparison_table, per_class_table, cost_table, build_tables,
                             write_table, fmt_mean_std, curves)

REPO = Path(__file__).resolve().parents[1]
SEEDS = (0, 1, 2)
CLASSES = ("background", "red_white", "lime_white")


def fake_run(d, preset, seed, metrics, grid=None, cell=None, label=None, group="", iters=10, summary=True,
             cost=(100.0, 8.0, 500.0), classes=CLASSES, **cfg):
    """A run folder as the learner leaves it (config.json, summary.json, metrics.jsonl, optional sweep.json), with
    known numbers. `metrics`: label-map name -> mIoU; per-class IoU of a map = mIoU + class index."""
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    method = dict(dskd="dskd", dskd_gc="dskd", synernet="synernet", synernet_code="synernet").get(preset, preset)
    c = dict(dict(preset=preset, method=method, dataset="synthetic", scale="demo", seed=seed, max_iters=iters,
                  batch_size=8, lr=1e-4), **cfg)
    (d / "config.json").write_text(json.dumps(c))
    if grid: (d / "sweep.json").write_text(json.dumps(dict(grid=grid, cell=cell or preset, label=label or preset,
                                                           group=group)))
    m = {}
    for k, v in metrics.items():
        m[f"{k}_miou"] = v
        m[f"{k}_per_class"] = {name: v + i for i, name in enumerate(classes)}
    if summary:
        (d / "summary.json").write_text(json.dumps(dict(
            preset=preset, iters=summary if isinstance(summary, int) and summary is not True else iters, world_size=1,
            cam_miou=m.get("cam_miou"), pseudo_label_miou=m.get("pseudo_label_miou"), seg_miou=m.get("seg_miou"),
            seg_miou_ms=m.get("seg_ms_miou"), seg_miou_ms_crf=m.get("seg_ms_crf_miou"),
            per_class_iou=m.get("seg_ms_crf_per_class"), per_class_source="seg_ms_crf", train_seconds=cost[0],
            images_per_second=cost[1], peak_memory_mb=cost[2], device="cpu", metrics=m)))
    lines = [dict(step=t, loss_total=1.0 / t + seed) for t in range(1, iters + 1)]
    lines.append(dict(step=iters // 2, **{f"val_{k}_miou": v / 2 for k, v in metrics.items()}))
    (d / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    return d


def stats(xs):
    xs = np.asarray(xs, float)
    return xs.mean(), xs.std(ddof=1)


# the numbers of the fake ablation: (group, cell, label, preset, config) and seed -> metrics
ABL = [
    (("DSKD+GC", "toco", "baseline (ToCo)", "toco", {}),
        lambda k: dict(cam=40.0 + k, pseudo_label=30.0 + 2 * k, seg=20.0 + 3 * k, seg_ms_crf=22.0 + 3 * k)),
    (("DSKD+GC", "dskd", "+ DSKD", "dskd", {}),
        lambda k: dict(cam=41.0 + k * k, pseudo_label=31.0, seg=21.0 + k, seg_ms_crf=23.0 + k)),
    (("DSKD+GC", "dskd_gc", "+ DSKD + GC", "dskd_gc", dict(gc_enable=True)),
        lambda k: dict(cam=42.0, pseudo_label=10.0, pseudo_label_gc=33.0 + k, seg=22.0 + k, seg_ms_crf=25.0 + k)),
    (("SynerNet", "synernet_single", "single branch", "synernet",
      dict(fusion="fixed", fusion_weights=[1.0, 0.0], cross_supervision=False)),
        lambda k: dict(cam=1.0, b_cam=50.0 + k, p_cam=5.0, pseudo_label=1.0, b_pseudo_label=45.0 - k,
                       p_pseudo_label=2.0, seg=1.0, seg_b=35.0 + k, seg_p=3.0, seg_ms_crf=37.0 + k)),
    (("SynerNet", "synernet_fusion", "+ confidence fusion", "synernet", dict(fusion="confidence")),
        lambda k: dict(cam=51.0 + k, b_cam=51.0 + k, pseudo_label=46.0, seg=36.0 + 2 * k, seg_ms_crf=38.0 + 2 * k)),
]


@pytest.fixture()
def root(tmp_path):
    for (group, cell, label, preset, cfg), f in ABL:
        for k in SEEDS:
            fake_run(tmp_path / f"ablation/{cell}-seed{k}", preset, k, f(k), grid="ablation", cell=cell, label=label,
                     group=group, **cfg)
    for h, l in ((0.85, 0.25), (0.75, 0.35)):
        for k in SEEDS:
            fake_run(tmp_path / f"thresholds/th{h:.2f}-{l:.2f}-seed{k}", "dskd_gc", k,
                     dict(cam=60.0 + h * k, seg=50.0 + 10 * l + k), grid="thresholds", cell=f"th{h:.2f}-{l:.2f}",
                     gc_enable=True, gc_th_high=h, gc_th_low=l)
    for a, b, c in ((0.2, 0.5, 0.1), (0.1, 0.4, 0.1)):
        for k in SEEDS:
            fake_run(tmp_path / f"loss_weights/w{a}-{b}-{c}-seed{k}", "dskd_gc", k, dict(seg=60.0 + 10 * a * k),
                     grid="loss_weights", cell=f"w{a}-{b}-{c}", gc_enable=True, w_ptc=a, w_sim=b, w_punc=c, w_seg=0.1)
    for p, base in (("toco", 10.0), ("dskd_gc", 20.0), ("synernet", 30.0)):
        for k in SEEDS:
            fake_run(tmp_path / f"methods/{p}-seed{k}", p, k,
                     dict(cam=base + k, pseudo_label=base, seg=base + 2 * k, seg_ms_crf=base + 1 + 2 * k),
                     grid="methods", cell=p, group="methods", cost=(100.0 * (k + 1), base / 10 + k, 400.0 + k),
                     **(dict(gc_enable=True) if p == "dskd_gc" else {}))
    # folders the tables must leave out, each with its reason
    fake_run(tmp_path / "methods/toco-seed3", "toco", 3, dict(seg=99.0), grid="methods", summary=False)
    fake_run(tmp_path / "methods/toco-seed4", "toco", 4, dict(seg=99.0), grid="methods", summary=5)
    d = fake_run(tmp_path / "methods/toco-seed5", "toco", 5, dict(seg=99.0), grid="methods")
    (d / "summary.json").write_text('{"iters": 10, "seg_mi')
    d = fake_run(tmp_path / "methods/toco-seed6", "toco", 6, dict(seg=99.0), grid="methods")
    (d / "config.json").unlink()
    (tmp_path / "methods/empty-seed0").mkdir()
    (tmp_path / "methods/empty-seed0/sweep.json").write_text("{}")
    return tmp_path


@pytest.fixture()
def runs(root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return collect_runs(root)


def test_collect_runs_leaves_out_unfinished_and_broken(root):
    with pytest.warns(UserWarning, match="5 run folder\\(s\\) left out") as w:
        runs = collect_runs(root)
    reasons = dict(runs.attrs["skipped"])
    assert reasons[str(root / "methods/toco-seed3")] == "unfinished: no summary.json"
    assert reasons[str(root / "methods/toco-seed4")] == "incomplete: summary has 5 iterations, config asks for 10"
    assert reasons[str(root / "methods/toco-seed5")].startswith("unreadable summary.json")
    assert reasons[str(root / "methods/toco-seed6")] == "no config.json"
    assert reasons[str(root / "methods/empty-seed0")] == "no config.json"
    assert "toco-seed5" in str(w[0].message)
    assert len(runs) == 5 * 3 + 2 * 3 + 2 * 3 + 3 * 3
    assert not (runs["seg_miou"] == 99.0).any()
    assert set(collect_runs(root, dataset="voc", warn=False)["dataset"]) == set()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        collect_runs(root / "nowhere")


def test_label_sources_and_resolved_metrics(runs):
    r = runs.set_index("run_dir")
    single = r.loc[r.index[r.index.str.endswith("synernet_single-seed1")][0]]
    assert (single.cam_miou, single.pseudo_label_miou, single.seg_miou) == (51.0, 44.0, 36.0)   # branch B
    assert (single.m_p_cam, single.m_cam) == (5.0, 1.0)                                          # raw ones kept
    gc = r.loc[r.index[r.index.str.endswith("ablation/dskd_gc-seed2")][0]]
    assert (gc.pseudo_label_miou, gc.m_pseudo_label, gc.src_pseudo_label) == (35.0, 10.0, "pseudo_label_gc")
    # crossed single branch: decoder B learns P's label
    assert label_sources(dict(method="synernet", fusion="fixed", fusion_weights=[1, 0], cross_supervision=True)) == \
        dict(cam="b_cam", pseudo_label="p_pseudo_label", seg="seg_b")
    assert label_sources(dict(method="synernet", fusion="fixed", fusion_weights=[0.0, 1.0], cross_supervision=False)) \
        == dict(cam="p_cam", pseudo_label="p_pseudo_label", seg="seg_p")
    assert label_sources(dict(method="toco")) == dict(cam="cam", pseudo_label="pseudo_label", seg="seg")


def test_ablation_table(runs):
    t = ablation_table(runs, numeric=True)
    assert list(t.columns[:5]) == ["group", "step", "kind", "setting", "seeds"] and t.columns[-1] == "source"
    assert t["step"].tolist() == ["baseline (ToCo)", "+ DSKD", "+ DSKD + GC",                      # measured
                                  "baseline (ToCo)", "+ DSKD", "+ DSKD + GC",                      # Table 1
                                  "single branch", "+ confidence fusion"]
    assert t["kind"].tolist() == ["measured"] * 3 + ["paper (reported)"] * 3 + ["measured"] * 2
    meas = t[t.kind == "measured"].set_index("step")
    for (group, cell, label, preset, cfg), f in ABL:
        vals = [f(k) for k in SEEDS]
        src = label_sources(dict(method="synernet" if "synernet" in cell else preset, **cfg))
        for col, key in (("CAM", src["cam"]), ("pseudo-label", src["pseudo_label"]), ("seg", src["seg"]),
                         ("seg (MS+CRF)", "seg_ms_crf")):
            m, s = stats([v[key] for v in vals])
            assert meas.loc[label, col] == pytest.approx(m), (label, col)
            assert meas.loc[label, f"{col} std"] == pytest.approx(s), (label, col)
            assert meas.loc[label, f"{col} n"] == 3
        assert meas.loc[label, "seeds"] == "0,1,2" and meas.loc[label, "setting"] == "synthetic/demo, 10 it"
    ref = t[t.kind == "paper (reported)"]
    assert ref["seg"].tolist() == [r["seg"] for r in PAPER_RESULTS["ablation"]] == [68.57, 68.53, 69.67]
    assert ref["seg std"].isna().all() and ref["CAM"].isna().all()
    assert (ref["setting"] == "VOC val").all() and ref["source"].str.contains("Table 1").all()
    # formatted: mean ± sample std (n=3), reference values as published
    f = ablation_table(runs)
    m, s = stats([ABL[0][1](k)["seg"] for k in SEEDS])
    assert f.loc[0, "seg"] == f"{m:.2f} ± {s:.2f} (n=3)" == "23.00 ± 3.00 (n=3)"
    assert f.loc[3, "seg"] == "68.57" and f.loc[3, "CAM"] == "" and f.loc[3, "seeds"] == ""
    assert ablation_table(runs, reference=False)["kind"].eq("measured").all()


def test_threshold_and_loss_weight_tables(runs):
    t = thresholds_table(runs, numeric=True)
    assert t.shape[0] == 2 + 3
    meas = t[t.kind == "measured"]
    assert meas[["θh", "θl"]].values.tolist() == [[0.75, 0.35], [0.85, 0.25]]            # sorted by θh
    for (_, row), (h, l) in zip(meas.iterrows(), ((0.75, 0.35), (0.85, 0.25))):
        m, s = stats([50.0 + 10 * l + k for k in SEEDS])
        assert (row["seg"], row["seg std"], row["seg n"]) == (pytest.approx(m), pytest.approx(s), 3)
        m, s = stats([60.0 + h * k for k in SEEDS])
        assert (row["CAM"], row["CAM std"]) == (pytest.approx(m), pytest.approx(s))
    ref = t[t.kind == "paper (reported)"]
    assert ref[["θh", "θl", "seg", "CAM"]].values.tolist() == [[0.75, 0.35, 69.012, 70.966], [0.85, 0.25, 69.670, 71.429],
                                                              [0.90, 0.20, 69.390, 70.892]]
    w = loss_weights_table(runs, numeric=True)
    assert list(w.columns[:4]) == ["λ1", "λ2", "λ3", "λ4"]
    meas = w[w.kind == "measured"]
    assert meas[["λ1", "λ2", "λ3", "λ4"]].values.tolist() == [[0.1, 0.4, 0.1, 0.1], [0.2, 0.5, 0.1, 0.1]]
    for (_, row), a in zip(meas.iterrows(), (0.1, 0.2)):
        m, s = stats([60.0 + 10 * a * k for k in SEEDS])
        assert (row["seg"], row["seg std"]) == (pytest.approx(m), pytest.approx(s))
    assert len(w[w.kind == "paper (reported)"]) == 7
    assert w.loc[w.kind == "paper (reported)", "seg"].max() == 69.67
    f = loss_weights_table(runs)
    assert f.loc[0, "λ1"] == "0.1" and f.loc[1, "seg"] == f"{62.0:.2f} ± {stats([60, 62, 64])[1]:.2f} (n=3)"


def test_comparison_table_keeps_reference_rows_apart(runs):
    t = comparison_table(runs, numeric=True)
    meas = t[t.kind == "measured"].set_index("method")
    assert list(meas.index) == ["toco", "dskd_gc", "synernet"]
    for p, base in (("toco", 10.0), ("dskd_gc", 20.0), ("synernet", 30.0)):
        assert meas.loc[p, "seg"] == pytest.approx(base + 2) and meas.loc[p, "seg std"] == pytest.approx(2.0)
        assert meas.loc[p, "seg (MS+CRF)"] == pytest.approx(base + 3)
        assert meas.loc[p, "CAM"] == pytest.approx(base + 1) and meas.loc[p, "CAM std"] == pytest.approx(1.0)
    assert meas["reported mIoU"].isna().all()
    ref = t[t.kind == "paper (reported)"]
    assert ref[["CAM", "pseudo-label", "seg", "seg (MS+CRF)"]].isna().all().all()
    toco = ref[(ref.method == "ToCo (ViT-B)")].set_index("setting")["reported mIoU"]
    assert (toco["VOC val"], toco["VOC test"], toco["COCO val"]) == (71.1, 72.2, 42.2)
    assert ref["source"].str.contains("reported|listed|Neural Networks").all()
    assert set(ref["method"]) >= {"DSKD+GC (ViT-B)", "DuPL (ViT-B)"} and "SEAM" not in set(ref["method"])
    assert set(comparison_table(runs, reference="repo")["preset"].dropna()) <= {"toco", "dskd_gc", "synernet"}
    assert "SEAM" in set(comparison_table(runs, reference="all")["method"])
    assert comparison_table(runs, reference=None)["kind"].eq("measured").all()
    with pytest.raises(ValueError, match="reference must be"):
        comparison_table(runs, reference="some")


def test_per_class_and_cost_tables(runs, tmp_path):
    t = per_class_table(runs, numeric=True)
    assert t["method"].tolist() == ["toco", "dskd_gc", "synernet"] and (t["map"] == "seg_ms_crf").all()
    for (_, row), base in zip(t.iterrows(), (10.0, 20.0, 30.0)):
        for i, c in enumerate(CLASSES):
            m, s = stats([base + 1 + 2 * k + i for k in SEEDS])
            assert (row[c], row[f"{c} std"], row[f"{c} n"]) == (pytest.approx(m), pytest.approx(s), 3)
    assert "paper (reported)" not in set(t["kind"])                       # synthetic classes: no VOC reference row
    for k in SEEDS:                                                       # VOC classes: Table 6 joins as its own row
        fake_run(tmp_path / f"voc/toco-seed{k}", "toco", k, dict(seg_ms_crf=50.0 + k), grid="voc", cell="toco",
                 classes=VOC_CLASSES, dataset="voc")
    v = per_class_table(collect_runs(tmp_path / "voc"), grid="voc", numeric=True)
    assert v["kind"].tolist() == ["measured", "paper (reported)"]
    assert v.loc[1, "aeroplane"] == 86.5 and v.loc[1, "tvmonitor"] == 57.1 and v.loc[0, "aeroplane"] == pytest.approx(52.0)
    c = cost_table(runs, numeric=True).set_index("method")
    for p, base in (("toco", 10.0), ("dskd_gc", 20.0), ("synernet", 30.0)):
        assert c.loc[p, "train time (s)"] == pytest.approx(200.0) and c.loc[p, "train time (s) std"] == pytest.approx(100.0)
        assert c.loc[p, "images/s"] == pytest.approx(base / 10 + 1) and c.loc[p, "peak memory (MB)"] == pytest.approx(401.0)
    assert c.loc["ToCo (ViT-B)", "kind"] == "paper (reported)"
    assert c.loc["ToCo (ViT-B)", "images/s"] == pytest.approx(4 / 0.53)


def test_different_configs_are_never_averaged(tmp_path):
    for k in SEEDS:
        fake_run(tmp_path / f"a/toco-seed{k}", "toco", k, dict(seg=10.0), grid="methods", cell="toco")
        fake_run(tmp_path / f"b/toco-seed{k}", "toco", k, dict(seg=20.0), grid="methods", cell="toco", lr=5e-5)
    t = comparison_table(collect_runs(tmp_path), reference=None, numeric=True)
    assert len(t) == 2 and sorted(t["seg"]) == [10.0, 20.0] and (t["seg n"] == 3).all()
    assert t["method"].str.match(r"toco \[[0-9a-f]{8}\]").all() and t["method"].nunique() == 2


def test_build_and_write_tables(runs, tmp_path):
    tabs = build_tables(runs)
    assert set(tabs) == {"ablation", "thresholds", "loss_weights", "comparison", "per_class_iou", "training_cost"}
    for name, df in tabs.items():
        assert not df.empty, name
        assert set(df["kind"]) <= {"measured", "paper (reported)"} and df.columns[-1] == "source"
        md, csv, tex = write_table(df, tmp_path / "reports", name, caption=name)
        lines = md.read_text().splitlines()
        assert lines[0] == name and len(lines) == 2 + 2 + len(df)
        assert pd.read_csv(csv, keep_default_na=False).shape == df.shape
        body = tex.read_text()
        assert body.count(r"\\") >= len(df) + 1 and "±" not in body
    assert build_tables(runs.iloc[:0])["ablation"].empty
    assert fmt_mean_std(*[1.0, float("nan"), 1]) == "1.00 (n=1)"


def test_curves(runs):
    c = curves(runs, "ablation")
    single = c[(c.label == "single branch") & (c.curve == "seg mIoU (%)")]
    # the mid-run validation of branch B's decoder, then the summary's final value, per seed
    assert sorted(single["value"]) == sorted([(35.0 + k) / 2 for k in SEEDS] + [35.0 + k for k in SEEDS])
    loss = c[(c.label == "baseline (ToCo)") & (c.curve == "training loss")]
    assert len(loss) == 3 * 10 and loss["value"].max() == pytest.approx(1.0 + 2)


def _fake_launcher(job):
    "A job that writes what a finished run leaves (config + summary), without training."
    job.run_dir.mkdir(parents=True, exist_ok=True)
    job.config().save(job.run_dir / "job.json")
    code = ("import json, shutil, sys; d = sys.argv[1]; shutil.copy(d + '/job.json', d + '/config.json');"
            "json.dump(dict(iters=json.load(open(d + '/config.json'))['max_iters']), open(d + '/summary.json', 'w'))")
    return [sys.executable, "-c", code, str(job.run_dir)]


def test_plan_skips_finished_and_resumes_partial(tmp_path):
    jobs = plan("smoke", seeds=2, max_iters=3, out_root=tmp_path)
    assert [j.name for j in jobs] == ["toco-seed0", "toco-seed1", "dskd_gc-seed0", "dskd_gc-seed1"]
    assert [j.run_dir.relative_to(tmp_path).as_posix() for j in jobs][0] == "smoke/toco-seed0"
    done, part = jobs[0], jobs[1]
    done.run_dir.mkdir(parents=True); done.config().save(done.run_dir / "config.json")
    (done.run_dir / "summary.json").write_text(json.dumps(dict(iters=3)))
    part.run_dir.mkdir(parents=True); part.config().save(part.run_dir / "config.json")
    (part.run_dir / "summary.json").write_text(json.dumps(dict(iters=2)))       # an older, shorter summary
    assert is_finished(done.run_dir) and not is_finished(part.run_dir)
    assert [job_status(j)[0] for j in jobs] == ["finished", "partial", "new", "new"]
    rep = run_sweep("smoke", seeds=2, max_iters=3, out_root=tmp_path, launcher=_fake_launcher)
    assert [(r.job.name, r.before, r.outcome) for r in rep.results] == [
        ("toco-seed0", "finished", "skipped"), ("toco-seed1", "partial", "ok"), ("dskd_gc-seed0", "new", "ok"),
        ("dskd_gc-seed1", "new", "ok")]
    assert not (done.run_dir / "sweep.log").exists() and (part.run_dir / "sweep.log").exists()
    rep = run_sweep("smoke", seeds=2, max_iters=3, out_root=tmp_path, launcher=_fake_launcher)
    assert {r.outcome for r in rep.results} == {"skipped"}
    # a different schedule in the same folders: a conflict, reported and never counted as finished
    with pytest.raises(RuntimeError, match="FAILED smoke/toco-seed0: the folder holds a run with another config"):
        run_sweep("smoke", seeds=1, max_iters=4, out_root=tmp_path, launcher=_fake_launcher)


def test_overlapping_grids_share_runs(tmp_path):
    "The real grids overlap (GC's default thresholds = the dskd_gc preset): such a job reuses the other grid's run."
    run_sweep("methods", seeds=1, max_iters=2, out_root=tmp_path, cells=["dskd_gc"], launcher=_fake_launcher)
    launched = []
    def launcher(job):
        launched.append(job.cell.name)
        return _fake_launcher(job)
    rep = run_sweep("thresholds", seeds=1, max_iters=2, out_root=tmp_path, launcher=launcher)
    assert [(r.job.cell.name, r.outcome) for r in rep.results] == [
        ("th0.75-0.35", "ok"), ("th0.85-0.25", "reused"), ("th0.90-0.20", "ok")]
    assert launched == ["th0.75-0.35", "th0.90-0.20"]
    assert not (tmp_path / "thresholds" / "th0.85-0.25-seed0" / "config.json").exists()
    runs = collect_runs(tmp_path)
    th = runs[runs.grid == "thresholds"].set_index("cell")
    assert th.loc["th0.85-0.25", "run_dir"] == str((tmp_path / "methods" / "dskd_gc-seed0").resolve())
    assert th.loc["th0.85-0.25", "config_id"] == runs.set_index("grid").loc["methods", "config_id"]
    assert len(set(th.config_id)) == 3
    # a second pass finds everything finished; with the reused run gone the job trains in its own folder
    assert {r.outcome for r in run_sweep("thresholds", seeds=1, max_iters=2, out_root=tmp_path,
                                         launcher=launcher).results} == {"skipped"}
    (tmp_path / "methods" / "dskd_gc-seed0" / "summary.json").unlink()
    rep = run_sweep("thresholds", seeds=1, max_iters=2, out_root=tmp_path, launcher=launcher)
    assert [r.outcome for r in rep.results] == ["skipped", "ok", "skipped"]
    assert (tmp_path / "thresholds" / "th0.85-0.25-seed0" / "summary.json").exists()


def _papermill(nb, out, params, cwd):
    args = [sys.executable, "-m", "papermill", str(REPO / "nbs" / nb), str(out), "--no-progress-bar", "-k", "python3"]
    for k, v in params.items(): args += ["-p", k, str(v)]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(Path(out).read_text())


def test_smoke_sweep_and_reports_through_papermill(tmp_path):
    "The real thing, tiny: 2 cells x 1 seed x 2 iterations trained by papermill, then every report from the folders."
    sweeps, reports = tmp_path / "sweeps", tmp_path / "reports"
    _papermill("ablation.ipynb", tmp_path / "ablation.ipynb",
               dict(grid="smoke", seeds=1, max_iters=2, out_root=sweeps), tmp_path)
    for cell in ("toco", "dskd_gc"):
        d = sweeps / "smoke" / f"{cell}-seed0"
        assert is_finished(d) and (d / "train.ipynb").is_file() and (d / "sweep.log").is_file()
        meta = json.loads((d / "sweep.json").read_text())
        assert (meta["grid"], meta["cell"], meta["params"]["max_iters"]) == ("smoke", cell, 2)
        assert "papermill" in meta["command"]
    # started again: every job is finished, nothing runs
    rep = run_sweep("smoke", seeds=1, max_iters=2, out_root=sweeps)
    assert [r.outcome for r in rep.results] == ["skipped", "skipped"]
    _papermill("tables.ipynb", tmp_path / "tables.ipynb",
               dict(runs_root=sweeps, reports_dir=reports, methods_grid="smoke", ablation_grid="smoke", n_images=1),
               tmp_path)
    for name in ("ablation", "comparison", "per_class_iou", "training_cost"):
        for ext in ("md", "csv", "tex"): assert (reports / f"{name}.{ext}").is_file(), (name, ext)
    for name in ("thresholds", "loss_weights"): assert not (reports / f"{name}.md").exists()
    for fig in ("fig_curves_ablation", "fig_curves_methods", "fig_per_class_iou", "fig_pseudo_labels_ablation",
                "fig_cams_ablation", "fig_predictions_methods"):
        assert (reports / f"{fig}.png").stat().st_size > 1000, fig
    cmp_ = pd.read_csv(reports / "comparison.csv", keep_default_na=False)
    meas = cmp_[cmp_.kind == "measured"]
    assert meas["method"].tolist() == ["ToCo (smoke)", "DSKD+GC (smoke)"]
    s = json.loads((sweeps / "smoke/toco-seed0/summary.json").read_text())
    assert meas["seg"].iloc[0] == f"{s['seg_miou']:.2f} (n=1)" and meas["setting"].iloc[0] == "synthetic/demo, 2 it"
    assert len(pd.read_csv(reports / "runs.csv")) == 2
