"""Shared bits of the benchmarks: where ../shared is, and a clean skip when it is absent."""

from __future__ import annotations

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
