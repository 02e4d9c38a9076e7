"""Data pipelines: tiny VOC-layout and COCO-format fixtures built on the fly, the real loaders and conversions on them,
bad input, crops and boxes, loader resume and sharding, and the synthetic generator (determinism, layout, design)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import synernet.data.datasets as D
from synernet.core.config import ConfigError, make_config
from synernet.data.datasets import (LABEL_FILE, ClsDataset, SegDataset, build_cls_labels, check_dataset, coco_to_masks,
                           dataset_info, load_cls_labels, make_train_loader, make_val_loader, read_list, resolve_root,
                           save_cls_labels, save_mask, sbd_to_aug)
from synernet.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, DSKDTrainView, ToCoTrainView, box_mask, denormalize,
                                 random_crop)

REPO = Path(__file__).resolve().parents[1]
# pycocotools 2.x with NumPy 2 warns inside its own decode(); nothing to do about it here
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


# ---------------------------------------------------------------------------------------------------- fixtures
def write_voc(root: Path, specs: dict, label_file=True):
    """VOC layout from explicit specs: {split: [(name, h, w, [(class, r0, r1, c0, c1), ...]), ...]}.
    Returns {name: (image, mask, labels)} with the labels computed here, independently of build_cls_labels."""
    rng = np.random.default_rng(0)
    (root / "JPEGImages").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    truth, labels = {}, {}
    for split, items in specs.items():
        for name, h, w, objs in items:
            img = rng.integers(1, 256, (h, w, 3)).astype(np.uint8)
            mask = np.zeros((h, w), np.uint8)
            y = np.zeros(20, np.float32)
            for c, r0, r1, c0, c1 in objs:
                mask[r0:r1, c0:c1] = c
                mask[r0, c0:c1] = 255
                y[c - 1] = 1
            Image.fromarray(img).save(root / "JPEGImages" / f"{name}.png", format="PNG")  # lossless for checks
            os.rename(root / "JPEGImages" / f"{name}.png", root / "JPEGImages" / f"{name}.jpg")
            save_mask(root / "SegmentationClassAug" / f"{name}.png", mask)
            truth[name] = (img, mask, y)
            labels[name] = y
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{n}\n" for n, *_ in items))
    if label_file:
        save_cls_labels(root / LABEL_FILE, labels)
    return truth


SPECS = {
    "train_aug": [("a1", 40, 50, [(3, 5, 20, 5, 30)]), ("a2", 30, 64, [(15, 2, 28, 10, 60), (7, 0, 10, 0, 8)]),
                  ("a3", 64, 36, [(20, 10, 50, 3, 30)]), ("a4", 50, 50, []), ("a5", 45, 41, [(1, 1, 44, 1, 40)])],
    "val": [("v1", 33, 47, [(2, 3, 30, 4, 40)]), ("v2", 20, 25, [(9, 1, 19, 1, 24), (11, 5, 9, 5, 9)]),
            ("v3", 40, 40, [])],
}


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOC2012"
    truth = write_voc(root, SPECS)
    cfg = make_config("base", dataset="voc", data_root=str(root), crop_size=32, batch_size=2, num_workers=0,
                      val_resize=32)
    return root, truth, cfg


# ------------------------------------------------------------------------------------------------ VOC loaders
def test_voc_training_and_evaluation_items(voc):
    root, truth, cfg = voc
    ds = ClsDataset(cfg)
    assert ds.names == [n for n, *_ in SPECS["train_aug"]]
    for i, name in enumerate(ds.names):
        it = ds[i]
        assert it["name"] == name
        assert it["img"].shape == (3, 32, 32) and it["img"].dtype == torch.float32
        assert torch.equal(it["cls_label"], torch.from_numpy(truth[name][2]))
        assert it["img_box"].dtype == torch.int64 and it["img_box"].shape == (4,)
        assert [c.shape for c in it["crops"]] == [(3, 32, 32)] * 3 and it["crops"][0] is it["img"]
    seg = SegDataset(cfg)
    assert seg.names == ["v1", "v2", "v3"]
    for i, name in enumerate(seg.names):
        it = seg[i]
        img, mask, y = truth[name]
        assert torch.equal(it["mask"], torch.from_numpy(mask.astype(np.int64)))
        ref = (img / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        assert np.allclose(it["img"].numpy().transpose(1, 2, 0), ref, atol=1e-5)      # original size, no resize
        assert torch.equal(it["cls_label"], torch.from_numpy(y))
    info = dataset_info(cfg)
    assert (info.name, info.num_classes, info.root, info.train_split, info.val_split) == \
        ("voc", 20, root, "train_aug", "val")
    # an inference-only split (like VOC test): images, no labels, no masks
    (root / "ImageSets/Segmentation/test.txt").write_text("a1\nv2\n")
    labels = load_cls_labels(root / LABEL_FILE, 20)
    save_cls_labels(root / LABEL_FILE, {k: v for k, v in labels.items() if k not in ("a1", "v2")})
    it = D.ImageDataset(cfg, "test")[1]
    assert sorted(it) == ["img", "name"] and it["name"] == "v2" and it["img"].shape == (3, 20, 25)


def test_labels_come_from_the_label_file_not_the_masks(voc):
    root, truth, cfg = voc
    labels = load_cls_labels(root / LABEL_FILE, 20)
    labels["v1"] = np.eye(20, dtype=np.float32)[5]                 # deliberately different from the mask
    save_cls_labels(root / LABEL_FILE, labels)
    assert SegDataset(cfg)[0]["cls_label"].argmax().item() == 5
    rep = check_dataset("voc", root, ["val"], log=lambda *a: None)   # ...and the checker reports the disagreement
    assert rep["val"]["label_mask_disagreements"] == 1


def test_build_cls_labels_matches_independent_labels(voc):
    root, truth, cfg = voc
    (root / LABEL_FILE).unlink()
    D.build_label_file("voc", root, ["train_aug", "val"], log=lambda *a: None)
    got = load_cls_labels(root / LABEL_FILE, 20)
    assert sorted(got) == sorted(truth)
    for n, (_, _, y) in truth.items():
        assert np.array_equal(got[n], y), n


def test_training_never_opens_a_mask(voc, monkeypatch):
    root, truth, cfg = voc
    opened = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(D.Image, "open", spy)
    monkeypatch.setattr(D, "read_mask", lambda *a, **k: pytest.fail("the training path read a mask"))
    loader = make_train_loader(cfg)
    for _ in range(5):
        next(loader)
    assert opened and not any("SegmentationClass" in p for p in opened)
    assert not any("mask" in k for k in vars(loader.dataset))
    import shutil
    shutil.rmtree(root / "SegmentationClassAug")                   # and it does not need the folder at all
    assert len(ClsDataset(cfg)) == 5


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_errors_name_the_file_and_the_fix(voc, tmp_path):
    root, truth, cfg = voc
    with pytest.raises(ConfigError, match="Unknown dataset 'pascal'"):
        dataset_info("pascal")
    with pytest.raises(FileNotFoundError, match="does not exist.*README"):
        resolve_root(cfg.replace(data_root=str(tmp_path / "nowhere")))
    with pytest.raises(FileNotFoundError, match=r"Split list .*train_aug_typo.txt not found.*train_aug, val"):
        ClsDataset(cfg, split="train_aug_typo")
    # a name in the list that does not exist
    lst = root / "ImageSets/Segmentation/val.txt"
    lst.write_text(lst.read_text() + "ghost\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 4 images named in .*val.txt are missing .*ghost.jpg"):
        SegDataset(cfg)
    lst.write_text("v1\nv2\nv3\n")
    # a label file that disagrees with the list
    labels = load_cls_labels(root / LABEL_FILE, 20)
    del labels["v2"]
    save_cls_labels(root / LABEL_FILE, labels)
    with pytest.raises(ValueError, match=r"no entry for 1 of the 3 images of .*val.txt.*'v2'.*build_cls_labels"):
        SegDataset(cfg)
    save_cls_labels(root / LABEL_FILE, {k: np.zeros(80, np.float32) for k in truth})
    with pytest.raises(ValueError, match="has 80 classes, the data set has 20"):
        ClsDataset(cfg)
    (root / LABEL_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"No image-level label file.*build_cls_labels.py --dataset voc"):
        ClsDataset(cfg)
    write_voc(tmp_path / "V2", SPECS)
    cfg2 = cfg.replace(data_root=str(tmp_path / "V2"))
    # a corrupt image: the loader names it
    (tmp_path / "V2/JPEGImages/a2.jpg").write_bytes(b"\xff\xd8\xff truncated")
    loader = make_train_loader(cfg2.replace(batch_size=5))
    with pytest.raises(ValueError, match=r"a2.jpg cannot be read.*corrupt"):
        next(loader)
    # a mask whose size differs from its image
    save_mask(tmp_path / "V2/SegmentationClassAug/v2.png", np.zeros((21, 25), np.uint8))
    with pytest.raises(ValueError, match=r"v2.png is 25x21 .*v2.jpg is 25x20"):
        SegDataset(cfg2)[1]
    # a colour mask, a mask with values of another data set
    Image.fromarray(np.zeros((33, 47, 3), np.uint8)).save(tmp_path / "V2/SegmentationClassAug/v1.png")
    with pytest.raises(ValueError, match=r"v1.png has mode 'RGB'"):
        SegDataset(cfg2)[0]
    save_mask(tmp_path / "V2/SegmentationClassAug/v1.png", np.full((33, 47), 60, np.uint8))
    with pytest.raises(ValueError, match=r"v1.png holds value 60"):
        SegDataset(cfg2)[0]
    # missing folders
    import shutil
    shutil.rmtree(tmp_path / "V2/SegmentationClassAug")
    with pytest.raises(FileNotFoundError, match=r"Mask folder .*SegmentationClassAug not found"):
        SegDataset(cfg2)
    shutil.rmtree(tmp_path / "V2/JPEGImages")
    with pytest.raises(FileNotFoundError, match=r"Image folder .*JPEGImages not found"):
        resolve_root(cfg2)
    (tmp_path / "V2/ImageSets/Segmentation/val.txt").write_text("v1\nv1\n")
    with pytest.raises(ValueError, match="names some images twice"):
        read_list(tmp_path / "V2/ImageSets/Segmentation/val.txt")


# ------------------------------------------------------------------------------------------- crops and boxes
def test_random_crop_box_marks_exactly_the_real_pixels():
    rng = np.random.default_rng(0)
    for _ in range(300):
        h, w, S = (int(v) for v in rng.integers(3, 60, 3))
        img = rng.integers(1, 256, (h, w, 3)).astype(np.uint8)
        crop, box = random_crop(img, S, rng)
        r0, r1, c0, c1 = box.tolist()
        assert crop.shape == (S, S, 3)
        assert (r1 - r0, c1 - c0) == (min(h, S), min(w, S))
        nz = (crop > 0).any(-1)
        assert np.array_equal(nz, box_mask(box, S))
        # the box holds a window of the image: find it by brute force
        win = crop[r0:r1, c0:c1]
        assert any(np.array_equal(img[i:i + win.shape[0], j:j + win.shape[1]], win)
                   for i in range(h - win.shape[0] + 1) for j in range(w - win.shape[1] + 1))


def _geometry_only(**kw):
    return ToCoTrainView(48, (0.5, 1.5), jitter_p=0, gray_p=0, main_blur_p=0, local_blur_p=0, global2_blur_p=0,
                         solarize_p=0, **kw)


def test_toco_views_box_with_and_without_the_double_flip_quirk():
    img = np.random.default_rng(1).integers(1, 256, (20, 30, 3)).astype(np.uint8)   # always padded
    wrong, mirrored = 0, 0
    for s in range(80):
        v = _geometry_only(compat_double_flip=False)(img, np.random.default_rng(s))
        real = (denormalize(v["img"]) > 0).any(0).numpy()
        assert np.array_equal(real, box_mask(v["img_box"], 48))
        assert torch.equal(v["crops"][2], v["img"])                  # one shared flip
        c = _geometry_only(compat_double_flip=True)(img, np.random.default_rng(s))
        wrong += not np.array_equal((denormalize(c["img"]) > 0).any(0).numpy(), box_mask(c["img_box"], 48))
        mirrored += torch.equal(c["crops"][2], c["img"].flip(-1)) and not torch.equal(c["crops"][2], c["img"])
    assert 20 < wrong < 60 and 20 < mirrored < 60                          # q1 reproduced: box wrong, local view mirrored


def test_dataset_box_and_dskd_views(voc):
    root, truth, cfg = voc
    ds = ClsDataset(cfg.replace(toco_compat_double_flip=False), transform=_geometry_only(compat_double_flip=False))
    for i in range(len(ds)):
        for e in range(3):
            it = ds[(i, e)]
            assert np.array_equal((denormalize(it["img"]) > 0).any(0).numpy(), box_mask(it["img_box"], 48))
    d = ClsDataset(cfg.replace(train_aug="dskd"))
    it = d[0]
    assert it["img_box"].tolist() == [0, 32, 0, 32] and "crops" not in it and it["img"].shape == (3, 32, 32)
    assert isinstance(d.transform, DSKDTrainView) and d.transform.scale == (0.32, 1.0)
    assert "crops" not in ClsDataset(cfg.replace(ctc_views=False))[0]
    v = ToCoTrainView(16, (0.9, 1.1), main_blur_p=1.0)
    im = np.random.default_rng(0).integers(0, 256, (20, 20, 3)).astype(np.uint8)
    assert torch.equal(v(im, np.random.default_rng(3))["img"], v(im, np.random.default_rng(3))["img"])


# -------------------------------------------------------------------------------------- loaders, DDP, resume
def _names(batches):
    return [n for b in batches for n in b["name"]]


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_resumes_with_identical_batches(voc, workers):
    root, truth, cfg = voc
    cfg = cfg.replace(num_workers=workers)
    a = make_train_loader(cfg)
    assert len(a) == 2                                               # 5 images, batch 2, drop_last
    first = [next(a) for _ in range(3)]                              # crosses into epoch 1
    st = a.state_dict()
    assert st == dict(epoch=1, position=1)
    rest = [next(a) for _ in range(3)]
    b = make_train_loader(cfg)
    b.load_state_dict(json.loads(json.dumps(st)))
    for x, y in zip(rest, [next(b) for _ in range(3)]):
        assert x["name"] == y["name"]
        for k in ("img", "cls_label", "img_box"):
            assert torch.equal(x[k], y[k])
        assert all(torch.equal(p, q) for p, q in zip(x["crops"], y["crops"]))
    # same batches from scratch, and independent of the number of workers
    c = make_train_loader(cfg.replace(num_workers=0))
    again = [next(c) for _ in range(3)]
    assert all(torch.equal(x["img"], y["img"]) for x, y in zip(first, again))
    # each epoch reshuffles; each batch has distinct images
    e0, e1 = a.epoch_batches(0), a.epoch_batches(1)
    assert e0 != e1 and all(len({i for i, _ in b}) == 2 for b in e0)


def test_ddp_sharding(voc, tmp_path):
    root, truth, cfg = voc
    with pytest.raises(ConfigError, match="does not divide"):
        make_train_loader(cfg.replace(batch_size=3), rank=0, world_size=2)
    ds = ClsDataset(cfg)
    shards = [make_train_loader(cfg.replace(batch_size=2), r, 2, dataset=ds) for r in range(2)]
    for epoch in range(3):
        b0, b1 = shards[0].epoch_batches(epoch), shards[1].epoch_batches(epoch)
        i0 = [i for b in b0 for i, _ in b]
        i1 = [i for b in b1 for i, _ in b]
        assert all(len(b) == 1 for b in b0 + b1)                    # per-process batch = 2 // 2
        assert len(i0) == len(i1) == 2 and not set(i0) & set(i1)    # 5 images -> 4 used, disjoint
        perm = np.random.default_rng([cfg.seed, epoch]).permutation(5)[:4]
        assert sorted(i0 + i1) == sorted(perm.tolist())
    with pytest.raises(ValueError, match="too few for one batch"):
        make_train_loader(cfg.replace(batch_size=8), dataset=ds)
    # validation: every image exactly once over the ranks, no padding
    names = []
    for r in range(3):
        names += [b["name"][0] for b in make_val_loader(cfg, rank=r, world_size=3)]
    assert sorted(names) == ["v1", "v2", "v3"]
    b = next(iter(make_val_loader(cfg)))
    assert b["img"].shape == (1, 3, 33, 47) and b["mask"].shape == (1, 33, 47)


# ---------------------------------------------------------------------------------------------------- SBD
def test_sbd_to_aug(tmp_path):
    from scipy.io import savemat
    voc = tmp_path / "VOC2012"
    sbd = tmp_path / "benchmark_RELEASE/dataset"
    rng = np.random.default_rng(0)
    (voc / "JPEGImages").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (sbd / "cls").mkdir(parents=True)
    (sbd / "img").mkdir()
    for n in ["i1", "i2", "i3", "i4", "i5"]:
        Image.fromarray(rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)).save(voc / "JPEGImages" / f"{n}.jpg")
    Image.fromarray(rng.integers(0, 255, (10, 12, 3)).astype(np.uint8)).save(sbd / "img" / "i6.jpg")  # SBD-only
    sbd_masks = {n: np.full((10, 12), k, np.uint8) for k, n in enumerate(["i1", "i2", "i3", "i6"], 1)}
    for n, m in sbd_masks.items():
        savemat(sbd / "cls" / f"{n}.mat", {"GTcls": {"Segmentation": m, "Boundaries": np.zeros(1),
                                                    "CategoriesPresent": np.unique(m)}})
    (sbd / "train.txt").write_text("i1\ni2\ni6\n")
    (sbd / "val.txt").write_text("i3\n")
    voc_mask = np.full((10, 12), 15, np.uint8)
    voc_mask[0] = 255
    save_mask(voc / "SegmentationClass/i2.png", voc_mask)         # VOC's own mask wins over SBD's
    save_mask(voc / "SegmentationClass/i4.png", voc_mask)
    save_mask(voc / "SegmentationClass/i5.png", voc_mask)
    (voc / "ImageSets/Segmentation/train.txt").write_text("i2\ni4\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("i3\ni5\n")
    res = D.main(["sbd", "--sbd", str(sbd), "--voc", str(voc)])
    assert read_list(voc / "ImageSets/Segmentation/train_aug.txt") == ["i1", "i2", "i4", "i6"]  # minus VOC val
    assert res == dict(sbd_masks=4, voc_masks=3, train_aug=4, images_copied=1)
    aug = voc / "SegmentationClassAug"
    assert np.array_equal(D.read_mask(aug / "i1.png", 20), sbd_masks["i1"])
    assert np.array_equal(D.read_mask(aug / "i2.png", 20), voc_mask)
    assert (voc / "JPEGImages/i6.jpg").exists()
    D.main(["labels", "--dataset", "voc", "--root", str(voc), "--splits", "train_aug", "val"])
    lab = load_cls_labels(voc / LABEL_FILE, 20)
    assert np.flatnonzero(lab["i1"]).tolist() == [0] and np.flatnonzero(lab["i2"]).tolist() == [14]
    assert sorted(lab) == ["i1", "i2", "i3", "i4", "i5", "i6"]


# --------------------------------------------------------------------------------------------------- COCO
def rect(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def write_coco(tmp_path, split="val"):
    """A small instances JSON: overlapping instances, a crowd RLE, a non-contiguous category id, an empty image."""
    from pycocotools import mask as mu
    img_dir = tmp_path / f"{split}2014"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    images, anns = [], []
    sizes = {1: (40, 60), 2: (30, 30), 3: (20, 25), 4: (32, 48)}
    for i, (h, w) in sizes.items():
        fn = f"COCO_{split}2014_{i:012d}.jpg"
        Image.fromarray(rng.integers(0, 255, (h, w, 3)).astype(np.uint8)).save(img_dir / fn)
        images.append(dict(id=i, file_name=fn, height=h, width=w))
    crowd = np.zeros((30, 30), np.uint8, order="F")
    crowd[5:15, 10:20] = 1
    rle = mu.encode(np.asfortranarray(crowd))
    counts = []                                              # an uncompressed RLE, as crowd annotations are stored
    flat = crowd.flatten(order="F")
    v, n = 0, 0
    for p in flat:
        if p == v:
            n += 1
        else:
            counts.append(n); v, n = p, 1
    counts.append(n)
    assert mu.decode(mu.frPyObjects(dict(counts=counts, size=[30, 30]), 30, 30)).sum() == crowd.sum() == \
        mu.area(rle)
    anns = [
        dict(id=1, image_id=1, category_id=1, segmentation=rect(5, 5, 45, 35), area=1200.0, iscrowd=0),   # person
        dict(id=2, image_id=1, category_id=18, segmentation=rect(20, 10, 30, 20), area=100.0, iscrowd=0),  # dog
        dict(id=3, image_id=2, category_id=90, segmentation=dict(counts=counts, size=[30, 30]), area=100.0,
             iscrowd=1),                                                                                   # toothbrush
        dict(id=4, image_id=2, category_id=44, segmentation=rect(2, 2, 8, 26), area=144.0, iscrowd=0),     # bottle
        dict(id=5, image_id=4, category_id=18, segmentation=rect(10, 4, 40, 28), area=720.0, iscrowd=0),
    ]
    cats = [dict(id=c, name=D.COCO_CLASSES[k + 1]) for k, c in enumerate(D.COCO_CATEGORY_IDS)]
    ann_file = tmp_path / f"instances_{split}2014.json"
    ann_file.write_text(json.dumps(dict(images=images, annotations=anns, categories=cats)))
    return ann_file, img_dir


def test_coco_conversion_and_loaders(tmp_path):
    ann, imgs = write_coco(tmp_path, "val")
    out = tmp_path / "coco"
    res = coco_to_masks(ann, imgs, out, "val", val_part_size=2, log=lambda *a: None)
    assert res == dict(images=3, without_annotations=1, val_part=2)
    names = read_list(out / "ImageSets/val.txt")
    assert names == [f"COCO_val2014_{i:012d}" for i in (1, 2, 4)]        # image 3 has no annotation
    part = read_list(out / "ImageSets/val_part.txt")
    assert len(part) == 2 and set(part) <= set(names)
    m1 = D.read_mask(out / f"SegmentationClass/val/{names[0]}.png", 80)
    cls = {c: k + 1 for k, c in enumerate(D.COCO_CATEGORY_IDS)}
    assert (cls[1], cls[18], cls[44], cls[90]) == (1, 17, 40, 80)
    # polygon rasterisation: interior (1 px in from the outline) is in, exterior (1 px out) is out
    assert (m1[12:19, 22:29] == 17).all()                                # the small dog is painted over the person
    assert (m1[7:34, 7:44][m1[7:34, 7:44] != 17] == 1).all()
    assert (m1[:4] == 0).all() and (m1[:, :4] == 0).all() and (m1[37:] == 0).all() and (m1[:, 47:] == 0).all()
    m2 = D.read_mask(out / f"SegmentationClass/val/{names[1]}.png", 80)
    assert (m2[5:15, 10:20] == 80).all() and (m2[3:26, 3:8] == 40).all()
    assert set(np.unique(m2)) == {0, 40, 80}
    from pycocotools.coco import COCO
    coco = COCO(str(ann))
    for a in coco.loadAnns(coco.getAnnIds()):
        im = coco.loadImgs(a["image_id"])[0]
        assert np.array_equal(D._ann_to_mask(a["segmentation"], im["height"], im["width"]), coco.annToMask(a))
    lab = load_cls_labels(out / LABEL_FILE, 80)
    assert np.flatnonzero(lab[names[0]]).tolist() == [0, 16] and np.flatnonzero(lab[names[1]]).tolist() == [39, 79]
    # crowd as ignore
    out2 = tmp_path / "coco2"
    coco_to_masks(ann, imgs, out2, "val", crowd="ignore", log=lambda *a: None)
    m2i = D.read_mask(out2 / f"SegmentationClass/val/{names[1]}.png", 80)
    assert (m2i[5:15, 10:20] == 255).all()
    # the real loaders on the converted layout
    cfg = make_config("base", dataset="coco", data_root=str(out), crop_size=32, batch_size=2, num_workers=0)
    seg = SegDataset(cfg)                                               # default val split: val_part
    assert seg.names == part and seg.split == "val_part"
    full = SegDataset(cfg, "val")
    it = full[0]
    assert torch.equal(it["mask"], torch.from_numpy(m1.astype(np.int64))) and it["img"].shape == (3, 40, 60)
    train = ClsDataset(cfg, split="val")
    assert train[1]["cls_label"].nonzero().flatten().tolist() == [39, 79]
    assert check_dataset("coco", out, ["val", "val_part"], log=lambda *a: None)["val"] == \
        dict(images=3, masks=True, label_mask_disagreements=0)
    # a train split is merged into the same label file; unknown categories are refused
    ann_t, imgs_t = write_coco(tmp_path, "train")
    coco_to_masks(ann_t, imgs_t, out, "train", log=lambda *a: None)
    assert len(load_cls_labels(out / LABEL_FILE, 80)) == 6
    assert ClsDataset(cfg).split == "train" and len(ClsDataset(cfg)) == 3
    bad = json.loads(ann.read_text())
    bad["annotations"][0]["category_id"] = 12                           # 12 is a gap in the COCO ids
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unknown category id 12"):
        coco_to_masks(tmp_path / "bad.json", imgs, tmp_path / "coco3", "val", log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="COCO image folder"):
        coco_to_masks(ann, tmp_path / "nowhere", tmp_path / "coco3", "val", log=lambda *a: None)


def test_data_scripts_run(tmp_path):
    ann, imgs = write_coco(tmp_path, "val")
    out = tmp_path / "coco"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    r = subprocess.run([sys.executable, str(REPO / "data/coco_to_masks.py"), "--ann", str(ann), "--images", str(imgs),
                        "--out", str(out), "--split", "val", "--workers", "2"], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["images"] == 3
    (out / LABEL_FILE).unlink()
    r = subprocess.run([sys.executable, str(REPO / "data/build_cls_labels.py"), "--dataset", "coco", "--root",
                        str(out), "--splits", "val"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len(load_cls_labels(out / LABEL_FILE, 80)) == 3


# ---------------------------------------------------------------------------------------------- synthetic
def _tree_bytes(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != ".complete"}


def test_synthetic_is_deterministic_and_in_voc_layout(tmp_path):
    from synernet.data.synthetic import generate_synthetic
    generate_synthetic(tmp_path / "a", seed=3, n_train=12, n_val=5)
    generate_synthetic(tmp_path / "b", seed=3, n_train=12, n_val=5)
    generate_synthetic(tmp_path / "c", seed=4, n_train=12, n_val=5)
    a, b, c = (_tree_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys() and a["JPEGImages/syn_train_00000.jpg"] != c["JPEGImages/syn_train_00000.jpg"]
    root = tmp_path / "a"
    assert read_list(root / "ImageSets/Segmentation/train.txt") == [f"syn_train_{i:05d}" for i in range(12)]
    rep = check_dataset("synthetic", root, ["train", "val"], log=lambda *a: None)   # the real VOC checks
    assert rep["train"]["label_mask_disagreements"] == rep["val"]["label_mask_disagreements"] == 0
    for p in (root / "SegmentationClassAug").iterdir():
        im = Image.open(p)
        m = np.asarray(im)
        assert im.mode == "P" and set(np.unique(m)) <= set(range(9)) | {255}
        assert 96 <= min(m.shape) and max(m.shape) <= 144
        if (m > 0).any():
            # every label edge is covered by the 255 band
            lab = m.astype(int)
            for dy, dx in ((0, 1), (1, 0)):
                a_, b_ = lab[: lab.shape[0] - dy, : lab.shape[1] - dx], lab[dy:, dx:]
                edge = (a_ != b_)
                assert ((a_[edge] == 255) | (b_[edge] == 255)).all()
        img = Image.open(root / "JPEGImages" / (p.stem + ".jpg"))
        assert img.format == "JPEG" and img.size == im.size


def test_synthetic_root_generation_and_marker(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNERNET_DATA", str(tmp_path / "data"))
    cfg = make_config("base", synthetic_n_train=10, synthetic_n_val=4, batch_size=2)
    root = resolve_root(cfg)
    assert root == tmp_path / "data/synthetic-seed0-train10-val4"
    assert (root / ".complete").exists()
    first = (root / "JPEGImages/syn_val_00003.jpg").read_bytes()
    (root / ".complete").unlink()                                      # half-written: regenerated, never used
    (root / "JPEGImages/syn_val_00003.jpg").write_bytes(b"half")
    assert resolve_root(cfg) == root and (root / "JPEGImages/syn_val_00003.jpg").read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["synthetic-seed0-train10-val4"]
    b = next(make_train_loader(cfg))
    assert b["img"].shape == (2, 3, 96, 96) and b["cls_label"].shape == (2, 8)
    assert dataset_info(make_config("base")).root == tmp_path / "data/synthetic"   # the default set's folder


def test_synthetic_design_has_the_two_failure_modes():
    """CAM-free checks of the design: the part names the class, the body only hints at it (generator v3: a typical
    class look 70 % of the time); context predicts its class."""
    from synernet.data.synthetic import CONTEXT_OF, REGIONS, render_split_item
    from synernet.data.datasets import SYNTHETIC_CLASSES
    C = 8
    body_rgb, part_rgb = [[] for _ in range(C)], [[] for _ in range(C)]
    ctx = {c: [0, 0, 0, 0] for c in CONTEXT_OF}              # with class: [pattern, n]; without: [pattern, n]
    part_frac = []
    for i in range(150):
        img, mask, reg, info = render_split_item(0, "train", i)
        for c in info["classes"]:
            obj = mask == c
            body_rgb[c - 1].append(img[obj & (reg == REGIONS.index("body"))].mean(0))
            part_rgb[c - 1].append(img[obj & (reg == REGIONS.index("part"))].mean(0))
        part_frac += [p / a for p, a in zip(info["part_area"], info["object_area"])]
        for cname, cx in CONTEXT_OF.items():
            k = 0 if SYNTHETIC_CLASSES.index(cname) in info["classes"] else 2
            ctx[cname][k] += cx in info["contexts"]
            ctx[cname][k + 1] += 1

    def separability(groups):                                # between-class / within-class variance of mean colours
        groups = [np.array(g) for g in groups]
        mu = np.concatenate(groups).mean(0)
        between = np.mean([((g.mean(0) - mu) ** 2).sum() for g in groups])
        within = np.mean([((g - g.mean(0)) ** 2).sum(1).mean() for g in groups])
        return between / within

    sp, sb = separability(part_rgb), separability(body_rgb)
    assert sp > 1.0 and 0.1 < sb < 0.5 * sp, (sp, sb)
    assert 0.05 < np.median(part_frac) < 0.25
    for cname, (w, nw, wo, nwo) in ctx.items():
        assert w / nw > 0.7 and wo / nwo < 0.15, (cname, w / nw, wo / nwo)
