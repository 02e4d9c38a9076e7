"""The command line on bad input: a user error prints its message and exits with status 2, without a traceback
(`--debug` shows it). One row of the bad-input catalogue (tests/README.md) per case."""
import os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from synernet.data.datasets import make_toy_voc
from synernet.engine.runs import main

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["--max_iters", "2", "--batch_size", "2", "--eval_every", "0", "--final_eval", "none", "--progress", "false",
        "--allow_silent_losses", "all"]


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("argv,expect", [
    (["--preset", "toco", "--max_iter", "3"], "Unknown config key 'max_iter'. Did you mean 'max_iters'"),
    (["--preset", "tocoo"], "Unknown preset 'tocoo'. Did you mean 'toco'?"),
    (["--preset", "toco", "--max_iters", "-5"], "must be > 0"),
    (["--preset", "toco", "--max_iters", "many"], "not a valid int"),
    (["--preset", "toco", "--nproc", "two"], "--nproc must be a whole number of processes, not 'two'"),
    (["--preset", "toco", "--dataset", "pascal"], "Valid choices: 'synthetic', 'voc', 'coco'"),
    (["--preset", "toco", "stray"], "Cannot parse argument 'stray'"),
    (["export"], "export takes one run folder, got 0"),
    (["export", "nowhere", "--out"], "export: --out needs a value"),
    (["--preset", "toco", "--nproc", "0"], "--nproc must be >= 1, not 0"),
    (["--preset", "toco", "--max_iters"], "Argument --max_iters needs a value (--max_iters VALUE)"),
])
def test_cli_user_errors_exit_2_without_traceback(argv, expect, capsys):
    code, err = _cli(argv, capsys)
    assert code == 2 and expect in err and "Traceback" not in err, (code, err)
    assert err.startswith("error: ") and "(--debug shows the traceback)" in err


def test_cli_missing_data_and_checkpoint_files(tmp_path, capsys):
    code, err = _cli(["--preset", "toco", "--dataset", "voc", "--scale", "demo", "--data_root", str(tmp_path / "no"),
                      "--out_dir", str(tmp_path / "r"), *TINY], capsys)
    assert code == 2 and "Data folder" in err and "does not exist" in err and "Traceback" not in err, err
    code, err = _cli(["export", str(tmp_path / "nowhere")], capsys)
    assert code == 2 and "final.pt not found" in err and "Traceback" not in err, err


def test_cli_refuses_an_unsafe_checkpoint(tmp_path, capsys):
    "A resumed run whose latest.pt needs code to unpickle: exit 2, the refusal, and nothing runs."
    marker = tmp_path / "pwned"
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    argv = ["--preset", "toco", "--out_dir", str(tmp_path / "r"), *TINY]
    from synernet.engine.runs import build_config
    build_config(argv).save(tmp_path / "r" / "config.json")
    torch.save({"iter": 0, "x": Evil()}, tmp_path / "r" / "checkpoints" / "latest.pt")
    code, err = _cli(argv, capsys)
    assert code == 2 and "Refusing to load checkpoint" in err and "posix.system" in err, err
    assert not marker.exists()


def test_cli_process_exit_status_and_debug(tmp_path):
    "The real process: status 2 and the message only; with --debug the traceback too."
    r = subprocess.run([PY, "-m", "synernet.train", "--preset", "tocoo"], capture_output=True, text=True, env=ENV,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Unknown preset 'tocoo'" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([PY, "-m", "synernet.train", "--debug", "--preset", "tocoo"], capture_output=True, text=True,
                       env=ENV, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr and "Unknown preset" in r.stderr


def test_cli_corrupt_image_names_the_file(tmp_path):
    "A truncated JPEG met by a loader worker during training: exit 2, the file named, no traceback."
    root = make_toy_voc(tmp_path / "voc", n=4)
    bad = root / "JPEGImages" / "train_aug_002.jpg"
    bad.write_bytes(bad.read_bytes()[:40])
    r = subprocess.run([PY, "-m", "synernet.train", "--preset", "toco", "--dataset", "voc", "--scale", "demo",
                        "--data_root", str(root), "--num_workers", "2", "--out_dir", str(tmp_path / "r"), *TINY],
                       capture_output=True, text=True, env=ENV, timeout=300, cwd=tmp_path)
    assert r.returncode == 2 and f"Image {bad} cannot be read" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("param,value,expect", [
    ("preset", "tocoo", "Unknown preset 'tocoo'. Did you mean 'toco'?"),
    ("max_iter", "3", "Unknown parameter 'max_iter' ('max_iter': did you mean 'max_iters'"),
])
def test_papermill_bad_parameter(tmp_path, param, value, expect):
    "A bad value or a misspelt name passed to the training notebook with -p stops it before training, with a message."
    r = subprocess.run([PY, "-m", "papermill", str(Path(__file__).resolve().parents[1] / "nbs" / "train.ipynb"),
                        str(tmp_path / "out.ipynb"), "--no-progress-bar", "-k", "python3", "-p", param, value,
                        "-p", "out_dir", str(tmp_path / "r")], capture_output=True, text=True, env=ENV, timeout=300,
                       cwd=tmp_path)
    assert r.returncode != 0 and expect in r.stdout + r.stderr, (r.stdout + r.stderr)[-3000:]
    assert not (tmp_path / "r").exists()


def test_checkpoint_and_weights_of_another_method(tmp_path):
    "A checkpoint or exported weights whose modules are not the method's: refused, naming the module."
    from safetensors.torch import save_file
    from synernet.engine import learner as L
    from synernet.engine.runs import load_weights
    class M(L.Method):
        def __init__(self, names, width=4):
            super().__init__(None, None, "cpu"); self.modules = {n: torch.nn.Linear(2, width) for n in names}
    L.save_checkpoint(tmp_path / "c.pt", 0, M(["net"]), [])
    with pytest.raises(L.CheckpointError, match="has no module 'student' .*written by another method"):
        L.load_checkpoint(tmp_path / "c.pt", M(["student"]), [], restore_rng=False)
    save_file({"net.weight": torch.zeros(4, 2), "net.bias": torch.zeros(4)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(L.CheckpointError, match="has no tensors of module 'teacher'"):
        load_weights(tmp_path / "w.safetensors", M(["teacher"]))
    with pytest.raises(L.CheckpointError, match="does not fit module 'net'"):
        load_weights(tmp_path / "w.safetensors", M(["net"], width=5))
