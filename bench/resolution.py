"""The fine-tuning step's rate at the backbone's size (the baseline) and at the lower resolutions a
--time-budget plan may train at (``training.plan.training_sizes``), against the plan's model of
it: a step's cost proportional to its pixels.

    python bench/resolution.py [--backbone PATH] [--size 224] [--steps 9]

Each size runs the recipe's training step on hymenoptera's training photos: the augmented
pipeline, MobileNetV2 with the head, Adam with the layer-wise rates, micro batches of 8 in
batches of 32 (fine-tuning's CPU defaults). One untimed step traces each size, then ``--steps`` of each
are timed, the sizes taking turns step by step, so a change of the machine's load touches them
alike. Prints each size's median images/s, its ratio to the baseline's, and the ratio the plan's
pixel model predicts, (size_0 / size)^2. Run it with nice -n 10.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, require  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", default=str(MOBILENET_V2))
    ap.add_argument("--size", type=int, default=224, help="the backbone's own input size")
    ap.add_argument("--steps", type=int, default=9, help="timed steps of each size")
    args = ap.parse_args()
    require(HYMENOPTERA, Path(args.backbone))

    from tlcli import data
    from tlcli._tf import tf
    from tlcli.model import backbone, classifier
    from tlcli.training import finetuning, plan

    t = tf()
    loaded = backbone.load(backbone.resolve_spec(args.backbone, args.size), trainable=True)
    sizes = [args.size, *plan.training_sizes(args.size, resizable=loaded.any_size)]
    print(f"backbone {Path(args.backbone).name}: any size {loaded.any_size}; crops' zoom "
          f"{plan.crop_zoom():.3f}; sizes {sizes}", flush=True)
    head = classifier.build_head(loaded.feature_dim, 2, dropout=0.2, l2=0.0, seed=0)
    one_view = classifier.build_classifier(loaded.layer, head, None)
    model = finetuning.MicroBatchModel(one_view.input, one_view.output, micro_batch=8)
    model.compile(optimizer=classifier.build_optimizer(classifier.warmup_cosine(1e-4, 100),
                                                       loaded.layer.trainable_variables),
                  loss="categorical_crossentropy")
    folders = sorted(d for d in (HYMENOPTERA / "train").iterdir() if d.is_dir())
    paths, labels = [], []
    for i, d in enumerate(folders):
        files = sorted(p for p in d.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        paths += [str(p) for p in files]
        labels += [i] * len(files)
    batches = {s: iter(data.image_dataset(paths, s, labels=labels, batch_size=32, shuffle_seed=0,
                                          augment=data.augmenter(mirror=True), augment_seed=0)
                       .map(lambda x, y: (x, t.one_hot(y, 2))).repeat()) for s in sizes}
    times = {s: [] for s in sizes}
    for s in sizes:  # trace each size once
        model.train_on_batch(*next(batches[s]))
    for _ in range(args.steps):
        for s in sizes:  # one step of each size in turn: a change of load touches them alike
            x, y = next(batches[s])
            began = time.perf_counter()
            model.train_on_batch(x, y)
            times[s].append(int(x.shape[0]) / (time.perf_counter() - began))
    rates = {s: statistics.median(r) for s, r in times.items()}
    for s in sizes:
        print(f"{s:4d} px  {rates[s]:6.2f} images/s (median of {len(times[s])} steps, {min(times[s]):.1f} to "
              f"{max(times[s]):.1f})  {rates[s] / rates[args.size]:.2f}x the {args.size} px rate  "
              f"(pixel model {(args.size / s) ** 2:.2f}x)", flush=True)

if __name__ == "__main__":
    main()
