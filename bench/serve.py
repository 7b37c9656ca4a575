"""Serving benchmark: `tlcli serve` under concurrent clients, against `tlcli predict` in the same run.

    .venv/bin/python bench/serve.py [--model BUNDLE] [--data DIR] [--clients 8] [--requests 200]
                                    [--workers N] [--engine tflite]

Without --model, trains a head-only MobileNetV2 bundle on ../shared/data/hymenoptera_data/train
(validation .../val) into a temporary folder and exports its model.tflite; prints SKIP when
../shared is absent. A given bundle is copied first (never modified). --data (default
hymenoptera val) holds the real photos posted.

Measures, all on loopback and in this one run:
* start to first answer: from launching `tlcli serve` to the first 200 answer of POST /predict
  (process start, imports, model load, bind and one classification; median of 3 launches; target
  < 1.0 s with a model.tflite), beside a fresh `tlcli predict IMG` process (median of 3), the
  floor it shares;
* --clients threads each posting --requests photos (raw bytes to /predict, one image a request,
  keep-alive connections, the photos taken in turn): throughput in images/s, p50 and p99
  latency, and the error count (any answer other than 200; must be 0);
* the baseline: `tlcli predict` over the same photos with the same engine (its own images/s line,
  model loaded, decoding included); target: serve throughput >= 0.8 x predict;
* SIGTERM after the load: the exit code (must be 0) and how long the exit took (must be < 5 s).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import HYMENOPTERA, MOBILENET_V2, REPO, require  # noqa: E402
from bench.deploy import bench_bundle, machine_line  # noqa: E402

# This checkout's tlcli, whatever the venv's console script was installed from.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "400"}


def tlcli_command() -> list[str]:
    return [sys.executable, "-m", "tlcli.cli"]


def predict_rate(bundle: Path, engine: str, files: list[str]) -> float:
    """`tlcli predict`'s own images/s line (stderr) over ``files``."""
    proc = subprocess.run([*tlcli_command(), "predict", *files, "--model", str(bundle), "--engine", engine, "--json"],
                          capture_output=True, text=True, env=ENV)
    m = re.search(r"\(([0-9.]+) images/s", proc.stderr)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"tlcli predict failed: {proc.stderr.strip()[-500:]}")
    return float(m.group(1))


def predict_cold(bundle: Path, engine: str, image: str) -> float:
    """Wall seconds of a fresh `tlcli predict IMAGE` process: the floor a server start shares
    (interpreter start, imports, model load, one image)."""
    start = time.perf_counter()
    subprocess.run([*tlcli_command(), "predict", image, "--model", str(bundle), "--engine", engine, "--json"],
                   capture_output=True, env=ENV, check=True)
    return time.perf_counter() - start


def post(conn: http.client.HTTPConnection, body: bytes) -> int:
    conn.request("POST", "/predict?top_k=1", body=body, headers={"Content-Type": "application/octet-stream"})
    r = conn.getresponse()
    r.read()
    return r.status


