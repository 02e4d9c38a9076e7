"""The GC label-noise bench (nbs/72_gc_bench.ipynb): only what GC's rules guarantee, with no tuned threshold. On
grid-aligned scenes with noise-free features every feature edge is a ground-truth boundary, so GC sends pixels to
background only inside the one-token boundary band, under every confidence reading and every kind of error; on clean
labels GC cannot lower the error and every wrong label it makes lies in that band; it changes no pixel outside
R_h and R_u. The ordering of the readings is a measurement (the notebook), not asserted here."""
import numpy as np
import pytest
import torch

from synernet.ops.gc import GC_READINGS, gaussian_correction
from synernet.experiments.gc_bench import NOISES, corrupt, make_scene, run_bench


@pytest.fixture(scope="module")
def aligned():
    return run_bench(n_images=4, seed=0, size=64, aligned=True, feat_noise=0.0)[0]


def test_every_reading_and_noise_is_measured(aligned):
    assert set(aligned.noise) == set(NOISES) and set(aligned.reading) == set(GC_READINGS)
    assert len(aligned) == len(NOISES) * len(GC_READINGS)


def test_background_only_at_ground_truth_boundaries(aligned):
    assert (aligned.to_bg_off_band == 0).all(), aligned[["noise", "reading", "to_bg_off_band"]]


def test_clean_labels_cannot_improve(aligned):
    clean = aligned[aligned.noise == "clean"]
    assert (clean.wrong_before == 0).all() and (clean.wrong_after >= clean.wrong_before).all()
    assert (clean.miou_after <= clean.miou_before).all() and (clean.labelled_after <= clean.labelled_before).all()
    assert (clean.wrong_off_band == 0).all()           # interior pixels keep, drop or copy their own class


def test_changes_only_inside_the_noise_regions():
    rng = np.random.default_rng(3)
    sc = [corrupt(make_scene(rng, size=64), n, rng) for n in ("spill", "missing", "cam_threshold")]
    Y, A, y, feat = (torch.stack([d[k] for d in sc]) for k in ("Y", "cam", "y", "feat"))
    for r in GC_READINGS:
        Yc, d = gaussian_correction(Y, A, y, feat, None, confidence=r, min_pixels=64, return_maps=True)
        assert not ((Yc != Y) & ~(d["Rh"] | d["Ru"])).any(), r
