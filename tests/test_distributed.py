"""Training on a cluster: two local worker processes with TF_CONFIG on 127.0.0.1 (CPU only),
TF_CONFIG parsing, shares, and a worker that dies mid-run."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import free_ports, make_colour_dataset

CLI = "import sys; from tlcli.cli import run; sys.argv[0] = 'tlcli'; run()"
TRAIN = ["--image-size", "32", "--epochs", "60", "--batch-size", "4", "--tensorboard", "none", "--json"]


def _start_cluster(tmp_path, args, n=2, extra=None):
    """``n`` worker processes running ``tlcli train args`` (+ ``extra[i]`` for worker i), each
    with its own TMPDIR."""
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    procs = []
    for i in range(n):
        tmp = tmp_path / f"tmp{i}"
        tmp.mkdir()
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp), TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}))
        mine = [*args, *(extra[i] if extra else [])]
        procs.append(subprocess.Popen([sys.executable, "-c", CLI, "train", *map(str, mine)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.fixture(scope="module")
def cluster_run(tmp_path_factory, tiny_backbone):
    """One fine-tuning run on two workers (the chief writes ``model``), and one on a single
    process with the same settings, on the same images; and a test set of new images."""
    tmp = tmp_path_factory.mktemp("cluster")
    data = make_colour_dataset(tmp / "images", per_class=10)
    test = make_colour_dataset(tmp / "test", per_class=4, start=100)
    args = [data, "--backbone", tiny_backbone, *TRAIN, "--fine-tune", "--fine-tune-epochs", "2",
            "--cache-dir", tmp / "cache"]
    (tmp / "out").mkdir()
    began = time.monotonic()
    procs = _start_cluster(tmp, [*args, "--out", tmp / "out" / "model"])
    # At the same time, into a cache of its own: it extracts everything itself.
    single = subprocess.Popen([sys.executable, "-c", CLI, "train", *map(str, args), "--strategy", "default",
                               "--cache-dir", tmp / "cache1", "--out", tmp / "single"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    done = [p.communicate(timeout=240) for p in procs]
    seconds = time.monotonic() - began
    return dict(tmp=tmp, test=test, procs=procs, done=done, seconds=seconds, single=(single, single.communicate()))


CLUSTER = pytest.mark.cluster  # each run starts 2-3 TensorFlow processes: 1.5-2.5 min on 2 shared cores


def _result(stdout):
    return json.loads(stdout)


@CLUSTER
def test_two_workers_both_succeed_and_share_the_extraction(cluster_run):
    for p, (_, err) in zip(cluster_run["procs"], cluster_run["done"]):
        assert p.returncode == 0, err[-3000:]
    chief, other = (_result(out) for out, _ in cluster_run["done"])
    assert (chief["worker"], other["worker"]) == (0, 1)
    assert chief["replicas"] == 2 and chief["global_batch_size"] == 8  # 4 per replica x 2 workers
    assert "MultiWorkerMirroredStrategy" in chief["strategy"]
    images = 30
    # Each extracts its half of the images: before fine-tuning (plain view) and after it (plain + mirror).
    assert chief["extracted_by_worker"] == other["extracted_by_worker"] == [chief["extracted"], other["extracted"]]
    # Each worker: its half of the plain features, then (after fine-tuning) its half of the plain
    # and mirror features of the tuned backbone; when the holdout undoes fine-tuning, only the
    # mirror features of the starting backbone are new.
    views = 3 if chief["fine_tune_improved"] else 2
    assert chief["extracted"] == other["extracted"] == views * images // 2
    assert cluster_run["seconds"] < 120


@CLUSTER
def test_only_the_chief_writes_the_bundle(cluster_run):
    tmp = cluster_run["tmp"]
    chief, other = (_result(out) for out, _ in cluster_run["done"])
    assert chief["model_dir"] == str(tmp / "out" / "model") and other["model_dir"] is None
    assert sorted(p.name for p in (tmp / "out").iterdir()) == ["model"]  # no lock, partial or staging left
    assert (tmp / "out" / "model" / "saved_model.pb").is_file()
    # The other worker's private place (under its TMPDIR) is gone, the chief had none, and
    # neither left TensorFlow's autograph modules there.
    assert [p for i in (0, 1) for p in (tmp / f"tmp{i}").iterdir()] == []


@CLUSTER
def test_cluster_model_matches_a_single_process_run(cluster_run):
    import tlcli

    single, (stdout, stderr) = cluster_run["single"]
    assert single.returncode == 0, stderr[-3000:]
    one, chief = _result(stdout), _result(cluster_run["done"][0][0])
    assert chief["labels"] == one["labels"]
    assert chief["fine_tune_epochs"] == 2
    tmp, test = cluster_run["tmp"], cluster_run["test"]
    on_cluster = tlcli.evaluate(test, model_dir=tmp / "out" / "model").report.accuracy
    alone = tlcli.evaluate(test, model_dir=tmp / "single").report.accuracy
    assert on_cluster >= alone - 1e-9 and on_cluster >= 0.9


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _wait_for_epoch(state_file, procs, seconds=150):
    """The chief's fine-tuning state once it has recorded an epoch (None: not within ``seconds``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        try:
            st = json.loads(state_file.read_text())["fine_tune"]
        except (OSError, ValueError, KeyError):
            st = None
        if st and st.get("epochs_run", 0) >= 1:
            return st
        time.sleep(0.05)
    return None


