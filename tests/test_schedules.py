"""Every preset x data set x scale trains what it says (issue 23).

- The preset registry: every method preset resolves on every data set at both scales and passes the silent-phase
  guard (`synernet.core.config.check_phases`); a config whose weighted loss starts at or after `max_iters` raises
  `SilentPhaseError` naming the loss, the key that delays it, its value and `max_iters`.
- A tiny COCO-layout set written here (an instances JSON with categories spread over the id range, a crowd RLE, an
  image without annotations, a grayscale JPEG) and converted by the project's own `coco_to_masks`: `toco` at demo
  scale logs its PTC, CTC and segmentation losses with non-zero weights.
- The papermill notebooks: papermill's own inspection finds every parameter with a type and a doc, and running
  `train.ipynb` with `-p scale demo -p out_dir ...` prints no "Unable to parse" or unknown-parameter line for a
  documented parameter.
"""
import ast, json, logging, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from synernet.core.config import (DATASETS, SCALES, ConfigError, SilentPhaseError, check_phases, loss_phases, make_config,
                           phase_table, phase_table_markdown)
from synernet.data.datasets import COCO_CATEGORY_IDS, COCO_CLASSES, coco_to_masks
from synernet.experiments.sweep import method_presets

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
PRESETS = method_presets()          # imports every method module; a new preset is covered by itself


def _papermill_notebooks() -> list[str]:
    "Every notebook with a cell tagged `parameters`: a new papermill notebook is covered by itself."
    return [p.stem for p in sorted((REPO / "nbs").glob("*.ipynb"))
            if any("parameters" in c["metadata"].get("tags", []) for c in json.loads(p.read_text())["cells"])]


PAPERMILL_NOTEBOOKS = _papermill_notebooks()
# pycocotools 2.x with NumPy 2 warns inside its own decode(); nothing to do about it here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ----------------------------------------------------------------------------------------------- the registry
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_resolves_and_every_weighted_loss_runs(preset, dataset, scale):
    cfg = make_config(preset, dataset, scale)
    ph = check_phases(cfg)
    weighted = {k: p for k, p in ph.items() if p["weight"]}
    assert weighted, f"{preset}: no loss has a weight"
    for k, p in weighted.items(): assert p["first"] is not None and p["first"] < cfg.max_iters, (k, p)


@pytest.mark.parametrize("preset", PRESETS)
def test_a_start_beyond_max_iters_is_refused(preset):
    "Cut the demo run just before the latest first iteration of a weighted loss: the guard names loss, key, value."
    cfg = make_config(preset, "coco", "demo")
    ph = check_phases(cfg)
    name, p = max(((k, p) for k, p in ph.items() if p["weight"]), key=lambda kp: kp[1]["first"])
    assert p["first"] > 0, f"{preset}: every loss starts at iteration 0; nothing to delay"
    short = cfg.replace(max_iters=p["first"])
    with pytest.raises(SilentPhaseError) as e: check_phases(short)
    msg = str(e.value)
    assert f"loss {name!r} (weight {p['weight']:g})" in msg and f"max_iters = {p['first']}" in msg, msg
    assert f" = {p['first']} delay" in msg, msg                      # the delaying key and its value
    check_phases(short.replace(allow_silent_losses="all"))          # a deliberate exception is a config key


def test_the_issue_case_toco_on_coco_at_demo_scale():
    cfg = make_config("toco", "coco", "demo")
    assert (cfg.max_iters, cfg.seg_start, cfg.contrast_start, cfg.seg_label_final_start) == (400, 150, 0, 0)
    assert (cfg.bkg_thre, cfg.ctc_temp) == (0.45, 1.0)                   # COCO's own values still apply
    paper = make_config("toco", "coco", "paper")
    assert (paper.max_iters, paper.seg_start, paper.contrast_start) == (80000, 8001, 12001)
    # what the issue found: ToCo's COCO phases in a 400-iteration run
    late = cfg.replace(seg_start=8001, contrast_start=12001, seg_label_final_start=12001)
    with pytest.raises(SilentPhaseError) as e: check_phases(late)
    msg = str(e.value)
    for part in ("loss 'ptc' (weight 0.2): contrast_start = 12001 delays it", "loss 'ctc'",
                 "loss 'seg' (weight 0.1): seg_start = 8001 delays it", "max_iters = 400"):
        assert part in msg, (part, msg)
    assert set(check_phases(late.replace(allow_silent_losses=("ptc", "ctc", "seg")))) >= {"ptc", "ctc", "seg"}
    with pytest.raises(ConfigError, match="'segg', which is not a loss"):
        check_phases(cfg.replace(allow_silent_losses="segg"))


