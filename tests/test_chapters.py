"""Every chapter runs, and shows what its committed outputs show (the docs show those outputs).

Each chapter is executed as `nbdev-test` executes it, by `tools/run_chapters.py` (execnb's `CaptureShell`
in nbs/, `#| slow` cells skipped, each chapter in a process of its own, two at a time: the chapters this
session selects are run once, by the `fresh` fixture), and its fresh outputs are compared cell by
cell with the outputs committed in the notebook, both sanitized alike (machine paths, memory addresses,
the run's timestamps and durations taken out):

- text must be equal, except numbers, which may differ within the tolerance below;
- an image (a plot) must be there; its pixels are not compared;
- a cell marked `#| varies` is executed, but its text is not compared.

When a chapter is meant to show something else, run `python tools/run_chapters.py <chapter>` and commit
the notebook with its new outputs."""

import importlib.util, json, subprocess, sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "run_chapters.py"
REL_TOL, ABS_TOL = 0.05, 0.02  # two numbers agree when within 5% of each other, or 0.02 apart
WORKERS = 2  # chapters run at a time, as `nbdev-test --n-workers 2`
TIMEOUT_S = 3600  # all the chapters selected (nbdev stops a cell after 600 s)

_spec = importlib.util.spec_from_file_location("run_chapters", TOOL)
run_chapters = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(run_chapters)
TEST = "test_chapter_runs_and_shows_its_committed_outputs"


@pytest.fixture(scope="module")
def fresh(request, tmp_path_factory):
    "The chapters this session tests, executed once, `WORKERS` at a time; `(folder of the runs, the tool's stderr)`."
    names = [it.callspec.params["chapter"] for it in request.session.items if it.originalname == TEST]
    out = tmp_path_factory.mktemp("chapters")
    r = subprocess.run(
        [sys.executable, str(TOOL), *names, "--out", str(out), "--workers", str(WORKERS)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    return out, r.stderr


@pytest.mark.parametrize("chapter", [p.name for p in run_chapters.chapters()])
def test_chapter_runs_and_shows_its_committed_outputs(chapter, fresh):
    out, stderr = fresh
    if (failed := out / f"{Path(chapter).stem}.failed.txt").exists():
        pytest.fail(f"{chapter} does not run:\n{failed.read_text()[-6000:]}", pytrace=False)
    assert (out / chapter).exists(), f"tools/run_chapters.py wrote no {chapter}:\n{stderr[-6000:]}"
    diffs = run_chapters.compare(ROOT / "nbs" / chapter, out / chapter, REL_TOL, ABS_TOL)
    assert not diffs, (
        f"{chapter}: {len(diffs)} cell(s) show something other than the committed outputs. If that is meant, "
        f"run `python tools/run_chapters.py {Path(chapter).stem}` and commit the chapter.\n" + "\n".join(diffs[:5])
    )


# --- the comparison and the sanitizing, on small made-up chapters -----------------------------


def code_cell(id, source, outputs):
    return {
        "cell_type": "code",
        "id": id,
        "metadata": {},
        "source": source,
        "outputs": outputs,
        "execution_count": None,
    }


def text_out(s):
    return {"output_type": "execute_result", "data": {"text/plain": [s]}, "metadata": {}, "execution_count": None}


def chapter(tmp_path, name, cells) -> Path:
    p = tmp_path / name / "demo.ipynb"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return p


def demo(accuracy="0.753", plot=True, timing="40.2", seed="3fa2", second="{time2}"):
    png = {"output_type": "display_data", "data": {"image/png": "iVBORw0KGgo=\n"}, "metadata": {}}
    return [
        code_cell("a1", "evaluate()", [text_out(f"accuracy {accuracy} on 1,000 images, v{{time1}}, v{second}")]),
        code_cell("b2", "plot()", [png] if plot else []),
        code_cell("c3", "#| varies\nbench()", [text_out(f"{timing} images per request, run {seed}")]),
    ]


def test_numbers_may_differ_within_the_tolerance_and_no_more(tmp_path):
    committed = chapter(tmp_path, "committed", demo())
    same = lambda **kw: run_chapters.compare(committed, chapter(tmp_path, "run", demo(**kw)), REL_TOL, ABS_TOL)
    assert same(accuracy="0.766") == []  # 0.013 apart
    assert same(timing="97.0", seed="77b1") == []  # `#| varies`: not compared
    assert same(second="{time1}") == []  # two versions registered in the same second, this time
    assert run_chapters.first_difference("fingerprint 2a91ae42138ce260", "fingerprint 2a91ae42139ce260")
    [diff] = same(accuracy="0.853")
    assert "demo.ipynb, cell 1 (id a1, 'evaluate()')" in diff and "0.753 and 0.853 differ by more than 5%" in diff
    [diff] = same(plot=False)
    assert "cell 2" in diff and "the committed chapter shows more: image/png" in diff


def test_sanitizing_takes_out_what_changes_from_machine_to_machine(tmp_path):
    now = datetime.now(UTC)
    text = (
        f"{ROOT}/nbs/artifacts <Store object at 0x7f3a2b1c0d90> v{now:%Y%m%d-%H%M%S}-123-a1b2c3 "
        f"created {now.isoformat()} in 12.5 s (80.1 it/s)\n\x1b[31mred\x1b[0m\n"
        "Map: 100%|██████████| 1000/1000 [00:00<00:00, 3158.29 examples/s]\n"
        "kept from 2024-01-02, 30 s\n\r      \r\n"
        "cat v1~1a2477e82d0~71d09b792b98~3~1.coZC8ZOSSFOt {'load_seconds': 6.418, 'flush_s': 3600}\n"
    )
    big = {"output_type": "display_data", "data": {"text/html": ["<p>x</p>" * 20_000]}, "metadata": {}}
    fig = {"output_type": "display_data", "data": {"image/png": "A" * 1_400_000, "text/plain": ["<Figure>"]}}
    nb = {"cells": [code_cell("a1", "x", [{"output_type": "stream", "name": "stdout", "text": [text]}, big, fig])]}
    stream, note, fig = run_chapters.Sanitizer(nb).notebook(nb)["cells"][0]["outputs"]
    assert "".join(stream["text"]) == (
        "{repo}/nbs/artifacts <Store object> v{time1} created {time2} in … s (… it/s)\n"
        "red\nkept from 2024-01-02, 30 s\ncat v1~{id1}~3~1.… {'load_seconds': …, 'flush_s': 3600}\n"
    )
    assert note["data"] == {
        "text/plain": ["[text/html of 160 kB left out by tools/run_chapters.py: too large for the docs]"]
    }
    assert (
        fig["data"]["text/plain"][1]
        == "[image/png of 1,050 kB left out by tools/run_chapters.py: too large for the docs]"
    )
