"""tools/regime_report.py (issue 16): runs described by their differences from the preset, paired switch and encoder
rows, per-seed orderings with sign counts, from run folders written here."""
import json, sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import regime_report as rr


@pytest.fixture(scope="module")
def defaults():
    return {p: rr.default_config(p, "synthetic") for p in ("toco", "dskd_gc", "synernet")}


def fake_run(root, name, defaults, preset, seed, metrics, nested=None, **changes):
    "A finished run: top-level summary metrics as the learner writes them, and `nested` under summary['metrics']."
    d = root / name
    d.mkdir(parents=True)
    cfg = dict(defaults[preset], seed=seed, out_dir=str(d), **changes)
    (d / "config.json").write_text(json.dumps(cfg, default=list))
    (d / "summary.json").write_text(json.dumps(dict(preset=preset, seed=seed, train_seconds=1.0, metrics=nested or {},
                                                    **metrics)))
    return d


def test_tables_from_run_folders(tmp_path, defaults):
    m = lambda cam, pl, seg: dict(cam_miou=cam, pseudo_label_miou=pl, seg_miou=seg)
    fake_run(tmp_path, "a", defaults, "toco", 0, m(20.0, 18.0, 15.0))
    fake_run(tmp_path, "b", defaults, "toco", 1, m(22.0, 19.0, 16.0))
    fake_run(tmp_path, "c", defaults, "toco", 0, m(17.0, 18.5, 15.0), w_ptc=0.0)        # a switch
    fake_run(tmp_path, "d", defaults, "toco", 0, m(10.0, 9.0, 8.0), pretrained=True,
             weights_file="/x/enc.safetensors")                                          # an encoder
    fake_run(tmp_path, "e", defaults, "dskd_gc", 0, dict(m(25.0, 20.0, 18.0), pseudo_label_gc_miou=21.0))
    fake_run(tmp_path, "f", defaults, "dskd_gc", 1, dict(m(21.0, 20.0, 17.0), pseudo_label_gc_miou=17.0))
    fake_run(tmp_path, "g", defaults, "synernet", 0, m(0.0, 20.0, 19.0), nested=dict(b_cam_miou=26.0))
    (tmp_path / "unfinished").mkdir()                                                    # no summary: left out
    runs = rr.load_runs([tmp_path])
    assert len(runs) == 7
    by = {Path(r["dir"]).name: r for r in runs}
    assert by["a"]["diff"] == {} and by["a"]["enc"] == {}
    assert by["c"]["diff"] == {"w_ptc": 0.0} and by["d"]["enc"] == {"weights": "x/enc.safetensors"}
    sw = rr.switches(runs)
    assert "| w_ptc=0.0 | from scratch | 0 | 20.0 -> 17.0 (-3.0) |" in sw
    enc = rr.encoders(runs)
    assert "| x/enc.safetensors | 0 | 20.0 -> 10.0 |" in enc
    order = rr.orderings(runs, ["toco", "dskd_gc", "synernet", "amr"])                   # amr: no runs, left out
    assert "`amr`" not in order
    assert "| `toco` | 20.0 | 22.0 |" in order
    assert "| `synernet` | 26.0 |  |" in order                                             # its CAM is B-CAM (nested)
    # dskd_gc - toco per seed: CAM +5, -1 -> mean +2.0, one seed of two with its sign; labels after GC: +3, -2
    row = next(l for l in order.splitlines() if l.startswith("| `dskd_gc` - `toco`"))
    assert "+2.0 +- 4.2 (1/2)" in row and "+0.5 +- 3.5 (1/2)" in row


def test_no_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no finished runs"):
        rr.main([str(tmp_path)])
