"""The upload page in a real browser: Playwright (sync API) driving Debian's Chromium against `vit-serve`."""
import shutil
from pathlib import Path

import pytest
from PIL import Image

from vit_nbdev.data import CIFAR10_LABELS, load_cifar10
from vit_nbdev.store import open_store

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[1]

def test_upload_page_shows_top5_bars(serve_process, tiny_packages, tmp_path):
    if not CHROMIUM.exists(): pytest.fail(f"{CHROMIUM} is missing: run .ci/setup-extra (apt-get install chromium)")
    from playwright.sync_api import sync_playwright
    store = str(tmp_path / "store")
    open_store(store).register(tiny_packages["a"], "va")
    server = serve_process(store)
    server.wait_ready()
    test = load_cifar10(progress=False).test
    img = tmp_path / "cifar-test-0.png"
    Image.fromarray(test.images[0].permute(1, 2, 0).numpy()).save(img)
    shot = tmp_path / "serve-page.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                                          "--disable-sync", "--no-first-run"])
        try:
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
            assert all(u.startswith(server.url) or u.startswith("blob:") for u in requests), requests   # nothing external
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    (ROOT / "bench" / "results").mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ROOT / "bench" / "results" / "serve-page.png")
    print(f"\nscreenshot: {shot} (copied to bench/results/serve-page.png); page says {label!r}, bars {names}")
