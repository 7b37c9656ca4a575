"""tlcli serve against hostile clients: deep JSON, odd top_k values, many tiny images, and clients
that send their headers or body slowly or not at all. Each gets a one-line JSON error in bounded
time, and nothing is logged as a server error."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import socket
import time
from urllib.parse import quote

import pytest
from PIL import Image

from tests.test_serve import call, files, multipart, post_json, running, served_bundle, url  # noqa: F401


@contextlib.contextmanager
def server_errors():
    """The records uvicorn logs at ERROR or above (a traceback of the app) while the block runs."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def assert_one_line_error(status, body, want):
    assert status == want, body
    assert isinstance(body, dict) and isinstance(body["error"], str), body
    assert "\n" not in body["error"] and "Traceback" not in body["error"], body


def tiny_gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (1, 1), 200).save(buf, "GIF")
    return buf.getvalue()


def exchange(base: str, chunks: list[bytes], pause: float = 0.0, limit: float = 6.0) -> tuple[bytes, float]:
    """Send ``chunks`` on one connection, ``pause`` seconds apart, reading what comes meanwhile;
    then read until the server closes the connection or ``limit`` seconds have passed. Returns
    (every byte the server sent, seconds until it closed, or ``limit``)."""
    port = int(base.rsplit(":", 1)[1])
    start, got = time.monotonic(), b""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        for chunk in chunks:
            try:
                s.sendall(chunk)
                s.settimeout(max(pause, 0.01))
                data = s.recv(65536)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:  # the server closed it while we were sending
                return got, time.monotonic() - start
            if not data:
                return got, time.monotonic() - start
            got += data
            if time.monotonic() - start > limit:
                return got, limit
        while time.monotonic() - start < limit:
            s.settimeout(limit - (time.monotonic() - start))
            try:
                data = s.recv(65536)
            except TimeoutError:
                return got, limit
            except OSError:
                break
            if not data:
                break
            got += data
    return got, time.monotonic() - start


def answer(raw: bytes):
    """Status and parsed JSON body of the last HTTP response in ``raw``."""
    head, _, body = raw.rpartition(b"HTTP/1.1 ")[2].partition(b"\r\n\r\n")
    return int(head[:3]), json.loads(body)


# ---- requests that parse, but should not be served ----------------------------------------------

def test_deep_json_and_odd_top_k_get_one_line_errors_and_no_logged_traceback(url, files):  # noqa: F811
    predict = url + "/v1/models/colours:predict"
    jpeg = {"Content-Type": "image/jpeg"}
    deep = [b"[" * 100_000, b'{"instances": ' + b"[" * 50_000, b'{"a": ' * 30_000 + b"1" + b"}" * 30_000,
            b'{"instances": ' + b"[" * 900 + b"0.5" + b"]" * 900 + b"}",
            b'{"signature_name": "serving_bytes", "instances": [' + b"[" * 900 + b"]" * 900 + b"]}"]
    odd = ["²", "٣", "-1", "0", "000", "", "1.5", "+2", " 2", "0x3", "inf", "NaN", "1e3", "2\n", "3\x00"]
    with server_errors() as logged:
        for body in deep:
            status, _, got = call(predict, "POST", body, {"Content-Type": "application/json"})
            assert_one_line_error(status, got, 400)
        for k in odd:
            status, _, got = call(f"{url}/predict?top_k={quote(k)}", "POST", files[0].read_bytes(), jpeg)
            assert_one_line_error(status, got, 400)
            assert got["error"].startswith("top_k=")
        for k in ("9" * 5000, "99999999999", "3"):
            status, _, got = call(f"{url}/predict?top_k={k}", "POST", files[0].read_bytes(), jpeg)
            assert status == 200 and [p["label"] for p in got[0]["predictions"]][0] == "red", got
            assert len(got[0]["predictions"]) == 3  # every label
        status, got = post_json(predict, {"instances": [[[[1e300] * 3] * 32] * 32]})
        assert_one_line_error(status, got, 400)
        for path in ("/v1/models/a%0Ab", "/v1/models/a%00b:predict", "/no%0Awhere"):
            status, _, got = call(url + path, "POST" if path.endswith("predict") else "GET", b"{}")
            assert status in (404, 405)
            assert_one_line_error(status, got, status)
    assert not logged, [r.getMessage() for r in logged]


