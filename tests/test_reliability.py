"""Reliability and safety of runs: the fault-injection matrix of the README's reliability section, one test per row,
and safe loading of checkpoint, weight and label files. CPU only, tiny models, deterministic.

Rows that need a real process death run `python -m synernet.train` in a subprocess; the kill points inside a
checkpoint write are reached with the learner's fault points (`SYNERNET_FAILPOINT=name:k` makes the process SIGKILL
itself at the k-th pass of `name`). The other rows train a toy method in this process."""
import errno, hashlib, io, json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from synernet.engine import learner as L
from synernet.core.config import make_config, seed_everything
from synernet.data.datasets import DataError, TrainLoader, ClsDataset, load_cls_labels, make_toy_voc, save_cls_labels

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------- helpers
def _train_cmd(out, **kw):
    "The same command every time: a tiny deterministic ToCo run (6 iterations, a checkpoint every 2)."
    args = {**dict(preset="toco", out_dir=out, deterministic=True, ckpt_every=2, max_iters=6, batch_size=2,
                   log_every=1, eval_every=0, final_eval="none", seg_start=3, seg_loss_nan_guard=True,
                   progress=False), **kw}
    return [PY, "-m", "synernet.train", *[a for k, v in args.items() for a in (f"--{k}", str(v))]]


def _run(cmd, failpoint=None, timeout=300):
    env = {k: v for k, v in ENV.items() if k != "SYNERNET_FAILPOINT"}
    if failpoint: env["SYNERNET_FAILPOINT"] = failpoint
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def _final_modules(run):
    return L.read_weights(run / "checkpoints" / "final.pt")["modules"]


class _ToyLoader:
    "An endless, resumable loader over a fixed random data set."
    def __init__(self, n=32, bs=4):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 3, 16, 16, generator=g), (torch.rand(n, 3, generator=g) > 0.5).float()
        self.bs, self.pos = bs, 0
    def __iter__(self): return self
    def __next__(self):
        per = len(self.x) // self.bs
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.pos // per))
        i = order[(self.pos % per) * self.bs:(self.pos % per + 1) * self.bs]; self.pos += 1
        return dict(img=self.x[i], cls_label=self.y[i])
    def state_dict(self): return dict(pos=self.pos)
    def load_state_dict(self, s): self.pos = s["pos"]


class _Info: num_classes, class_names = 3, ["background", "a", "b", "c"]


class _Toy(L.Method):
    "A small conv net with dropout (it draws random numbers); `stop_at` interrupts, `nan_at` poisons the loss 'reg'."
    stop_at = nan_at = None
    def __init__(self, cfg, info, device):
        super().__init__(cfg, info, device)
        self.modules = {"net": L.Forward(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                                             torch.nn.Conv2d(8, 4, 1)))}
        self.trainable = ("net",)
    def configure_optimizers(self): return [(torch.optim.AdamW(self.net("net").parameters(), 1e-2), None)]
    def loss_weights(self, n): return dict(cls=1.0, reg=0.1)
    def training_step(self, batch, n, w):
        if n == _Toy.stop_at: raise KeyboardInterrupt("simulated kill")
        logits = self.modules["net"](lambda net, x: net(x), F.dropout(batch["img"], 0.3))
        reg = logits.pow(2).mean()
        if n == _Toy.nan_at: reg = reg * float("nan")
        return dict(cls=F.multilabel_soft_margin_loss(logits[:, 1:].amax((2, 3)), batch["cls_label"]), reg=reg)
    def eval_labels(self, img, y, size): return dict(seg=(self.seg_logits(img).argmax(1), False))
    def seg_logits(self, img): return self.net("net")(img)


VAL = [dict(img=torch.randn(1, 3, 16, 16), mask=torch.randint(0, 4, (1, 16, 16)), cls_label=torch.ones(1, 3))]


@pytest.fixture(autouse=True)
def _nondeterministic_after():
    yield
    seed_everything(0, False)      # the toy runs switch torch to deterministic algorithms


def _toy(out, stop_at=None, nan_at=None, **kw):
    "Train the toy for 12 iterations, a checkpoint every 3 (after iterations 2, 5, 8, 11). None if interrupted."
    cfg = make_config("base", out_dir=str(out), max_iters=12, log_every=2, ckpt_every=3, eval_every=0,
                      deterministic=True, final_eval="none", progress=False, **kw)
    _Toy.stop_at, _Toy.nan_at = stop_at, nan_at
    lrn = L.Learner(cfg, _Toy, _ToyLoader(), VAL, _Info())
    try: lrn.fit()
    except KeyboardInterrupt: return None
    finally: _Toy.stop_at = _Toy.nan_at = None
    return lrn


