"""A million images on one machine: the feature store and the head fit at 10k, 100k
and 1M synthetic feature vectors, and the scan of a folder of 100,000 small image files.

For each size n the vectors (1,280-d float32, 100 classes: class centres plus unit noise) are
written through ``tlcli.features.store.FeatureStore`` into a folder on disk, and then, each in a fresh
child process whose RssAnon (anonymous memory: memory-mapped file pages do not count) is sampled
from /proc/PID/status every 20 ms:

- read: open the store, map every digest to its (shard, row), verify every shard's checksum and
  make one pass over all rows (the page cache is warm: the store was just written);
- fit: ``head.fit_head(store.rows(digests), y, 100)``, cross-validation included.

The physical limit, measured first in the same run: the machine's GFLOP/s at the refit's float32
block products (with the children's BLAS threads); the refit's floor is (epochs x 4 n d k + n d^2,
the Gram pass) / that rate, printed next to each fit's wall. The baseline, run in the same
run, is the in-memory solver at the smallest size (``fit_head`` on the float32 matrix in RAM,
which it copies to float64). The scan builds
100,000 16x16 PNG files (100 classes) and 10,000 of them in another folder (the linearity
baseline), and times ``data.scan`` over each in a child process, with the same sampling.

    python -m bench.scale [--sizes 10000,100000,1000000] [--scan-files 100000] [--dir DIR] [--skip scan,baseline,fit]

DIR (default: a temporary folder under /tmp) needs about 5.2 GB free for 1M vectors; each size's
store is deleted before the next is written. Targets: at 1M, fit peak RssAnon <= 3 GB and wall
<= 12 x the 100k wall; reading 1M back < 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DIM, CLASSES = 1280, 100
TARGET_RSS_GB, TARGET_WALL_RATIO, TARGET_READ_S = 3.0, 12.0, 60.0
ENV = dict(os.environ)


def digests(n: int) -> list[str]:
    return [f"{i:032x}" for i in range(n)]


def labels(n: int, start: int = 0) -> np.ndarray:
    """The labels of rows start..n."""
    return np.arange(start, n) % CLASSES


BLOCK = 4096


def features(start: int, stop: int, spread: float) -> np.ndarray:
    """Rows start..stop of the synthetic set: the class centre plus unit Gaussian noise (drawn
    per aligned block of BLOCK rows, so any range gives the same rows)."""
    centres = np.random.default_rng(0).normal(0, spread, (CLASSES, DIM)).astype(np.float32)
    first = start // BLOCK
    noise = np.vstack([np.random.default_rng(b + 1).standard_normal((BLOCK, DIM), dtype=np.float32)
                       for b in range(first, -(-stop // BLOCK))])
    return centres[labels(stop, start)] + noise[start - first * BLOCK:stop - first * BLOCK]


def write_store(folder: Path, n: int, spread: float) -> float:
    from tlcli.features import store

    t = time.perf_counter()
    s = store.FeatureStore(folder, dim=DIM)
    names = digests(n)
    for start in range(0, n, BLOCK):
        block = features(start, min(n, start + BLOCK), spread)
        for i, vec in enumerate(block):
            s.put(names[start + i], vec)
    s.flush()
    return time.perf_counter() - t


# ---- children ---------------------------------------------------------------------------------

def peak_child() -> dict:
    """The machine's rate (GFLOP/s) at the refit's products: a float32 block [16384, 1280] times
    the kernel [1280, 100] and its transpose times the gradient, best of 5, with this process's
    BLAS threads: what a streamed epoch could reach."""
    rng = np.random.default_rng(0)
    block = rng.standard_normal((16384, DIM), dtype=np.float32)
    kernel = rng.standard_normal((DIM, CLASSES), dtype=np.float32)
    logits, part = np.empty((16384, CLASSES), np.float32), np.empty((DIM, CLASSES), np.float32)
    best = np.inf
    for _ in range(6):
        t = time.perf_counter()
        np.matmul(block, kernel, out=logits)
        np.matmul(block.T, logits, out=part)
        best = min(best, time.perf_counter() - t)
    return {"gflops": 4 * 16384 * DIM * CLASSES / best / 1e9}


def child(args) -> dict:
    from tlcli.features import store
    from tlcli.model import head

    n = args.n
    t = time.perf_counter()
    if args.child == "fit-memory":  # the baseline: today's solver on the matrix in RAM
        X = features(0, n, args.spread)
        t = time.perf_counter()
        fit = head.fit_head(X, labels(n), CLASSES)
        return {"wall": time.perf_counter() - t, "epochs": fit.epochs, "l2": fit.l2,
                "accuracy": _accuracy(fit, args.spread)}
    rows = store.FeatureStore(args.store, dim=DIM).rows(digests(n))
    if args.child == "read":
        total = sum(float(block.sum(dtype=np.float64)) for block in rows.chunks(head.CHUNK_ROWS))
        return {"wall": time.perf_counter() - t, "finite": bool(np.isfinite(total))}
    opened = time.perf_counter() - t
    fit = head.fit_head(rows, labels(n), CLASSES)
    return {"wall": time.perf_counter() - t, "open": opened, "epochs": fit.epochs, "l2": fit.l2,
            "accuracy": _accuracy(fit, args.spread)}


def _accuracy(fit, spread: float) -> float:
    """Accuracy on 5,000 fresh vectors (rows the fit never saw)."""
    from tlcli.model import head

    X = features(10**8, 10**8 + 5000, spread)
    y = labels(10**8 + 5000, 10**8)
    return float(np.mean(head.predict_proba(X, fit.kernel, fit.bias).argmax(axis=1) == y))


def scan_child(args) -> dict:
    from tlcli import data

    t = time.perf_counter()
    folder = data.scan(args.store, image_size=16)
    return {"wall": time.perf_counter() - t, "images": len(folder.samples), "skipped": len(folder.skipped)}


def run_child(*argv: str) -> dict:
    """Run this script as a child, sampling its RssAnon; its result plus "rss_anon_gb"."""
    proc = subprocess.Popen([sys.executable, __file__, *argv], stdout=subprocess.PIPE, text=True, env=ENV)
    peak, stop = [0], threading.Event()
    began = time.monotonic()
    last = [began]

    def sample():
        path = f"/proc/{proc.pid}/status"
        while not stop.is_set():
            try:
                with open(path) as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak[0] = max(peak[0], int(line.split()[1]) * 1024)
            except OSError:
                pass
            time.sleep(0.02)
            if time.monotonic() - last[0] > 30:
                last[0] = time.monotonic()
                print(f"  ... {argv[1]}: {last[0] - began:.0f} s, peak RssAnon so far {peak[0] / 1e9:.2f} GB",
                      file=sys.stderr, flush=True)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"child {argv} failed with exit code {proc.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_anon_gb"] = peak[0] / 1e9
    return result


# ---- the scan -----------------------------------------------------------------------------------

def make_images(root: Path, count: int) -> None:
    """``count`` distinct 16x16 PNG files in 100 class folders."""
    import io

    from PIL import Image

    base = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(base, format="PNG")
    template = Image.open(io.BytesIO(base.getvalue()))
    for c in range(CLASSES):
        (root / f"class{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        img = template.copy()
        img.putpixel((i % 16, (i // 16) % 16), (i % 251, (i // 251) % 251, (i // 63001) % 251))
        img.save(root / f"class{i % CLASSES:03d}" / f"img{i:07d}.png", format="PNG", compress_level=1)


def bench_scan(tmp: Path, count: int) -> None:
    small = max(1000, count // 10)
    for n in (small, count):
        folder = tmp / f"scan-{n}"
        t = time.perf_counter()
        make_images(folder, n)
        made = time.perf_counter() - t
        r = run_child("--scan", "--store", str(folder))
        print(f"scan {n:>9,} files: {r['wall']:7.1f} s  ({1e6 * r['wall'] / n:6.0f} us/file)  "
              f"RssAnon {r['rss_anon_gb']:.2f} GB  ({r['images']:,} images; files made in {made:.0f} s)", flush=True)
        shutil.rmtree(folder)
        if n == small:
            base = r["wall"] / n
        else:
            print(f"  per-file time at {count:,} / at {small:,}: {r['wall'] / n / base:.2f} (1.00 = linear)")


# ---- main ---------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--scan-files", type=int, default=100_000)
    p.add_argument("--dir", default=None, help="where the stores and images go (default: a temp folder in /tmp)")
    p.add_argument("--skip", default="", help="comma-separated: scan, baseline, fit")
    p.add_argument("--spread", type=float, default=0.15, help="class centre spread (noise is 1)")
    p.add_argument("--threads", default="1", help="BLAS threads in the children (OPENBLAS_NUM_THREADS; '' leaves "
                   "it unset): on the shared 2-core machine one thread ran the head fit 2x faster than two")
    p.add_argument("--child", choices=["read", "fit", "fit-memory", "peak"])
    p.add_argument("--scan", action="store_true")
    p.add_argument("--store")
    p.add_argument("--n", type=int)
    args = p.parse_args()
    if args.scan:
        print(json.dumps(scan_child(args)))
        return
    if args.child:
        print(json.dumps(peak_child() if args.child == "peak" else child(args)))
        return
    if args.threads:
        ENV.update(OPENBLAS_NUM_THREADS=args.threads, OMP_NUM_THREADS=args.threads)
    skip = set(filter(None, args.skip.split(",")))
    sizes = [int(s) for s in args.sizes.split(",") if s]
    tmp = Path(tempfile.mkdtemp(prefix="tlcli-scale-", dir=args.dir))
    started = time.perf_counter()
    try:
        fits = {}
        peak = run_child("--child", "peak")["gflops"]
        print(f"machine: {peak:.1f} GFLOP/s at the refit's float32 block products ({args.threads or 'default'} BLAS "
              f"thread(s), measured now); an epoch is 4 x n x {DIM} x {CLASSES} FLOP", flush=True)
        if sizes and "baseline" not in skip:
            r = run_child("--child", "fit-memory", "--n", str(sizes[0]), "--spread", str(args.spread))
            print(f"baseline  {sizes[0]:>9,}: in-memory fit {r['wall']:7.1f} s  RssAnon {r['rss_anon_gb']:.2f} GB  "
                  f"(l2 {r['l2']}, {r['epochs']} epochs, accuracy {r['accuracy']:.4f})", flush=True)
        for n in sizes:
            need = n * DIM * 4 * 1.05
            free = shutil.disk_usage(tmp).free
            if free < need * 1.5:
                print(f"SKIP {n:,}: {need / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free in {tmp}")
                continue
            folder = tmp / f"store-{n}"
            wrote = write_store(folder, n, args.spread)
            read = run_child("--child", "read", "--store", str(folder), "--n", str(n))
            print(f"store     {n:>9,}: write {wrote:6.1f} s  read back {read['wall']:6.1f} s  "
                  f"(RssAnon {read['rss_anon_gb']:.2f} GB)", flush=True)
            if "fit" in skip:
                print(f"  read {read['wall']:.1f} s (target at 1M: < {TARGET_READ_S} s)")
                shutil.rmtree(folder)
                continue
            fit = run_child("--child", "fit", "--store", str(folder), "--n", str(n), "--spread", str(args.spread))
            fits[n] = fit
            print(f"fit       {n:>9,}: {fit['wall']:7.1f} s  RssAnon {fit['rss_anon_gb']:.2f} GB  "
                  f"(store opened in {fit['open']:.1f} s; l2 {fit['l2']}, {fit['epochs']} epochs, "
                  f"accuracy {fit['accuracy']:.4f}; {1e6 * fit['wall'] / n / max(fit['epochs'], 1):.2f} us per "
                  "row-epoch)", flush=True)
            limit = (fit["epochs"] * 4 * n * DIM * CLASSES + n * DIM * DIM) / peak / 1e9  # + the Gram pass (syrk)
            print(f"  physical limit of the refit ({fit['epochs']} epochs + the Gram pass) at {peak:.0f} GFLOP/s: "
                  f"{limit:.1f} s; the whole fit (cross-validation included) took {fit['wall'] / limit:.2f} x that",
                  flush=True)
            shutil.rmtree(folder)
            if n == 1_000_000:
                print(f"  targets at 1M: RssAnon {fit['rss_anon_gb']:.2f} <= {TARGET_RSS_GB} GB: "
                      f"{'met' if fit['rss_anon_gb'] <= TARGET_RSS_GB else 'MISSED'}; read {read['wall']:.1f} "
                      f"< {TARGET_READ_S} s: {'met' if read['wall'] < TARGET_READ_S else 'MISSED'}")
                if 100_000 in fits:
                    ratio = fit["wall"] / fits[100_000]["wall"]
                    print(f"  fit wall 1M / 100k: {fit['wall']:.1f} / {fits[100_000]['wall']:.1f} s = {ratio:.2f} "
                          f"<= {TARGET_WALL_RATIO}: {'met' if ratio <= TARGET_WALL_RATIO else 'MISSED'} (epochs "
                          f"chosen: {fits[100_000]['epochs']} at 100k, {fit['epochs']} at 1M)")
        if "scan" not in skip:
            bench_scan(tmp, args.scan_files)
        print(f"bench/scale.py took {time.perf_counter() - started:.0f} s")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
