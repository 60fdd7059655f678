"""Execute the chapters the way `nbdev-test` does, and keep their outputs, cleaned, for the docs.

    python tools/run_chapters.py                     # every chapter: outputs written into nbs/*.ipynb
    python tools/run_chapters.py data store         # some chapters (names or paths)
    python tools/run_chapters.py data --out DIR     # write the executed copy to DIR/data.ipynb; nbs/ is left as it is
                                                    # (a chapter that fails leaves DIR/data.failed.txt instead)
    python tools/run_chapters.py --workers 2        # two chapters at a time (each in its own process)
    python tools/run_chapters.py --sanitize-only    # only clean the outputs the chapters have (e.g. saved from Jupyter)

The chapters are the documentation, and the documentation should show what the code does: a DataFrame,
a value, a plot under each example. This runs each chapter and writes its outputs into the notebook, so
that they are committed with it and the site shows them. `tests/test_chapters.py` runs the chapters the
same way and compares the fresh outputs with the committed ones (`first_difference`, `compare`).

1. **execute**, as `nbdev-test` does: nbdev reads the chapter, execnb's `CaptureShell` runs its code cells
   in the chapter's folder (nbs/) with `IN_TEST=1` and the project root on `sys.path`. Cells flagged with
   one of the `tst_flags` of pyproject.toml (`#| slow`) or not evaluated (`#| eval: false`) are skipped and
   keep the outputs they have. The first cell that fails stops the chapter: nothing is written, the
   traceback is printed, the exit status is 1.
2. **sanitize** (`Sanitizer`): the outputs must be the same on every machine and every run, and small.
   Machine paths become `{repo}`, `{venv}`, `{site-packages}`, `{python}`, `{tmp}`, `~`; memory addresses
   go (`<X at 0x7f...>` becomes `<X>`); timestamps and time-based ids of the run (dated within a day of
   it) become `{time1}`, `{time2}`, ... (numbered per chapter, so two different ones stay different),
   its dates `{date1}`, ..., the service's prediction ids `v1~{id1}~3~1.…`; durations, rates and
   measured seconds become `… s`, `… it/s`, `'load_seconds': …`; ANSI codes and progress bars are
   removed; an oversized output is cut or left out, with a note saying so. `show_doc` cells keep no output:
   nbdev's doc processing runs them again for the site (`exec_show_docs`).
3. **clean**: `nbdev-clean` on the written notebook (execution counts, metadata).

A cell whose output differs from run to run for a good reason (a timing table, a random id) is marked
`#| varies`: it is executed, sanitized and committed like any other, but `tests/test_chapters.py` does
not compare its text. (nbdev hands the mark to Quarto as `#| varies: true`, which Quarto ignores, as it
does `#| slow: true`.)
"""

import argparse, json, os, re, sys, sysconfig, tempfile, traceback
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from math import isclose
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / "nbs"
VARIES = "varies"  # the `#| varies` mark: executed, not compared
MAX_TEXT = 20_000  # characters of one text output kept (a stream, a repr); the rest is cut, with a note
MAX_HTML = 100_000  # characters of one HTML output (a report, a big table); larger ones are left out
MAX_IMAGE = 1_000_000  # base64 characters of one image (about 750 kB); larger ones are left out
WIDGET = "application/vnd.jupyter.widget"  # an ipywidget (tqdm's notebook bar): needs a live Jupyter front end
DROPPED_MIMES = (WIDGET, "application/javascript")
RECENT = timedelta(days=1)  # a date this close to the run is the run's own (a timestamp, an id made from it)
REL_TOL, ABS_TOL = 0.05, 0.02  # two numbers agree when within 5% of each other, or 0.02 apart
# imported once, in the server that forks a process for each chapter; not the libraries whose loggers bind the
# stream they write to when imported (transformers, datasets): a chapter must show their messages as Jupyter does
PRELOAD = ["torch", "numpy", "pandas", "execnb.shell", "nbdev.test"]
# the chapters that take longest, longest first: started first, they do not leave one worker running alone at the end
# (the training chapter takes about a third of all the chapters' time; the others in order of their last timings)
LONGEST = ["train", "monitor", "registry", "canary", "robustness", "serve", "engine", "service", "model", "retrain"]

# --- 1. execute -------------------------------------------------------------------------------


class ChapterFailed(Exception):
    "A cell of the chapter raised; the message is its traceback."


