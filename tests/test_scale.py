"""At scale: the streamed head refit equals the in-memory fit, takes a memmap or the store's rows
without copying them, and a second run over the same images extracts nothing."""

import tracemalloc

import numpy as np
import pytest

from tests.helpers import make_colour_dataset
from tlcli import data, features
from tlcli.config import TrainConfig
from tlcli.errors import TlcliError
from tlcli.features import store
from tlcli.features import store as feature_store
from tlcli.model import head

SIZE = 32


def _blobs(n, d, k, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1.0, (k, d))
    y = np.arange(n) % k
    return (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


def _same_fit(a: head.HeadFit, b: head.HeadFit, tol=2e-5):
    assert (a.l2, a.epochs) == (b.l2, b.epochs)
    assert a.cv_loss == pytest.approx(b.cv_loss, rel=1e-9)
    scale = float(np.abs(a.kernel).max())
    np.testing.assert_allclose(b.kernel, a.kernel, atol=tol * scale)
    np.testing.assert_allclose(b.bias, a.bias, atol=tol * scale)
    np.testing.assert_allclose([h.get("loss", 0) for h in b.history], [h.get("loss", 0) for h in a.history],
                               rtol=1e-5)
    np.testing.assert_array_equal(a.oof_rows, b.oof_rows)


@pytest.mark.parametrize("n,d", [(1200, 24), (90, 200)], ids=["images > features", "images < features"])
def test_the_streamed_refit_equals_the_in_memory_fit(n, d):
    X, y = _blobs(n, d, 4)
    in_memory = head.fit_head(X, y, 4)  # small and in memory: the row-space solver
    streamed = head.fit_head(X, y, 4, chunk_rows=97)
    assert in_memory.epochs > 3 and in_memory.l2 in head.L2_GRID
    _same_fit(in_memory, streamed)


def test_the_streamed_refit_equals_the_in_memory_fit_over_many_epochs_with_weights_and_groups():
    X, y = _blobs(800, 16, 3, seed=4)
    groups = np.tile(np.arange(400), 2)
    y = np.tile(y[:400], 2)
    options = dict(class_weight={0: 2.5}, label_smoothing=0.2, groups=groups)
    _same_fit(head.fit_head(X, y, 3, **options), head.fit_head(X, y, 3, chunk_rows=128, **options))
    fixed = dict(l2=1e-3, epochs=300, fixed_epochs=True)
    _same_fit(head.fit_head(X, y, 3, **fixed), head.fit_head(X, y, 3, chunk_rows=50, **fixed), tol=1e-4)


def _memmap(path, X):
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=X.shape)
    mm[:] = X
    mm.flush()
    return np.load(path, mmap_mode="r")


def _peak_bytes(fit):
    tracemalloc.start()  # numpy reports its allocations to tracemalloc
    try:
        result = fit()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_memmap_is_streamed_without_copying_it(tmp_path, monkeypatch):
    monkeypatch.setattr(head, "CHUNK_ROWS", 2000)
    d, k = 256, 3
    small, y_small = _blobs(6000, d, k, seed=2)
    large, y_large = _blobs(18_000, d, k, seed=2)
    fit_small, peak_small = _peak_bytes(lambda: head.fit_head(_memmap(tmp_path / "s.npy", small), y_small, k,
                                                              epochs=30))
    fit_large, peak_large = _peak_bytes(lambda: head.fit_head(_memmap(tmp_path / "l.npy", large), y_large, k,
                                                              epochs=30))
    # Three times the rows: memory grows by the per-row labels and weights, not by the matrix.
    assert peak_large - peak_small < (large.nbytes - small.nbytes) / 8, (peak_small, peak_large)
    assert peak_large < large.nbytes, "not even one float32 copy of the matrix (a float64 one is twice that)"
    _same_fit(head.fit_head(small, y_small, k, epochs=30), fit_small)
    assert float(np.mean(head.predict_proba(large, fit_large.kernel, fit_large.bias).argmax(axis=1) == y_large)) > 0.9


