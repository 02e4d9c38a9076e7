"The self-distillation attempt of issue 16 (tools/pretrain_dino.py) runs, resumes and writes a loadable encoder."
import subprocess, sys, os
from pathlib import Path
import torch
from synernet.models.backbone import build_backbone
from synernet.experiments.pretrain import PretrainNet, encoder_state

ROOT = Path(__file__).resolve().parents[1]

def _run(work, steps):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(ROOT / "tools/pretrain_dino.py"), str(work), str(steps), "2"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout

def test_dino_runs_resumes_and_loads(tmp_path):
    _run(tmp_path, 2)
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["step"] == 2
    _run(tmp_path, 3)                                                  # resumes from step 2
    ck = torch.load(tmp_path / "last.pt", weights_only=False)
    assert ck["step"] == 3 and all(torch.isfinite(v).all() for v in ck["tea"].values())
    f = tmp_path / "teacher.safetensors"
    bb = build_backbone("vit_tiny_p8_demo", pretrained=True, weights_file=str(f))
    torch.manual_seed(0)
    init = encoder_state(PretrainNet("vit_tiny_p8_demo", 64))         # the student's (and teacher's) starting point
    got = bb.state_dict()
    for k in ("blocks.0.attn.qkv.weight", "blocks.5.mlp.fc2.weight", "patch_embed.proj.weight"):
        assert torch.equal(got[k], ck["tea"][f"pn.vit.{k}"])           # the file is the EMA teacher's encoder
        assert not torch.equal(got[k], init[k])                        # which moved off the initialisation
