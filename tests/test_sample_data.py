"""sample_data/ is what sample_data/generate.py makes, deterministically."""

import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLE = Path(__file__).resolve().parent.parent / "sample_data"


def _generator():
    spec = importlib.util.spec_from_file_location("generate", SAMPLE / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generator_reproduces_the_committed_images(tmp_path):
    gen = _generator()
    gen.generate(tmp_path)
    made = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.jpg"))
    committed = sorted(p.relative_to(SAMPLE / "images") for p in (SAMPLE / "images").rglob("*.jpg"))
    assert made == committed and len(made) == 3 * gen.PER_CLASS
    for rel in made:
        a = np.asarray(Image.open(tmp_path / rel), np.float32)
        b = np.asarray(Image.open(SAMPLE / "images" / rel), np.float32)
        assert a.shape == b.shape == (gen.SIZE, gen.SIZE, 3)
        assert np.abs(a - b).mean() < 1.0, rel  # same pixels, up to the JPEG encoder's version
