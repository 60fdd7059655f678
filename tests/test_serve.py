"""The service end to end: real `vit-serve` processes on 127.0.0.1 (see `ServeProcess` in conftest.py).

Predictions and their parity with training's preprocessing, every kind of bad upload, admin auth, a
model swap under load, a bounded load test, graceful shutdown flushing telemetry, telemetry to the
GCS emulator through an outage, feedback labels across two instances with kept images, and a fuzzer
over the OpenAPI schema."""

import io, os, random, signal, subprocess, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx, numpy as np, pytest, torch
from PIL import Image, ImageOps

from conftest import ServeProcess
from devtools import wait_for
from vit_nbdev.data import CIFAR10_LABELS, load_cifar10, preprocess
from vit_nbdev.model import forward_features, load_package
from vit_nbdev.telemetry import PredictionIds, decode_kept_image, read_telemetry
from vit_nbdev.store import open_store

TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}


# -- images -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    "The first 64 images of the bundled sample's test split, uint8 (N,3,32,32)."
    return load_cifar10(progress=False).test.images[:64]


def pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray(x.permute(1, 2, 0).numpy())


def enc(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def png(x: torch.Tensor) -> bytes:
    return enc(pil(x))


# -- a served store with three versions ------------------------------------------------------------


@pytest.fixture(scope="module")
def served_store(tiny_packages, tmp_path_factory) -> str:
    "A local store: `va` (alias latest), `vb` (no alias) and `vbroken` (not loadable)."
    uri = str(tmp_path_factory.mktemp("serve-store") / "store")
    st = open_store(uri)
    st.register(tiny_packages["a"], "va", aliases=["latest"])
    st.register(tiny_packages["b"], "vb", aliases=[])
    st.register(tiny_packages["broken"], "vbroken", aliases=[])
    return uri


@pytest.fixture(scope="module")
def server(served_store, tmp_path_factory):
    "One `vit-serve` for the functional tests (admin token set, telemetry flushed every 0.5 s)."
    p = ServeProcess(
        served_store,
        tmp_path_factory.mktemp("serve-logs"),
        {"VIT_ADMIN_TOKEN": TOKEN, "VIT_TELEMETRY_FLUSH_S": "0.5", "VIT_MAX_WAIT_MS": "3"},
    )
    p.wait_ready()
    yield p
    code = p.stop()
    assert code in (0, -signal.SIGTERM), p.log()


def predict(url: str, *blobs: bytes, client=None, **kw) -> httpx.Response:
    files = [("file", (f"img{i}.png", b, "application/octet-stream")) for i, b in enumerate(blobs)]
    return (client or httpx).post(url + "/predict", files=files, timeout=60, **kw)


def scores(answer: dict) -> dict:
    return {t["label"]: t["score"] for t in answer["top_k"]}


def same_answer(a: dict, b: dict, tol=1e-5) -> bool:
    return [t["label"] for t in a["top_k"]] == [t["label"] for t in b["top_k"]] and all(
        abs(x["score"] - y["score"]) <= tol for x, y in zip(a["top_k"], b["top_k"], strict=True)
    )


# -- predictions -------------------------------------------------------------------------------------


def test_predict_matches_training_preprocessing(server, tiny_packages, test_images):
    "Answers have the documented shape, and equal the in-process model on `preprocess` (training's path)."
    r = predict(server.url, *(png(x) for x in test_images[:6]), headers={"X-Request-ID": "my-req-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "my-req-1"
    answers = r.json()
    assert len(answers) == 6
    pkg = load_package(tiny_packages["a"])
    with torch.inference_mode():
        probs = forward_features(pkg.model, preprocess(test_images[:6], pkg.preprocess))[1].softmax(-1)
    for a, p in zip(answers, probs, strict=True):
        assert set(a) == {"label", "score", "top_k", "model_version", "prediction_id", "arm"}
        assert (a["model_version"], a["arm"]) == ("va", "production")  # no canary: production answers
        assert len(a["top_k"]) == 5 and a["label"] == a["top_k"][0]["label"] and a["score"] == a["top_k"][0]["score"]
        assert [t["score"] for t in a["top_k"]] == sorted((t["score"] for t in a["top_k"]), reverse=True)
        assert all(t["label"] in CIFAR10_LABELS for t in a["top_k"])
        top = p.topk(5)
        assert [t["label"] for t in a["top_k"]] == [CIFAR10_LABELS[i] for i in top.indices.tolist()]
        assert np.allclose([t["score"] for t in a["top_k"]], top.values.tolist(), atol=1e-5)
    # one file at a time gives the same answers as several in one request
    assert same_answer(predict(server.url, png(test_images[3])).json()[0], answers[3])


def _exif_jpeg(x: torch.Tensor) -> tuple[bytes, Image.Image]:
    "A JPEG whose pixels are stored rotated, with EXIF orientation 6 ('rotate 90° clockwise to view')."
    upright = pil(x).resize((48, 64), Image.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 6
    return enc(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95), upright


def converted_cases(x: torch.Tensor, y: torch.Tensor) -> dict:
    "name → (upload bytes, PNG of the RGB image the service must see)."
    im = pil(x)
    cases = {
        "grayscale": (enc(im.convert("L")), png_of(im.convert("L").convert("RGB"))),
        "palette": (enc(im.convert("P")), png_of(im.convert("P").convert("RGB"))),
    }
    rgba = im.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(im.size))
    white = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), rgba).convert("RGB")
    cases["rgba"] = (enc(rgba), png_of(white))
    cmyk = enc(im.convert("CMYK"), "JPEG", quality=95)
    cases["cmyk"] = (cmyk, png_of(Image.open(io.BytesIO(cmyk)).convert("RGB")))
    g8 = np.asarray(im.convert("L"))
    cases["16-bit"] = (enc(Image.fromarray(g8.astype(np.uint16) * 257)), png_of(Image.fromarray(g8).convert("RGB")))
    gif = enc(im, "GIF", save_all=True, append_images=[pil(y)], duration=100, loop=0)
    cases["animated-gif"] = (gif, png_of(Image.open(io.BytesIO(gif)).convert("RGB")))
    jpg, _ = _exif_jpeg(x)
    cases["exif-rotated"] = (jpg, png_of(ImageOps.exif_transpose(Image.open(io.BytesIO(jpg))).convert("RGB")))
    return cases


def png_of(im: Image.Image) -> bytes:
    return enc(im)


def test_modes_animations_and_exif_are_converted(server, test_images):
    """Grayscale, palette, RGBA, CMYK, 16-bit, animated GIF, EXIF-rotated JPEG: 200, and the image the service
    sees is the expected RGB one."""
    for name, (upload, expected) in converted_cases(test_images[7], test_images[8]).items():
        r = predict(server.url, upload, expected)
        assert r.status_code == 200, (name, r.text)
        got, want = r.json()
        assert same_answer(got, want), (name, got, want)
    # and the differences are visible: not the second GIF frame, not the unrotated JPEG
    gif = enc(pil(test_images[7]), "GIF", save_all=True, append_images=[pil(test_images[8])], duration=100, loop=0)
    frames = Image.open(io.BytesIO(gif))
    frames.seek(1)
    a, second = predict(server.url, gif, enc(frames.convert("RGB"))).json()
    assert not same_answer(a, second)
    jpg, _ = _exif_jpeg(test_images[7])
    a, raw = predict(server.url, jpg, enc(Image.open(io.BytesIO(jpg)).convert("RGB"))).json()
    assert not same_answer(a, raw)


def _bomb() -> bytes:
    return enc(Image.new("1", (12_000, 12_000)))  # 144 megapixels in ~20 kB


BAD = {
    # name: (parts, expected status, words in the message)
    "not an image": ([b"just some text, not pixels"], 415, "not an image"),
    "empty file": ([b""], 400, "empty"),
    "truncated png": ("trunc-png", 422, "truncated"),
    "truncated jpeg": ("trunc-jpeg", 422, "cannot"),
    "corrupt png": ("corrupt-png", None, ""),
    "over the size limit": ("big", 413, "larger than the limit"),
    "decompression bomb": ("bomb", 413, "megapixels"),
    "too many files": ("many", 413, "too many files"),
}


def _parts(kind, x):
    if not isinstance(kind, str):
        return kind
    good = png(x)
    return {
        "trunc-png": lambda: [good[: len(good) - 60]],
        "trunc-jpeg": lambda: [enc(pil(x).resize((96, 96)), "JPEG")[:600]],
        "corrupt-png": lambda: [good[:40] + bytes(random.Random(0).randrange(256) for _ in range(500))],
        "big": lambda: [good + os.urandom(11 * 2**20)],
        "bomb": lambda: [_bomb()],
        "many": lambda: [good] * 17,
    }[kind]()


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_a_4xx_with_a_message(server, test_images, case):
    kind, status, words = BAD[case]
    r = predict(server.url, *_parts(kind, test_images[0]))
    assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
    if status:
        assert r.status_code == status, (case, r.status_code, r.text)
    detail = r.json()["detail"]
    assert isinstance(detail, str) and words in detail, (case, detail)


def test_malformed_requests_are_4xx(server, test_images):
    u = server.url + "/predict"
    r = httpx.post(u, json={"file": "cat.png"})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = httpx.post(u, files=[("image", ("a.png", png(test_images[0]), "image/png"))])
    assert r.status_code == 422 and "'file'" in r.json()["detail"]
    r = httpx.post(u, content=b"--xyz\r\nnonsense", headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert 400 <= r.status_code < 500, r.text
    r = httpx.post(u, content=b"x", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 400 and "boundary" in r.json()["detail"]
    # a good file after a bad one: the bad one is named, nothing is classified
    r = predict(server.url, png(test_images[0]), b"GIF89a broken")
    assert r.status_code in (415, 422) and r.json()["detail"].startswith("file 2")


def test_the_process_survived_all_that(server, test_images):
    assert server.proc.poll() is None
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert predict(server.url, png(test_images[0])).status_code == 200
    assert server.metric("vit_http_requests_total", route="/predict", status="500") == 0


# -- pages, metrics, admin ----------------------------------------------------------------------------


def test_pages_docs_and_metrics(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert (
        "<script>" in page.text and "http://" not in page.text and "https://" not in page.text
    )  # no CDN, nothing external
    mon = httpx.get(server.url + "/monitoring")
    assert mon.status_code == 200 and "No drift report yet" in mon.text and "/admin/update-monitoring" in mon.text
    spec = httpx.get(server.url + "/openapi.json").json()
    assert {
        "/",
        "/predict",
        "/healthz",
        "/readyz",
        "/metrics",
        "/monitoring",
        "/admin/update-model",
        "/admin/update-reference-data",
        "/admin/update-monitoring",
        "/feedback",
        "/feedback/form",
    } <= set(spec["paths"])
    assert "Live accuracy (labelled predictions)" in mon.text
    ok = spec["paths"]["/predict"]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok["items"]["$ref"].endswith("/Prediction")
    ready = httpx.get(server.url + "/readyz").json()
    assert {k: ready[k] for k in ("ready", "model_version", "detail")} == {
        "ready": True,
        "model_version": "va",
        "detail": None,
    }
    assert (ready["engine"]["name"], ready["engine"]["selected_by"]) == ("torch-fp32", "VIT_ENGINE")  # conftest pins it
    m = httpx.get(server.url + "/metrics").text
    for name in (
        "vit_http_requests_total",
        "vit_http_request_duration_seconds_bucket",
        "vit_batch_size_bucket",
        "vit_queue_depth",
        'vit_model_info{version="va"} 1.0',
        "vit_telemetry_records_written_total",
        "vit_telemetry_records_dropped_total",
        "vit_drift_score",
        "vit_drift_detected",
        'vit_feedback_rejected_total{reason="too_large"}',
        "vit_feedback_without_image_total",
        "vit_feedback_records_written_total",
        'vit_arm_requests_total{arm="production",result="ok"}',
        "vit_canary_loaded 0.0",
    ):
        assert name in m, name
    assert server.metric("vit_batch_size_count") > 0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": TOKEN},
        {"Authorization": f"Bearer {TOKEN}x"},
        {"Authorization": "Bearer é".encode()},
    ],
)
def test_admin_refuses_without_the_token(server, headers):
    for path in ("/admin/update-model", "/admin/update-reference-data", "/admin/update-monitoring"):
        r = httpx.post(server.url + path, json={"version": "vb"}, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (path, r.text)
    assert httpx.get(server.url + "/readyz").json()["model_version"] == "va"  # nothing happened


def test_admin_with_the_token(server):
    r = httpx.post(server.url + "/admin/update-model", headers=ADMIN)  # no body: re-resolve VIT_MODEL (latest = va)
    assert r.status_code == 200 and r.json()["changed"] is False
    for body, status in [
        ({"version": "nope"}, 404),
        ({"version": "vbroken"}, 422),
        ({"version": 3}, 422),
        ({"x": 1}, 422),
    ]:
        r = httpx.post(server.url + "/admin/update-model", json=body, headers=ADMIN)
        assert r.status_code == status, (body, r.text)
    r = httpx.post(
        server.url + "/admin/update-model", content=b"{not json", headers={**ADMIN, "content-type": "application/json"}
    )
    assert r.status_code == 422
    assert httpx.get(server.url + "/readyz").json()["model_version"] == "va"


# -- swap under load, load test -------------------------------------------------------------------------


def hammer(url: str, blobs: list[bytes], clients: int, until: threading.Event | float, files_per_request=lambda i: 1):
    "`clients` threads post to /predict until `until` (an event or a duration): [(status, [versions], seconds)] each."
    stop = until if isinstance(until, threading.Event) else None
    end = None if stop else time.monotonic() + until

    def client(c):
        out, i = [], 0
        with httpx.Client(timeout=120) as h:
            while not (stop.is_set() if stop else time.monotonic() > end):
                n = files_per_request(i)
                t0 = time.perf_counter()
                try:
                    r = predict(url, *(blobs[(c * 7 + i + k) % len(blobs)] for k in range(n)), client=h)
                    out.append(
                        (
                            r.status_code,
                            [a["model_version"] for a in r.json()] if r.status_code == 200 else r.text,
                            time.perf_counter() - t0,
                        )
                    )
                except httpx.TransportError as e:
                    out.append(("transport", repr(e), time.perf_counter() - t0))
                i += 1
        return out

    with ThreadPoolExecutor(clients) as ex:
        return list(ex.map(client, range(clients)))


def test_swap_under_load_loses_nothing(server, served_store, test_images):
    blobs = [png(x) for x in test_images[:16]]
    stop = threading.Event()
    with ThreadPoolExecutor(1) as ex:
        load = ex.submit(hammer, server.url, blobs, 8, stop, lambda i: 1 + i % 2)
        before = server.metric("vit_predictions_total", version="va")
        wait_for(
            lambda: server.metric("vit_predictions_total", version="va") >= before + 32, 120, "the load to be on"
        )  # the load is on
        bad = httpx.post(server.url + "/admin/update-model", json={"version": "vbroken"}, headers=ADMIN, timeout=120)
        assert bad.status_code == 422 and "still serving va" in bad.json()["detail"]
        r = httpx.post(
            server.url + "/admin/update-model", json={"version": "vb"}, headers=ADMIN, timeout=120
        )  # moves latest too
        assert r.status_code == 200 and r.json() | {"load_seconds": 0} == {
            "version": "vb",
            "previous": "va",
            "changed": True,
            "load_seconds": 0,
            "alias": "latest",
        }
        wait_for(
            lambda: server.metric("vit_predictions_total", version="vb") >= 32, 120, "answers from vb"
        )  # and goes on, on vb
        stop.set()
        per_client = load.result()
    flat = [x for c in per_client for x in c]
    assert all(s == 200 for s, _, _ in flat), [x for x in flat if x[0] != 200][:5]
    assert {v for c in per_client for _, vs, _ in c for v in vs} == {"va", "vb"}
    for c in per_client:  # each client sees va, then vb, never back
        versions = [v for _, vs, _ in c for v in vs]
        assert versions == sorted(versions), versions
        assert all(len(set(vs)) == 1 for _, vs, _ in c)  # a request's images are answered by one model
    assert server.metric("vit_model_info", version="vb") == 1 and server.metric("vit_model_info", version="va") == 0
    print(f"\nswap under load: {len(flat)} requests, all 200")
    assert open_store(served_store).resolve("latest") == "vb"
    r = httpx.post(
        server.url + "/admin/update-model", json={"version": "va"}, headers=ADMIN, timeout=120
    )  # latest back to va
    assert r.json()["version"] == "va" and r.json()["changed"] and open_store(served_store).resolve("latest") == "va"


def test_load_16_clients(server, served_store, test_images):
    "16 concurrent clients for 20 s: no errors; every prediction becomes a telemetry record."
    seconds = float(os.environ.get("VIT_LOAD_TEST_SECONDS", 20))
    before = server.metric("vit_predictions_total")
    t0 = time.perf_counter()
    per_client = hammer(server.url, [png(x) for x in test_images], 16, seconds)
    wall = time.perf_counter() - t0
    flat = [x for c in per_client for x in c]
    errors = [x for x in flat if x[0] != 200]
    lat = np.array([x[2] for x in flat])
    assert not errors, errors[:5]
    assert server.metric("vit_predictions_total") - before == len(flat)
    deadline = time.monotonic() + 30
    while server.metric("vit_telemetry_buffered_records") > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    written, predicted = server.metric("vit_telemetry_records_written_total"), server.metric("vit_predictions_total")
    records = len(read_telemetry(served_store))
    assert written == predicted == records and server.metric("vit_telemetry_records_dropped_total") == 0
    print(
        f"\nload test: 16 clients × {wall:.0f} s: {len(flat)} requests, 0 errors, {len(flat) / wall:.0f} req/s, "
        f"p50 {np.percentile(lat, 50) * 1e3:.0f} ms, p99 {np.percentile(lat, 99) * 1e3:.0f} ms; "
        f"telemetry records in the store: {records} (= predictions served by this process)"
    )


# -- fuzzing ------------------------------------------------------------------------------------------


def test_monitoring_end_to_end(server, served_store, test_images):
    """predictions -> telemetry -> /admin/update-reference-data, /admin/update-monitoring -> /monitoring shows the
    report, /metrics the score. On the module's server (serving va): no test before this one builds a report."""
    p, store = server, served_store
    before, predicted = httpx.get(p.url + "/monitoring").text, p.metric("vit_predictions_total")
    assert "No drift report yet" in before and p.metric("vit_drift_detected") == -1
    blobs = [png(x) for x in test_images[:40]]
    for i in range(0, 120, 8):
        assert (
            httpx.post(
                p.url + "/predict",
                files=[("file", (f"{j}.png", blobs[j % 40], "image/png")) for j in range(i, i + 8)],
                timeout=30,
            ).status_code
            == 200
        )
    t = time.time()
    while p.metric("vit_telemetry_records_written_total") < predicted + 120:  # every record, ours the last
        assert time.time() - t < 30
        time.sleep(0.2)
    r = httpx.post(p.url + "/admin/update-reference-data", headers=ADMIN, timeout=120)
    assert r.status_code == 200 and r.json()["version"] == "va" and r.json()["records"] == 500, r.text
    r = httpx.post(p.url + "/admin/update-monitoring", headers=ADMIN, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "building", r.text
    t = time.time()
    while p.metric("vit_drift_detected") == -1:
        assert time.time() - t < 180, p.log()[-3000:]
        time.sleep(0.5)
    page = httpx.get(p.url + "/monitoring").text
    from vit_nbdev.monitor import latest_report

    html, summary = latest_report(open_store(store))
    body = html.find("<body>") + 6  # the live accuracy goes on top of the report
    assert (
        page != before
        and page.startswith(html[:body])
        and page.endswith(html[body:])
        and "Live accuracy" in page[: page.find("</section>")]
    )
    assert summary["status"] == "ok" and summary["n_current"] >= 100
    assert 0 <= p.metric("vit_drift_score") <= 1 and p.metric("vit_drift_detected") in (0, 1)
    st = open_store(store)
    assert any(k.endswith(".json") for k in st.list("reports/")) and st.exists("models/va/reference.parquet")


def test_schemathesis_finds_no_server_error(server, tmp_path):
    "schemathesis over /openapi.json (examples, coverage, fuzzing): no 5xx, without and with the admin token."
    st = Path(sys.executable).parent / "schemathesis"
    common = [
        str(st),
        "run",
        server.url + "/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "15",
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--workers",
        "2",
        "--no-color",
        "--max-time",
        "30",
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        "30",
    ]
    runs = {
        "anonymous": [],
        "admin": [
            "-H",
            f"Authorization: Bearer {TOKEN}",  # the monitoring actions are covered by their own test
            "--exclude-path-regex",
            "update-(reference-data|monitoring)",
        ],
    }
    for name, extra in runs.items():
        p = subprocess.run(common + extra, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert p.returncode == 0, f"{name}:\n{p.stdout[-6000:]}\n{p.stderr[-2000:]}"
    assert server.metric("vit_http_requests_total", status="500") == 0
    assert httpx.get(server.url + "/readyz").json()["model_version"] == "va"


# -- shutdown, queue bound ------------------------------------------------------------------------------


def test_sigterm_flushes_telemetry_records_equal_predictions(serve_process, tiny_packages, tmp_path, test_images):
    "Under load, SIGTERM: requests in flight finish, then every successful prediction is on disk; no token ⇒ admin 503."
    store = str(tmp_path / "store")
    open_store(store).register(tiny_packages["a"], "va")
    p = serve_process(
        store, VIT_TELEMETRY_FLUSH_S=3600, VIT_TELEMETRY_FLUSH_RECORDS=100_000
    )  # nothing written before shutdown
    p.wait_ready()
    for path in ("/admin/update-model", "/admin/update-monitoring"):
        r = httpx.post(p.url + path, json={"version": "va"}, headers={"Authorization": "Bearer anything"})
        assert r.status_code == 503 and "VIT_ADMIN_TOKEN" in r.json()["detail"]
    with ThreadPoolExecutor(1) as ex:
        load = ex.submit(hammer, p.url, [png(x) for x in test_images[:16]], 6, 4.0, lambda i: 1 + i % 3)
        time.sleep(2.5)
        assert p.metric("vit_telemetry_records_written_total") == 0
        p.proc.send_signal(signal.SIGTERM)
        per_client = load.result()
    code = p.proc.wait(60)
    assert code in (0, -signal.SIGTERM), p.log()
    flat = [x for c in per_client for x in c]
    ok = sum(len(vs) for s, vs, _ in flat if s == 200)
    assert ok > 0 and all(s in (200, "transport") for s, _, _ in flat), [
        x for x in flat if x[0] not in (200, "transport")
    ][:3]
    df = read_telemetry(store, "va")
    assert len(df) == ok, (len(df), ok, p.log())
    assert not df.duplicated(["request_id", "item"]).any()
    assert set(df.columns) >= {
        "time",
        "request_id",
        "model_version",
        "label",
        "score",
        "top_k",
        "embedding",
        "width",
        "height",
    }
    assert len(df.embedding[0]) == 128 and df.width[0] == 32 and (df.model_version == "va").all()
    print(f"\nSIGTERM under load: {ok} images answered 200, {len(df)} telemetry records on disk")


# -- feedback ---------------------------------------------------------------------------------------------


def test_feedback_across_two_instances_with_kept_images(serve_process, tiny_packages, tmp_path, test_images):
    """predict -> POST /feedback on the same or another instance (shared VIT_FEEDBACK_KEY) -> every accepted label
    in the store after SIGTERM, none of the refused; images kept (or not) in telemetry."""
    store, key = str(tmp_path / "store"), "feedback-key-shared-by-the-fleet"
    open_store(store).register(tiny_packages["a"], "va")
    a = serve_process(store, VIT_FEEDBACK_KEY=key, VIT_TELEMETRY_FLUSH_S=3600)  # writes nothing before its shutdown
    b = serve_process(store, VIT_FEEDBACK_KEY=key, VIT_TELEMETRY_FLUSH_S=0.5, VIT_KEEP_IMAGES=0)
    for p in (a, b):
        p.wait_ready()
    uploads = [png(x) for x in test_images[:3]]
    on_a, [on_b] = predict(a.url, *uploads).json(), predict(b.url, uploads[0]).json()
    fb = lambda p, body, **kw: httpx.post(
        p.url + "/feedback", timeout=30, **({"content": body} if isinstance(body, bytes) else {"json": body}), **kw
    )
    item = lambda ans, label: {"prediction_id": ans["prediction_id"], "label": label}

    r = fb(a, item(on_a[0], "cat"))  # single
    assert (r.status_code, r.json()) == (200, {"accepted": 1, "excluded_from_training": 0}), r.text
    r = fb(
        b, [item(on_a[1], "dog"), item(on_a[2], on_a[2]["label"]), item(on_b, "ship")]
    )  # a list, two made by the other instance
    assert (r.status_code, r.json()) == (200, {"accepted": 3, "excluded_from_training": 1}), r.text
    r = fb(a, item(on_b, "frog"))  # b kept no image
    assert r.json() == {"accepted": 1, "excluded_from_training": 1}
    page = httpx.post(a.url + "/feedback/form", data=item(on_a[0], "bird"), timeout=30)  # the page without JavaScript
    assert page.status_code == 200 and "Thanks! Your label is recorded." in page.text
    accepted = 6

    expired = PredictionIds.from_settings(key).new("va", 3, True, t=datetime.now(UTC) - timedelta(days=8))
    payload, mac = on_a[0]["prediction_id"].rsplit(".", 1)
    forged = payload[:-1] + "0." + mac  # "image not kept", with the MAC of "kept"
    other_key = PredictionIds.from_settings("another fleet's key").new("va", 3, True)
    bad = [
        (item(on_a[0], "kitten"), 422, "airplane, automobile, bird, cat"),
        ({"prediction_id": expired, "label": "cat"}, 404, "has expired"),
        ({"prediction_id": forged, "label": "cat"}, 404, forged[:40]),
        ({"prediction_id": other_key, "label": "cat"}, 404, "is unknown"),
        (
            [item(on_a[1], "cat"), item(on_a[2], "kitten")],
            422,
            "item 2: unknown label 'kitten'",
        ),  # all or nothing: the good one is not kept
        ([item(on_a[1], "cat"), {"prediction_id": "nope", "label": "cat"}], 404, "item 2: prediction id 'nope'"),
        (b"{not json", 422, "not JSON"),
        ({"label": "cat"}, 422, "expected JSON"),
        ([], 422, "a list of 0"),
        ([item(on_a[1], "cat")] * 1001, 422, "a list of 1001"),
        (b" " * (2**20 + 1), 413, "1 MiB"),
    ]
    for body, status, words in bad:
        r = fb(a, body)
        assert r.status_code == status and words in r.json()["detail"], (
            body if not isinstance(body, bytes) else body[:20],
            r.status_code,
            r.text[:300],
        )
    assert httpx.post(a.url + "/feedback/form", data={"prediction_id": "nope", "label": "cat"}).status_code == 404

    assert (
        a.metric("vit_feedback_total", model_version="va") == 3
        and b.metric("vit_feedback_total", model_version="va") == 3
    )
    assert (
        a.metric("vit_feedback_total", correct="true") + b.metric("vit_feedback_total", correct="true") >= 1
    )  # on_a[2] was confirmed
    assert a.metric("vit_feedback_without_image_total") == 1 and b.metric("vit_feedback_without_image_total") == 1
    for reason, n in [("unknown_label", 2), ("unknown_id", 5), ("invalid", 4), ("too_large", 1)]:
        assert a.metric("vit_feedback_rejected_total", reason=reason) == n, reason
    wait_for(lambda: b.metric("vit_feedback_records_written_total") == 3, what="b to write its labels")
    mon = httpx.get(b.url + "/monitoring").text  # b's labels are in the store: its page counts them
    live = mon[mon.index("Live accuracy") : mon.index("</section>")]
    assert "<code>va</code>" in live and '<td style="padding:2px 12px;text-align:right">3</td>' in live, live

    for p in (a, b):
        assert p.stop() in (0, -signal.SIGTERM), p.log()
    got = read_telemetry(store, "va", kind="feedback")
    assert len(got) == accepted and set(got.source) == {"api", "page"}, got  # none lost, none of the refused
    assert set(got.prediction_id) == {x["prediction_id"] for x in [*on_a, on_b]}
    assert list(got[got.prediction_id == on_b["prediction_id"]].image_kept) == [False, False]
    tel = read_telemetry(store, "va").set_index("prediction_id")
    assert len(tel) == 4 and tel.image[on_b["prediction_id"]] is None
    for ans, x in zip(on_a, test_images[:3], strict=True):  # the image as the model saw it: the upload, 32×32
        assert (decode_kept_image(tel.image[ans["prediction_id"]]) == x.permute(1, 2, 0).numpy()).all()


def test_full_queue_answers_503_with_retry_after(serve_process, tiny_packages, tmp_path, test_images):
    store = str(tmp_path / "store")
    open_store(store).register(tiny_packages["a"], "va")
    p = serve_process(store, VIT_QUEUE_SIZE=4, VIT_MAX_BATCH=4, VIT_MAX_FILES=16, VIT_TELEMETRY=0)
    p.wait_ready()
    r = predict(p.url, *[png(test_images[0])] * 5)  # more images than the queue holds
    assert r.status_code == 503 and r.headers["retry-after"] == "1" and "busy" in r.json()["detail"]
    per_client = hammer(p.url, [png(x) for x in test_images[:8]], 12, 2.0, lambda i: 3)
    statuses = {s for c in per_client for s, _, _ in c}
    assert statuses <= {200, 503} and 200 in statuses, statuses
    assert p.metric("vit_queue_rejections_total") >= 1


# -- GCS ------------------------------------------------------------------------------------------------


def test_telemetry_to_gcs_survives_outages(serve_process, gcs_emulator, gcs_uri, tiny_packages, test_images):
    """Telemetry shards land in the emulator; paused or stopped, predictions go on at full speed, records are
    retried or dropped (counted), and resume after."""
    open_store(gcs_uri).register(tiny_packages["a"], "va")
    p = serve_process(
        gcs_uri,
        STORAGE_EMULATOR_HOST=gcs_emulator.host,
        VIT_TELEMETRY_FLUSH_S=0.3,
        VIT_TELEMETRY_FLUSH_RECORDS=8,
        VIT_TELEMETRY_MAX_BUFFER=30,
        VIT_TELEMETRY_TIMEOUT_S=1,
    )
    p.wait_ready()
    blobs = [png(x) for x in test_images[:16]]
    count = lambda: len(read_telemetry(open_store(gcs_uri), "va"))

    def run(n, tag):
        lat = []
        with httpx.Client(timeout=30) as h:
            for i in range(n):
                t0 = time.perf_counter()
                r = predict(p.url, blobs[i % 16], client=h, headers={"X-Request-ID": f"{tag}-{i}"})
                lat.append(time.perf_counter() - t0)
                assert r.status_code == 200, r.text
        return max(lat)

    run(10, "before")
    wait_for(lambda: count() == 10, what="10 records in GCS")
    with gcs_emulator.paused():  # connections hang
        slowest = run(50, "paused")
        wait_for(lambda: p.metric("vit_telemetry_write_failures_total") > 0, what="a failed write")
        assert p.metric("vit_telemetry_records_dropped_total") > 0  # 50 records > a buffer of 30
    assert slowest < 2.0, f"a prediction took {slowest:.1f} s while GCS hung"
    run(10, "after")
    wait_for(lambda: p.metric("vit_telemetry_buffered_records") == 0, what="the buffer to drain")
    df = read_telemetry(open_store(gcs_uri), "va")
    ids = set(df.request_id)
    assert {f"after-{i}" for i in range(10)} <= ids and {f"before-{i}" for i in range(10)} <= ids
    written, dropped = p.metric("vit_telemetry_records_written_total"), p.metric("vit_telemetry_records_dropped_total")
    assert written == len(df) and written + dropped == 70, (written, dropped, len(df))
    print(
        f"\nGCS paused: {int(dropped)} records dropped, "
        f"{int(p.metric('vit_telemetry_write_failures_total'))} failed writes, "
        f"slowest prediction {slowest * 1e3:.0f} ms"
    )

    with gcs_emulator.down():  # connection refused; the restarted emulator is empty
        slowest = run(20, "down")
        wait_for(lambda: p.metric("vit_telemetry_write_failures_total") > 2, what="failed writes while down")
    assert slowest < 2.0
    run(5, "back")
    wait_for(
        lambda: p.metric("vit_telemetry_buffered_records") == 0, timeout=40, what="the buffer to drain after a restart"
    )
    ids = set(read_telemetry(open_store(gcs_uri), "va").request_id)
    assert {f"back-{i}" for i in range(5)} <= ids
    assert p.proc.poll() is None and httpx.get(p.url + "/readyz").status_code == 200