def test_the_command_line_runs_the_same_check(tmp_path):
    args = [PY, "-m", "synernet.core", "--preset", "toco", "--dataset", "coco", "--scale", "demo", "--max_iters", "100",
            "--out_dir", str(tmp_path / "r")]
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode != 0 and "SilentPhaseError" in r.stderr and "seg_start = 150 delays it" in r.stderr, r.stderr
    assert not (tmp_path / "r").exists()                            # stopped before the run folder
    r = subprocess.run(args + ["--allow_silent_losses", "seg"], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "phases (first iteration of each loss; max_iters 100): 0: cls aux ptc ctc · never: seg" in r.stdout
    assert json.loads(r.stdout[r.stdout.index("{"):])["allow_silent_losses"] == ["seg"]


def test_the_phase_table_in_the_config_notebook_is_current():
    "The table shown in nbs/90_api.ipynb is the registry's (refresh it with `python tools/phase_table.py`)."
    nb = json.loads((REPO / "nbs" / "90_api.ipynb").read_text())
    cell = next(c for c in nb["cells"] if "phase_table_markdown(sc.phase_table())" in "".join(c["source"]))
    shown = "".join("".join(o["data"]["text/markdown"]) for o in cell.get("outputs", [])
                    if "text/markdown" in o.get("data", {}))
    assert shown == phase_table_markdown(phase_table()), "stale phase table: run `python tools/phase_table.py`"


# ----------------------------------------------------------------------------------------- a tiny COCO set
CATS = (1, 18, 44, 62, 90)          # person, dog, bottle, chair, toothbrush: spread over the id range (not 1..5)
COLOURS = {1: (220, 40, 40), 18: (40, 200, 60), 44: (40, 80, 230), 62: (230, 200, 40), 90: (200, 60, 200)}


def _poly(kind, x0, y0, s):
    if kind == 0: return [x0, y0, x0 + s, y0, x0 + s, y0 + s, x0, y0 + s]                       # square
    if kind == 1: return [x0 + s / 2, y0, x0 + s, y0 + s, x0, y0 + s]                           # triangle
    t = np.linspace(0, 2 * np.pi, 12, endpoint=False)                                              # disc
    return [float(v) for a in t for v in (x0 + s / 2 + s / 2 * np.cos(a), y0 + s / 2 + s / 2 * np.sin(a))]


def write_tiny_coco(root: Path, split: str, n: int, seed: int = 0):
    """An MS COCO 2014-style split: `<split>2014/COCO_<split>2014_<id>.jpg` and `instances_<split>2014.json`. Each
    image holds one or two filled shapes, one per category (shape and colour tell the category); one image has a
    crowd region stored as an uncompressed RLE, one has no annotation, one is a grayscale JPEG."""
    from pycocotools import mask as mu
    from PIL import ImageDraw
    rng = np.random.default_rng(seed)
    img_dir = root / f"{split}2014"; img_dir.mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i in range(1, n + 1):
        h, w = int(rng.integers(80, 112)), int(rng.integers(96, 136))
        fn = f"COCO_{split}2014_{i:012d}.jpg"
        img = Image.fromarray(rng.normal(120, 12, (h, w, 3)).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(img)
        images.append(dict(id=i, file_name=fn, height=h, width=w))
        if i == n:                                                        # an image without annotations
            img.save(img_dir / fn); continue
        for j, cat in enumerate(rng.choice(CATS[:4], size=1 + (i % 2), replace=False)):
            s = int(rng.integers(24, 40)); x0 = int(rng.integers(0, w - s)); y0 = int(rng.integers(0, h - s))
            poly = _poly(CATS.index(cat) % 3, x0, y0, s)
            draw.polygon(poly, fill=COLOURS[int(cat)])
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=int(cat), segmentation=[poly],
                             area=float(s * s), iscrowd=0, bbox=[x0, y0, s, s]))
        if i == 1:                                                        # a crowd region, uncompressed RLE
            m = np.zeros((h, w), np.uint8, order="F"); m[2:14, 2:30] = 1
            draw.rectangle([2, 2, 29, 13], fill=COLOURS[90])
            flat, counts, v, c = m.flatten(order="F"), [], 0, 0
            for p in flat:
                if p == v: c += 1
                else: counts.append(c); v, c = p, 1
            counts.append(c)
            anns.append(dict(id=len(anns) + 1, image_id=i, category_id=90, iscrowd=1, area=float(m.sum()),
                             segmentation=dict(counts=counts, size=[h, w]), bbox=[2, 2, 28, 12]))
            assert mu.decode(mu.frPyObjects(anns[-1]["segmentation"], h, w)).sum() == m.sum()
        (img.convert("L") if i == 2 else img).save(img_dir / fn, quality=95)   # image 2: grayscale
    cats = [dict(id=c, name=COCO_CLASSES[COCO_CATEGORY_IDS.index(c) + 1], supercategory="x") for c in CATS]
    ann = root / f"instances_{split}2014.json"
    ann.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return ann, img_dir


