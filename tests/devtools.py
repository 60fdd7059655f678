"""The command-line tools the tests drive (from the dev extras: ruff, pre-commit, hadolint, shellcheck,
check-jsonschema; and the package's own scripts), found once, the same way, by every test module."""

import contextlib, io, shutil, socket, subprocess, sys
from pathlib import Path

import pytest


def dev_tool(name: str) -> str:
    "The console script `name`: next to this Python first (the project's venv), then on PATH; fail if missing."
    for cand in (Path(sys.executable).parent / name, shutil.which(name)):
        if cand and Path(cand).is_file():
            return str(cand)
    pytest.fail(f"{name} is not installed (pip install -c constraints.txt -e '.[dev]')")


def shellcheck(*paths, text: str | None = None, cwd=None) -> None:
    "Assert that the scripts at `paths` (or the script `text`) parse (`bash -n`) and pass shellcheck at style severity."
    runs = [(str(p), None) for p in paths] if text is None else [("-", text)]
    for arg, script in runs:
        r = subprocess.run(
            ["bash", "-n", *([arg] if script is None else [])], input=script, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 0, r.stderr
        r = subprocess.run(
            [dev_tool("shellcheck"), "--severity=style", arg],
            input=script,
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, f"shellcheck findings:\n{r.stdout}{r.stderr}"


def free_port() -> int:
    "A TCP port of 127.0.0.1 nobody listens on now."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(
    cond,  # called until it returns something true, which `wait_for` returns
    timeout: float = 30,  # seconds before the test fails (a busy machine may be slow)
    what: str = "a condition",  # named in the failure
    every: float = 0.2,  # seconds between calls
):
    "Poll `cond()` until it returns something true and return that; fail after `timeout` seconds."
    import time

    deadline = time.monotonic() + timeout
    while not (res := cond()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)
    return res


CHROMIUM = Path("/usr/bin/chromium")  # Debian's Chromium, installed by tools/setup-system.sh
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def require_chromium() -> None:
    "Fail at once, with the command that installs it, when the browser the tests drive is missing."
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run tools/setup-system.sh (it installs Debian's chromium)")


def launch_chromium(playwright):
    "Debian's Chromium, headless, driven by Playwright (`playwright install` is never needed)."
    require_chromium()
    return playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)


def in_process(main, *args) -> tuple[int, str, str]:
    "A command line's `main` called in this process with `args`: (exit status, stdout, stderr); argparse's exit too."
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()