@CLUSTER
def test_an_interrupted_cluster_resumes_from_the_chiefs_last_epoch(tmp_path, tiny_backbone, colour_data,
                                                                  trained_bundle):
    """Ctrl-C on both workers mid fine-tuning keeps the previous bundle and the chief's progress;
    the same command with --resume on both continues from the chief's epoch and only the chief
    writes the new bundle."""
    import tlcli

    (tmp_path / "out").mkdir()
    out, epochs = tmp_path / "out" / "model", 3
    shutil.copytree(trained_bundle, out)
    before = _files(out)
    # Without mirror views and the LiteRT attempt (the tiny backbone cannot be converted): fewer steps to wait for.
    args = [colour_data, "--backbone", tiny_backbone, *TRAIN, "--fine-tune", "--fine-tune-epochs", epochs,
            "--fine-tune-patience", epochs, "--no-mirror", "--extractor", "tf", "--cache-dir", tmp_path / "cache",
            "--out", out, "--force"]
    for run in ("first", "mixed", "second"):
        (tmp_path / run).mkdir()
    first = _start_cluster(tmp_path / "first", args)
    try:
        st = _wait_for_epoch(tmp_path / "out" / ".model.partial" / "state.json", first)
        for p in first:
            p.send_signal(signal.SIGINT)
        ended = [p.communicate(timeout=60) for p in first]
    finally:
        for p in first:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert st is not None, ended[0][1][-3000:]
    assert [p.returncode for p in first] == [130, 130], ended[1][1][-3000:]
    assert _files(out) == before  # the previous bundle is intact
    for i, (_, err) in enumerate(ended):
        line = err.strip().splitlines()[-1]
        assert f"the previous model at {out} is untouched; progress kept" in line and "--resume" in line, err[-2000:]
        assert ("worker 1 (127.0.0.1:" in line and "writes nothing into --out" in line) == (i == 1)
    saved = json.loads((tmp_path / "out" / ".model.partial" / "state.json").read_text())["fine_tune"]
    assert 1 <= saved["epochs_run"] < epochs

    # The chief alone with --resume: both stop at once, each with one line naming the two, and keep the progress.
    mixed = _start_cluster(tmp_path / "mixed", args, extra=[["--resume"], []])
    refused = [p.communicate(timeout=120) for p in mixed]
    for p, (_, err) in zip(mixed, refused):
        assert p.returncode == 2, err[-3000:]
        assert re.search(r"error: --resume: worker 0 \(127\.0\.0\.1:\d+, the chief\) started with --resume and "
                         r"worker 1 \(127\.0\.0\.1:\d+\) without; start every worker with the same command",
                         err), err[-3000:]
    assert json.loads((tmp_path / "out" / ".model.partial" / "state.json").read_text())["fine_tune"] == saved
    assert _files(out) == before

    second = _start_cluster(tmp_path / "second", [*args, "--resume"])
    done = [p.communicate(timeout=240) for p in second]
    for p, (_, err) in zip(second, done):
        assert p.returncode == 0, err[-3000:]
    chief, other = (_result(stdout) for stdout, _ in done)
    for _, err in done:  # each worker continued from the chief's checkpoint, not from scratch
        assert f"fine-tuning continues after epoch {saved['epochs_run']} of {epochs}" in err, err[-3000:]
    assert chief["fine_tune_epochs"] == other["fine_tune_epochs"] == epochs
    # The first run's features of each worker's half came back from the common --cache-dir.
    assert chief["cached"] >= 12 and other["cached"] >= 12
    assert [row["epoch"] for row in chief["history"]["fine-tune"]] == list(range(1, epochs + 1))
    assert chief["history"]["fine-tune"] == other["history"]["fine-tune"]
    assert chief["model_dir"] == str(out) and other["model_dir"] is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model"]  # the progress went with the run
    assert [p for run in ("first", "mixed", "second") for p in (tmp_path / run).glob("tmp*/tlcli-*")] == []
    meta = json.loads((out / "tlcli.json").read_text())
    assert meta["config"]["fine_tune"] is True and meta["training"]["fine_tune_epochs"] == epochs
    assert chief["labels"] == ["blue", "green", "red"]
    test = make_colour_dataset(tmp_path / "test", per_class=3, start=100)
    assert tlcli.evaluate(test, model_dir=out).report.accuracy >= 0.9


