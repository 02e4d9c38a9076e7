"""The GPU check script runs end to end on the CPU with tiny shapes (`--dry-run`), so that it works the first time a
GPU is lent: every step passes and the report has the fields the GPU run will fill."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "VENV": str(Path(sys.executable).parents[1])}
    r = subprocess.run(["bash", "tools/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rep = json.loads(out.read_text())["gpu_check_dry_run"]
    for k in ("environment", "speed", "bf16_vs_fp32", "memory_24gb", "train_resume"):
        assert rep[k]["ok"], (k, rep[k])
    rows = rep["speed"]["rows"]
    assert set(rows) == {"toco", "dskd_gc", "synernet"}
    for p, row in rows.items():
        assert row["seconds_per_step"] > 0 and row["tflops_per_step"] > 0, (p, row)
        assert {"cam pass", "forward", "backward", "optimiser"} <= set(row["seconds_by_part"]), (p, row)
    assert rep["memory_24gb"]["peak_memory_gb"] > 0
    tr = rep["train_resume"]
    assert tr["finished"] and (tr["resumed"] or not tr["killed_after_first_checkpoint"])
