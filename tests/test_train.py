"""End-to-end training: papermill smoke runs (synthetic, VOC and COCO layouts), evaluation of exported weights, and a
2-process DDP run on CPU (gloo); kill-and-resume is in test_reliability.py. Tiny settings throughout (batch 2-4, a
few iterations, crop 96)."""
import hashlib, json, os, shutil, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch

from synernet.data.datasets import make_toy_voc

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
# a few iterations: the later phases (segmentation, ...) never start, deliberately (see synernet.core.config.check_phases)
TINY = dict(max_iters=3, batch_size=2, log_every=2, eval_every=0, eval_max_images=2, progress=False,
            allow_silent_losses="all")


def _papermill(nb, out, params, cwd):
    args = [PY, "-m", "papermill", str(REPO / "nbs" / nb), str(out), "--no-progress-bar", "-k", "python3"]
    for k, v in params.items(): args += ["-p", k, str(v)]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return json.loads(Path(out).read_text())


def _check_run(run, dataset):
    s = json.loads((run / "summary.json").read_text())
    assert (s["dataset"], s["iters"], s["world_size"]) == (dataset, 3, 1)
    assert s["seg_miou"] is not None and 0 <= s["cam_miou"] <= 100
    for f in ("loss_curves.png", "predictions.png", "miou.csv", "per_class_iou.csv", "checkpoints/final.pt"):
        assert (run / f).is_file(), f
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss_total" in m]
    assert steps == [2, 3]
    return s


