"""The documentation site, previewed offline without Quarto.

    python tools/docs_preview.py                 # writes _preview/; open _preview/contents.html
    python tools/docs_preview.py --out DIR       # somewhere else
    python tools/docs_preview.py --proc _proc    # use what `nbdev-proc-nbs` wrote instead of processing again

The published site is built by `nbdev-docs` (Quarto) in GitHub Actions; Quarto is not installed
everywhere. This renders the same content with what the `dev` extra has, so that the pages can
be read (and tested, tests/test_docs_preview.py) on any machine:

1. **process**: every chapter goes through nbdev's own notebook processors, the ones that
   `nbdev-proc-nbs` and `nbdev-docs` run (`FilterDefaults`: frontmatter, `show_doc` sections for
   the exported names, hidden cells removed, ...), into OUT/_proc/. nbdev runs every cell that
   exports or imports something while it does this; a failure there breaks the site build too,
   so it is reported (and the page shows the error).
2. **render**: each processed chapter becomes OUT/<chapter>.html with nbconvert's `lab` template.
   The Quarto cell options left by nbdev are applied (`#| echo: false` hides the code,
   `include: false` drops the cell, `output: false` its output), headings get the ids
   Quarto (pandoc) gives them, so links such as `index.html#the-module-map` work.
3. **local files**: images and files a page links to are copied from nbs/, as Quarto copies
   them into the site. A file outside nbs/ is *not* on the published site, so it is reported.
4. **navigation**: the chapters in the order of nbs/sidebar.yml (read now: chapters come and
   go), a sidebar on every page and a contents page, OUT/contents.html.

Nothing is fetched from the network (no MathJax, no require.js); mermaid diagrams are shown as
their source. Exit status 1 when a chapter could not be processed or a page refers to a local
file that the site would not have.
"""

import argparse, functools, html, os, re, shutil, sys, warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

import jinja2, nbformat, yaml
from bs4 import BeautifulSoup

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"

# --- 1. process -------------------------------------------------------------------------------


def process(src: Path, dst: Path) -> list[str]:
    "Run nbdev's documentation processors on notebook `src`, write `dst`; return nbdev's warnings."
    from fastcore.nbio import read_nb, write_nb
    from nbdev.processors import FilterDefaults

    nb, before, cwd = read_nb(src), os.environ.get("IN_TEST"), os.getcwd()
    os.environ["IN_TEST"] = "1"  # as nbdev-proc-nbs does (nbdev.serve_drv)
    try:  # nbdev runs the chapter's export and import cells here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            FilterDefaults()(nb)
    finally:
        os.chdir(cwd)
        if before is None:
            del os.environ["IN_TEST"]
        else:
            os.environ["IN_TEST"] = before
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    msgs = [
        str(w.message).split("\n---\n") for w in caught if "nbdev" in w.filename
    ]  # nbdev's: "<message>\n---\n<cell>\n---"
    return [m[0] + (f" (cell: {m[1].splitlines()[0]} ...)" if len(m) > 1 and m[1].strip() else "") for m in msgs]


# --- 2. render --------------------------------------------------------------------------------

TEMPLATE = """{%- extends 'lab/index.html.j2' -%}
{# no scripts from the network: no require.js, MathJax, mermaid.js or widget manager #}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_js_mathjax -%}{%- endblock html_head_js_mathjax -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
{% block jupyter_widgets %}{% endblock jupyter_widgets %}
{% block extra_css %}<style>
body { margin: 0 0 0 17rem; max-width: 60rem; padding: 0 1.5rem 3rem; }
nav.preview-nav { position: fixed; left: 0; top: 0; bottom: 0; width: 15.5rem; overflow-y: auto;
  padding: 1rem; background: #f7f7f9; border-right: 1px solid #ddd; font: 14px/1.5 sans-serif; }
nav.preview-nav ol { padding-left: 1.2rem; } nav.preview-nav a { text-decoration: none; }
nav.preview-nav .current { font-weight: bold; }
header.preview-title { padding: 1.5rem 0 0.5rem 0; font-family: var(--jp-content-font-family, sans-serif); }
header.preview-title p { color: #555; font-size: 1.1rem; }
.preview-error { border: 2px solid #c00; background: #fee; padding: 0.5rem 1rem; white-space: pre-wrap; }
</style>{% endblock extra_css %}
{%- block body_header -%}
{{ super() }}
{{ resources.preview.nav }}
<header class="preview-title"><h1 class="title">{{ resources.preview.title | e }}</h1>
{%- if resources.preview.description -%}
<p class="description">{{ resources.preview.description }}</p>
{%- endif %}</header>
{{ resources.preview.error }}
{%- endblock body_header -%}
{% block error -%}<div class="preview-error-output">{{ super() }}</div>{%- endblock error %}
"""


