"""How the chapters read: exported cells per chapter (count, median and largest, in lines), code lines over 120
characters in each generated module, and how many code cells show an output.

    python tools/chapter_stats.py                # the working tree
    python tools/chapter_stats.py --rev 1c729f3  # a commit, read from git (e.g. to compare before and after)
    python tools/chapter_stats.py --json         # the same figures as JSON
"""

import argparse, json, statistics, subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 120  # ruff's line length (E501) in pyproject.toml


def read(path: str, rev: str | None) -> str:
    "The text of `path` (relative to the repository) in the working tree, or at commit `rev`."
    if rev is None:
        return (ROOT / path).read_text()
    return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def tracked(pattern: str, rev: str | None) -> list[str]:
    "The files matching `pattern` (a git pathspec glob) in the working tree or at commit `rev`."
    if rev is None:
        return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))
    out = subprocess.run(["git", "ls-tree", "-r", "--name-only", rev], cwd=ROOT, capture_output=True, text=True)
    return sorted(p for p in out.stdout.split() if Path(p).match(pattern))


def chapter_stats(path: str, rev: str | None) -> dict:
    "Exported cells (their sizes in lines) and code cells with an output, of one chapter."
    cells = json.loads(read(path, rev))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    sizes = [len("".join(c["source"]).splitlines()) for c in code if "".join(c["source"]).startswith("#| export")]
    return dict(
        export_cells=len(sizes),
        median=statistics.median(sizes) if sizes else 0,
        largest=max(sizes, default=0),
        cells_with_output=sum(bool(c.get("outputs")) for c in code),
        sizes=sizes,
    )


def module_stats(path: str, rev: str | None) -> dict:
    "Lines of a generated module, and those longer than `LIMIT`."
    lines = read(path, rev).splitlines()
    return dict(lines=len(lines), long=sum(len(l) > LIMIT for l in lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="a git commit (default: the working tree)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of tables")
    a = ap.parse_args(argv)
    chapters = {Path(p).stem: chapter_stats(p, a.rev) for p in tracked("nbs/*.ipynb", a.rev)}
    modules = {Path(p).stem: module_stats(p, a.rev) for p in tracked("vit_nbdev/*.py", a.rev) if "_modidx" not in p}
    everything = [s for c in chapters.values() for s in c["sizes"]]
    total = dict(
        export_cells=len(everything),
        median=statistics.median(everything),
        largest=max(everything),
        lines=sum(m["lines"] for m in modules.values()),
        long=sum(m["long"] for m in modules.values()),
    )
    out = dict(rev=a.rev or "working tree", chapters=chapters, modules=modules, total=total)
    if a.json:
        print(json.dumps({**out, "chapters": {k: {**v, "sizes": None} for k, v in chapters.items()}}, indent=1))
        return out
    print(f"## {out['rev']}\n")
    print("| chapter | exported cells | median | largest | code cells with output |\n|---|--:|--:|--:|--:|")
    for name, c in chapters.items():
        print(f"| {name} | {c['export_cells']} | {c['median']} | {c['largest']} | {c['cells_with_output']} |")
    print(f"\n| module | lines | over {LIMIT} |\n|---|--:|--:|")
    for name, m in modules.items():
        print(f"| {name} | {m['lines']} | {m['long']} |")
    share = 100 * total["long"] / total["lines"]
    print(
        f"\nall: {total['export_cells']} exported cells, median {total['median']}, largest {total['largest']}; "
        f"{total['lines']} package lines, {total['long']} over {LIMIT} ({share:.1f}%)"
    )
    return out


if __name__ == "__main__":
    main()