def _coco_fixture(root):
    "The COCO layout (JPEGImages/<train|val>, SegmentationClass/<train|val>, ImageSets/<split>.txt), 80 classes."
    make_toy_voc(root, n=4, num_classes=80, splits=("train", "val_part"), seed=1)
    for split, sub in (("train", "train"), ("val_part", "val")):
        for d in ("JPEGImages", "SegmentationClass"): (root / d / sub).mkdir(parents=True, exist_ok=True)
        for name in (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split():
            shutil.move(root / "JPEGImages" / f"{name}.jpg", root / "JPEGImages" / sub / f"{name}.jpg")
            shutil.move(root / "SegmentationClassAug" / f"{name}.png", root / "SegmentationClass" / sub / f"{name}.png")
        shutil.move(root / "ImageSets" / "Segmentation" / f"{split}.txt", root / "ImageSets" / f"{split}.txt")
    shutil.rmtree(root / "SegmentationClassAug"); (root / "ImageSets" / "Segmentation").rmdir()
    return root


@pytest.mark.parametrize("dataset", ["synthetic", "voc", "coco"])
def test_train_notebook(tmp_path, dataset):
    params = dict(TINY, dataset=dataset, out_dir=tmp_path / "run", final_eval="ms" if dataset == "synthetic" else "single")
    if dataset == "voc": params.update(data_root=make_toy_voc(tmp_path / "voc", n=4), scale="demo")
    if dataset == "coco": params.update(data_root=_coco_fixture(tmp_path / "coco"), scale="demo")
    nb = _papermill("train.ipynb", tmp_path / "out.ipynb", params, tmp_path)
    s = _check_run(tmp_path / "run", dataset)
    assert len(s["per_class_iou"]) == {"synthetic": 9, "voc": 21, "coco": 81}[dataset]
    if dataset == "synthetic":
        assert s["seg_miou_ms"] is not None
        # the injected extra parameters (batch_size, log_every, ...) reached the config
        assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 2
        ev = _papermill("evaluate.ipynb", tmp_path / "ev.ipynb",
                        dict(run_dir=tmp_path / "run", final_eval="ms", max_images=2), tmp_path)
        e = json.loads((tmp_path / "run" / "eval_summary.json").read_text())
        # the same weights and images as the training run's final evaluation give the same numbers
        for k in ("cam_miou", "seg_miou", "seg_ms_miou"):
            assert e[k] == pytest.approx(s["metrics"][k], abs=1e-9), k
        assert (tmp_path / "run" / "eval_per_class_iou.csv").is_file()
        assert not any(o.get("output_type") == "error" for c in ev["cells"] for o in c.get("outputs", []))
        # shared weights: exported as safetensors, evaluated from the file alone (a folder without config.json)
        w = tmp_path / "shared" / "weights.safetensors"
        r = subprocess.run([PY, "-m", "synernet.train", "export", str(tmp_path / "run"), "--out", str(w)],
                           capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 0 and r.stdout.strip() == str(w), r.stderr[-3000:]
        _papermill("evaluate.ipynb", tmp_path / "ev2.ipynb", dict(run_dir=tmp_path / "shared" / "eval", checkpoint=w,
                                                                   final_eval="ms", max_images=2), tmp_path)
        e2 = json.loads((tmp_path / "shared" / "eval" / "eval_summary.json").read_text())
        for k in ("cam_miou", "seg_miou", "seg_ms_miou"): assert e2[k] == e[k], k


def _method_presets():
    from synernet.experiments.sweep import method_presets
    return method_presets()


@pytest.mark.parametrize("preset", [p for p in _method_presets() if p != "synernet"])   # synernet: the default above
def test_train_notebook_every_preset(tmp_path, preset):
    "Every registered method preset trains through the papermill notebook and writes its summary and figures."
    params = dict(TINY, preset=preset, out_dir=tmp_path / "run", final_eval="single", seg_start=0,
                  seg_loss_nan_guard=True)
    _papermill("train.ipynb", tmp_path / "out.ipynb", params, tmp_path)
    s = _check_run(tmp_path / "run", "synthetic")
    assert s["preset"] == preset and s["seg_miou"] is not None


DDP_WORKER = textwrap.dedent("""
    import hashlib, json, sys, torch
    from synernet.core.config import dist_info, parse_cli
    from synernet.engine.runs import build_config, train
    lrn, summary = train(build_config(sys.argv[2:]))
    h = hashlib.sha256()
    for k, v in sorted(lrn.method.net("net").state_dict().items()): h.update(k.encode()); h.update(v.numpy().tobytes())
    open(f"{sys.argv[1]}/hash{dist_info()[0]}.txt", "w").write(h.hexdigest())
""")


def test_ddp_two_processes(tmp_path):
    """2 processes (gloo) x 2 images = global batch 4. Both ranks keep identical parameters. The first iteration's
    classification losses equal a single process's with batch 4: the two ranks take images perm[0::2] and perm[1::2]
    of the same epoch permutation (together the single process's first batch, with the same per-image augmentation)
    and the logged loss is the mean over ranks of per-rank means. Tolerance 1e-4 relative: float summation order.
    PTC/CTC are not per-image means (pairs within a batch; crops drawn per process), so later steps differ."""
    (tmp_path / "w.py").write_text(DDP_WORKER)
    common = ["--preset", "toco", "--max_iters", "2", "--batch_size", "4", "--log_every", "1", "--eval_every", "0",
              "--final_eval", "none", "--progress", "false", "--seed", "3", "--allow_silent_losses", "seg"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(tmp_path / "w.py"),
                        str(tmp_path), *common, "--out_dir", str(tmp_path / "ddp")], env=env, capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    h0, h1 = (tmp_path / "hash0.txt").read_text(), (tmp_path / "hash1.txt").read_text()
    assert h0 == h1
    s = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert s["world_size"] == 2
    r = subprocess.run([PY, str(tmp_path / "w.py"), str(tmp_path / "single"), *common, "--out_dir",
                        str(tmp_path / "single")], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    m2 = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    m1 = json.loads((tmp_path / "single" / "metrics.jsonl").read_text().splitlines()[0])
    for k in ("loss_cls", "loss_aux"): assert m2[k] == pytest.approx(m1[k], rel=1e-4), k
    assert m2["loss_ptc"] != m1["loss_ptc"] or m2["loss_ctc"] != m1["loss_ctc"]   # the comparison can tell runs apart
    assert (tmp_path / "single" / "hash0.txt").read_text() != h0


def test_cli_errors(tmp_path):
    r = subprocess.run([PY, "-m", "synernet.train", "--preset", "toco", "--max_iter", "3"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "Did you mean 'max_iters'" in r.stderr
    r = subprocess.run([PY, "-m", "synernet.train", "--preset", "toco", "--nproc", "two"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and "whole number" in r.stderr