@functools.cache
def inline_md(text: str) -> str:
    "A one-line description as HTML: escaped, with its `code` spans."
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))


def exporter():
    from nbconvert import HTMLExporter

    return HTMLExporter(
        template_name="lab",
        extra_loaders=[jinja2.DictLoader({"preview.html.j2": TEMPLATE})],
        template_file="preview.html.j2",
        exclude_input_prompt=True,
        exclude_output_prompt=True,
    )


def read_nb(path: Path):
    "A notebook; nbdev's processed ones carry extra keys (`has_sd`, timings) that `apply_quarto_options` drops."
    return nbformat.read(path, as_version=4, capture_validation_error={})


def frontmatter(nb) -> dict:
    "The YAML frontmatter nbdev put in the first raw cell (title, description, output-file)."
    for c in nb.cells:
        if c.cell_type == "raw" and c.source.lstrip().startswith("---"):
            return yaml.safe_load(c.source.strip().strip("-")) or {}
    return {}


DIRECTIVE = re.compile(r"^#\|\s*([\w-]+)\s*:\s*(.*?)\s*$")


def apply_quarto_options(nb):
    "Quarto's cell options as Quarto applies them; raw cells (the frontmatter) and fenced-div markers go."
    cells = []
    for c in nb.cells:
        if c.cell_type == "raw":
            continue
        for k in set(c) - {"cell_type", "id", "metadata", "source", "outputs", "execution_count", "attachments"}:
            del c[k]  # nbdev's `has_sd`
        c.metadata.pop("execution", None)  # execnb's timings (not valid nbformat)
        if c.cell_type == "markdown":
            c.source = re.sub(r"(?m)^:::.*\n?", "", c.source)  # `::: {.callout-note}` ... `:::`: keep the content
        if c.cell_type == "code":
            lines, opts = c.source.split("\n"), {}
            while lines and (m := DIRECTIVE.match(lines[0])):
                opts[m[1]] = m[2].lower()
                lines.pop(0)
            c.source = "\n".join(lines)
            if opts.get("include") == "false":
                continue
            if opts.get("output") == "false":
                c.outputs = []
            if opts.get("echo") == "false":
                c.metadata.setdefault("tags", []).append("preview-hide-input")
        cells.append(c)
    nb.cells = cells
    return nb


def pandoc_id(text: str) -> str:
    "The id pandoc (so Quarto) gives a heading: letters, digits, `_-.`; words joined by `-`; lowercase; from a letter."
    s = "-".join("".join(ch for ch in text.lower() if ch.isalnum() or ch in "_-. \n\t").split())
    s = re.sub(r"^[^a-z\u00c0-\uffff]+", "", s)
    return s or "section"