def make_tiny_coco(root: Path, n_train: int = 24, n_val: int = 8) -> Path:
    "Write both splits and convert them with `coco_to_masks` into `root/coco` (the layout the data loaders read)."
    out = root / "coco"
    for split, n, seed in (("train", n_train, 0), ("val", n_val, 1)):
        ann, imgs = write_tiny_coco(root / "raw", split, n, seed)
        coco_to_masks(ann, imgs, out, split, val_part_size=n_val, log=lambda *a: None)
    return out


@pytest.fixture(scope="module")
def tiny_coco(tmp_path_factory):
    return make_tiny_coco(tmp_path_factory.mktemp("tiny_coco"))


def test_toco_at_demo_scale_on_coco_trains_every_loss(tiny_coco, tmp_path):
    """The last iterations of ToCo's demo schedule on a COCO-layout set: PTC, CTC and the segmentation loss are
    computed and logged with their weights. The resolved demo config is used unchanged except for sizes (batch 2,
    crop 64) and logging; the learner starts at iteration max_iters - 2 instead of 0 (a 400-iteration run would take
    minutes), which is the end of the same schedule."""
    from synernet.engine.learner import Learner
    cfg = make_config("toco", "coco", "demo", data_root=str(tiny_coco), out_dir=str(tmp_path / "run"), batch_size=2,
                      crop_size=64, log_every=1, eval_every=0, ckpt_every=0, eval_max_images=2, final_eval="single",
                      progress=False, num_workers=0)
    assert (cfg.max_iters, cfg.seg_start, cfg.contrast_start) == (400, 150, 0)
    lrn = Learner(cfg)
    assert lrn.info.num_classes == 80
    lrn.start_iter = cfg.max_iters - 2
    s = lrn.fit()
    lines = [m for m in lrn.run.read_metrics() if "loss_total" in m]
    assert [m["step"] for m in lines] == [399, 400]
    for m in lines:
        for k in ("ptc", "ctc", "seg"):
            assert m[f"w_{k}"] > 0 and np.isfinite(m[f"loss_{k}"]), (k, m)
    assert s["seg_miou"] is not None and len(s["per_class_iou"]) == 81


# --------------------------------------------------------------------------------- papermill's parameters
def _assigned_names(nb_path: Path) -> list[str]:
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", []))
    tree = ast.parse("".join(cell["source"]))
    return [n.target.id if isinstance(n, ast.AnnAssign) else n.targets[0].id
            for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))]


def test_the_papermill_notebooks_are_found():
    assert {"train", "evaluate", "ablation", "tables"} <= set(PAPERMILL_NOTEBOOKS)


@pytest.mark.parametrize("name", PAPERMILL_NOTEBOOKS)
def test_papermill_finds_every_parameter_with_a_type(name, caplog):
    import papermill
    path = REPO / "nbs" / f"{name}.ipynb"
    with caplog.at_level(logging.WARNING, logger="papermill"):
        params = papermill.inspect_notebook(str(path))
    assert not [r.getMessage() for r in caplog.records if "Unable to parse" in r.getMessage()]
    assert list(params) == _assigned_names(path)
    for p in params.values():
        assert p["inferred_type_name"] not in ("None", "", None), p
        assert p["help"] and p["default"] is not None, p


def test_train_notebook_has_no_unknown_or_unparsed_parameter(tiny_coco, tmp_path):
    "A documented parameter passed with -p is never reported as unknown; the extras (other config keys) may be."
    documented = _assigned_names(REPO / "nbs" / "train.ipynb")
    params = dict(dataset="coco", data_root=tiny_coco, preset="toco", scale="demo", out_dir=tmp_path / "run",
                  max_iters=2, nproc=1)
    extras = dict(seg_start=0, batch_size=2, crop_size=64, log_every=1, eval_every=0, eval_max_images=2,
                  final_eval="single", progress=False)
    args = [PY, "-m", "papermill", str(REPO / "nbs" / "train.ipynb"), str(tmp_path / "out.ipynb"), "--no-progress-bar",
            "-k", "python3"]
    for k, v in {**params, **extras}.items(): args += ["-p", k, str(v)]
    r = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-5000:]
    assert "Unable to parse" not in out
    unknown = {l.split("Passed unknown parameter:")[1].strip() for l in out.splitlines() if "unknown parameter" in l}
    assert unknown == set(extras), unknown                        # the extras only: never a documented parameter
    assert not unknown & set(documented)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (s["preset"], s["dataset"], s["scale"], s["iters"]) == ("toco", "coco", "demo", 2)