@CLUSTER
@pytest.mark.parametrize("dead", [1, 0], ids=["worker", "chief"])
def test_a_dead_worker_stops_the_others_with_one_line_naming_it(tmp_path, tiny_backbone, colour_data, dead):
    """Either way round: when the chief dies, TensorFlow's collective fails first, and that
    worker's error too is the one line naming the chief, not TensorFlow's traceback."""
    out, alive = tmp_path / "model", 1 - dead
    procs = _start_cluster(tmp_path, [colour_data, "--backbone", tiny_backbone, *TRAIN, "--fine-tune",
                                      "--fine-tune-epochs", "500", "--fine-tune-patience", "500", "--cache-dir",
                                      tmp_path / "cache", "--out", out])
    try:
        partial = tmp_path / ".model.partial" / "fine-tune"
        deadline = time.monotonic() + 120
        while not partial.exists() and time.monotonic() < deadline and procs[0].poll() is None:
            time.sleep(0.2)
        assert partial.exists(), procs[0].communicate(timeout=30)[1][-3000:]  # the chief is fine-tuning
        procs[dead].kill()
        killed = time.monotonic()
        _, err = procs[alive].communicate(timeout=90)
        assert time.monotonic() - killed < 45
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[alive].returncode == 1, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: cluster: worker {dead} \(127\.0\.0\.1:\d+(, the chief)?\) stopped", last), err[-3000:]
    assert "Traceback" not in err
    assert not out.exists()


# A worker's watch on its peer, in a process without TensorFlow (nothing to abort): the peer is a
# listening socket that closes; the step either fails (raise) or never returns (hang).
WATCH = """
import socket, sys, time
sys.modules["tensorflow"] = None
from tlcli.training import cluster
peer = socket.socket()
peer.bind(("127.0.0.1", 0))
peer.listen(8)
c = cluster.Cluster((f"127.0.0.1:{peer.getsockname()[1]}", "127.0.0.1:1"), 1)
try:
    with cluster.Watch(c, interval=0.1, failures=3, grace=float(sys.argv[2])) as watch:
        time.sleep(0.5)
        peer.close()
        closed = time.monotonic()
        while sys.argv[1] == "hang" or watch.dead is None:
            time.sleep(0.05)
        print(f"noticed after {time.monotonic() - closed:.2f} s")
        raise RuntimeError("the step's collective failed")
except cluster.ClusterError as exc:
    print(f"ClusterError: {exc}")
"""


@pytest.mark.parametrize("step", ["raise", "hang"])
def test_when_the_chief_stops_the_watch_ends_the_worker_with_one_line_naming_it(step):
    began = time.monotonic()
    p = subprocess.run([sys.executable, "-c", WATCH, step, "60" if step == "raise" else "0.5"],
                       capture_output=True, text=True, timeout=60)
    named = r"cluster: worker 0 \(127\.0\.0\.1:\d+, the chief\) stopped \(no answer on its port"
    if step == "raise":  # the failed step becomes the ClusterError naming the worker
        assert p.returncode == 0, p.stderr
        noticed, line = p.stdout.splitlines()
        assert float(noticed.split()[2]) < 3 and re.match("ClusterError: " + named, line)
    else:  # nothing hangs: the watch ends the process itself, with that line
        assert p.returncode == 1 and p.stdout == "" and time.monotonic() - began < 30
        assert re.fullmatch("tlcli: " + named + r".*--resume to continue from the chief's last epoch\n", p.stderr)