def fix_headings(soup) -> None:
    "Give every heading pandoc's id (numbered `-1`, `-2` when repeated) and point its ¶ link at it."
    seen = {}
    for h in soup.select("main h1, main h2, main h3, main h4, main h5, main h6"):
        if "title" in (h.get("class") or []):
            continue
        anchor = h.find("a", class_="anchor-link")
        text = h.get_text().removesuffix(anchor.get_text()) if anchor else h.get_text()
        base = pandoc_id(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        h["id"] = base if n == 0 else f"{base}-{n}"
        if anchor:
            anchor["href"] = "#" + h["id"]


def fix_links(soup, src_dir: Path, pages: dict, site: str, out: Path) -> list[str]:
    """Links to chapters (`x.ipynb`, or the published site's `x.html`) go to the preview's pages; local
    files inside nbs/ are copied to `out`; return the references the published site would not have."""
    problems = []
    for tag, attr in (("a", "href"), ("img", "src")):
        for el in soup.select(f"main {tag}[{attr}]"):
            url = el[attr]
            if el.find_parent("nav", class_="preview-nav"):
                continue  # the preview's own navigation
            if site and url.startswith(site):  # the published site: read the preview's page
                rel = url[len(site) :].lstrip("/") or "index.html"
                page, _, frag = rel.partition("#")
                if page in pages.values():
                    el[attr] = page + ("#" + frag if frag else "")
                continue
            u = urlsplit(url)
            if u.scheme or u.netloc or not u.path:
                continue  # http(s), data:, mailto:, #fragment
            target = (src_dir / unquote(u.path)).resolve()
            if target.suffix == ".ipynb" and target in pages:
                el[attr] = pages[target] + ("#" + u.fragment if u.fragment else "")
                continue
            if target.suffix == ".html":  # another page of the site
                if target.with_suffix(".ipynb") not in pages:
                    problems.append(f"{url}: no such page")
                continue
            if not target.is_relative_to(NBS):
                problems.append(
                    f"{url}: outside nbs/, so not on the published site (put it under nbs/, e.g. nbs/images/)"
                )
            elif not target.is_file():
                problems.append(f"{url}: no such file")
            else:
                dest = out / target.relative_to(NBS)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(target, dest)
    return problems


def render(
    proc_nb: Path, out: Path, page: str, nav: str, src_dir: Path, pages: dict, site: str, error: str = ""
) -> list[str]:
    "Write chapter `proc_nb` as `out/page`; return its problems (see `fix_links`)."
    from nbconvert.preprocessors import TagRemovePreprocessor

    nb = read_nb(proc_nb)
    fm = frontmatter(nb)
    title = str(fm.get("title") or proc_nb.stem)
    nb.metadata["title"] = title
    nb = apply_quarto_options(nb)
    TagRemovePreprocessor(remove_input_tags={"preview-hide-input"}).preprocess(nb, {})
    err = f'<div class="preview-error">{html.escape(error)}</div>' if error else ""
    body, _ = exporter().from_notebook_node(
        nb,
        resources={
            "preview": {
                "title": title,
                "description": inline_md(str(fm.get("description", ""))),
                "nav": nav,
                "error": err,
            }
        },
    )
    soup = BeautifulSoup(body, "html.parser")
    fix_headings(soup)
    problems = fix_links(soup, src_dir, pages, site, out)
    (out / page).parent.mkdir(parents=True, exist_ok=True)
    (out / page).write_text(str(soup), encoding="utf-8")
    return problems


# --- 4. navigation ----------------------------------------------------------------------------


def sidebar(nbs: Path = NBS) -> list[tuple[str, Path]]:
    "`(section, path)` of every document in nbs/sidebar.yml, in order (sections may nest)."
    doc = yaml.safe_load((nbs / "sidebar.yml").read_text())

    def walk(items, section=""):
        for it in items or []:
            if isinstance(it, str):
                yield section, nbs / it
            elif isinstance(it, dict) and "contents" in it:
                yield from walk(it["contents"], it.get("section", section))
            elif isinstance(it, dict) and "href" in it:
                yield section, nbs / it["href"]

    return list(walk(doc["website"]["sidebar"]["contents"]))


def nav_html(chapters: list, titles: dict, current: str = "") -> str:
    items = "".join(
        f'<li><a href="{p}"{" class=current" if p == current else ""}>{html.escape(titles[p])}</a></li>'
        for _, p in chapters
    )
    head = '<a href="contents.html"><b>Contents</b></a> <small>(preview)</small>'
    return f'<nav class="preview-nav">{head}<ol>{items}</ol></nav>'


def contents_html(project: str, chapters: list, titles: dict, descriptions: dict, problems: dict) -> str:
    rows, section = [], None
    for sec, p in chapters:
        if sec != section and sec:
            rows.append(f"</ol><h2>{html.escape(sec)}</h2><ol>")
        section = sec
        note = f' <span class="preview-error">{len(problems[p])} problem(s)</span>' if problems.get(p) else ""
        link = f'<a href="{p}">{html.escape(titles[p])}</a>'
        rows.append(f"<li>{link} — {inline_md(descriptions.get(p, ''))}{note}</li>")
    title = f"{html.escape(project)}: docs preview"
    return f"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body {{ font: 16px/1.6 sans-serif; max-width: 50rem; margin: 2rem auto; }}
.preview-error {{ color: #c00; }}</style>
</head><body><main><h1 class="title">{title}</h1>
<p>The chapters in the order of <code>nbs/sidebar.yml</code>, rendered offline from the processed notebooks by
<code>tools/docs_preview.py</code>. The published site is built from the same notebooks by Quarto
(<code>nbdev-docs</code>).</p>
<ol>{"".join(rows)}</ol></main></body></html>"""


# --- the command ------------------------------------------------------------------------------


def site_url() -> str:
    try:
        from nbdev.config import get_config

        cfg = get_config(ROOT)
        return (cfg.doc_host.rstrip("/") + "/" + cfg.doc_baseurl.strip("/") + "/") if cfg.doc_host else ""
    except Exception:
        return ""


def build(out: Path, proc: Path | None = None, nbs: Path = NBS) -> dict:
    "Render the preview into `out`; return `{page: [problems]}` (empty lists when all is well)."
    out.mkdir(parents=True, exist_ok=True)
    listed = [(s, p) for s, p in sidebar(nbs) if p.suffix == ".ipynb"]
    for _, p in sidebar(nbs):
        if p.suffix != ".ipynb":
            print(f"  skipped {p.relative_to(nbs)}: only notebooks are rendered by the preview")
    others = [("Not in the sidebar", p) for p in sorted(nbs.glob("*.ipynb")) if p not in {q for _, q in listed}]
    docs = listed + others
    pages = {p: str(p.relative_to(nbs).with_suffix(".html")) for _, p in docs}  # notebook -> page
    chapters = [(s, pages[p]) for s, p in docs]
    proc_dir = proc or out / "_proc"
    titles, descriptions, errors, problems = {}, {}, {}, {}
    for _, src in docs:
        page, dst = pages[src], proc_dir / src.relative_to(nbs)
        if proc is None:
            try:
                for w in process(src, dst):
                    print(f"  {src.name}: nbdev: {w}")
            except Exception as e:  # the site build fails here too
                errors[page] = f"nbdev could not process {src.name} (nbdev-docs would fail the same way):\n{e}"
                shutil.copy2(src, dst)  # show the chapter unprocessed, with the error on top
        elif not dst.exists():
            errors[page] = f"{dst} is missing: run nbdev-proc-nbs"
            dst = src
        fm = frontmatter(read_nb(dst))
        titles[page], descriptions[page] = str(fm.get("title") or src.stem), str(fm.get("description") or "")
        problems[page] = [errors[page]] if page in errors else []
    site, src_pages = site_url(), {p.resolve(): v for p, v in pages.items()}
    for _, src in docs:
        page, dst = pages[src], proc_dir / src.relative_to(nbs)
        problems[page] += render(
            dst if dst.exists() else src,
            out,
            page,
            nav_html(chapters, titles, page),
            src.parent.resolve(),
            src_pages,
            site,
            errors.get(page, ""),
        )
    project = (
        yaml.safe_load((nbs / "nbdev.yml").read_text())["website"]["title"]
        if (nbs / "nbdev.yml").exists()
        else ROOT.name
    )
    (out / "contents.html").write_text(
        contents_html(project, chapters, titles, descriptions, problems), encoding="utf-8"
    )
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument(
        "--out", type=Path, default=ROOT / "_preview", help="output folder (default: _preview/, git-ignored)"
    )
    ap.add_argument(
        "--proc", type=Path, help="processed notebooks from `nbdev-proc-nbs` (e.g. _proc) instead of processing here"
    )
    a = ap.parse_args(argv)
    os.chdir(ROOT)  # nbdev reads pyproject.toml from here, as nbdev-proc-nbs does
    problems = build(a.out.resolve(), a.proc.resolve() if a.proc else None)
    for page, ps in problems.items():
        for p in ps:
            print(f"PROBLEM {page}: {p}")
    n = sum(map(len, problems.values()))
    print(f"{len(problems)} pages in {a.out}; open {a.out / 'contents.html'}" + (f"; {n} problem(s)" if n else ""))
    return 1 if n else 0


if __name__ == "__main__":
    sys.exit(main())
