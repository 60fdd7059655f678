"""The documentation, read in a browser: `tools/docs_preview.py` renders every chapter of nbs/sidebar.yml
from nbdev's processed notebooks (the published site is built from the same by Quarto, which cannot
run here), and Chromium (Playwright, as in test_serve_browser.py) opens each page and checks its
title, its `show_doc` sections, its images, that it shows outputs (at least one besides the `show_doc`
sections: the chapters are committed with their outputs, written by tools/run_chapters.py), that no cell
shows an error, and that no local link is broken."""

import json, os, re, subprocess, sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import yaml
from devtools import launch_chromium, require_chromium

ROOT = Path(__file__).resolve().parents[1]


def sidebar_notebooks() -> list[str]:
    "The notebooks of nbs/sidebar.yml in order (read now: chapters are added and renamed), sections flattened."

    def walk(items):
        for it in items or []:
            if isinstance(it, str):
                yield it
            elif isinstance(it, dict) and "contents" in it:
                yield from walk(it["contents"])
            elif isinstance(it, dict) and "href" in it:
                yield it["href"]

    doc = yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())
    return [p for p in walk(doc["website"]["sidebar"]["contents"]) if p.endswith(".ipynb")]


def expected(proc_nb: Path) -> dict:
    "What the page of processed notebook `proc_nb` must show: title, show_doc headings, images, cells with outputs."
    text = lambda s: "".join(s) if isinstance(s, list) else s
    cells = [
        {**c, "source": text(c["source"])} for c in json.loads(proc_nb.read_text())["cells"]
    ]  # nbdev adds keys nbformat rejects
    raw = next(
        (c["source"] for c in cells if c["cell_type"] == "raw" and c["source"].lstrip().startswith("---")), "---\n---"
    )
    title = str((yaml.safe_load(raw.strip().strip("-")) or {}).get("title") or proc_nb.stem)
    show_docs, images, outputs, own_outputs = [], 0, 0, 0
    for c in cells:
        if c["cell_type"] == "markdown":
            images += len(re.findall(r"!\[[^\]]*\]\(|<img\s", c["source"]))
        if c["cell_type"] != "code":
            continue
        hidden = re.search(r"(?m)^#\|\s*(include|output)\s*:\s*false", c["source"])
        if not hidden:
            images += sum(any(k.startswith("image/") for k in o.get("data", {})) for o in c["outputs"])
        shown = not hidden and any(o.get("name") != "stderr" for o in c["outputs"])  # a warning alone: not a result
        if re.search(r"(?m)^show_doc\(", c["source"]):  # nbdev's section: a heading with the name
            md = "".join(text(o.get("data", {}).get("text/markdown", "")) for o in c["outputs"])
            show_docs += re.findall(r"(?m)^#{2,4} (.+?)\s*$", md)
        else:
            own_outputs += shown
        outputs += shown
    return {"title": title, "show_docs": show_docs, "images": images, "outputs": outputs, "own_outputs": own_outputs}