# TensorFlow notices first: the chief is gone, and the collective fails at once with TensorFlow's
# error, before the watch has missed it 3 times (the run that showed this printed a traceback).
TF_NOTICES_FIRST = """
import socket, sys, time
sys.modules["tensorflow"] = None
from tlcli.training import cluster
ERRORS = {"__module__": "tensorflow.python.framework.errors_impl"}
UnavailableError, ResourceExhaustedError = (type(name, (Exception,), ERRORS)
                                           for name in ("UnavailableError", "ResourceExhaustedError"))
peer = socket.socket()
peer.bind(("127.0.0.1", 0))
peer.listen(256)  # the probes while the watch decides are never accepted: room for all of them
c = cluster.Cluster((f"127.0.0.1:{peer.getsockname()[1]}", "127.0.0.1:1"), 1)
try:
    with cluster.Watch(c, interval=0.1, failures=3, grace=60, seen=[0]):
        if sys.argv[1] == "stopped":
            peer.close()
        if sys.argv[1] == "other":  # not a collective's: not the cluster's to explain
            raise ResourceExhaustedError("OOM when allocating tensor")
        raise UnavailableError("Collective ops is aborted by: failed to connect to all addresses\\nmore")
except cluster.ClusterError as exc:
    print(f"ClusterError: {exc}")
except ResourceExhaustedError as exc:
    print(f"ResourceExhaustedError: {exc}")
"""


