"""The demo encoder's pretrained weights (nbs/73_pretrain.ipynb, nbs/pretrain.ipynb): the committed file matches its
model card and loads, the pretraining notebook runs end to end at a tiny size (and a rerun resumes to the same bytes),
and a demo run starts from the committed weights with pretrained=True, or from scratch (the default), and says which in
summary.json and env.json."""
import json, subprocess, sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from synernet.models.backbone import build_backbone, card_sha256, demo_weights, encoder_weights, file_sha256

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEMO = "vit_tiny_p8_demo"


def test_committed_weights_match_their_model_card():
    f = demo_weights(DEMO)
    assert f.is_file(), f"{f} is missing: OMP_NUM_THREADS=1 papermill nbs/pretrain.ipynb runs/pretrain.ipynb"
    assert f.stat().st_size <= 25e6
    assert file_sha256(f) == card_sha256(f.with_suffix(".md"))
    sd, bb = load_file(str(f)), build_backbone(DEMO, pretrained=True)
    assert set(sd) == set(bb.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in bb.state_dict().items())
    assert encoder_weights(DEMO, True) == dict(encoder_weights=f"synernet/weights/{DEMO}.safetensors",
                                               encoder_weights_sha256=file_sha256(f))


def _papermill(out, params, cwd):
    args = [PY, "-m", "papermill", str(REPO / "nbs" / "pretrain.ipynb"), str(out), "--no-progress-bar", "-k", "python3"]
    for k, v in params.items(): args += ["-p", k, str(v)]
    r = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]


def test_pretrain_notebook_tiny(tmp_path):
    f = tmp_path / "enc.safetensors"
    params = dict(work_dir=tmp_path / "work", steps=3, batch_size=4, warmup=1, eval_images=8, diag_images=8,
                  weights_out=f)
    _papermill(tmp_path / "out.ipynb", params, tmp_path)
    sha = file_sha256(f)
    assert card_sha256(f.with_suffix(".md")) == sha
    res = json.loads((tmp_path / "work" / "result.json").read_text())
    assert res["images_seen"] == 12 and 0 <= res["acc_gap"] <= 1
    bb = build_backbone(DEMO, weights_file=f)
    sd = load_file(str(f))
    assert all(torch.equal(sd[k], v) for k, v in bb.state_dict().items())
    # a rerun finds the finished checkpoint, trains nothing and writes the same bytes
    f.unlink()
    _papermill(tmp_path / "out2.ipynb", params, tmp_path)
    assert file_sha256(f) == sha


def test_pretrain_notebook_tiny_masked(tmp_path):
    "The self-supervised objective through the same notebook: its model card says what it trained and claims no accuracy."
    f = tmp_path / "enc.safetensors"
    params = dict(work_dir=tmp_path / "work", steps=2, batch_size=4, warmup=1, eval_images=8, diag_images=8,
                  weights_out=f, objective="masked")
    _papermill(tmp_path / "out.ipynb", params, tmp_path)
    card = f.with_suffix(".md").read_text()
    assert card_sha256(f.with_suffix(".md")) == file_sha256(f)
    assert "masked-patch reconstruction" in card and "trains no classifier" in card and "-p objective masked" in card
    assert json.loads((tmp_path / "work" / "result.json").read_text())["hparams"]["objective"] == "masked"


@pytest.mark.parametrize("pretrained", [True, False])
def test_demo_run_names_its_encoder_weights(tmp_path, pretrained):
    from synernet.engine.runs import run_training
    run = tmp_path / "run"
    run_training(preset="toco", dataset="synthetic", out_dir=str(run), pretrained=pretrained, max_iters=2,
                     batch_size=2, log_every=1, eval_every=0, eval_max_images=2, progress=False, final_eval="single",
                     allow_silent_losses="all")
    env = json.loads((run / "env.json").read_text())["starts"][-1]
    want = encoder_weights(DEMO, pretrained)
    assert want["encoder_weights"] == (f"synernet/weights/{DEMO}.safetensors" if pretrained else "random")
    for rec in (json.loads((run / "summary.json").read_text()), env):
        assert {k: rec[k] for k in want} == want