def test_many_tiny_images_are_refused_over_the_limit_and_classified_a_batch_at_a_time(served_bundle):  # noqa: F811
    from tlcli.deploy.server import make_app

    gif = tiny_gif()
    row = {"b64": base64.b64encode(gif).decode()}
    # the default limits: 8,000 1x1 GIFs in 0.6 MB are refused at once, not decoded into gigabytes
    start = time.monotonic()
    with running(make_app(served_bundle, workers=1)) as base:
        status, got = post_json(base + "/v1/models/colours:predict",
                                {"signature_name": "serving_bytes", "instances": [row] * 8000})
        assert_one_line_error(status, got, 400)
        assert "8000 images in one request, over the limit of 256" in got["error"]
        body, headers = multipart([(f"{i}.gif", gif) for i in range(8000)])
        status, _, got = call(base + "/predict", "POST", body, headers)
        assert_one_line_error(status, got, 400)
    assert time.monotonic() - start < 30

    app = make_app(served_bundle, workers=1, max_images=70)
    model, batches = app.state.model, []
    outputs = model.outputs  # what /predict and the TF Serving endpoints (through classify) all run
    model.outputs = lambda x: batches.append(len(x)) or outputs(x)
    with running(app) as base:
        for n in (70, 71):
            body, headers = multipart([(f"{i}.gif", gif) for i in range(n)])
            uploads = call(base + "/predict", "POST", body, headers)
            rest = post_json(base + "/v1/models/colours:predict",
                             {"signature_name": "serving_bytes", "instances": [row] * n})
            cols = post_json(base + "/v1/models/colours:predict",
                             {"signature_name": "serving_bytes", "inputs": {"image_bytes": [row] * n}})
            if n == 70:
                assert uploads[0] == 200 and len(uploads[-1]) == 70
                assert rest[0] == 200 and len(rest[1]["predictions"]) == 70
                assert cols[0] == 200 and len(cols[1]["outputs"]["labels"]) == 70
            else:
                for status, got in (uploads[::2], rest, cols):
                    assert_one_line_error(status, got, 400)
    assert batches == [32, 32, 6] * 3


# ---- clients that send slowly, or stop -----------------------------------------------------------

@pytest.fixture(scope="module")
def slow_url(served_bundle):  # noqa: F811
    """A server whose headers must come within 0.5 s and bodies within 2 s."""
    from tlcli.deploy.server import make_app

    with running(make_app(served_bundle, workers=1, body_seconds=2.0), header_seconds=0.5) as base:
        yield base


def test_a_client_that_stalls_or_trickles_its_headers_gets_408_and_is_closed(slow_url):
    head = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
    status_line = b"GET /v1/models/colours HTTP/1.1\r\nHost: x\r\n\r\n"
    cases = {
        "silent": ([], 0.0),
        "stops mid-headers": ([head], 0.0),
        "a byte at a time": ([bytes([b]) for b in head + b"X-Pad: " + b"a" * 200], 0.05),
        "stops mid-headers of a second request": ([status_line, b"GET /v1/mod"], 0.3),
    }
    with server_errors() as logged:
        for name, (chunks, pause) in cases.items():
            got, seconds = exchange(slow_url, chunks, pause)
            assert seconds < 3, (name, got)
            if name == "silent":
                assert got == b""  # closed, as an idle kept-alive connection is
                continue
            assert got.count(b"HTTP/1.1 ") == (2 if "second" in name else 1), (name, got)
            status, body = answer(got)
            assert_one_line_error(status, body, 408)
            assert "headers not received within 0.5 s" in body["error"]
    assert not logged, [r.getMessage() for r in logged]


def test_a_body_sent_too_slowly_or_cut_short_gets_408_or_400_in_bounded_time(slow_url, files):  # noqa: F811
    image = files[0].read_bytes()
    form, form_headers = multipart([("a.jpg", image)])
    request = json.dumps({"signature_name": "serving_bytes", "instances": [{"b64": base64.b64encode(image).decode()}]})
    heads = {
        "raw": f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: {len(image)}\r\n\r\n".encode(),
        "chunked": b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        "multipart": (f"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: {form_headers['Content-Type']}\r\n"
                      f"Content-Length: {len(form)}\r\n\r\n").encode(),
        "tf serving": (f"POST /v1/models/colours:predict HTTP/1.1\r\nHost: x\r\n"
                       f"Content-Length: {len(request)}\r\n\r\n").encode(),
    }
    bodies = {"raw": image, "chunked": b"".join(b"1\r\n%c\r\n" % b for b in image), "multipart": form,
              "tf serving": request.encode()}
    with server_errors() as logged:
        for name, head in heads.items():
            trickle = [bodies[name][i:i + 6] for i in range(0, len(bodies[name]), 6)]  # 10 s at 0.05 s each
            got, seconds = exchange(slow_url, [head, *trickle[:200]], 0.05)
            assert seconds < 5, (name, got)
            status, answered = answer(got)
            assert_one_line_error(status, answered, 408)
            assert "body not received within 2 s" in answered["error"]
        # the body slower than the header deadline, within the body's: served
        step = -(-len(image) // 4)
        got, seconds = exchange(slow_url, [heads["raw"], *[image[i:i + step] for i in range(0, len(image), step)]],
                                0.3)
        status, answered = answer(got)
        assert status == 200 and answered[0]["predictions"][0]["label"] == "red", got
        # a client that goes away mid-body: nothing to answer, nothing logged
        exchange(slow_url, [heads["raw"], image[:100]], 0.0, limit=0.2)
        time.sleep(0.3)
    assert not logged, [r.getMessage() for r in logged]