@pytest.mark.parametrize("peer", ["stopped", "up", "other"])
def test_a_collective_that_tensorflow_fails_first_becomes_one_line(peer):
    p = subprocess.run([sys.executable, "-c", TF_NOTICES_FIRST, peer], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stderr == "", p.stderr
    [line] = p.stdout.splitlines()
    if peer == "other":
        assert line == "ResourceExhaustedError: OOM when allocating tensor"
    elif peer == "stopped":  # the watch is given the time to name the worker
        assert re.match(r"ClusterError: cluster: worker 0 \(127\.0\.0\.1:\d+, the chief\) stopped", line), line
    else:
        assert line.startswith("ClusterError: cluster: a collective operation with the other workers failed "
                               "(UnavailableError: Collective ops is aborted by: failed to connect"), line
        assert "--resume" in line

# One worker of two, alone: tf.distribute waits in native code for the other to start.
JOIN = ("import sys; from tlcli.training import cluster; cluster.STARTUP_SECONDS = float(sys.argv.pop(1)); "
        "from tlcli.cli import run; sys.argv[0] = 'tlcli'; run()")


def _join_alone(tmp_path, colour_data, tiny_backbone, startup):
    mine, absent = free_ports(2)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TMPDIR=str(tmp_path), TF_CONFIG=json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{mine}", f"127.0.0.1:{absent}"]}, "task": {"type": "worker", "index": 0}}))
    args = [colour_data, "--backbone", tiny_backbone, *TRAIN, "--out", tmp_path / "model"]
    proc = subprocess.Popen([sys.executable, "-c", JOIN, str(startup), "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, mine


@CLUSTER
def test_a_worker_whose_peer_never_comes_up_stops_with_one_line_in_time(tmp_path, colour_data, tiny_backbone):
    proc, mine = _join_alone(tmp_path, colour_data, tiny_backbone, startup=4)
    began = time.monotonic()
    try:
        out, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, err[-3000:]
    assert json.loads(out)["error"].startswith("cluster: worker 1 (127.0.0.1:")  # --json: the error for scripts
    assert time.monotonic() - began < 60 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert re.fullmatch(r"error: cluster: worker 1 \(127\.0\.0\.1:\d+\) did not come up within 4 s; start every "
                        r"worker named in TF_CONFIG", lines[-1]), err[-3000:]
    said = " ".join(" ".join(err.split()).split(" "))
    assert "worker 0 (127.0.0.1:" in said and "joining; every worker named in TF_CONFIG must start within 4 s" in said
    assert f"port {mine} of every network interface, not only 127.0.0.1" in said  # TensorFlow binds 0.0.0.0
    assert not (tmp_path / "model").exists()


TWICE = """
import json, sys
import tlcli
for name in ("first", "second"):
    r = tlcli.train(sys.argv[1], out=sys.argv[2] + "/" + name, backbone=sys.argv[3], image_size=32, epochs=20,
                    batch_size=4, strategy="multi_worker", tensorboard=None)
    print(r.strategy)
"""


@CLUSTER
def test_a_second_run_in_the_process_trains_on_the_cluster_it_joined(tmp_path, colour_data, tiny_backbone):
    """The join listens on the worker's port before TensorFlow's server takes it: a second run of
    the same process, whose server holds the port, must not try again."""
    [port] = free_ports(1)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CONFIG=json.dumps(
        {"cluster": {"worker": [f"127.0.0.1:{port}"]}, "task": {"type": "worker", "index": 0}}))
    p = subprocess.run([sys.executable, "-c", TWICE, str(colour_data), str(tmp_path), str(tiny_backbone)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("MultiWorkerMirroredStrategy: worker 0") == 2

@CLUSTER
def test_sigterm_while_joining_ends_the_worker_with_one_line(tmp_path, colour_data, tiny_backbone):
    import socket

    proc, mine = _join_alone(tmp_path, colour_data, tiny_backbone, startup=120)
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and proc.poll() is None:  # its server is up: it waits inside TensorFlow
            try:
                socket.create_connection(("127.0.0.1", mine), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted while worker 0 (127.0.0.1:"), err[-3000:]
    assert "Traceback" not in err and not (tmp_path / "model").exists()

def test_tf_config_names_workers_chief_first_and_shares_cover_the_list():
    from tlcli.training import cluster

    spec = {"cluster": {"worker": ["h1:1001", "h2:1002"], "chief": ["h0:1000"]}, "task": {"type": "worker", "index": 1}}
    c = cluster.from_env({"TF_CONFIG": json.dumps(spec)})
    assert c.workers == ("h0:1000", "h1:1001", "h2:1002") and c.index == 2 and not c.is_chief
    items = list(range(10))
    shares = [cluster.Cluster(c.workers, i).share(items) for i in range(3)]
    assert sorted(sum(shares, [])) == items and [len(s) for s in shares] == [4, 3, 3]
    assert list(cluster.Cluster(c.workers, 1).positions(10)) == shares[1]
    assert cluster.from_env({}) is None and cluster.Cluster(c.workers, 0).is_chief


@pytest.mark.parametrize("raw, why", [
    ("{not json", "not valid JSON"),
    ('{"cluster": {"ps": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}', "'ps'"),
    ('{"cluster": {"worker": ["nohost"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 2}}', "task worker 2"),
    ('{"cluster": {"worker": ["a:1"]}}', '"task"'),
    # Every field's type: a bool is an int in Python, and the worker would then wait silently.
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": true}}', "N an integer"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": "1"}}', "N an integer"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1.0}}', "N an integer"),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": ["worker"], "index": 1}}', '"type"'),
    ('{"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": -1}}', "task worker -1"),
    ('{"cluster": {"worker": [12345]}, "task": {"type": "worker", "index": 0}}', "12345"),
    ('{"cluster": {"worker": ["a:1", ["b:2"]]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": {"0": "a:1"}}, "task": {"type": "worker", "index": 0}}', "must be a list"),
    ('{"cluster": {"worker": "a:1"}, "task": {"type": "worker", "index": 0}}', "must be a list"),
    ('{"cluster": {"chief": ["a:1", "b:2"]}, "task": {"type": "chief", "index": 0}}', "one entry"),
    ('{"cluster": {"worker": ["a:0"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:65536"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:\\uff11"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a b:1"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": [":1"]}, "task": {"type": "worker", "index": 0}}', "host:port"),
    ('{"cluster": {"worker": ["a:1", "a:1"]}, "task": {"type": "worker", "index": 0}}', "named twice"),
    ('{"cluster": {"chief": ["a:1"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}}', "named twice"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}, "rpc_layer": 1}', '"rpc_layer"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}, "rpc_layer": "grpc+verbs"}',
     "not supported"),
    ('{"cluster": {"worker": ["a:1"]}, "task": {"type": "worker", "index": 0}, "environment": []}',
     '"environment"'),
    ('{"cluster": {"worker": ["a:1"]}, "task": "worker"}', '"task"'),
    ('{"cluster": [], "task": {"type": "worker", "index": 0}}', '"cluster"'),
    ('[1, 2]', '"cluster"'),
])
def test_bad_tf_config_is_one_line_naming_it(raw, why):
    from tlcli.errors import UsageError
    from tlcli.training import cluster

    with pytest.raises(UsageError) as info:
        cluster.from_env({"TF_CONFIG": raw})
    message = str(info.value)
    assert message.startswith("TF_CONFIG: ") and why in message and "\n" not in message


def test_multi_worker_without_tf_config_is_a_usage_error(monkeypatch):
    from tlcli.errors import UsageError
    from tlcli.training import strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="--strategy multi_worker: TF_CONFIG is not set"):
        strategy.choose("multi_worker")
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1"]}, "task": {"type": "worker",
                                                                                         "index": 0}}))
    assert strategy.wants_cluster("auto") is None  # one worker: no cluster to join
    assert strategy.wants_cluster("multi_worker").size == 1


