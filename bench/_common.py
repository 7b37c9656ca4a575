"""Shared bits of the benchmarks: where ../shared is, a clean skip when it is absent, and the
--model / --data / --repeats options of the deployment benchmarks."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
HYMENOPTERA = SHARED / "data" / "hymenoptera_data"
MOBILENET_V2 = SHARED / "models" / "mobilenet_v2_100_224_feature_vector"


def require(*paths: Path) -> None:
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"SKIP: benchmark data not found: {', '.join(missing)}")
        sys.exit(0)


def model_and_data(parser: argparse.ArgumentParser, *, data_help: str, repeats: int) -> argparse.Namespace:
    """``parser``'s arguments with ``--model`` (a bundle; default: one trained on hymenoptera),
    ``--data`` (``data_help``; default: hymenoptera val) and ``--repeats``, parsed; skips (exit 0)
    when a default needs ../shared and it is absent. ``args.data`` is the folder to use."""
    parser.add_argument("--model", type=Path, help="a trained bundle (default: train one on hymenoptera)")
    parser.add_argument("--data", type=Path, help=f"{data_help} (default: hymenoptera val)")
    parser.add_argument("--repeats", type=int, default=repeats, help="cold-start runs per engine (median)")
    args = parser.parse_args()
    if args.model is None:
        require(HYMENOPTERA, MOBILENET_V2)
    if args.data is None:
        require(HYMENOPTERA)
        args.data = HYMENOPTERA / "val"
    return args
