"""`tlcli models` against hostile servers and caches: a server that accepts and never answers, a
lock a killed download left, a lock that is a FIFO, a cache entry that links to itself. Each is a
one-line error or a correct answer in bounded time, and nothing is left in the cache."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import deadline
from tlcli.errors import BackboneError
from tlcli.model import backbone, hub_cache
from tlcli.model.presets import PRESETS

ROOT = Path(__file__).parents[1]


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    folder = tmp_path / "hub"
    folder.mkdir()
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(folder))
    return folder


@pytest.fixture
def silent_server():
    """A loopback address that accepts connections (the kernel's backlog) and never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def reaped_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def stale_lock(handle: str, pid: int) -> tuple:
    """The lock and temporary folder tensorflow_hub leaves when its process is killed mid-download."""
    module = hub_cache.cache_path(handle)
    uid = uuid.uuid4().hex
    lock, tmp = module.with_name(module.name + ".lock"), module.with_name(f"{module.name}.{uid}.tmp")
    (tmp / "variables").mkdir(parents=True)
    (tmp / "saved_model.pb").write_bytes(b"partial")
    lock.write_text(f"{socket.gethostname()}.{pid}.{uid}")
    return lock, tmp


def test_fetch_from_a_server_that_never_answers_ends_in_bounded_time_and_leaves_nothing(hub_dir, silent_server):
    start = time.monotonic()
    with deadline(60), pytest.raises(BackboneError, match="could not fetch it \\(no answer within 1 s\\)"):
        hub_cache.fetch_model(silent_server + "/model", timeout=1)
    assert time.monotonic() - start < 30
    assert list(hub_dir.iterdir()) == []  # no lock, no temporary folder


def test_a_lock_left_by_a_killed_download_does_not_block_the_next_fetch(hub_dir):
    handle = f"http://127.0.0.1:{closed_port()}/model"
    lock, tmp = stale_lock(handle, reaped_pid())
    start = time.monotonic()
    with deadline(60), pytest.raises(BackboneError, match="could not fetch it"):
        hub_cache.fetch_model(handle, timeout=5)  # tensorflow_hub alone waited 10 minutes for the lock
    assert time.monotonic() - start < 30
    assert not lock.exists() and not tmp.exists()
    assert list(hub_dir.iterdir()) == []


def test_a_lock_of_a_running_download_or_of_another_machine_is_left_alone(hub_dir):
    handle = "http://127.0.0.1:9/model"
    lock, tmp = stale_lock(handle, os.getpid())
    assert backbone.clear_stale_download(handle) == []
    assert lock.exists() and tmp.exists()
    lock.write_text(f"another-host.{reaped_pid()}.{tmp.name.split('.')[1]}")
    assert backbone.clear_stale_download(handle) == []
    assert lock.exists() and tmp.exists()
    lock.write_text(f"{socket.gethostname()}.{reaped_pid()}.{tmp.name.split('.')[1]}")
    assert sorted(backbone.clear_stale_download(handle)) == sorted([str(lock), str(tmp)])


def in_child(code: str, seconds: float = 90) -> str:
    """stdout of ``code`` run in a fresh interpreter, failing (not hanging) after ``seconds``: a
    hang in native code, or in a loop that swallows OSError, is beyond SIGALRM's reach."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_a_lock_that_is_a_fifo_is_a_one_line_error_not_a_hang(hub_dir):
    handle = f"http://127.0.0.1:{closed_port()}/model"
    module = hub_cache.cache_path(handle)
    os.mkfifo(module.with_name(module.name + ".lock"))
    out = in_child("from tlcli.errors import BackboneError\nfrom tlcli.model import hub_cache\ntry:\n"
                   f"    hub_cache.fetch_model({handle!r}, timeout=1)\nexcept BackboneError as exc:\n    print(exc)\n")
    assert re.fullmatch(r"--backbone \S+: the TF Hub cache's lock file \S+ is a FIFO \(named pipe\), not a "
                        r"regular file; remove it\n", out)


@pytest.mark.parametrize("target", [".", "..", "../.."], ids=["itself", "its-parent", "the-cache"])
def test_models_list_counts_a_cache_entry_that_links_back_up_once(hub_dir, target):
    preset = PRESETS["mobilenet_v3_small_100_224"]
    folder = hub_cache.cache_path(preset.handle)
    (folder / "variables").mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(bytes(3000))
    (folder / "variables" / "variables.index").write_bytes(bytes(2000))
    for name in ("a", "b", "c"):  # three links: walking them, the paths grow without end
        os.symlink(target, folder / "variables" / name)
    listing = json.loads(in_child("import json\nfrom tlcli.model import hub_cache\n"
                                  "print(json.dumps(hub_cache.list_models().to_dict()))\n", 60))
    entry = next(m for m in listing["models"] if m["name"] == preset.name)
    assert entry["cached"] and entry["size_bytes"] == 5000