def test_fit_head_takes_the_stores_rows_directly(tmp_path, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_ROWS", 64)
    X, y = _blobs(400, 12, 5, seed=3)
    s = store.FeatureStore(tmp_path / "s")
    digests = [f"{i:032x}" for i in range(len(X))]
    for digest, vec in zip(digests, X):
        s.put(digest, vec)
    s.flush()
    order = np.random.default_rng(0).permutation(len(X))  # rows spread over every shard
    rows = store.FeatureStore(tmp_path / "s", dim=12).rows([digests[i] for i in order])
    _same_fit(head.fit_head(X[order], y[order], 5), head.fit_head(rows, y[order], 5))


@pytest.fixture(scope="module")
def pooling():
    import tf_keras as k

    inp = k.Input((SIZE, SIZE, 3))
    return k.Model(inp, k.layers.GlobalAveragePooling2D()(inp))  # features: the mean colour, dim 3


def test_a_second_run_extracts_nothing_and_a_grown_folder_only_the_new_images(tmp_path, pooling, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_ROWS", 5)  # several shards per run
    root = make_colour_dataset(tmp_path / "ds", per_class=6)

    def views():
        samples = data.scan(root, image_size=SIZE).samples
        return features.compute_views(samples, extractors=(pooling, None), cache_key="pool", cache_dir=tmp_path / "c",
                                      image_size=SIZE, batch_size=4, max_pixels=TrainConfig().max_pixels)

    first = views()
    assert (first.extracted, first.cached) == (18, 0)
    second = views()
    assert (second.extracted, second.cached) == (0, 18)
    np.testing.assert_array_equal(second.plain, first.plain)
    make_colour_dataset(root, per_class=2, start=6)
    third = views()
    assert (third.extracted, third.cached) == (6, 18)


def test_large_views_are_fitted_from_the_store_without_an_in_memory_copy(tmp_path, pooling, monkeypatch):
    monkeypatch.setattr(store, "CHUNK_ROWS", 7)  # several shards per view
    root = make_colour_dataset(tmp_path / "ds", per_class=8)
    samples = data.scan(root, image_size=SIZE).samples
    train = samples[::2] + samples[1::4]  # a subset, out of order: rows spread over the shards

    def views(cache_dir):
        return features.compute_views(samples, extractors=(pooling, pooling), cache_key="pool", cache_dir=cache_dir,
                                      image_size=SIZE, batch_size=4, max_pixels=TrainConfig().max_pixels, mirror=True)

    in_memory = views(tmp_path / "a")
    assert isinstance(in_memory.plain, np.ndarray) and isinstance(in_memory.mirror, np.ndarray)
    monkeypatch.setattr(feature_store, "VIEWS_IN_MEMORY_BYTES", 0)  # every view counts as large
    cold = views(tmp_path / "b")  # extracted in this process: read back from the shards it wrote
    warm = views(tmp_path / "b")
    assert (cold.extracted, warm.extracted) == (2 * len(samples), 0)
    for large in (cold, warm):
        assert isinstance(large.plain, store.StoredRows) and isinstance(large.mirror, store.StoredRows)
        np.testing.assert_array_equal(np.asarray(large.plain), in_memory.plain)
    handed = []
    real_fit = head.fit_head
    monkeypatch.setattr(head, "fit_head", lambda X, *a, **kw: handed.append(X) or real_fit(X, *a, **kw))
    options = dict(class_weight={1: 2.0}, epochs=60)
    fits = [head.fit_views(v, train, 3, **options) for v in (in_memory, warm)]
    assert isinstance(handed[0], np.ndarray) and isinstance(handed[1], store.StoredRows)
    assert handed[1].shape == (2 * len(train), 3)
    _same_fit(*fits)
    np.testing.assert_allclose(head.predict_views(warm, train, fits[1]), head.predict_views(in_memory, train, fits[1]),
                               atol=1e-6)


def test_a_large_cold_view_keeps_no_fresh_vector_in_memory_so_an_unwritable_store_is_one_clear_error(
        tmp_path, pooling, monkeypatch):
    root = make_colour_dataset(tmp_path / "ds", per_class=4)
    samples = data.scan(root, image_size=SIZE).samples
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = tmp_path / "a-file" / "cache"  # under a regular file: no store can be written, even as root

    def views():
        return features.compute_views(samples, extractors=(pooling, None), cache_key="pool", cache_dir=unwritable,
                                      image_size=SIZE, batch_size=4, max_pixels=TrainConfig().max_pixels)

    small = views()  # small views are gathered in memory: the store is only an optimisation
    assert isinstance(small.plain, np.ndarray) and small.extracted == len(samples)
    monkeypatch.setattr(feature_store, "VIEWS_IN_MEMORY_BYTES", 0)
    with pytest.raises(TlcliError, match=r"feature store could not be written .* --cache-dir") as err:
        views()  # had the fresh vectors been kept, this would have fallen back to them
    assert str(unwritable) in str(err.value) and "\n" not in str(err.value)


def test_static_extraction_batches_all_have_the_batch_size_and_the_same_features(tmp_path, pooling):
    import tf_keras as k

    seen = []

    class Recording(k.Model):  # records the batch dimension each traced call sees
        def call(self, x):
            seen.append(x.shape[0])
            return pooling(x)

    root = make_colour_dataset(tmp_path / "ds", per_class=4)
    samples = data.scan(root, image_size=SIZE).samples  # 12 images: batches of 5 leave 2
    common = dict(extractor=Recording(), image_size=SIZE, batch_size=5, max_pixels=TrainConfig().max_pixels)
    loose, n = features.extract(samples, cache=feature_store.NoStore(), **common)
    assert None in seen  # a dynamic batch dimension
    seen.clear()
    padded, m = features.extract(samples, cache=feature_store.NoStore(), static=True, **common)
    assert set(seen) == {5} and (n, m) == (12, 12)
    np.testing.assert_array_equal(padded, loose)


def test_the_scan_reports_progress_a_bounded_number_of_times(tmp_path):
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 200, 30)).save(png, format="PNG")
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(1050):
            (tmp_path / c / f"{i}.png").write_bytes(png.getvalue())
    calls = []
    folder = data.scan(tmp_path, image_size=8, progress=lambda done, total: calls.append((done, total)))
    assert len(folder.samples) == 2100
    assert calls[0] == (1, 2100) and calls[-1] == (2100, 2100)
    assert len(calls) <= 1002 and [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_the_skipped_table_lists_the_first_files_and_counts_the_rest():
    from rich.console import Console

    from tlcli.cli import render

    skipped = [{"path": f"ds/c/{i}.jpg", "reason": "truncated" if i % 3 else "zero bytes", "detail": ""}
               for i in range(10_000)]
    console = Console(record=True, width=200)
    console.print(render.skipped_table(skipped))
    text = console.export_text()
    assert "Skipped 10000 unusable file(s)" in text
    assert f"ds/c/{render.SKIPPED_ROWS - 1}.jpg" in text and f"ds/c/{render.SKIPPED_ROWS}.jpg" not in text
    rest = skipped[render.SKIPPED_ROWS:]
    zero = sum(s["reason"] == "zero bytes" for s in rest)
    assert f"... and {len(rest)} more" in text
    assert f"{len(rest) - zero} truncated, {zero} zero bytes" in text
    assert len(text.splitlines()) < render.SKIPPED_ROWS + 10


def test_class_weights_balance_many_classes():
    labels = [i % 1000 for i in range(50_000)] + [0] * 50_000
    weights = data.class_weights(labels, 1001)
    assert weights[0] == pytest.approx(100_000 / (1001 * 50_050))
    assert weights[1] == pytest.approx(100_000 / (1001 * 50))
    assert weights[1000] == 0.0


def test_metrics_read_the_probabilities_in_blocks_with_the_same_result(monkeypatch):
    from tlcli import metrics

    rng = np.random.default_rng(5)
    n, k = 2000, 7
    probs = rng.dirichlet(np.ones(k), n).astype(np.float32)
    y = rng.integers(0, k, n)
    labels = [f"c{i}" for i in range(k)]
    paths = [f"{i}.jpg" for i in range(n)]
    whole = metrics.compute(y, probs, labels, paths=paths, top_k=3, max_mistakes=20)
    monkeypatch.setattr(metrics, "BLOCK_ROWS", 97)
    blocks = metrics.compute(y, probs, labels, paths=paths, top_k=3, max_mistakes=20)
    assert blocks.confusion == whole.confusion
    assert blocks.mistakes == whole.mistakes and blocks.per_class == whole.per_class
    p64 = probs.astype(np.float64)
    assert blocks.accuracy == pytest.approx(np.mean(p64.argmax(axis=1) == y))
    assert blocks.top_k_accuracy == pytest.approx(np.mean((np.argsort(-p64, axis=1)[:, :3] == y[:, None]).any(axis=1)))
    assert blocks.loss == pytest.approx(-np.mean(np.log(p64[np.arange(n), y])), rel=1e-12)
    assert whole.loss == pytest.approx(blocks.loss, rel=1e-12)


def test_above_its_image_limit_train_skips_its_pairwise_data_check_with_one_line(
        tmp_path, colour_data, train_args, monkeypatch):
    import tlcli
    from tlcli import bundle
    from tlcli.insight import findings
    from tlcli.progress import Info

    monkeypatch.setattr(findings, "TRAIN_CHECK_MAX_IMAGES", 23)  # the colour data has 24 images
    said = []
    tlcli.train(colour_data, out=str(tmp_path / "m"), cache_dir=str(tmp_path / "c"), extractor="tf",
                progress=lambda e: said.append(e.message) if isinstance(e, Info) else None, **train_args)
    assert bundle.load(tmp_path / "m").meta.audit is None
    assert [m for m in said if m.startswith("data check skipped")] == [
        f"data check skipped: more than 23 images make it too slow here; run 'tlcli audit {colour_data}' to check "
        "for duplicates and mislabeled images"]