# ---- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_fine_tuning_under_a_mixed_policy_saves_a_float32_model(tmp_path, train_args, colour_data, policy):
    """The hub layer (traced for float32) trains under the policy; the head's weights reach the
    saved float32 model, whose SavedModel and TFLite file take and give float32."""
    import numpy as np

    import tlcli
    from tlcli._tf import keras, tf

    out = tmp_path / "model"
    r = tlcli.train(colour_data, out=str(out), **{**train_args, "batch_size": 4}, fine_tune=True,
                    fine_tune_epochs=2, precision=policy, fine_tune_learning_rate=1e-3)
    assert r.fine_tune_epochs == 2 and r.val_accuracy >= 0.8
    assert keras().mixed_precision.global_policy().name == "float32"  # put back after fine-tuning
    loaded = tf().saved_model.load(str(out))
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.dtype == tf().float32
    probs = next(iter(serve(tf().zeros([2, 32, 32, 3])).values()))
    assert probs.dtype == tf().float32 and np.allclose(np.sum(probs, axis=1), 1.0, atol=1e-5)
    e = tlcli.export_tflite(out)
    assert e.agreement == 1.0
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(e.path))
    assert [d["dtype"] for d in interp.get_input_details()] == [np.float32]
    assert {d["dtype"] for d in interp.get_output_details()} == {np.float32}  # probabilities, unknown_score


def test_auto_precision_follows_the_hardware():
    from tlcli.training import strategy as precision

    assert precision.resolve_precision("auto", kind="CPU") == "float32"
    assert precision.resolve_precision("auto", kind="TPU") == "mixed_bfloat16"
    assert precision.resolve_precision("auto", kind="GPU", capability=(8, 0)) == "mixed_float16"
    assert precision.resolve_precision("auto", kind="GPU", capability=(6, 1)) == "float32"
    assert precision.resolve_precision("mixed_bfloat16", kind="CPU") == "mixed_bfloat16"


def test_unknown_precision_is_a_usage_error(train_args, colour_data, tmp_path):
    import tlcli
    from tlcli.errors import UsageError

    with pytest.raises(UsageError, match="--precision float8: must be one of auto, float32"):
        tlcli.train(colour_data, out=str(tmp_path / "m"), **train_args, precision="float8")


# ---- TPU, as far as a CPU goes ------------------------------------------------------------------

def _batches(n, batch):
    import numpy as np

    from tlcli._tf import tf

    x = np.arange(n, dtype=np.float32).reshape(n, 1, 1, 1) * np.ones((1, 2, 2, 3), np.float32)
    y = np.eye(2, dtype=np.float32)[np.arange(n) % 2]
    return tf().data.Dataset.from_tensor_slices((x, y)).batch(batch)


def test_static_batches_drop_the_remainder_or_pad_it_with_zero_weights():
    import numpy as np

    from tlcli.training.finetuning import static_batches

    dropped = list(static_batches(_batches(10, 4), 4))
    assert [b[0].shape[0] for b in dropped] == [4, 4]
    padded = static_batches(_batches(10, 4), 4, pad=True)
    assert padded.element_spec[0].shape.as_list() == [4, 2, 2, 3]  # static: known at graph time
    batches = list(padded)
    assert [b[0].shape[0] for b in batches] == [4, 4, 4]
    weights = np.concatenate([b[2].numpy() for b in batches])
    assert weights.tolist() == [1.0] * 10 + [0.0] * 2
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images[:10, 0, 0, 0].tolist() == list(range(10)) and not images[10:].any()
    assert len(list(static_batches(_batches(8, 4), 4, pad=True))) == 2  # nothing to pad: no empty batch


def test_padding_is_masked_out_of_the_accuracy():
    from tlcli._tf import keras
    from tlcli.training.finetuning import static_batches

    k = keras()
    inputs = k.Input((2, 2, 3))
    # Predicts class 1 for every image: right on the odd ones, so 5 of 10 (3 of 7 with padding as class 0).
    probs = k.layers.Lambda(lambda x: k.backend.one_hot(k.backend.cast(k.backend.sum(x, axis=[1, 2, 3]) * 0 + 1,
                                                                     "int32"), 2))(inputs)
    m = k.Model(inputs, probs)
    m.compile(loss="categorical_crossentropy", weighted_metrics=["accuracy"])
    _, plain = m.evaluate(_batches(10, 4), verbose=0)
    _, masked = m.evaluate(static_batches(_batches(10, 4), 4, pad=True), verbose=0)
    assert plain == pytest.approx(0.5) and masked == pytest.approx(0.5)


