"""The feature store: concurrent writers, damage detection, bulk reads, the old cache layout."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tlcli.features import store
from tlcli.features import store as feature_store

DIM = 8


def _vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


def _digest(i: int) -> str:
    return f"{i:032x}"


def _filled(folder, n, *, chunk=None, monkeypatch=None):
    if chunk:
        monkeypatch.setattr(store, "CHUNK_ROWS", chunk)
    s = store.FeatureStore(folder, dim=DIM)
    for i in range(n):
        s.put(_digest(i), _vec(i))
    s.flush()
    return s


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from tlcli.features import store
    store.CHUNK_ROWS = 37
    folder, first, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = store.FeatureStore(folder)
    for i in range(first, first + n):
        s.put(f"{i:032x}", np.random.default_rng(i).standard_normal(8).astype(np.float32))
    s.flush()
""")


def test_concurrent_writer_processes_lose_and_tear_nothing(tmp_path):
    folder, per, procs = tmp_path / "s", 400, 4
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), str(p * per), str(per)], env=env)
               for p in range(procs)]
    seen = 0
    while any(w.poll() is None for w in writers):  # a reader racing the writers sees whole shards only
        reader = store.FeatureStore(folder, dim=DIM)
        for i in range(0, procs * per, 7):
            got = reader.get(_digest(i))
            if got is not None:
                np.testing.assert_array_equal(got, _vec(i))
                seen += 1
    assert all(w.wait() == 0 for w in writers)
    final = store.FeatureStore(folder, dim=DIM)
    rows = final.rows([_digest(i) for i in range(procs * per)])
    np.testing.assert_array_equal(rows[np.arange(procs * per)], np.stack([_vec(i) for i in range(procs * per)]))
    assert len(list(folder.glob("*.json"))) == procs * -(-per // 37)
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_rows_reads_many_vectors_back_in_chunks_without_loading_them(tmp_path, monkeypatch):
    _filled(tmp_path / "s", 250, chunk=64, monkeypatch=monkeypatch)
    s = store.FeatureStore(tmp_path / "s", dim=DIM)
    order = [_digest(i) for i in (249, 3, 100, 64, 0)]
    rows = s.rows(order)
    assert rows.shape == (5, DIM) and rows.dtype == np.float32
    np.testing.assert_array_equal(rows[np.arange(5)], np.stack([_vec(i) for i in (249, 3, 100, 64, 0)]))
    np.testing.assert_array_equal(np.vstack(list(rows.chunks(2))), rows[np.arange(5)])
    used = [rows.arrays[i] for i in set(rows.refs[:, 0].tolist())]
    assert all(isinstance(a, np.memmap) for a in used), "shards are memory-mapped, not read"
    with pytest.raises(KeyError, match=_digest(999)):
        s.rows([_digest(1), _digest(999)])


@pytest.mark.parametrize("damage", ["flip a byte", "cut short", "sidecar garbled", "digest renamed",
                                    "no sidecar"])
def test_a_damaged_shard_reads_as_missing_and_only_its_vectors(tmp_path, monkeypatch, damage):
    _filled(tmp_path / "s", 30, chunk=10, monkeypatch=monkeypatch)
    victim = sorted((tmp_path / "s").glob("*.json"))[1]  # holds vectors 10..19
    data, sidecar = victim.with_suffix(".f32"), victim
    if damage == "flip a byte":
        raw = bytearray(data.read_bytes())
        raw[5] ^= 0x40
        data.write_bytes(bytes(raw))
    elif damage == "cut short":
        data.write_bytes(data.read_bytes()[:-4])
    elif damage == "sidecar garbled":
        sidecar.write_text(sidecar.read_text()[:-10])
    elif damage == "digest renamed":  # a sidecar edited to map vector 10 to digest 99
        meta = json.loads(sidecar.read_text())
        meta["digests"][0] = _digest(99)
        sidecar.write_text(json.dumps(meta))
    else:
        sidecar.unlink()
    s = store.FeatureStore(tmp_path / "s", dim=DIM)
    for i in range(30):
        got = s.get(_digest(i))
        if 10 <= i < 20:
            assert got is None
        else:
            np.testing.assert_array_equal(got, _vec(i))
    assert s.get(_digest(99)) is None
    # What it held is written again (here by hand, as extract does) and read from the new shard.
    for i in range(10, 20):
        s.put(_digest(i), _vec(i))
    s.flush()
    again = store.FeatureStore(tmp_path / "s", dim=DIM)
    np.testing.assert_array_equal(again.rows([_digest(i) for i in range(30)])[np.arange(30)],
                                  np.stack([_vec(i) for i in range(30)]))


def test_invalid_vectors_in_a_whole_shard_are_refused(tmp_path):
    s = store.FeatureStore(tmp_path / "s")
    s.put("aa" * 16, np.array([np.nan] * DIM, np.float32))
    s.put("bb" * 16, np.full(DIM, 1e30, np.float32))
    s.put("cc" * 16, _vec(1))
    s.flush()
    again = store.FeatureStore(tmp_path / "s", dim=DIM)
    assert again.get("aa" * 16) is None and again.get("bb" * 16) is None
    np.testing.assert_array_equal(again.get("cc" * 16), _vec(1))
    assert store.FeatureStore(tmp_path / "s", dim=DIM + 1).get("cc" * 16) is None, "another backbone's width"


def test_the_old_per_image_cache_is_ignored(tmp_path):
    digest = "ab" * 16
    old = tmp_path / "cache" / "features" / f"m-d{feature_store.DECODER_VERSION}" / digest[:2] / f"{digest}.npy"
    old.parent.mkdir(parents=True)
    np.save(old, _vec(0))
    cache = feature_store.model_store(tmp_path / "cache", "m", dim=DIM)
    assert cache.get(digest) is None
    cache.put(digest, _vec(1))
    cache.flush()
    np.testing.assert_array_equal(feature_store.model_store(tmp_path / "cache", "m", dim=DIM).get(digest), _vec(1))
    assert old.exists(), "the old entry is left for the user to delete"
    assert cache.dir.parent.name == "store"


def test_a_failing_disk_loses_the_buffer_but_does_not_raise(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    s = store.FeatureStore(tmp_path / "ro" / "s", dim=DIM)
    s.put(_digest(1), _vec(1))

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.files, "write_atomic", full)
    s.flush()
    assert store.FeatureStore(tmp_path / "ro" / "s", dim=DIM).get(_digest(1)) is None


def test_rows_refuses_digests_in_a_damaged_shard(tmp_path, monkeypatch):
    _filled(tmp_path / "s", 20, chunk=10, monkeypatch=monkeypatch)
    victim = sorted((tmp_path / "s").glob("*.f32"))[0]  # vectors 0..9
    victim.write_bytes(b"\0" * victim.stat().st_size)  # right size, wrong bytes
    s = store.FeatureStore(tmp_path / "s", dim=DIM)
    with pytest.raises(KeyError, match=_digest(3)):
        s.rows([_digest(15), _digest(3)])
    np.testing.assert_array_equal(s.rows([_digest(15)])[np.arange(1)], _vec(15)[None])
    assert s.get(_digest(3)) is None