def _params(lrn): return [p.detach().clone() for p in lrn.method.net("net").parameters()]


def _same(a, b): return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ------------------------------------------------------------------------------ row 1: SIGKILL, resume bit-identical
def test_sigkill_anywhere_resumes_bit_identical(tmp_path):
    """SIGKILL at five points, each followed by the same command: in the middle of writing a checkpoint, between two
    iterations' checkpoints, after `previous.pt` is linked, after the new `latest.pt` is renamed into place but before
    its checksum. The run ends with the weights and the metric lines of an uninterrupted run, bit for bit."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    r = _run(_train_cmd(straight)); assert r.returncode == 0, r.stderr[-3000:]
    # (fault point of this start, the iteration this start resumes at); checkpoints follow iterations 1, 3 and 5
    plan = [("ckpt_mid_write:2", None),     # killed while writing iteration 3's checkpoint: latest.pt is 1's
            ("iteration:3", 2),             # killed after iteration 4's update: latest.pt is 3's
            ("ckpt_linked:1", 4),           # killed in 5's write, previous.pt linked, latest.pt (3's) without checksum
            ("ckpt_replaced:1", 4),         # killed after the new latest.pt (5's) is in place, before its checksum
            (None, 6)]                      # nothing left to train: writes final.pt and finishes
    ck = killed / "checkpoints"
    for fp, at in plan:
        r = _run(_train_cmd(killed), fp)
        if fp is not None:
            assert r.returncode == -signal.SIGKILL, (fp, r.returncode, r.stderr[-2000:])
            assert not (ck / "final.pt").exists()
        else: assert r.returncode == 0, r.stderr[-3000:]
        if at is not None: assert f"resumed from {ck}/latest.pt at iteration {at}" in r.stdout, (fp, r.stdout[-2000:])
    assert "latest.pt has no checksum file latest.pt.sha256 beside it; it reads, so it is used" in r.stdout
    a, b = _final_modules(straight), _final_modules(killed)
    for k in a["net"]: assert torch.equal(a["net"][k], b["net"][k]), k
    ma = [json.loads(l) for l in (straight / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == [1, 2, 3, 4, 5, 6]
    assert [m["loss_total"] for m in ma] == [m["loss_total"] for m in mb]
    assert not list(ck.glob(".*.tmp"))                    # no temporary file is left behind
    for f in ("latest.pt", "previous.pt", "final.pt"): assert L.verify_checkpoint(ck / f) is None, f


# --------------------------------------------------------------- row 2: a damaged latest checkpoint, previous used
def _flip_byte(f: Path):
    "Flip one bit of the first stored tensor (the first weight of the network): the file still loads."
    import struct, zipfile
    with zipfile.ZipFile(f) as z:
        info = z.getinfo(min((n for n in z.namelist() if "/data/" in n and n.rsplit("/", 1)[1].isdigit()),
                             key=lambda n: int(n.rsplit("/", 1)[1])))
    b = bytearray(f.read_bytes())
    name_len, extra_len = struct.unpack("<HH", b[info.header_offset + 26:info.header_offset + 30])
    b[info.header_offset + 30 + name_len + extra_len + 2] ^= 0x40
    f.write_bytes(bytes(b))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_resumes_from_previous(tmp_path, damage):
    "A truncated, or silently corrupted (one byte flipped), latest.pt is reported and the run resumes from previous.pt."
    ref = _params(_toy(tmp_path / "a"))
    assert _toy(tmp_path / "b", stop_at=10) is None                      # latest = iteration 8, previous = 5
    ck = tmp_path / "b" / "checkpoints"
    f = ck / "latest.pt"
    if damage == "truncate": f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else: _flip_byte(f)
    lrn = _toy(tmp_path / "b")
    assert _same(_params(lrn), ref)
    assert lrn.start_iter == 6                                            # from previous.pt (iteration 5)
    log = (tmp_path / "b" / "log.txt").read_text()
    assert f"checkpoint {f} is not usable: its SHA-256" in log and "resuming from" in log and "previous.pt" in log


def test_no_usable_checkpoint_never_starts_over(tmp_path):
    "Both checkpoints damaged: the run refuses to start from iteration 0 on its own and says what to do."
    assert _toy(tmp_path / "b", stop_at=10) is None
    ck = tmp_path / "b" / "checkpoints"
    for f in ("latest.pt", "previous.pt"): _flip_byte(ck / f)
    with pytest.raises(L.CheckpointError, match="No usable checkpoint.*latest.pt: its SHA-256.*previous.pt: its SHA"):
        _toy(tmp_path / "b")


# ------------------------------------------------------------------------- row 3: the disk fills during a write
def test_disk_full_during_checkpoint_write(tmp_path, monkeypatch):
    "ENOSPC in the middle of the second checkpoint write: a clear error, the first checkpoint intact, no temp files."
    real_open, writes = open, []
    class _Full(io.FileIO):
        def write(self, b):
            if self.tell() + len(memoryview(b)) > 4096: raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)
    def full_open(path, mode="r", *a, **kw):
        if str(path).endswith(".latest.pt.tmp") and "b" in mode:
            writes.append(path)
            if len(writes) == 2: return _Full(path, "w")
        return real_open(path, mode, *a, **kw)
    monkeypatch.setattr(L, "open", full_open, raising=False)
    with pytest.raises(L.CheckpointError) as e:
        _toy(tmp_path / "b")
    msg = str(e.value)
    assert "after iteration 5" in msg and "No space left on device (ENOSPC)" in msg and "Nothing was replaced" in msg
    assert "latest.pt (intact)" in msg
    ck = tmp_path / "b" / "checkpoints"
    assert sorted(p.name for p in ck.iterdir()) == ["latest.pt", "latest.pt.sha256"]
    assert L.verify_checkpoint(ck / "latest.pt") is None and L.read_weights(ck / "latest.pt")["iter"] == 2
    monkeypatch.undo()
    assert _toy(tmp_path / "b").start_iter == 3                            # the same command resumes from it


# ------------------------------------------------------------------------------ row 4: one rank of two dies
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


@pytest.mark.parametrize("how", ["kill", "hang"])
def test_dead_rank_is_named_in_bounded_time(tmp_path, how):
    """Two processes started the way a cluster scheduler starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT; no torchrun
    agent to clean up). Rank 1 is SIGKILLed ('kill') or SIGSTOPped ('hang', so that only the process-group timeout
    can end the wait). Rank 0 exits with status 1 within a bounded time, naming rank 1."""
    port, out = _free_port(), tmp_path / "run"
    cmd = _train_cmd(out, max_iters=200, ckpt_every=0, batch_size=4, dist_timeout=4)
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    try:
        t0 = time.time()
        while time.time() - t0 < 120 and procs[0].poll() is None:       # wait for a few logged iterations
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 1: break
            time.sleep(0.1)
        assert procs[0].poll() is None, procs[0].communicate()[1][-3000:]
        procs[1].send_signal(signal.SIGKILL if how == "kill" else signal.SIGSTOP)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=60)
        took = time.time() - t0
    finally:
        for p in procs:
            if p.poll() is None: p.kill()
            p.communicate()
    assert procs[0].returncode == 1, err[-3000:]
    assert "rank 1 of 2 stopped answering" in err and "this process (rank 0) stops too" in err, err[-3000:]
    assert "Traceback" not in err
    assert took < (20 if how == "kill" else 4 + 4 + 20), took


# --------------------------------------------------------------------------- row 5: a NaN or infinite loss
def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path):
    "A NaN in loss 'reg' at iteration 7: the run stops naming both, and latest.pt (iteration 5) is kept, unchanged."
    with pytest.raises(L.NonFiniteLoss) as e:
        _toy(tmp_path / "b", nan_at=7)
    msg = str(e.value)
    assert msg.startswith("iteration 7: loss 'reg' is nan (weight 0.1); the other losses: cls ") and "is kept" in msg
    ck = tmp_path / "b" / "checkpoints"
    assert L.verify_checkpoint(ck / "latest.pt") is None and L.read_weights(ck / "latest.pt")["iter"] == 5
    assert not (ck / "final.pt").exists()
    st = L.read_weights(ck / "latest.pt")["modules"]["net"]
    assert all(torch.isfinite(v).all() for v in st.values())


def test_nonfinite_loss_skip(tmp_path):
    "With nonfinite_loss='skip' the update of iteration 7 is dropped with a warning and the run finishes finite."
    lrn = _toy(tmp_path / "b", nan_at=7, nonfinite_loss="skip")
    assert lrn.skipped_updates == 1
    assert all(torch.isfinite(p).all() for p in _params(lrn))
    assert "iteration 7: loss 'reg' is nan" in (tmp_path / "b" / "log.txt").read_text()


# ---------------------------------------------------------------- row 6: a loader worker crashes on a corrupt image
@pytest.fixture
def toy_voc(tmp_path):
    root = make_toy_voc(tmp_path / "voc", n=8)
    bad = root / "JPEGImages" / "train_aug_003.jpg"
    bad.write_bytes(bad.read_bytes()[:40])                                  # a truncated JPEG
    return root, bad


def _voc_cfg(root, **kw):
    return make_config("toco", dataset="voc", scale="demo", data_root=str(root), **kw)


def test_worker_error_names_the_file(toy_voc):
    "An exception in a worker (PIL cannot decode the file) reaches the main process as a DataError naming the file."
    root, bad = toy_voc
    loader = TrainLoader(ClsDataset(_voc_cfg(root)), 2, num_workers=2)
    with pytest.raises(DataError) as e:
        for _ in range(8): next(loader)
    assert f"Image {bad} cannot be read" in str(e.value) and "Traceback" not in str(e.value)


class _CrashingDataset(ClsDataset):
    "A decoder that crashes the whole worker process on the corrupt file (as a native decoder can)."
    def __getitem__(self, key):
        idx = key[0] if isinstance(key, (tuple, list)) else key
        if self.images[idx].name == "train_aug_003.jpg": os.kill(os.getpid(), signal.SIGSEGV)
        return super().__getitem__(key)


def test_worker_crash_names_the_file(toy_voc):
    "A worker killed by a signal: the error names the images that were being read, the corrupt one among them."
    root, bad = toy_voc
    loader = TrainLoader(_CrashingDataset(_voc_cfg(root)), 2, num_workers=2)
    with pytest.raises(DataError) as e:
        for _ in range(8): next(loader)
    assert "A data loader worker died" in str(e.value) and str(bad) in str(e.value)


# ------------------------------------------------------------------------------------------------ safe loading
def _evil(marker: Path):
    class Evil:
        def __reduce__(self): return (os.system, (f"touch {marker}",))
    return Evil()


def test_malicious_checkpoint_is_refused(tmp_path):
    """A checkpoint whose pickle runs a shell command: resuming, `load_checkpoint` and `read_weights` refuse it,
    name what it needs, and the command never runs. (Control: a plain unpickler does run it.)"""
    marker = tmp_path / "pwned"
    assert _toy(tmp_path / "b", stop_at=4) is None
    ck = tmp_path / "b" / "checkpoints" / "latest.pt"
    st = L.read_weights(ck); st["extra"] = {"x": _evil(marker)}
    torch.save(st, ck)
    (ck.parent / "latest.pt.sha256").write_text(hashlib.sha256(ck.read_bytes()).hexdigest() + "  latest.pt\n")
    for load in (lambda: _toy(tmp_path / "b"), lambda: L.read_weights(ck),
                 lambda: L.load_checkpoint(ck, _Toy(None, _Info(), "cpu"), [])):
        with pytest.raises(L.UnsafeFileError, match=r"Refusing to load checkpoint .*latest.pt: its pickle needs "
                                                    r"posix.system"):
            load()
    assert not marker.exists()
    torch.load(ck, weights_only=False)                           # the control: this file does run code
    assert marker.exists()


def test_malicious_label_file_is_refused(tmp_path):
    "A cls_labels_onehot.npy whose pickle runs a command is refused; np.load(allow_pickle=True) would run it."
    marker, f = tmp_path / "pwned", tmp_path / "cls_labels_onehot.npy"
    np.save(f, {"a": np.zeros(20, np.float32), "b": _evil(marker)}, allow_pickle=True)
    with pytest.raises(DataError, match="needs posix.system, which a label file never holds"):
        load_cls_labels(f, 20)
    assert not marker.exists()
    np.load(f, allow_pickle=True)
    assert marker.exists()
    save_cls_labels(f, {"a": np.eye(20, dtype=np.float32)[3]})         # a genuine file still loads
    assert load_cls_labels(f, 20)["a"][3] == 1


def test_malicious_weights_file_is_refused(tmp_path):
    "A backbone weights_file (.pth) whose pickle runs a command is refused by the weights-only reader."
    from synernet.models.backbone import build_vit
    marker, f = tmp_path / "pwned", tmp_path / "w.pth"
    torch.save({"x": _evil(marker)}, f)
    with pytest.raises(Exception, match="posix.system"):
        build_vit("vit_tiny_p8_demo", weights_file=f)
    assert not marker.exists()


def test_checkpoint_with_numpy_rng_state_loads(tmp_path):
    "A checkpoint written before the numpy RNG state was stored as a tensor (a numpy array) still resumes."
    assert _toy(tmp_path / "b", stop_at=4) is None
    ck = tmp_path / "b" / "checkpoints" / "latest.pt"
    st = L.read_weights(ck); st["rng"] = L._native_rng(st["rng"])
    assert isinstance(st["rng"]["numpy"][1], np.ndarray)
    torch.save(st, ck); (ck.parent / "latest.pt.sha256").unlink()
    assert _toy(tmp_path / "b").start_iter == 3