def test_tpu_resolver_path_up_to_the_tpu(monkeypatch):
    """No TPU here: auto falls back, --strategy tpu is one line. With a resolver that finds one
    (faked), the system is initialised and TPUStrategy is built on it, loading from the host."""
    from tlcli._tf import tf
    from tlcli.errors import UsageError
    from tlcli.training import strategy

    t = tf()
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(UsageError, match="--strategy tpu: no TPU found by TPUClusterResolver") as info:
        strategy.choose("tpu")
    assert "has no TPU runtime (tensorflow-tpu on PyPI stops at 2.20, Cloud TPU's runtime table at 2.18)" in str(
        info.value)
    calls = []

    class Resolver:
        def __init__(self, *args, **kwargs):
            calls.append("resolve")

    class FakeTPUStrategy:
        num_replicas_in_sync = 8

        def __init__(self, resolver):
            calls.append(("strategy", type(resolver).__name__))

    monkeypatch.setattr(t.distribute.cluster_resolver, "TPUClusterResolver", Resolver)
    monkeypatch.setattr(t.config, "experimental_connect_to_cluster", lambda r: calls.append("connect"))
    monkeypatch.setattr(t.tpu.experimental, "initialize_tpu_system", lambda r: calls.append("initialize"))
    monkeypatch.setattr(t.distribute, "TPUStrategy", FakeTPUStrategy)
    chosen = strategy.choose("auto")
    assert calls == ["resolve", "connect", "initialize", ("strategy", "Resolver")]
    assert chosen.name == "tpu" and chosen.replicas == 8 and chosen.accelerator
    assert chosen.io_device == "/job:localhost" and chosen.static_shapes


def test_a_tpu_run_on_the_cpu_fine_tunes_on_static_batches_with_the_padding_masked(tmp_path, monkeypatch,
                                                                                    train_args):
    """The recipe with a TPU's Chosen (its strategy faked by the default one): the backbone loads
    through the host, fine-tuning gets batches of one static shape, the holdout's last batch is
    padded with weight-0 images, and its accuracy counts the real images only. (Class 0 is white:
    a black padding image, whose target is all zeros, would count as right only for class 0.)"""
    import numpy as np

    import tlcli
    from tlcli._tf import tf
    from tlcli.training import finetuning, strategy

    monkeypatch.delenv("TF_CONFIG", raising=False)
    fake = strategy.Chosen(tf().distribute.get_strategy(), "tpu", "TPUStrategy (faked)", accelerator=True)
    monkeypatch.setattr(strategy, "choose", lambda name: fake)
    real, made = finetuning.static_batches, []

    def recorded(ds, batch_size, *, pad=False):
        out = real(ds, batch_size, pad=pad)
        made.append((pad, out))
        return out

    monkeypatch.setattr(finetuning, "static_batches", recorded)
    images = make_colour_dataset(tmp_path / "images", colours={"a_white": (235, 235, 235), "blue": (20, 40, 220),
                                                               "red": (220, 30, 30)})
    r = tlcli.train(images, out=str(tmp_path / "m"), **{**train_args, "batch_size": 4}, fine_tune=True,
                    fine_tune_epochs=2, fine_tune_patience=5, mirror=False)
    assert r.strategy == "TPUStrategy (faked)" and r.fine_tune_epochs == 2 and r.val_accuracy >= 0.8
    (_, train), (padded, holdout) = made
    assert padded and train.element_spec[0].shape.as_list() == [4, 32, 32, 3]
    assert holdout.element_spec[0].shape.as_list() == [4, 32, 32, 3] and len(holdout.element_spec) == 3
    weights = np.concatenate([w.numpy() for _, _, w in holdout])
    real_images = int(weights.sum())
    assert 0 < real_images < len(weights)  # a padded last batch
    for row in r.history["fine-tune"]:  # the accuracy of the real holdout images: k of them right
        right = row["val_accuracy"] * real_images
        assert right == pytest.approx(round(right), abs=1e-4), (row, real_images)


def test_backbone_loads_through_the_host_io_device(tiny_backbone):
    from tlcli.model import backbone

    spec = backbone.resolve_spec(str(tiny_backbone), 32)
    loaded = backbone.load(spec, io_device="/job:localhost")
    assert loaded.feature_dim == backbone.load(spec).feature_dim and loaded.image_size == 32


def test_summary_of_a_non_chief_worker_says_the_chief_writes_the_model():
    from rich.console import Console

    from tlcli.cli import render
    from tlcli.training.recipe import TrainResult

    r = TrainResult(model_dir=None, labels=["a", "b"], train_counts={"a": 2, "b": 2}, val_counts={}, train_accuracy=1.0,
                    val_accuracy=None, val_loss=None, head_epochs=3, fine_tune_epochs=0, extracted=2, cached=0,
                    strategy="MultiWorkerMirroredStrategy", replicas=2, global_batch_size=8, seconds=1.0,
                    worker=1, extracted_by_worker=[2, 2])
    console = Console(width=200, record=True)
    console.print(render.train_summary(r, tensorboard="logs"))
    text = console.export_text()
    assert "worker 1 of 2" in text and "2, 2" in text and "written by the chief" in text
    assert "tensorboard" not in text