def start_server(bundle: Path, engine: str, workers: int | None, first: bytes) -> tuple[subprocess.Popen, int, float]:
    """Launch `tlcli serve --port 0`; return (process, port, seconds from launch to first answer)."""
    extra = ["--workers", str(workers)] if workers else []
    start = time.perf_counter()
    proc = subprocess.Popen([*tlcli_command(), "serve", "--model", str(bundle), "--port", "0", "--engine", engine,
                             *extra], stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stderr.readline()
    m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
    if not m:
        proc.kill()
        raise SystemExit(f"tlcli serve did not start: {line}{proc.stderr.read()[-500:]}")
    port = int(m.group(1))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status = post(conn, first)
    ready = time.perf_counter() - start
    conn.close()
    if status != 200:
        raise SystemExit(f"first answer was HTTP {status}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
    return proc, port, ready


def load(port: int, bodies: list[bytes], clients: int, requests: int) -> tuple[float, list[float], int]:
    """(wall seconds, per-request latencies, errors) of ``clients`` threads x ``requests`` posts."""
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def client(k: int):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine, bad = [], 0
        for i in range(requests):
            t0 = time.perf_counter()
            try:
                ok = post(conn, bodies[(k * requests + i) % len(bodies)]) == 200
            except OSError:
                ok = False
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            mine.append(time.perf_counter() - t0)
            bad += not ok
        conn.close()
        with lock:
            latencies.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies, errors[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a trained bundle (default: train one on hymenoptera)")
    parser.add_argument("--data", type=Path, help="photos to post (default: hymenoptera val)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200, help="requests per client")
    parser.add_argument("--workers", type=int, help="tlcli serve --workers (default: its own)")
    parser.add_argument("--engine", default="tflite", choices=["tf", "tflite"])
    args = parser.parse_args()
    require(*([] if args.model else [HYMENOPTERA, MOBILENET_V2]), *([] if args.data else [HYMENOPTERA]))
    data_dir = args.data or HYMENOPTERA / "val"

    import tlcli
    from tlcli.data.walk import expand

    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="tlcli-serve-") as tmp:
        bundle = bench_bundle(args.model, tmp)
        if args.engine == "tflite" and not (bundle / "model.tflite").exists():
            tlcli.export_tflite(bundle)
        files = [f for f in expand([data_dir]) if Path(f).is_file()]
        bodies = [Path(f).read_bytes() for f in files]
        print(f"{len(files)} photos in {data_dir}; engine {args.engine}", flush=True)

        rate = predict_rate(bundle, args.engine, files)
        cold = statistics.median(predict_cold(bundle, args.engine, files[0]) for _ in range(3))
        starts = []
        for _ in range(2):  # the median of three launches; the third one takes the load
            proc, _, ready = start_server(bundle, args.engine, args.workers, bodies[0])
            starts.append(ready)
            proc.terminate()
            proc.wait()
        proc, port, ready = start_server(bundle, args.engine, args.workers, bodies[0])
        ready = statistics.median([*starts, ready])
        try:
            load(port, bodies[:16], 2, 8)  # warm up every worker's interpreter
            seconds, latencies, errors = load(port, bodies, args.clients, args.requests)
        finally:
            t0 = time.perf_counter()
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed after 10 s"
            exit_s = time.perf_counter() - t0
        total = args.clients * args.requests
        served = (total - errors) / seconds
        q = statistics.quantiles(latencies, n=100)
        print(f"\n{'':<34}{'value':>10}")
        print(f"{'start to first answer (s)':<34}{ready:>10.2f}")
        print(f"{'tlcli predict IMG, cold (s)':<34}{cold:>10.2f}")
        print(f"{'start / predict cold':<34}{ready / cold:>10.2f}")
        print(f"{f'serve, {args.clients} clients x {args.requests} (img/s)':<34}{served:>10.1f}")
        print(f"{'tlcli predict, same photos (img/s)':<34}{rate:>10.1f}")
        print(f"{'serve / predict':<34}{served / rate:>10.2f}")
        print(f"{'latency p50 (ms)':<34}{1000 * q[49]:>10.1f}")
        print(f"{'latency p99 (ms)':<34}{1000 * q[98]:>10.1f}")
        print(f"{'errors':<34}{errors:>10d}")
        print(f"{'SIGTERM: exit code, seconds':<34}{str(code):>6} {exit_s:>3.1f}")
        print(f"\ntargets: start < 1.0 s: {'met' if ready < 1.0 else 'NOT met'} ({ready:.2f} s); "
              f"throughput >= 0.8 x predict: {'met' if served >= 0.8 * rate else 'NOT met'} "
              f"({served / rate:.2f}); errors 0: {'met' if errors == 0 else 'NOT met'} ({errors}); "
              f"exit 0 within 5 s: {'met' if code == 0 and exit_s < 5 else 'NOT met'}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
