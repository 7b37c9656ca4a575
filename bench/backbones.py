"""CPU milliseconds per image of each backbone preset this machine has, for `tlcli models list`.

For every preset found in the TF Hub cache ($TFHUB_CACHE_DIR), or as ../shared/models/<name>_feature_vector,
the frozen backbone runs on the same decoded hymenoptera photos through LiteRT (the CPU
extraction engine, converted as `tlcli train` converts it) and through TensorFlow (the Keras
extractor's predict), after a warm-up pass; the median of a few timed passes is reported. The
baseline of the same run is the default preset (mobilenet_v2_100_224): each row gives its ratio.
Presets this machine does not have are listed as not measured. Paste the LiteRT column into
tlcli/model/presets.py (``cpu_ms``).

    nice -n 10 python -m bench.backbones [--images 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, SHARED, require  # noqa: E402


def local_backbone(name: str, handle: str) -> str | None:
    """The folder this machine has for a preset: its TF Hub cache entry, else ../shared/models."""
    from tlcli.model import hub_cache

    status = hub_cache.status(handle, name)
    if status.cached:
        return status.path
    shared = SHARED / "models" / f"{name}_feature_vector"
    return str(shared) if (shared / "saved_model.pb").is_file() else None


def timed(run, batch: np.ndarray, repeats: int) -> float:
    """Median milliseconds per image of ``run(batch)`` over ``repeats`` passes, after a warm-up."""
    run(batch[:8])
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000 / len(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    require(HYMENOPTERA)
    from tlcli.config import DEFAULT_PRESET
    from tlcli.data import images
    from tlcli.features.extraction import tf_features
    from tlcli.model import backbone, litert
    from tlcli.model import classifier as model
    from tlcli.model.presets import PRESETS

    photos = sorted((HYMENOPTERA / "train").glob("*/*.jpg"))[:args.images]
    rows, cache = [], tempfile.mkdtemp(prefix="tlcli-bench-")
    for p in PRESETS.values():
        path = local_backbone(p.name, p.handle)
        if path is None:
            rows.append((p.name, None, None))
            continue
        spec = backbone.BackboneSpec(path, p.image_size)
        loaded = backbone.load(spec, path=path)
        batch = np.stack([images.load_for_model(str(f), p.image_size) for f in photos])
        runner = litert.prepare(loaded, spec, cache_dir=cache)
        extractor = model.build_extractor(loaded.layer, p.image_size)
        lite = timed(runner, batch, args.repeats) if runner is not None else None
        tf_ms = timed(lambda b, e=extractor: tf_features(e, b), batch, args.repeats)
        rows.append((p.name, lite, tf_ms))
        print(f"  measured {p.name}", flush=True)
    base = next((r for r in rows if r[0] == DEFAULT_PRESET and r[1] is not None), None)
    print(f"\n{len(photos)} photos, median of {args.repeats} passes; baseline {DEFAULT_PRESET} (same run)")
    print(f"{'preset':28} {'LiteRT ms':>10} {'TF ms':>8} {'LiteRT vs base':>15}")
    for name, lite, tf_ms in rows:
        if lite is None and tf_ms is None:
            print(f"{name:28} {'not measured here (not on this machine)':>35}")
            continue
        ratio = f"{lite / base[1]:.2f}x" if base and lite else "-"
        print(f"{name:28} {lite or float('nan'):10.2f} {tf_ms:8.2f} {ratio:>15}")


if __name__ == "__main__":
    main()