def _tf_config(monkeypatch, index, n=2):
    workers = [f"127.0.0.1:{p}" for p in free_ports(n)]
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker",
                                                                                         "index": index}}))


def test_a_non_chief_worker_runs_into_a_private_folder_and_resumes_from_the_chiefs_state(tmp_path, monkeypatch):
    from tlcli.config import TrainConfig
    from tlcli.training import cluster, distributed, run_state, strategy

    monkeypatch.setattr(strategy, "choose", lambda name: None)  # the strategy itself needs a fresh process
    monkeypatch.setattr(cluster, "join", lambda found, create: create())  # and the other workers
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    out = tmp_path / "model"
    chief_state = run_state.partial_dir(out) / "state.json"
    chief_state.parent.mkdir()
    chief_state.write_text('{"saved": "by the chief"}')
    cfg = TrainConfig(out=str(out), resume=True, tensorboard="logs")

    _tf_config(monkeypatch, 0)
    mine, node = distributed.join(cfg)
    assert mine is cfg and node.cluster.is_chief and node.scratch is None

    _tf_config(monkeypatch, 1)
    mine, node = distributed.join(cfg)
    assert node.cluster.index == 1 and node.out == str(out)
    assert mine.out.startswith(str(tmp_path / "tmp")) and mine.tensorboard is None
    copied = run_state.partial_dir(mine.out) / "state.json"
    assert copied.read_text() == '{"saved": "by the chief"}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.partial", "tmp"]  # nothing new beside --out


def test_resume_reads_the_checkpoints_in_the_work_folder_it_loaded_not_the_chiefs(tmp_path):
    from tlcli.config import TrainConfig
    from tlcli.training import run_state

    chief_out, worker_out = tmp_path / "shared" / "model", tmp_path / "worker1" / "model"
    chief_partial, copy = run_state.partial_dir(chief_out), run_state.partial_dir(worker_out)
    saved = run_state.RunState(run_state.absolute(TrainConfig(data_dir=str(tmp_path / "images"), out=str(chief_out),
                                                              fine_tune=True)))
    saved.fine_tune = run_state.FineTuneState(epochs_run=2, last_checkpoint=str(chief_partial / "fine-tune" / "last-2"),
                                              best_checkpoint=str(tmp_path / "elsewhere" / "best-1"))
    saved.save(copy)  # what distributed.join copies into a non-chief worker's private folder
    cfg, state = run_state.resume(TrainConfig(out=str(worker_out), resume=True), {"out", "resume"}, lambda e: None)
    assert cfg.out == str(worker_out) and cfg.fine_tune and state.fine_tune.epochs_run == 2
    assert state.fine_tune.last_checkpoint == str(copy / "fine-tune" / "last-2")
    assert state.fine_tune.best_checkpoint == str(tmp_path / "elsewhere" / "best-1")  # not in the work folder: kept


def test_a_non_chief_worker_with_nothing_to_resume_is_one_line_naming_the_out(tmp_path, monkeypatch):
    from tlcli.config import TrainConfig
    from tlcli.errors import UsageError
    from tlcli.training import cluster, distributed, strategy

    monkeypatch.setattr(strategy, "choose", lambda name: None)  # the strategy itself needs a fresh process
    monkeypatch.setattr(cluster, "join", lambda found, create: create())  # and the other workers
    _tf_config(monkeypatch, 1)
    out = tmp_path / "model"
    with pytest.raises(UsageError) as info:
        distributed.join(TrainConfig(out=str(out), resume=True))
    message = str(info.value)
    # The single-process line, and why a worker may not see the chief's progress.
    assert message.startswith(f"--resume: no interrupted run to continue for --out {out} (worker 1 (127.0.0.1:")
    assert "a folder every worker sees" in message and message.endswith("run without --resume")
    assert "\n" not in message and list(tmp_path.iterdir()) == []


def test_joining_a_cluster_after_tensorflow_started_is_one_line(monkeypatch):
    from tlcli._tf import tf
    from tlcli.errors import UsageError
    from tlcli.training import strategy

    tf().constant(1.0) + 1  # this process's runtime is up
    _tf_config(monkeypatch, 0)
    with pytest.raises(UsageError, match="--strategy multi_worker: TensorFlow already started in this process"):
        strategy.choose("auto")
