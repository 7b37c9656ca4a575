"""Test-time augmentation's crop views on real photos: what the decision sees, and what it misses.

On hymenoptera (train/ and val/ as the splits) through the frozen MobileNetV2 (../shared/models),
the plain, mirror, crop and crop-mirror views of every photo are extracted (TensorFlow, the
feature store in a temporary folder). Then ``features.tta.decide`` on the training photos alone
(the head's options are ``tlcli train``'s defaults), and for information the head fit on all the
training photos, with and without the crop views, scored on the validation photos (log loss and
accuracy, the saved model's way: the mean of the views). The baseline of each ratio is the run
without the crop views (mirror averaging on), in the same run. This is the decision a budgeted
run that stays head-only, or whose fine-tuning is undone, makes with this backbone.

    nice -n 10 python -m bench.tta
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402


def main() -> None:
    require(HYMENOPTERA, MOBILENET_V2)
    from tlcli import data
    from tlcli.config import DEFAULTS
    from tlcli.features import compute_views, tta
    from tlcli.model import backbone, head
    from tlcli.model import classifier as model

    size = 224
    train = data.scan(HYMENOPTERA / "train", image_size=size)
    val = data.scan(HYMENOPTERA / "val", image_size=size, labels=train.labels)
    samples = train.samples + val.samples
    loaded = backbone.load(backbone.resolve_spec(str(MOBILENET_V2), size))
    cache = tempfile.mkdtemp(prefix="tlcli-bench-tta-")
    common = dict(cache_key="bench-tta", cache_dir=cache, image_size=size, batch_size=32,
                  max_pixels=DEFAULTS.max_pixels)
    began = time.perf_counter()
    views = compute_views(samples, mirror=True, extractors=(model.build_extractor(loaded.layer, size),
                                                            model.build_extractor(loaded.layer, size, flip=True)),
                          **common)
    crop = compute_views(samples, mirror=True,
                         extractors=(model.build_extractor(loaded.layer, size, crop=True),
                                     model.build_extractor(loaded.layer, size, crop=True, flip=True)),
                         **dict(common, cache_key=tta.crop_key("bench-tta")))
    print(f"{len(samples)} photos x 4 views extracted in {time.perf_counter() - began:.0f} s")
    options = dict(epochs=DEFAULTS.epochs, label_smoothing=DEFAULTS.label_smoothing, patience=DEFAULTS.patience,
                   seed=DEFAULTS.seed)
    decision = tta.decide(views, crop, train.samples, len(train.labels), mirror=True, **options)
    print(f"decision on the {decision.images} training photos: {decision.describe()}; {decision.reason}")
    print(f"  CV loss ratio with/without crop: {decision.with_crop / decision.without:.3f}")

    y_val = np.array([s.label for s in val.samples])
    print("for information, the head refit on all training photos, scored on the val photos:")
    rows = {}
    for name, v in (("without crop (baseline)", views), ("with crop", tta.averaged(views, crop))):
        fit = head.fit_views(v, train.samples, len(train.labels), **options)
        p = head.predict_views(v, val.samples, fit)
        rows[name] = (float(-np.log(np.maximum(p[np.arange(len(y_val)), y_val], 1e-12)).mean()),
                      float((p.argmax(1) == y_val).mean()))
        print(f"  {name:24s} val loss {rows[name][0]:.4f}  val accuracy {rows[name][1]:.4f}")
    base, with_crop = rows["without crop (baseline)"], rows["with crop"]
    print(f"  val loss ratio with/without crop: {with_crop[0] / base[0]:.3f}")


if __name__ == "__main__":
    main()