def chapters(names=()) -> list[Path]:
    "The chapters named (`data`, `data.ipynb`, `nbs/data.ipynb`), or all of them, as `nbdev-test` finds them."
    if not names:
        from nbdev.doclinks import nbglob

        return sorted(Path(p) for p in nbglob(NBS, as_path=True))
    found = [
        Path(n) if Path(n).suffix == ".ipynb" and Path(n).exists() else NBS / f"{Path(n).stem}.ipynb" for n in names
    ]
    if missing := [str(p) for p in found if not p.is_file()]:
        raise SystemExit(f"no such chapter: {', '.join(missing)}")
    return [p.resolve() for p in found]


def execute(chapter: Path) -> dict:
    "Run `chapter` as `nbdev-test` does; return the notebook (JSON) with fresh outputs in the cells that ran."
    from execnb.shell import CaptureShell
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.process import NBProcessor
    from nbdev.test import nb_test_cells

    cfg = get_config(chapter.parent)
    flags = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags or [])
    ran = {c.id for c in nb_test_cells(chapter, flags)}  # not skipped: no `#| slow`, no `#| eval: false`
    nb = NBProcessor(chapter, rm_directives=False, process=True).nb
    os.environ["IN_TEST"] = "1"  # as nbdev-test sets it
    sys.path.insert(0, str(cfg.config_path))
    shell = CaptureShell(chapter, profile=bool(cfg.exec_profile))
    with working_directory(chapter.parent):
        try:
            shell.run_all(nb, exc_stop=True, preproc=lambda c: c.id not in ran, cell_timeout=cfg.cell_timeout or None)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # what nbdev-test counts as a failure, SystemExit included
            raise ChapterFailed(shell.prettytb(fname=chapter) or traceback.format_exc()) from e
    fresh = {c.id: json.loads(json.dumps(c.outputs)) for c in nb.cells if c.id in ran}
    raw = json.loads(chapter.read_text(encoding="utf-8"))
    for c in raw["cells"]:
        if c.get("id") in fresh:
            c["outputs"] = fresh[c["id"]]
    return raw


# --- 2. sanitize ------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)")
BAR = re.compile(r"\d{1,3}%\|[^\n|]*\||\[\d+:\d\d(?::\d\d)?(?:<[^\],\n]*)?,[^\]\n]*\]")  # tqdm's bar, its [00:01<...]
ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+(?=>)|0x[0-9a-fA-F]{8,}")
ISO_TIME = re.compile(r"(?<!\d)(\d{4})-(\d\d)-(\d\d)[T ](\d\d):(\d\d):(\d\d)(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?(?!\d)")
ID_TIME = re.compile(  # ids made from the time: 20260501-114502-3fa2c1, v20260501-114502-123-abc123, ...T114502.123Z
    r"(?<!\d)(\d{4})(\d\d)(\d\d)[T-](\d\d)(\d\d)(\d\d)(?:\.\d+Z?|-\d{3})?(?:-[0-9a-f]{4,12})?(?![0-9A-Za-z])"
)
TIME = re.compile(f"{ISO_TIME.pattern}|{ID_TIME.pattern}")
DATE = re.compile(r"(?<!\d)(\d{4})-(\d\d)-(\d\d)(?!\d)")
PLACEHOLDER = re.compile(r"\{(time|date|id)(\d+)\}")
DURATION = re.compile(
    r"(?<![\w.])(?:\d+\.\d+\s?(ms|µs|us|ns|s|sec|secs|seconds|min|mins|minutes)|\d+\s?(ms|µs|us|ns))\b"
)
RATE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?\s?((?:it|img|images|samples|examples|rows|req|requests|batches)/s)\b")
TIMED = re.compile(r"(['\"]?\w*(?:_s|_ms|seconds|per_s)['\"]?:\s*)\d+\.\d+")  # 'load_seconds': 6.418 (a measurement)
PREDICTION_ID = re.compile(r"~([0-9a-f]{9,12}~[0-9a-f]{12})(~\d+~[01])(\.[\w-]*)?")  # v1~<ms>~<nonce>~3~1.<signature>


def _text(v) -> str:
    return "".join(v) if isinstance(v, list) else v


def _lines(s: str) -> list[str]:
    return s.splitlines(True)


def _is_show_doc(cell) -> bool:
    return cell["cell_type"] == "code" and re.search(r"(?m)^show_doc\(", _text(cell["source"])) is not None


