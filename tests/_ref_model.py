"""Reference parity of the optimiser schedule with ToCo (fixture family `poly_warmup_adamw_lr`; see
tests/fixtures/toco/README.md, section 4.10).

Protocol: see test_reference.py. Each case gives the initial lr of every parameter group, the schedule's settings and
the group lrs read after `steps[k]` calls of the scheduler's `step()` (the lr used by update number `steps[k]`,
computed from t = steps[k] - 1). The check drives `synernet.models.toco.WarmupLR` on a real AdamW with one group per
`init_lr` entry, compares every requested row (rtol 1e-12), the dense group-0 trace where the case has one, and the
pure function `poly_warmup_factor` on the same steps. Nothing depends on case names, shapes or values.
"""
import numpy as np
import torch

from synernet.models.toco import WarmupLR, poly_warmup_factor

RTOL = 1e-12


def _close(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if not np.allclose(got, want, rtol=RTOL, atol=0.0):
        k = np.unravel_index(np.argmax(np.abs(got - want) / np.abs(want).clip(1e-300)), got.shape)
        raise AssertionError(f"{what}: at {k} got {got[k]!r}, want {want[k]!r} (rtol {RTOL:g})")


def run_poly(case, glob, name):
    init = [float(v) for v in case["init_lr"]]
    warm, T = int(case["warmup_iter"]), int(case["max_iter"])
    ratio, power = float(case["warmup_ratio"]), float(case["power"])
    steps = [int(s) for s in case["steps"]]
    assert steps == sorted(steps) and steps[0] >= 1, f"{name}: steps must be increasing and >= 1"
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in init]
    opt = torch.optim.AdamW([dict(params=[p], lr=lr) for p, lr in zip(params, init)], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    sched = WarmupLR(opt, max_iters=T, warmup_iters=warm, warmup_ratio=ratio, power=power, schedule="poly")
    # before any step() the groups hold their initial lrs
    _close([g["lr"] for g in opt.param_groups], init, f"{name}: lr before the first step")
    n_dense = len(case["lr_g0_dense"]) if "lr_g0_dense" in case else 0
    last = max(steps[-1], n_dense)
    rows, dense, want_rows = [], [], set(steps)
    for n in range(1, last + 1):
        sched.step()
        if n <= n_dense: dense.append(opt.param_groups[0]["lr"])
        if n in want_rows: rows.append([g["lr"] for g in opt.param_groups])
    _close(rows, case["lr"], f"poly_warmup_adamw_lr/{name}: group lrs at steps")
    if n_dense:
        _close(dense, case["lr_g0_dense"], f"poly_warmup_adamw_lr/{name}: dense group-0 trace")
    pure = [[lr * poly_warmup_factor(s - 1, warm, T, ratio, power) for lr in init] for s in steps]
    _close(pure, case["lr"], f"poly_warmup_adamw_lr/{name}: poly_warmup_factor")


CHECKS = {
    "poly_warmup_adamw_lr": dict(
        fields={"init_lr", "warmup_iter", "max_iter", "warmup_ratio", "power", "steps", "lr", "lr_g0_dense"},
        globals=set(), run=run_poly),
}
