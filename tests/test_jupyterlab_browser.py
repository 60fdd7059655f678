"""The editing path in a real browser: the documented setup (`nbdev-install-hooks`, then `jupyter lab` in the
project's root) on a copy of the data chapter, JupyterLab on 127.0.0.1 with a token, driven by Playwright in Debian's
Chromium (as in test_serve_browser.py): the chapter's first code cells run in the project's environment,
a cell is added and run, and saving keeps the notebook clean (nbdev's Jupyter hook). Everything is
written under tmp_path: the chapter, the Jupyter configuration ($HOME), the screenshot."""

import json, os, secrets, shutil, signal, subprocess, sys, time, urllib.error, urllib.request
from pathlib import Path

import pytest
from devtools import dev_tool, free_port, launch_chromium, require_chromium, wait_for

ROOT = Path(__file__).resolve().parents[1]
KERNEL_IDLE = """() => {  // the chapter's kernel started and is idle
  const k = document.querySelector('.jp-Toolbar-kernelName');
  const i = document.querySelector('.jp-Notebook-ExecutionIndicator');
  return k && i && k.innerText.trim() && !k.innerText.includes('No Kernel') && i.dataset.status === 'idle';
}"""
CELLS_RAN = """n => [...document.querySelectorAll('.jp-CodeCell .jp-InputPrompt')]
  .filter(p => /\\[\\d+\\]/.test(p.innerText)).length >= n"""  # at least n code cells show an execution count


class JupyterLab:
    """`jupyter lab` in `project` on 127.0.0.1:`port` with a token; `stop()` shuts it and its kernels down.
    Started in the project's root, not with `jupyter lab nbs`: nbdev's save hook opens the notebook's path
    (relative to Jupyter's root) from the server's working directory, so the two must be the same folder."""

    def __init__(self, project: Path, env: dict):
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = project.parent / "jupyterlab.log"
        cmd = [
            dev_tool("jupyter"),
            "lab",
            "--no-browser",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={self.port}",
            "--ServerApp.port_retries=0",
            f"--IdentityProvider.token={self.token}",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]  # nothing from the network
        if os.geteuid() == 0:
            cmd.append("--allow-root")  # CI runs as root
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=project, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def api(self, path: str, method: str = "GET"):
        req = urllib.request.Request(self.url + path, method=method, headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.loads(r.read() or b"{}")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"jupyter lab exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")
        try:
            return bool(self.api("/api/status"))
        except (urllib.error.URLError, OSError):
            return False

    def stop(self):
        if self.proc.poll() is None:
            try:
                self.api("/api/shutdown", "POST")  # stops the kernels, then the server
            except (urllib.error.URLError, OSError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):  # anything left in its process group (kernels)
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(0.5)
        self.proc.wait(timeout=10)