class Sanitizer:
    "Rewrites a chapter's outputs so that they read the same on every machine and every run (see the module doc)."

    def __init__(
        self,
        nb: dict,  # the chapter: time placeholders already in it are numbered on from
        root: Path = ROOT,  # the repository, shown as `{repo}`
        now: datetime | None = None,  # the time of the run (default: now)
    ):
        self.now = (now or datetime.now(UTC)).date()
        folders = {str(p): name for p, name in self._folders(root)}
        self.folders = sorted(folders.items(), key=lambda kv: -len(kv[0]))  # the most specific first
        self.tmp = re.compile(re.escape(tempfile.gettempdir().rstrip("/")) + r"/[^\s/'\"<>)\],;]+")
        self.seen, self.count = {}, {"time": 0, "date": 0, "id": 0}
        for m in PLACEHOLDER.finditer(json.dumps([c.get("outputs", []) for c in nb["cells"]])):
            self.count[m[1]] = max(self.count[m[1]], int(m[2]))

    @staticmethod
    def _folders(root: Path):
        for key in ("purelib", "platlib"):
            yield sysconfig.get_paths()[key], "{site-packages}"
        if sys.prefix != sys.base_prefix:
            yield sys.prefix, "{venv}"
        yield sysconfig.get_paths()["stdlib"], "{python}"
        yield from ((root, "{repo}"), (root.resolve(), "{repo}"))
        if len(str(Path.home())) > 1:
            yield Path.home(), "~"

    def _label(self, kind: str, text: str) -> str:
        if (kind, text) not in self.seen:
            self.count[kind] += 1
            self.seen[kind, text] = f"{{{kind}{self.count[kind]}}}"
        return self.seen[kind, text]

    def _times(self, s: str) -> str:
        def recent(kind):
            def sub(m):
                y, mo, d = [g for g in m.groups() if g is not None][:3]
                try:
                    day = datetime(int(y), int(mo), int(d)).date()
                except ValueError:
                    return m[0]
                return self._label(kind, m[0]) if abs(day - self.now) <= RECENT else m[0]

            return sub

        s = TIME.sub(recent("time"), s)
        return DATE.sub(recent("date"), s)

    def text(self, s: str) -> str:
        "One text output, sanitized (not yet cut to size)."
        s = ANSI.sub("", s)
        lines = [
            next((p for p in reversed(ln.split("\r")) if p.strip()), "\r") if "\r" in ln else ln for ln in s.split("\n")
        ]
        s = "\n".join(line for line in lines if line != "\r" and not BAR.search(line))  # \r: as a terminal shows it
        for folder, name in self.folders:
            s = s.replace(folder, name)
        s = self.tmp.sub("{tmp}", s)
        s = ADDRESS.sub(lambda m: "" if m[0].startswith(" at") else "0x…", s)
        s = self._times(s)
        s = DURATION.sub(lambda m: f"… {m[1] or m[2]}", s)
        s = RATE.sub(lambda m: f"… {m[1]}", s)
        s = TIMED.sub(lambda m: f"{m[1]}…", s)
        return PREDICTION_ID.sub(lambda m: f"~{self._label('id', m[1])}{m[2]}" + (".…" if m[3] else ""), s)

    def outputs(self, outs: list[dict]) -> list[dict]:
        "A cell's outputs, sanitized: streams merged, widgets and scripts dropped, oversized ones cut or left out."
        res = []
        for o in outs:
            o = json.loads(json.dumps(o))
            if o["output_type"] == "stream":
                if res and res[-1]["output_type"] == "stream" and res[-1]["name"] == o["name"]:
                    res[-1]["text"] = _text(res[-1]["text"]) + _text(o["text"])
                    continue
            elif o["output_type"] == "error":
                o["evalue"] = self.text(o["evalue"])
                o["traceback"] = [self.text(t) for t in o["traceback"]]
            elif any(k.startswith(WIDGET) for k in o.get("data", {})):
                continue  # a widget (a progress bar): its text stand-in says nothing
            res.append(o)
        for o in res:
            if o["output_type"] == "stream":
                o["text"] = _lines(_cut(self.text(_text(o["text"]))))
            elif "data" in o:
                o["data"] = self._data(o["data"])
        return [o for o in res if _text(o.get("text", "")).strip() or o.get("data") or o["output_type"] == "error"]

    def _data(self, data: dict) -> dict:
        out, left_out = {}, []
        for mime, v in data.items():
            if mime.startswith(DROPPED_MIMES):
                continue
            if mime.startswith("image/") and mime != "image/svg+xml":
                if len(_text(v)) <= MAX_IMAGE:
                    out[mime] = v
                else:
                    left_out.append(f"{mime} of {len(_text(v)) * 3 // 4 // 1000:,} kB")
            elif mime in ("text/html", "image/svg+xml"):
                s = self.text(_text(v))
                if len(s) <= MAX_HTML:
                    out[mime] = _lines(s)
                else:
                    left_out.append(f"{mime} of {len(s) // 1000:,} kB")
            elif mime.startswith("text/"):
                out[mime] = _lines(_cut(self.text(_text(v))))
            else:
                out[mime] = v
        if left_out:  # said where every front end shows it
            note = f"[{', '.join(left_out)} left out by tools/run_chapters.py: too large for the docs]"
            text = _text(out.get("text/plain", "")).rstrip("\n")
            out["text/plain"] = _lines(f"{text}\n{note}" if text else note)
        return out

    def notebook(self, nb: dict) -> dict:
        "Sanitize every output of `nb` in place; `show_doc` cells keep none (the doc processing makes them)."
        for c in nb["cells"]:
            if c["cell_type"] == "code":
                c["outputs"] = [] if _is_show_doc(c) else self.outputs(c.get("outputs", []))
        return nb


