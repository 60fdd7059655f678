"""The module map of `vit_nbdev` as a mermaid graph, made from the code's own imports.

    python tools/module_map.py            # print the graph of the package as it is
    python tools/module_map.py --check    # exit 1 if the graph in nbs/index.ipynb or README.md differs,
                                          # or if a module imports another's `_names`
    python tools/module_map.py --write    # put the graph of the code into nbs/index.ipynb and README.md
    python tools/module_map.py --package DIR   # the graph of another copy of the package (e.g. an old commit's)

An arrow `a --> b`: module `a` imports `b` when it is imported; a dotted arrow `a -.-> b`: `a` imports `b`
only inside a function (after parsing arguments, or on first use).
"""

import argparse, ast, json, re, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "%% module map: made by tools/module_map.py", "%% end of module map"


def edges(package: Path) -> tuple[set, set]:
    "`(eager, lazy)`: sets of `(importer, imported)` between the package's modules."
    mods = {p.stem for p in package.glob("*.py") if not p.stem.startswith("_")}
    eager, lazy = set(), set()
    for m in sorted(mods):
        tree = ast.parse((package / f"{m}.py").read_text())
        top = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level == 1:
                    names = [node.module] if node.module else [a.name for a in node.names]
                elif node.module and node.module.startswith("vit_nbdev."):
                    names = [node.module.split(".")[1]]
                elif node.module == "vit_nbdev":
                    names = [a.name for a in node.names]
                else:
                    continue
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("vit_nbdev.")]
            else:
                continue
            for n in names:
                if n in mods and n != m:
                    (eager if id(node) in top else lazy).add((m, n))
    return eager, lazy - eager


def private_imports(package: Path) -> list[str]:
    "Imports of another module's private (`_`) names: `'<module>: <names> from <module>'` for each."
    found = []
    for f in sorted(package.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("vit_nbdev")):
                if names := [a.name for a in node.names if a.name.startswith("_") and a.name != "__version__"]:
                    found.append(f"{f.stem}: {', '.join(names)} from {node.module}")
    return found


def mermaid(package: Path) -> str:
    "The graph, one arrow per line, sorted."
    eager, lazy = edges(package)
    mods = sorted({p.stem for p in package.glob("*.py") if not p.stem.startswith("_")})
    lines = ["flowchart TB", f"  {BEGIN}"] + [f"  {m}" for m in mods]
    lines += [f"  {a} --> {b}" for a, b in sorted(eager)] + [f"  {a} -.-> {b}" for a, b in sorted(lazy)]
    return "\n".join(lines + [f"  {END}"])


def blocks(text: str) -> list[str]:
    "The module-map graphs found in `text` (between the BEGIN and END comment lines, inclusive)."
    return [m.group(0) for m in re.finditer(re.escape(BEGIN) + r".*?" + re.escape(END), text, re.S)]


def documents() -> dict[str, str]:
    nb = json.loads((ROOT / "nbs" / "index.ipynb").read_text())
    return {
        "nbs/index.ipynb": "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown"),
        "README.md": (ROOT / "README.md").read_text(),
    }


def check(package: Path = ROOT / "vit_nbdev") -> list[str]:
    "Where the documented module map is missing or differs from the code's; imports of another module's private names."
    want = "\n".join(l.strip() for l in mermaid(package).splitlines()[1:])
    problems = []
    for name, text in documents().items():
        found = blocks(text)
        if not found:
            problems.append(f"{name}: no module map (a block starting with {BEGIN!r})")
        for b in found:
            if "\n".join(l.strip() for l in b.splitlines()) != want:
                problems.append(f"{name}: the module map differs from the code's imports")
    return problems + [f"private names imported across modules: {p}" for p in private_imports(package)]


def write(package: Path = ROOT / "vit_nbdev") -> None:
    "Replace the module map in nbs/index.ipynb and README.md by the code's."
    graph = "\n".join(mermaid(package).splitlines()[1:])
    sub = lambda text: re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda m: graph.strip(), text, flags=re.S)
    p = ROOT / "nbs" / "index.ipynb"
    nb = json.loads(p.read_text())
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            c["source"] = sub("".join(c["source"])).splitlines(True)
    p.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    (ROOT / "README.md").write_text(sub((ROOT / "README.md").read_text()))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--package", type=Path, default=ROOT / "vit_nbdev")
    a = ap.parse_args()
    if a.write:
        write(a.package)
    if a.check:
        problems = check(a.package)
        print("\n".join(problems) or "the module map in the docs matches the code")
        sys.exit(1 if problems else 0)
    if not (a.check or a.write):
        print(mermaid(a.package))