def check_page(page, url: str, exp: dict, out: Path) -> list[str]:
    "Open `url`; return what is wrong with it (empty when all is well)."
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(url, wait_until="load")
    bad = []
    if page.inner_text("h1.title").strip() != exp["title"] or page.title() != exp["title"]:
        bad.append(f"title {page.inner_text('h1.title')!r} / {page.title()!r}, expected {exp['title']!r}")
    headings = page.eval_on_selector_all(
        "main h2, main h3, main h4", "hs => hs.map(h => h.innerText.replace(/¶$/, '').trim())"
    )
    # a dunder's heading is rendered as Markdown: `Engine.__call__` shows as "Engine.call", with "call" in bold
    plain = {h.replace("__", "") for h in headings}
    bad += [f"no show_doc section {n!r}" for n in exp["show_docs"] if n.replace("__", "") not in plain]
    shown = page.locator("main .jp-CodeCell:has(.jp-OutputArea-output)").count()
    if not exp["own_outputs"]:
        bad.append("no cell shows an output: run `python tools/run_chapters.py CHAPTER` and commit the chapter")
    if shown < exp["outputs"]:
        bad.append(f"{shown} cells show outputs, the notebook has {exp['outputs']}")
    imgs = page.eval_on_selector_all(
        "img", "is => is.map(i => [i.getAttribute('src').slice(0, 80), i.complete && i.naturalWidth > 0])"
    )
    bad += [f"image does not load: {src}" for src, ok in imgs if not ok]
    if len(imgs) < exp["images"]:
        bad.append(f"{len(imgs)} images, the notebook has {exp['images']}")
    for sel, what in ((".preview-error", "processing error"), (".preview-error-output", "error output")):
        bad += [f"{what}: {t[:300]}" for t in page.locator(sel).all_inner_texts()]
    bad += [f"request leaves the preview: {u}" for u in requests if not u.startswith(("file://", "data:"))]
    links = page.eval_on_selector_all("a[href]", "as => as.map(a => [a.getAttribute('href'), a.href])")
    for href, absolute in links:
        u = urlsplit(absolute)
        if u.scheme != "file":
            continue  # the web: not checked here
        target = Path(unquote(u.path))
        if not target.resolve().is_relative_to(out.resolve()):
            bad.append(f"link {href!r} leaves the preview folder")
            continue
        if not target.is_file():
            bad.append(f"broken link {href!r}")
            continue
        if u.fragment and target.suffix == ".html":
            ids = set(re.findall(r'\sid="([^"]+)"', target.read_text(encoding="utf-8")))
            if unquote(u.fragment) not in ids:
                bad.append(f"link {href!r}: no #{u.fragment} in {target.name}")
    return bad


def test_docs_preview_every_page(tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    out = tmp_path / "preview"
    # CI has just run nbdev-proc-nbs (.ci/run) and names its folder: rendered as it is, not processed again
    proc_dir = Path(os.environ.get("VIT_DOCS_PROC") or out / "_proc")
    proc = ["--proc", str(proc_dir)] if os.environ.get("VIT_DOCS_PROC") else []
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "docs_preview.py"), "--out", str(out), *proc],
        capture_output=True,
        text=True,
        timeout=420,
    )
    assert (out / "contents.html").exists(), (
        f"docs_preview.py failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    )
    problems = [l for l in r.stdout.splitlines() if l.startswith("PROBLEM")]  # reported with the pages' own below
    assert r.returncode == (1 if problems else 0), r.stdout[-3000:] + r.stderr[-3000:]
    chapters = sidebar_notebooks()
    assert chapters, "nbs/sidebar.yml lists no notebook"
    pages = [str(Path(c).with_suffix(".html")) for c in chapters]
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.goto((out / "contents.html").as_uri())
            listed = page.eval_on_selector_all("main li > a", "as => as.map(a => a.getAttribute('href'))")
            assert listed[: len(pages)] == pages, f"contents page order {listed}, sidebar order {pages}"
            page.screenshot(path=str(tmp_path / "docs-preview-contents.png"))
            failures, n_show_docs, n_outputs = {}, 0, 0
            for chapter, name in zip(chapters, pages, strict=True):
                exp = expected(proc_dir / chapter)
                n_show_docs += len(exp["show_docs"])
                n_outputs += exp["outputs"]
                tab = browser.new_page(viewport={"width": 1200, "height": 900})
                if bad := check_page(tab, (out / name).as_uri(), exp, out):
                    failures[name] = bad
                if exp["show_docs"] and not (tmp_path / "docs-preview-chapter.png").exists():
                    tab.goto((out / name).as_uri() + "#" + tab.eval_on_selector("main h3[id]", "h => h.id"))
                    tab.screenshot(path=str(tmp_path / "docs-preview-chapter.png"))
                tab.close()
        finally:
            browser.close()
    assert not failures and not problems, "\n".join(
        problems + [f"{name}: {b}" for name, bad in failures.items() for b in bad]
    )
    assert n_show_docs > 0, "no chapter has a show_doc section: is nbdev's processing running?"
    print(
        f"\n{len(pages)} pages, {n_show_docs} show_doc sections, {n_outputs} cells with outputs; "
        f"screenshots in {tmp_path}"
    )