def _cut(s: str) -> str:
    if len(s) <= MAX_TEXT:
        return s
    keep = s.rfind("\n", 0, MAX_TEXT) + 1 or MAX_TEXT
    return s[:keep] + f"[… {len(s) - keep:,} more characters left out by tools/run_chapters.py]\n"


# --- comparing two runs (tests/test_chapters.py) ----------------------------------------------

NUMBER = re.compile(  # a number on its own: the digits of an id or a hash (`2a91ae42`, `v2`) are text
    r"((?<![A-Za-z_\d.])[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?(?![A-Za-z_\d]|\.\w))"
)


def first_difference(
    old: str,  # the committed text
    new: str,  # this run's
    rel_tol: float = REL_TOL,  # numbers agree within this fraction of each other...
    abs_tol: float = ABS_TOL,  # ... or this far apart
) -> str | None:
    "Where text `new` differs from `old` (numbers within the tolerance agree); None if they agree."
    a, b = NUMBER.split(old), NUMBER.split(new)
    for i in range(max(len(a), len(b))):
        x, y = (a[i] if i < len(a) else None), (b[i] if i < len(b) else None)
        if x == y:
            continue
        if i % 2 and x is not None and y is not None and isclose(float(x), float(y), rel_tol=rel_tol, abs_tol=abs_tol):
            continue
        at_a, at_b = len("".join(a[:i])), len("".join(b[:i]))
        n = old.count("\n", 0, at_a) + 1
        line = lambda s, at: s[s.rfind("\n", 0, at) + 1 :].split("\n", 1)[0]
        why = (
            f"{x} and {y} differ by more than {rel_tol:.0%} and {abs_tol}" if i % 2 and x and y else "the text differs"
        )
        return f"line {n}: {why}:\n  committed: {line(old, at_a)!r}\n  this run:  {line(new, at_b)!r}"
    return None


def _varies(cell) -> bool:
    lines = _text(cell["source"]).splitlines()
    return any(re.match(rf"#\|\s*{VARIES}\s*$", s.strip()) for s in lines if s.startswith("#|"))


def _shown(outputs: list[dict]) -> list[tuple[str, str | None]]:
    """What a cell shows, one `(kind, text)` a piece; `text` is None for an image (only its presence is compared).
    `{time3}` reads `{time}`: whether two events of a run fell in the same second, so share a label, varies."""
    res = []
    for o in outputs:
        if o["output_type"] == "stream":
            res.append((o["name"], _text(o["text"])))
        elif o["output_type"] == "error":
            res.append(("error", f"{o['ename']}: {o['evalue']}"))
        else:
            for mime, v in sorted(o.get("data", {}).items()):
                image = mime.startswith("image/")
                res.append((mime, None if image else _text(v) if isinstance(v, (str, list)) else json.dumps(v)))
    return [(kind, text and PLACEHOLDER.sub(r"{\1}", text)) for kind, text in res]


