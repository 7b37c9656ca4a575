"""Peak memory of `tlcli train` on a tiny dataset salted with four under-limit PNG bombs.

Each bomb is an 11300 x 11300 palette PNG with transparency (127.7 MP, just under the default
128 MP limit, about 124 KB on disk). The run must stay below 3 GB of RSS, with the bombs either
decoded within that or refused with a reason. Builds everything in a temporary folder (a tiny
hub-format backbone, so no download is needed) and runs the CLI in a subprocess, whose peak RSS
is read with wait4. The assets are built in another subprocess first: a child's peak RSS
counts the moment it is forked, so this process stays small.

    python -m bench.bombs [--bombs 4] [--side 11300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
TARGET_GB = 3.0


def make_bomb(path: Path, side: int) -> None:
    img = Image.new("P", (side, side), 1)
    img.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])
    img.save(path, transparency=bytes([0, 128, 255, 60]), optimize=True)


def build(tmp: Path, bombs: int, side: int) -> None:
    """The tiny dataset in ``tmp/plain``, the same with the bombs in ``tmp/data``, and a tiny
    backbone in ``tmp/backbone``."""
    import shutil

    sys.path.insert(0, str(REPO))
    from tests.helpers import make_colour_dataset, make_tiny_backbone

    plain = make_colour_dataset(tmp / "plain", per_class=8)
    data = Path(shutil.copytree(plain, tmp / "data"))
    for i in range(bombs):
        make_bomb(data / ["blue", "green", "red"][i % 3] / f"bomb{i}.png", side)
    make_tiny_backbone(tmp / "backbone")


def train_peak(tmp: Path, data: Path, name: str) -> tuple[subprocess.CompletedProcess, float, float]:
    """`tlcli train` on ``data`` in a fresh process: (the process, wall seconds, its peak RSS in GB)."""
    cmd = [sys.executable, "-c", "from tlcli.cli import run; run()", "train", str(data),
           "--backbone", str(tmp / "backbone"), "--image-size", "32", "--epochs", "30", "--batch-size", "8",
           "--out", str(tmp / f"model-{name}"), "--cache-dir", str(tmp / f"cache-{name}"), "--tensorboard", "none",
           "--json"]
    start = time.perf_counter()
    with open(tmp / "stdout", "w+") as out, open(tmp / "stderr", "w+") as err:
        # PYTHONPATH: this checkout's tlcli, whatever an installed one is.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        child = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=tmp, env=env)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, nobody else's
        seconds = time.perf_counter() - start
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(cmd, os.waitstatus_to_exitcode(status), out.read(), err.read())
    return proc, seconds, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bombs", type=int, default=4)
    ap.add_argument("--side", type=int, default=11300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                        f"from bench.bombs import build; from pathlib import Path; "
                        f"build(Path({str(tmp)!r}), {args.bombs}, {args.side})"],
                       check=True, capture_output=True)
        size_kb = (tmp / "data" / "blue" / "bomb0.png").stat().st_size / 1024 if args.bombs else 0
        _, base_s, base_gb = train_peak(tmp, tmp / "plain", "plain")
        proc, seconds, peak_gb = train_peak(tmp, tmp / "data", "bombs")
    mp = args.side ** 2 / 1e6
    print(f"{args.bombs} bombs of {args.side}x{args.side} ({mp:.1f} MP, {size_kb:.0f} KB each)")
    print(f"baseline, the same data without the bombs: {base_s:.1f} s, peak RSS {base_gb:.2f} GB")
    print(f"with the bombs: exit {proc.returncode} in {seconds:.1f} s, peak RSS {peak_gb:.2f} GB "
          f"({peak_gb - base_gb:+.2f} GB, {peak_gb / base_gb:.2f}x the baseline)")
    # The floor: one bomb decoded at a time, holding its palette pixels (1 byte each) and its RGB
    # result (Pillow keeps RGB in 4 bytes a pixel) at once.
    print(f"floor for one decode at a time: about {mp * 5 / 1e3:.2f} GB over the baseline")
    if proc.returncode:
        print(proc.stderr[-2000:])
    else:
        try:
            result = json.loads(proc.stdout)
            print(f"trained; skipped: {[(Path(s['path']).name, s['reason']) for s in result.get('skipped', [])]}")
        except (ValueError, IndexError, AttributeError):
            pass
    verdict = "OK" if peak_gb < TARGET_GB and proc.returncode == 0 else "MISS"
    print(f"target peak RSS < {TARGET_GB:.0f} GB: {peak_gb:.2f} GB: {verdict}")
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
