"""The upload page in a real browser: Playwright (sync API) driving Debian's Chromium against `vit-serve`, with and
without JavaScript: classify an image, then correct the answer with one click (the label reaches the store). One
server and one browser serve both pages (a server start is the costly part)."""

import signal

from devtools import launch_chromium, require_chromium
from PIL import Image

from vit_nbdev.data import CIFAR10_LABELS, load_cifar10
from vit_nbdev.store import open_store
from vit_nbdev.telemetry import read_telemetry


def with_javascript(browser, server, img, shot) -> tuple[str, list[str], str]:
    "The page with JavaScript: the top-5 bars, a one-click correction, /docs offline; (label, names, the correction)."
    page = browser.new_page(viewport={"width": 900, "height": 640})
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('version').textContent === 'va'")
    page.set_input_files("#file", str(img))
    page.wait_for_selector("#out[data-done='1']", timeout=30_000)
    label = page.inner_text("#label")
    names = page.locator(".row .name").all_inner_texts()
    widths = page.locator(".bar > span").evaluate_all("els => els.map(e => e.getBoundingClientRect().width)")
    assert page.inner_text("#error") == ""
    assert any(label.lower().startswith(c) for c in CIFAR10_LABELS), label
    assert len(names) == 5 and all(n.lower() in CIFAR10_LABELS for n in names), names
    assert len(widths) == 5 and all(w > 0 for w in widths) and widths == sorted(widths, reverse=True), widths
    assert page.locator("#preview").evaluate("e => e.complete && e.naturalWidth") == 32
    assert all(u.startswith(server.url) or u.startswith("blob:") for u in requests), requests  # nothing external
    buttons = page.locator("#fb button")
    assert (
        buttons.count() == 10 and page.locator("#fb button.yes").get_attribute("value") == label.split(" ")[0].lower()
    )
    wrong = page.locator("#fb button:not(.yes)").first  # "Wrong? It is a …": one click
    truth = wrong.get_attribute("value")
    wrong.click()
    page.wait_for_function("document.getElementById('thanks').textContent.startsWith('Thanks')", timeout=30_000)
    assert page.locator("#fb button.sent").get_attribute("value") == truth and page.inner_text("#error") == ""
    assert server.metric("vit_feedback_total", model_version="va", correct="false") == 1
    page.screenshot(path=str(shot), full_page=True)

    docs = browser.new_page()  # /docs: Swagger UI with its assets from the app (works offline)
    docs_requests = []
    docs.on("request", lambda r: docs_requests.append(r.url))
    docs.goto(server.url + "/docs")
    docs.wait_for_selector(".opblock-summary-path >> text=/predict", timeout=30_000)
    assert all(u.startswith(server.url) or u.startswith("data:") for u in docs_requests), docs_requests
    return label, names, truth


def without_javascript(browser, server, img, shot) -> str:
    "The page as a plain HTML form: choose a file, press Classify, the answer comes back as a page; the correction."
    page = browser.new_context(java_script_enabled=False).new_page()
    page.goto(server.url + "/")
    assert page.is_visible("#file") and page.is_visible("#submit")
    page.set_input_files("#file", str(img))
    with page.expect_navigation():
        page.click("#submit")
    label = page.inner_text("#label")
    assert any(label.lower().startswith(c) for c in CIFAR10_LABELS), label
    assert len(page.locator(".row .name").all_inner_texts()) == 5
    assert page.locator("#preview").evaluate("e => e.complete && e.naturalWidth") == 32  # the upload shown back
    assert page.inner_text("#version") == "va"
    page.screenshot(path=str(shot), full_page=True)
    truth = page.locator("#fb button:not(.yes)").first.get_attribute("value")
    with page.expect_navigation():
        page.locator("#fb button:not(.yes)").first.click()  # the correction, as a plain form
    assert page.inner_text("#thanks") == "Thanks! Your label is recorded." and page.inner_text("#error") == ""
    return truth


def test_upload_page_with_and_without_javascript(serve_process, tiny_packages, tmp_path):
    "Both pages on one server: each correction is one label in the store (flushed at shutdown), with its source."
    require_chromium()
    from playwright.sync_api import sync_playwright

    store = str(tmp_path / "store")
    open_store(store).register(tiny_packages["a"], "va")
    server = serve_process(store)
    server.wait_ready()
    test = load_cifar10(progress=False).test
    imgs = [tmp_path / f"cifar-test-{i}.png" for i in (0, 1)]
    for i, img in enumerate(imgs):
        Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).save(img)
    shot = tmp_path / "serve-page.png"
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            label, names, by_click = with_javascript(browser, server, imgs[0], shot)
            by_form = without_javascript(browser, server, imgs[1], tmp_path / "no-js.png")
        finally:
            browser.close()
    assert server.stop() in (0, -signal.SIGTERM), server.log()
    got = read_telemetry(store, kind="feedback").sort_values("source").to_dict("records")  # flushed at shutdown
    assert [(fb["label"], fb["correct"], fb["source"]) for fb in got] == [
        (by_click, False, "api"),
        (by_form, False, "page"),
    ], got
    assert got[0]["image_kept"], got[0]
    print(f"\nscreenshot: {shot}; page says {label!r}, bars {names}; corrected to {by_click!r}")