def _cell_difference(old: list[dict], new: list[dict], tol: tuple) -> str | None:
    a, b = _shown(old), _shown(new)
    for (ka, ta), (kb, tb) in zip(a, b, strict=False):
        if ka != kb:
            return f"committed shows {ka}, this run {kb}"
        if ta is not None and (d := first_difference(ta, tb, *tol)):
            return f"{ka}, {d}"
    if len(a) != len(b):
        more, extra = ("this run", b[len(a)]) if len(b) > len(a) else ("the committed chapter", a[len(b)])
        return f"{more} shows more: {extra[0]} {(extra[1] or '')[:200]!r}"
    return None


def compare(
    committed: Path,  # the chapter as committed
    fresh: Path,  # the same chapter, just run
    rel_tol: float = REL_TOL,  # see `first_difference`
    abs_tol: float = ABS_TOL,
) -> list[str]:
    "The first difference of each cell whose outputs differ, both chapters sanitized alike; `#| varies` cells pass."
    old, new = (json.loads(p.read_text(encoding="utf-8")) for p in (committed, fresh))
    if [c.get("id") for c in old["cells"]] != [c.get("id") for c in new["cells"]]:
        return [f"{committed.name}: the run has other cells than the committed chapter"]
    Sanitizer(old).notebook(old)
    Sanitizer(new).notebook(new)
    diffs = []
    for i, (a, b) in enumerate(zip(old["cells"], new["cells"], strict=True), 1):
        if (
            a["cell_type"] != "code"
            or _varies(a)
            or not (d := _cell_difference(a["outputs"], b["outputs"], (rel_tol, abs_tol)))
        ):
            continue
        first = next((s for s in _text(a["source"]).splitlines() if not s.startswith("#|")), "")
        diffs.append(f"{committed.name}, cell {i} (id {a.get('id')}, {first[:60]!r}): {d}")
    return diffs


# --- the command ------------------------------------------------------------------------------


def run(chapter: Path, out: Path | None = None, sanitize_only: bool = False) -> str:
    "Execute (unless `sanitize_only`), sanitize and clean `chapter`, written to `out`/name or in place."
    from fastcore.nbio import write_nb
    from nbdev.clean import nbdev_clean

    nb = json.loads(chapter.read_text(encoding="utf-8")) if sanitize_only else execute(chapter)
    Sanitizer(nb).notebook(nb)
    dst = out / chapter.name if out else chapter
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_nb(nb, dst)
    nbdev_clean(fname=str(dst))
    shown = sum(bool(c.get("outputs")) for c in nb["cells"])
    return f"{chapter.name}: {shown} cells with outputs"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    ap.add_argument("chapters", nargs="*", help="chapter names or paths (default: every chapter in nbs/)")
    ap.add_argument("--out", type=Path, help="write the executed chapters here instead of into nbs/")
    ap.add_argument("--workers", type=int, default=1, help="chapters run at a time, each in its own process")
    ap.add_argument("--sanitize-only", action="store_true", help="do not execute: clean the outputs there are")
    a = ap.parse_args(argv)
    todo, out = chapters(a.chapters), a.out.resolve() if a.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    os.chdir(ROOT)  # nbdev reads pyproject.toml from here, as nbdev-test and nbdev-clean do
    failed = []
    if len(todo) == 1:
        jobs = [(todo[0], None)]
    else:  # a fresh process for each chapter: chapters change the environment, the working folder, global state,
        # and a warning shows once a process (each chapter shows its own, whichever ran before it)
        ctx = get_context("forkserver" if "forkserver" in get_all_start_methods() else "spawn")
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
        pool = ProcessPoolExecutor(max(1, a.workers), mp_context=ctx, max_tasks_per_child=1)
        first = lambda ch: LONGEST.index(ch.stem) if ch.stem in LONGEST else len(LONGEST)
        started = {ch: pool.submit(run, ch, out, a.sanitize_only) for ch in sorted(todo, key=first)}
        jobs = [(ch, started[ch]) for ch in todo]  # reported in the order asked for
    for ch, job in jobs:
        try:
            print(job.result() if job else run(ch, out, a.sanitize_only), flush=True)
        except ChapterFailed as e:
            print(f"{ch.name} failed:\n{e}", file=sys.stderr, flush=True)
            failed.append(ch.name)
            if out:  # for tests/test_chapters.py, which runs several chapters at a time
                (out / f"{ch.stem}.failed.txt").write_text(str(e), encoding="utf-8")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
