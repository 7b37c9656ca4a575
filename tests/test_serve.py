"""tlcli serve: TF Serving's REST API, /predict and the page, against a server on a free loopback
port; its answers equal `tlcli predict --json`'s; its error table; no TensorFlow on LiteRT; a
graceful exit on SIGTERM; the page driven in headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import run_cli
from tlcli.data import image_files, images

CHROMIUM = Path("/usr/bin/chromium")
MAX_BODY = 300_000
MAX_PIXELS = 10_000


@pytest.fixture(scope="module")
def served_bundle(trained_bundle, tmp_path_factory):
    """The shared bundle, copied, with a model.tflite (so --engine auto runs LiteRT)."""
    import tlcli

    dst = tmp_path_factory.mktemp("served") / "colours"
    shutil.copytree(trained_bundle, dst)
    tlcli.export_tflite(dst)
    return dst


@contextlib.contextmanager
def running(app, header_seconds: float = 10.0):
    """``app`` served as ``tlcli serve`` serves it, on a free loopback port, in a thread; yields
    the base URL."""
    from tlcli.deploy.receipt import uvicorn_server
    from tlcli.deploy.server import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app, header_seconds=header_seconds, log_level="warning", access_log=False,
                            lifespan="off")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(served_bundle):
    from tlcli.deploy.server import make_app

    with running(make_app(served_bundle, engine="auto", workers=2, max_pixels=MAX_PIXELS,
                          max_body_bytes=MAX_BODY)) as base:
        yield base


def call(url, method="GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, parsed JSON or text) of one request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, head, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, head, raw = e.code, e.headers, e.read()
    if head.get("content-type", "").startswith("application/json"):
        return status, head, json.loads(raw)
    return status, head, raw.decode()


def post_json(url, data) -> tuple[int, dict]:
    status, _, body = call(url, "POST", json.dumps(data).encode(), {"Content-Type": "application/json"})
    return status, body


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, dict]:
    boundary = "tlcli-test-boundary"
    parts = []
    for i, (name, data) in enumerate(files):
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def b64(path) -> dict:
    return {"b64": base64.b64encode(Path(path).read_bytes()).decode()}


@pytest.fixture(scope="module")
def files(colour_data):
    return [colour_data / "red" / "red_0.jpg", colour_data / "green" / "green_1.png",
            colour_data / "blue" / "blue_2.jpg"]


def cli_predictions(files, bundle, engine) -> list[dict]:
    result = run_cli("predict", *files, "--model", bundle, "--engine", engine, "--json", "--top-k", "3")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def assert_same_predictions(got: list[dict], want: list[dict]):
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert [p["probability"] for p in got] == pytest.approx([p["probability"] for p in want], abs=1e-6)


# ---- TF Serving's REST API --------------------------------------------------------------------

def test_status_and_metadata_have_tf_servings_shapes(url):
    expected = {"model_version_status": [{"version": "1", "state": "AVAILABLE",
                                          "status": {"error_code": "OK", "error_message": ""}}]}
    for path in ("/v1/models/colours", "/v1/models/colours/versions/1"):
        status, head, body = call(url + path)
        assert (status, body) == (200, expected)
        assert head["content-type"] == "application/json"
    status, _, meta = call(url + "/v1/models/colours/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "colours", "signature_name": "", "version": "1"}
    defs = meta["metadata"]["signature_def"]["signature_def"]
    assert set(defs) == {"serving_default", "serving_bytes"}
    dims = lambda info: [int(d["size"]) for d in info["tensor_shape"]["dim"]]  # noqa: E731
    assert dims(defs["serving_default"]["inputs"]["images"]) == [-1, 32, 32, 3]
    assert defs["serving_default"]["inputs"]["images"]["dtype"] == "DT_FLOAT"
    assert dims(defs["serving_default"]["outputs"]["probabilities"]) == [-1, 3]
    assert defs["serving_bytes"]["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
    assert set(defs["serving_bytes"]["outputs"]) == {"probabilities", "labels"}


def test_bytes_signature_in_every_request_form_answers_like_tlcli_predict(url, served_bundle, files):
    want = cli_predictions(files, served_bundle, "tflite")
    labels = (served_bundle / "labels.txt").read_text().splitlines()
    forms = [{"instances": [b64(f) for f in files]},
             {"instances": [{"image_bytes": b64(f)} for f in files]},
             {"inputs": {"image_bytes": [b64(f) for f in files]}},
             {"inputs": [b64(f) for f in files]}]
    for form in forms:
        status, body = post_json(url + "/v1/models/colours:predict", {"signature_name": "serving_bytes", **form})
        assert status == 200, body
        if "instances" in form:
            rows = body["predictions"]
            assert all(set(r) == {"probabilities", "labels"} for r in rows)
        else:
            assert set(body) == {"outputs"} and set(body["outputs"]) == {"probabilities", "labels"}
            rows = [{"probabilities": p, "labels": lab}
                    for p, lab in zip(body["outputs"]["probabilities"], body["outputs"]["labels"])]
        assert len(rows) == len(files)
        for row, cli in zip(rows, want):
            assert row["labels"] == labels
            ranked = sorted(zip(row["probabilities"], labels), key=lambda t: -t[0])
            assert_same_predictions([{"label": lab, "probability": p} for p, lab in ranked], cli["predictions"])


def test_default_signature_takes_float_images_row_and_columnar(url, served_bundle, files):
    x = [images.load_for_model(f, 32).tolist() for f in files]
    status, rows = post_json(url + "/v1/models/colours/versions/1:predict", {"instances": x})
    assert status == 200
    status, cols = post_json(url + "/v1/models/colours:predict",
                             {"signature_name": "serving_default", "inputs": {"images": x}})
    assert status == 200
    status, named = post_json(url + "/v1/models/colours:predict", {"instances": [{"images": v} for v in x]})
    assert status == 200
    # One output: TF Serving leaves out its name.
    assert np.asarray(rows["predictions"]).shape == (3, 3)
    assert rows["predictions"] == cols["outputs"] == named["predictions"]
    status, by_bytes = post_json(url + "/v1/models/colours:predict",
                                 {"signature_name": "serving_bytes", "instances": [b64(f) for f in files]})
    assert np.asarray(rows["predictions"]) == pytest.approx(
        np.asarray([r["probabilities"] for r in by_bytes["predictions"]]), abs=1e-6)
    assert np.argmax(rows["predictions"], 1).tolist() == [2, 1, 0]  # red, green, blue in label order


# ---- /predict ---------------------------------------------------------------------------------

def test_predict_endpoint_answers_the_objects_of_tlcli_predict_json(url, served_bundle, files):
    want = cli_predictions(files, served_bundle, "tflite")
    body, headers = multipart([(f.name, f.read_bytes()) for f in files])
    status, head, got = call(url + "/predict?top_k=3", "POST", body, headers)
    assert status == 200
    assert "dur=" in head["server-timing"]
    assert [g["path"] for g in got] == [f.name for f in files]
    for g, w in zip(got, want):
        assert g["error"] is None and set(g) == set(w)
        assert_same_predictions(g["predictions"], w["predictions"])
    status, _, raw = call(url + "/predict?top_k=1&name=red.jpg", "POST", files[0].read_bytes(),
                          {"Content-Type": "image/jpeg"})
    assert status == 200 and raw[0]["path"] == "red.jpg"
    assert_same_predictions(raw[0]["predictions"], want[0]["predictions"][:1])


def test_predict_on_the_tensorflow_engine_equals_tlcli_predict_engine_tf(served_bundle, files):
    from tlcli.deploy.server import make_app

    want = cli_predictions(files, served_bundle, "tf")
    with running(make_app(served_bundle, engine="tf", workers=2)) as base:
        body, headers = multipart([(f.name, f.read_bytes()) for f in files])
        status, _, got = call(base + "/predict", "POST", body, headers)
        _, meta = post_json(base + "/v1/models/colours:predict", {"instances": [[[[0.5] * 3] * 32] * 32]})
    assert status == 200
    for g, w in zip(got, want):
        assert_same_predictions(g["predictions"], w["predictions"])
    assert len(meta["predictions"][0]) == 3


# ---- the error table --------------------------------------------------------------------------

def test_every_client_mistake_gets_its_status_and_a_one_line_json_error(url, tmp_path, files):
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200), (200, 10, 10)).save(big)
    predict = url + "/v1/models/colours:predict"
    jpeg = {"Content-Type": "image/jpeg"}
    cases = [
        (413, call(url + "/predict", "POST", bytes(MAX_BODY + 1), jpeg)),
        (413, post_json(predict, {"signature_name": "serving_bytes",
                                  "instances": [{"b64": "A" * MAX_BODY}]})),
        (400, call(url + "/predict", "POST", b"not a photo\n", jpeg)),
        (400, call(url + "/predict", "POST", big.read_bytes(), jpeg)),
        (400, post_json(predict, {"signature_name": "serving_bytes", "instances": [{"b64": "bm90IGFuIGltYWdl"}]})),
        (400, post_json(predict, {"signature_name": "serving_bytes", "instances": [b64(big)]})),
        (400, post_json(predict, {"signature_name": "serving_bytes", "instances": [{"b64": "%%%"}]})),
        (400, call(predict, "POST", b'{"instances": [1, 2', {"Content-Type": "application/json"})),
        (400, call(predict, "POST", b"\xff\xfe", {"Content-Type": "application/json"})),
        (400, post_json(predict, ["not", "an", "object"])),
        (400, post_json(predict, {"signature_name": "nope", "instances": [1]})),
        (400, post_json(predict, {"instances": [[1, 2, 3]]})),
        (400, post_json(predict, {"instances": []})),
        (400, post_json(predict, {"instances": [1], "inputs": [1]})),
        (400, post_json(predict, {"inputs": {"pixels": [1]}})),
        (400, call(url + "/predict?top_k=zero", "POST", files[0].read_bytes(), jpeg)),
        (404, call(url + "/v1/models/other")),
        (404, call(url + "/v1/models/colours/versions/7")),
        (404, post_json(url + "/v1/models/other:predict", {"instances": [1]})),
        (404, call(url + "/nowhere")),
        (405, call(predict)),
        (405, call(url + "/v1/models/colours", "POST", b"{}")),
        (405, call(url + "/predict")),
        (405, call(url + "/", "DELETE")),
    ]
    for i, (want, got) in enumerate(cases):
        status, body = got[0], got[-1]
        assert status == want, (i, body)
        assert isinstance(body, dict) and isinstance(body["error"], str), (i, body)
        assert "\n" not in body["error"] and "Traceback" not in body["error"], (i, body)
    assert "not an image" in cases[2][1][-1]["error"]
    assert image_files.OVER_PIXEL_LIMIT in cases[3][1][-1]["error"]
    assert "not an image" in cases[4][1][-1]["error"]
    assert image_files.OVER_PIXEL_LIMIT in cases[5][1][-1]["error"]
    assert cases[7][1][-1]["error"].startswith("JSON Parse error")
    assert cases[18][1][-1] == {"error": "Servable not found for request: Latest(other)"}
    assert cases[20][1][1]["allow"] == "POST"


def test_a_multi_file_upload_with_a_bad_file_is_400_with_every_result(url, files):
    body, headers = multipart([(files[0].name, files[0].read_bytes()), ("notes.jpg", b"hello\n")])
    status, _, got = call(url + "/predict", "POST", body, headers)
    assert status == 400
    assert got["error"].startswith("notes.jpg: not an image")
    assert got["results"][0]["predictions"][0]["label"] == "red"
    assert got["results"][1]["predictions"] == []


def test_concurrent_requests_all_succeed(url, files):
    body, headers = multipart([(files[0].name, files[0].read_bytes())])
    out = []

    def client():
        for _ in range(10):
            status, _, got = call(url + "/predict", "POST", body, headers)
            out.append((status, got[0]["predictions"][0]["label"]))

    threads = [threading.Thread(target=client) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == [(200, "red")] * 60


def test_page_has_no_external_assets(url):
    status, head, html = call(url + "/")
    assert status == 200 and head["content-type"].startswith("text/html")
    assert "<script>" in html and "<style>" in html and 'id="files"' in html
    for external in ("src=\"http", "href=\"http", "src='http", "@import", "url(http", "//cdn"):
        assert external not in html
    assert "default-src 'none'" in head["content-security-policy"]
    assert '"colours"' in html


# ---- the process: no TensorFlow, ready line, SIGTERM, --host warning --------------------------

SERVE_SCRIPT = textwrap.dedent("""
    import json, os, signal, sys, threading, urllib.request
    from tlcli.deploy import server
    from tlcli.progress import Info

    def ask(url):
        body = json.dumps({"signature_name": "serving_bytes",
                           "instances": [{"b64": sys.argv[2]}]}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "v1/models/colours:predict", body)) as r:
            answer = json.load(r)
        p = answer["predictions"][0]
        print(json.dumps({"label": p["labels"][p["probabilities"].index(max(p["probabilities"]))],
                          "tensorflow": any(m.split(".")[0] == "tensorflow" for m in sys.modules)}), flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def progress(event):
        if isinstance(event, Info):
            threading.Thread(target=ask, args=(event.message.split(" at ")[1].split()[0],)).start()

    server.serve(sys.argv[1], port=0, engine="auto", progress=progress)
    print("returned", flush=True)
""")


def test_serve_on_litert_never_imports_tensorflow_and_sigterm_returns(served_bundle, files):
    proc = subprocess.run([sys.executable, "-c", SERVE_SCRIPT, str(served_bundle), b64(files[0])["b64"]],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "CI": ""})
    assert proc.returncode == 0, proc.stderr
    first, last = proc.stdout.splitlines()
    assert json.loads(first) == {"label": "red", "tensorflow": False}
    assert last == "returned"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_signal_finishes_the_request_in_flight_and_exits_0(served_bundle, files, sig):
    env = {**os.environ, "COLUMNS": "40", "NO_COLOR": "1"}  # narrow: the URL line must not wrap
    proc = subprocess.Popen([sys.executable, "-c", "from tlcli.cli import run; run()", "serve", "--model",
                             str(served_bundle), "--port", "0", "--workers", "1"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stderr.readline()
        assert "serving colours at http://127.0.0.1:" in line, line
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        body = files[0].read_bytes()
        conn = socket.create_connection(("127.0.0.1", port), timeout=30)
        conn.sendall(f"POST /predict?name=slow.jpg HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        time.sleep(0.3)
        proc.send_signal(sig)  # while the request's body is still coming
        time.sleep(0.3)
        conn.sendall(body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"]"):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        conn.close()
        code = proc.wait(timeout=5)
        rest = proc.stderr.read()
    finally:
        proc.kill()
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])[0]["path"] == "slow.jpg"
    assert code == 0, rest
    assert "Traceback" not in rest and "stopped serving colours after" in " ".join(rest.split()), rest


def test_host_0000_warns_and_a_taken_port_is_one_line(served_bundle):
    taken = socket.socket()
    taken.bind(("0.0.0.0", 0))
    taken.listen()
    try:
        result = run_cli("serve", "--model", served_bundle, "--host", "0.0.0.0", "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert "warning" in lines[0] and "unauthenticated" in lines[0] and "network" in lines[0]
    assert lines[1].startswith("error: --host 0.0.0.0 --port") and "choose another --port" in lines[1]


def test_bad_options_are_one_line_usage_errors(served_bundle):
    for args, word in ((["--workers", "0"], "--workers"), (["--port", "70000"], "--port"),
                       (["--name", "a/b"], "--name")):
        result = run_cli("serve", "--model", served_bundle, *args)
        assert result.exit_code == 2 and word in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---- the page in a real browser ---------------------------------------------------------------

def test_page_in_headless_chromium_shows_the_label_of_an_uploaded_image(url, files, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(url + "/")
            page.set_input_files("#files", str(files[0]))
            page.wait_for_selector(".top-label", timeout=30_000)
            label = page.inner_text(".result .top-label")
            timing = page.inner_text(".result .time")
            page.screenshot(path=str(shot))
        finally:
            browser.close()
    assert label == "red"
    assert timing.endswith("ms") and "model" in timing
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (600, 900)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, bars and the photo, not a blank page


def test_page_shows_a_rejected_file_by_name_and_error_instead_of_a_broken_image(url, tmp_path):
    if not CHROMIUM.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing; CI must run the browser test (.ci/run installs chromium)")
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    (tmp_path / "notes.jpg").write_bytes(b"hello\n")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 600})
            page.goto(url + "/")
            page.set_input_files("#files", str(tmp_path / "notes.jpg"))
            page.wait_for_selector(".result .error", timeout=30_000)
            page.wait_for_selector(".result .missing", timeout=10_000)
            shown = page.eval_on_selector(".result", "e => [e.querySelectorAll('img').length, "
                                          "e.querySelector('.file').textContent, e.querySelector('.error').textContent,"
                                          " e.querySelector('.missing').textContent]")
        finally:
            browser.close()
    assert shown[0] == 0 and shown[1] == "notes.jpg" and shown[3] == "no preview"
    assert shown[2].startswith("notes.jpg: not an image")


def test_floats_are_written_with_tf_servings_digits():
    from tlcli.deploy.tf_serving import tf_serving_float

    shown = [json.dumps(tf_serving_float(np.float32(v))) for v in (0.2, 0.9300001, 1.0, 1e-5, 0.0)]
    assert shown == ["0.2", "0.930000126", "1.0", "1e-05", "0.0"]  # not 0.20000000298023224


def test_a_body_over_the_limit_is_413_also_in_chunks_and_multipart(url, files):
    import http.client

    port = int(url.rsplit(":", 1)[1])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    chunks = (bytes(50_000) for _ in range(MAX_BODY // 50_000 + 2))  # no Content-Length: the limit counts
    conn.request("POST", "/predict", body=chunks, headers={"Content-Type": "image/jpeg"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "over the limit" in json.loads(r.read())["error"]
    conn.close()
    body, headers = multipart([(f"{i}.jpg", files[0].read_bytes() + bytes(40_000)) for i in range(10)])
    assert len(body) > MAX_BODY
    status, _, got = call(url + "/predict", "POST", body, headers)
    assert status == 413 and "over the limit" in got["error"]


def test_name_option_sets_the_model_name_of_the_urls(served_bundle, files):
    from tlcli.deploy.server import make_app

    with running(make_app(served_bundle, name="tlcli", workers=1)) as base:
        assert call(base + "/v1/models/tlcli")[0] == 200
        assert call(base + "/v1/models/colours")[0] == 404
        status, body = post_json(base + "/v1/models/tlcli:predict",
                                 {"signature_name": "serving_bytes", "instances": [b64(files[1])]})
    assert status == 200
    row = body["predictions"][0]
    assert row["labels"][int(np.argmax(row["probabilities"]))] == "green"