def test_jupyterlab_runs_and_saves_the_data_chapter(tmp_path):
    require_chromium()
    from playwright.sync_api import sync_playwright

    project, home = tmp_path / "project", tmp_path / "home"
    (project / "nbs").mkdir(parents=True)
    home.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", project)  # [tool.nbdev]: the hook reads jupyter_hooks from here
    shutil.copy2(ROOT / "nbs" / "data.ipynb", project / "nbs")
    (project / "vit_nbdev").symlink_to(ROOT / "vit_nbdev")  # the chapter finds ../vit_nbdev/sample
    env = {**os.environ, "HOME": str(home), "GIT_CEILING_DIRECTORIES": str(tmp_path.parent)}
    for k in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        env.pop(k, None)

    # the README's setup: nbdev's Jupyter hook goes into ~/.jupyter (outside a git checkout, only that part)
    subprocess.run(
        [dev_tool("nbdev-install-hooks")], cwd=tmp_path, env=env, capture_output=True, timeout=60, check=True
    )
    assert "nbdev_clean_jupyter" in (home / ".jupyter" / "jupyter_server_config.py").read_text()

    notification = (
        home
        / ".jupyter"
        / "lab"
        / "user-settings"
        / "@jupyterlab"
        / "apputils-extension"
        / "notification.jupyterlab-settings"
    )
    notification.parent.mkdir(parents=True)
    notification.write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )  # no "news?" prompt over the page

    cells = json.loads((project / "nbs" / "data.ipynb").read_text())["cells"]
    first_output = None
    lab = JupyterLab(project, env)
    try:
        wait_for(lab.ready, 90, "jupyter lab to answer")
        with sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                requests = []
                page.on("request", lambda r: requests.append(r.url))
                page.goto(f"{lab.url}/lab/tree/nbs/data.ipynb?token={lab.token}")
                page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
                page.wait_for_function(KERNEL_IDLE, timeout=90_000)
                page.locator(".jp-Notebook .jp-Cell").first.click()
                page.keyboard.press("Escape")  # command mode, first cell selected
                done = CELLS_RAN
                ran = 0
                for i, cell in enumerate(cells[:30]):  # Shift+Enter down the chapter until a cell shows a result
                    page.keyboard.press("Shift+Enter")
                    if cell["cell_type"] != "code":
                        continue
                    ran += 1
                    page.wait_for_function(
                        done, arg=ran, timeout=120_000
                    )  # its prompt shows an execution count: it ran
                    out = (
                        page.locator(".jp-Notebook .jp-Cell")
                        .nth(i)
                        .locator(".jp-OutputArea-output:not([data-mime-type*=stderr])")
                    )
                    if out.count():
                        first_output = (i, out.first.inner_text())
                        break
                assert first_output and first_output[1].strip(), f"none of the first {ran} code cells showed a result"
                # an edit: a new cell below, run in the kernel the chapter names: the project's environment
                page.keyboard.press("Escape")
                page.keyboard.press("b")
                page.keyboard.press("Enter")
                page.keyboard.type("import sys; sys.prefix")
                page.keyboard.press("Shift+Enter")
                page.wait_for_function(done, arg=ran + 1, timeout=60_000)
                prefix = (
                    page.locator(".jp-CodeCell", has_text="import sys; sys.prefix")
                    .locator(".jp-OutputArea-output")
                    .inner_text()
                )
                assert prefix.strip() == repr(sys.prefix), (
                    f"the kernel runs in {prefix}, not in the project's environment {sys.prefix}"
                )
                page.screenshot(path=str(tmp_path / "jupyterlab.png"))

                page.keyboard.press("Escape")
                page.keyboard.press("Control+s")
                saved = project / "nbs" / "data.ipynb"
                wait_for(lambda: "sys.prefix" in saved.read_text(), 30, "the notebook to be saved")
                assert all(u.startswith((lab.url, "data:", "blob:", "ws://127.0.0.1")) for u in requests), [
                    u for u in requests if not u.startswith(lab.url)
                ]
            except Exception:
                page.screenshot(path=str(tmp_path / "jupyterlab-failure.png"))
                raise
            finally:
                browser.close()
    finally:
        lab.stop()
    assert lab.proc.returncode is not None

    # saved through nbdev's hook: already clean (nbdev-clean changes nothing), the run's outputs kept
    text = saved.read_text()
    check = project / "nbs" / "data-check.ipynb"
    check.write_text(text)
    subprocess.run(
        [dev_tool("nbdev-clean"), "--fname", str(check)],
        cwd=project,
        env=env,
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert check.read_text() == text, "the saved notebook is not clean: is jupyter_hooks = true in [tool.nbdev]?"
    nb = json.loads(text)
    assert all(c.get("execution_count") is None for c in nb["cells"] if c["cell_type"] == "code")
    errors = [o for c in nb["cells"] for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, [f"{o['ename']}: {o['evalue']}" for o in errors]
    assert any("sys.prefix" in "".join(c["source"]) and c["outputs"] for c in nb["cells"])
    print(
        f"\nfirst result (cell {first_output[0]}): {first_output[1][:120]!r}; kernel prefix {prefix.strip()}; "
        f"screenshot {tmp_path / 'jupyterlab.png'}"
    )


def test_chapters_name_the_kernel_of_the_project_environment():
    "Every chapter names the `python3` kernel, and in this environment that kernel is this environment's Python."
    names = {
        p.name: json.loads(p.read_text()).get("metadata", {}).get("kernelspec", {}).get("name")
        for p in (ROOT / "nbs").glob("*.ipynb")
    }
    assert set(names.values()) == {"python3"}, names
    r = subprocess.run(
        [dev_tool("jupyter"), "kernelspec", "list", "--json"], capture_output=True, text=True, timeout=60, check=True
    )
    spec = json.loads(r.stdout)["kernelspecs"]["python3"]
    argv0 = spec["spec"]["argv"][0]
    # `python` in a kernelspec means "the Python running Jupyter" (jupyter_client swaps in sys.executable)
    assert argv0 in ("python", "python3") or Path(argv0).resolve() == Path(sys.executable).resolve(), spec
    assert Path(spec["resource_dir"]).resolve().is_relative_to(Path(sys.prefix).resolve()), (
        f"python3 resolves to {spec['resource_dir']}, outside this environment ({sys.prefix}): remove that kernelspec"
    )
