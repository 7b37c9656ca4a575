"""The --backbone A,B choice under --time-budget against the choice without one, on hymenoptera's
training photos with the two real backbones of ../shared/models.

Each case runs ``choice.choose`` alone (no head refit, no fine-tuning) in a fresh process with a
cold feature cache: ``none`` (today's choice, every candidate extracted; as --fine-tune makes
it, so that the concatenation is not tried there either and the work compares), ``roomy`` (a
budget that fits them all: what timing each candidate before extracting costs) and ``tight`` (a
budget whose half cannot hold the second candidate: it is left out). The cases alternate
``--repeats`` times; the baseline is ``none`` of the same run, and each case gives its mean's
ratio to it.

    nice -n 10 python -m bench.choice_budget [--tight 14s] [--roomy 10m] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench._common import HYMENOPTERA, SHARED, require  # noqa: E402

MODELS = [SHARED / "models" / f"{name}_feature_vector" for name in ("mobilenet_v1_025_224", "mobilenet_v2_100_224")]
CANDIDATES = ",".join(str(m) for m in MODELS)


def one(budget: str | None) -> dict:
    """This process's case: the choice's seconds, what it extracted and its notes."""
    from tlcli.config import TrainConfig, time_budget_seconds
    from tlcli.training import choice, plan

    started = time.monotonic()
    cfg = TrainConfig(data_dir=str(HYMENOPTERA / "train"), val_dir=str(HYMENOPTERA / "val"), backbone=CANDIDATES,
                      image_size=224, time_budget=budget, fine_tune=budget is None, tensorboard=None)
    deadline = plan.Deadline(time_budget_seconds(cfg), started=started)
    _, picked, _ = choice.choose(cfg, choice.candidate_specs(cfg), deadline=deadline)
    return {"seconds": time.monotonic() - started,
            "extracted": [s.name for s in picked.standings], "plan": picked.plan and picked.plan.describe(),
            "rates": picked.plan and picked.plan.rates, "notes": picked.notes}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tight", default="14s")
    parser.add_argument("--roomy", default="10m")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(one(None if args.case == "none" else args.case)))
        return
    require(HYMENOPTERA, *MODELS)
    rows = {"none": [], "roomy": [], "tight": []}
    for _ in range(args.repeats):
        for name, budget in (("none", "none"), ("roomy", args.roomy), ("tight", args.tight)):
            with tempfile.TemporaryDirectory() as cache:
                out = subprocess.run([sys.executable, "-m", "bench.choice_budget", "--case", budget], check=True,
                                     capture_output=True, text=True, env={**os.environ, "TLCLI_CACHE_DIR": cache},
                                     cwd=Path(__file__).resolve().parent.parent)
            rows[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.mean(r["seconds"] for r in rows["none"])
    for name, runs in rows.items():
        mean, row = statistics.mean(r["seconds"] for r in runs), runs[-1]
        rates = ", ".join(f"{n} {r['extract']:.0f}/s" for n, r in (row["rates"] or {}).items())
        each = " / ".join(f"{r['seconds']:.1f}" for r in runs)
        lines = [f"{name}: {each} s (mean {mean:.1f} s, {mean / base:.2f}x "
                 f"none); cross-validated: {', '.join(row['extracted'])}", row["plan"],
                 rates and f"measured images/s: {rates}", *row["notes"]]
        for i, line in enumerate(filter(None, lines)):
            print(textwrap.fill(line, 80, initial_indent="  " * (i > 0), subsequent_indent="    "))

if __name__ == "__main__":
    main()
