"""A throwaway PostgreSQL server for the tests: `initdb` and `pg_ctl` in a temporary folder, on a free port of
127.0.0.1, with a password (so that the tests see URLs that carry one). PostgreSQL refuses to run as root, so as
root the server runs as the `postgres` user the Debian package creates (tools/setup-system.sh installs it)."""

import contextlib, os, secrets, shutil, subprocess, tempfile
from pathlib import Path

import pytest
from devtools import free_port


def pg_bin() -> Path:
    "The folder of `initdb` and `pg_ctl`: Debian's newest `/usr/lib/postgresql/<v>/bin`, else the PATH's."
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if found:
        return found[-1].parent
    if initdb := shutil.which("initdb"):
        return Path(initdb).parent
    pytest.fail("PostgreSQL is not installed: run tools/setup-system.sh (it installs the postgresql package)")


def _as_owner(cmd: list[str]) -> list[str]:
    "`cmd` as the `postgres` user when this is root (PostgreSQL will not run as root), else as it is."
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_server(user: str = "optuna", database: str = "optuna"):
    "Start a PostgreSQL server; yield its URL `postgresql://user:password@127.0.0.1:port/database`; stop and remove it."
    bin_dir, port, password = pg_bin(), free_port(), secrets.token_hex(8)
    root = Path(tempfile.mkdtemp(prefix="vit-pg-"))
    data, pwfile = root / "data", root / "pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    opts = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c fsync=off"
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", user, "--pwfile", str(pwfile), "-A", "scram-sha-256"]
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"]
    createdb = [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", user, database]
    try:
        try:
            subprocess.run(_as_owner(initdb), check=True, capture_output=True, text=True, timeout=120)
            subprocess.run(_as_owner(start), check=True, capture_output=True, text=True, timeout=120)
            env = {**os.environ, "PGPASSWORD": password}
            subprocess.run(createdb, env=env, check=True, capture_output=True, text=True, timeout=60)
        except subprocess.CalledProcessError as e:
            log = (root / "log").read_text() if (root / "log").exists() else ""
            pytest.fail(f"PostgreSQL did not start: {e.cmd[:3]}: {e.stderr}{log[-2000:]}")
        yield f"postgresql://{user}:{password}@127.0.0.1:{port}/{database}"
    finally:
        if (data / "postmaster.pid").exists():
            stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"]
            subprocess.run(_as_owner(stop), capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
