"""Speed of the batched EM of synernet.ops.gc against a loop of scikit-learn GaussianMixture(2) fits.

The workload of GC on one training batch at paper scale: 8 images of 448 x 448 label confidences (8 x 200,704 values,
bimodal), a 2-component fit per image and the noise posterior of every pixel. Two settings:
  - subsampled: each fit uses 16,384 uniformly drawn values (gc_n_fit, as synernet.ops.gc fits); posteriors on all 200,704;
  - full: each fit uses all 200,704 values.
scikit-learn gets exactly the same data (the same subsample) and the same initial weights / means / precisions, so
both run the same EM; its time includes its k-means initialisation, which it runs even when the initial parameters are
given (that is how it is used in practice, e.g. by DuPL). Times are medians over repeats, after one warm-up call.

    OMP_NUM_THREADS=1 python tools/bench_gmm.py [--device cpu|cuda] [--repeats 5] [--out FILE.json]

On a CPU shared with other jobs, run with OMP_NUM_THREADS=1 (one thread for torch, numpy and scikit-learn alike):
with two threads per process on two busy cores every parallel torch kernel waits for a descheduled thread, and
small element-wise operations become 50x slower (measured here), which says nothing about either implementation.
"""
import argparse, json, os, platform, statistics, sys, time, warnings

import numpy as np
import torch
from sklearn.mixture import GaussianMixture

from synernet.ops.gc import fit_gmm_batched, gmm_posterior, subsample_valid


def make_batch(B=8, H=448, W=448, seed=0):
    "Label-confidence-like values: per image a random mixture of a low and a high mode, clipped to [0, 1]."
    rng = np.random.default_rng(seed)
    out = np.empty((B, H * W), np.float32)
    for b in range(B):
        p = rng.uniform(0.1, 0.4)
        z = rng.random(H * W) < p
        lo, hi = rng.normal(rng.uniform(0.2, 0.5), 0.12, H * W), rng.normal(rng.uniform(0.8, 0.95), 0.05, H * W)
        out[b] = np.clip(np.where(z, lo, hi), 0, 1)
    return torch.from_numpy(out)


def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize(dev)


def ours(values, valid, n_fit, dtype, seed=0):
    g = torch.Generator(device=values.device).manual_seed(seed)
    fit = fit_gmm_batched(values, valid, n_fit=n_fit, generator=g, dtype=dtype)
    return fit, gmm_posterior(values, fit)


def sklearn_loop(values, valid, n_fit, seed=0):
    "Per image: the same subsample and initialisation as ours, GaussianMixture.fit, predict_proba on all values."
    v = values.cpu()
    xs, oks = subsample_valid(v, valid.cpu(), n_fit, torch.Generator().manual_seed(seed))
    posts, fits = [], []
    for b in range(v.shape[0]):
        x = xs[b][oks[b]].double().numpy().reshape(-1, 1)
        q = np.quantile(x[:, 0], [0.25, 0.75])
        gm = GaussianMixture(2, covariance_type="full", reg_covar=5e-4, tol=1e-5, max_iter=50, random_state=0,
                             weights_init=[0.5, 0.5], means_init=q.reshape(2, 1),
                             precisions_init=np.full((2, 1, 1), 1 / (x.var() + 5e-4)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm.fit(x)
        lo = int(np.argmin(gm.means_[:, 0]))
        posts.append(gm.predict_proba(v[b].double().numpy().reshape(-1, 1))[:, lo])
        fits.append(gm)
    return fits, np.stack(posts)


def timeit(fn, dev, repeats):
    fn(); sync(dev)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter(); fn(); sync(dev); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sklearn_repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    vals = make_batch().to(dev)
    valid = torch.ones_like(vals, dtype=torch.bool)
    res = dict(command=" ".join(["python", *sys.argv]), device=str(dev), gpu=torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
               cpu=platform.processor() or platform.machine(), torch_threads=torch.get_num_threads(),
               omp_num_threads=os.environ.get("OMP_NUM_THREADS"), cpu_count=os.cpu_count(),
               load_avg=os.getloadavg(), torch=torch.__version__, batch=list(vals.shape), runs={})
    for name, n_fit in (("subsampled_16384", 16384), ("full_200704", 0)):
        _, p_sk = sklearn_loop(vals, valid, n_fit)
        t_sk = timeit(lambda: sklearn_loop(vals, valid, n_fit), torch.device("cpu"), a.sklearn_repeats)
        row = dict(sklearn_s=t_sk)
        for dname, dt in (("float64", torch.float64), ("float32", torch.float32)):
            fit, post = ours(vals, valid, n_fit, dt)
            t = timeit(lambda: ours(vals, valid, n_fit, dt), dev, a.repeats)
            err = float(np.abs(post.double().cpu().numpy() - p_sk).max())
            row[dname] = dict(ours_s=t, speedup=t_sk / t, max_posterior_diff=err,
                              em_iters=fit.n_iter.tolist())
        res["runs"][name] = row
        print(f"{name}: sklearn {t_sk:.3f} s | ours float64 {row['float64']['ours_s']:.4f} s "
              f"(x{row['float64']['speedup']:.1f}, max |dpost| {row['float64']['max_posterior_diff']:.1e}) | "
              f"float32 {row['float32']['ours_s']:.4f} s (x{row['float32']['speedup']:.1f}, "
              f"max |dpost| {row['float32']['max_posterior_diff']:.1e})", flush=True)
    if a.out:
        with open(a.out, "w") as f: json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
