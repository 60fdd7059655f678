"""bench/profile_request.py on a tiny configuration: every probe on the request's path records time (a rename in the
serving code fails here, not silently in the next profile), and profile.json has what the tables are made from.
No timing is asserted: only that each measurement was made."""

import json, os, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "vit_nbdev" / "checkpoints" / "vit-cifar-small-cifar10"
# the stages of a request the engine chapter's table reads, by their names in the script's SEGMENTS
STAGES = {"read", "parse", "decode + preprocess", "queue", "resize", "forward", "softmax", "respond", "request"}


def test_profile_request_tiny(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "profile_request.py"), "--preset", "vit-cifar-tiny"]
    cmd += ["--package", str(SHIPPED), "--threads", "1", "--seconds", "0.05", "--min-reps", "3", "--out", str(tmp_path)]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Request segments, median ms" in r.stdout and "| queue |" in r.stdout, r.stdout[-3000:]

    R = json.loads((tmp_path / "profile.json").read_text())
    assert {"command", "host", "settings", "probes", "segments", "models"} <= set(R)
    assert {"cpu", "cpus", "torch", "omp_wait_policy"} <= set(R["host"])
    assert STAGES <= set(R["segments"]), set(R["segments"])
    probes_marked = {mark[:-1] for a, b in R["segments"].values() for mark in (a, b)}
    assert set(R["probes"]) <= probes_marked, "a probe that no segment reads"
    assert set(R["models"]) == {"vit-cifar-tiny", SHIPPED.name}
    for name, m in R["models"].items():
        c = m["threads"]["1"]
        for seg in [*R["segments"], "overhead"]:
            assert c["request"][seg]["n"] >= 3, (name, seg)  # every request had every probe's marks
        assert c["request"]["request"]["median_ms"] > 0 and "cpu_median_ms" in c["request"]["request"]
        assert {"decode", "preprocess", "resize", "forward"} <= set(c["stages"])
        assert all(s["n"] > 0 for s in c["stages"].values())
        assert c["ops"]["families"] and c["ops"]["top"] and "matmul" in c["ops"]["families"]
        assert m["variants"]["arms"]["eager fp32"]["n"] > 0, m["variants"]
        assert m["package"]["image_size"] == 32
    assert R["models"]["vit-cifar-tiny"]["package"]["path"] == "<tmp>/vit-cifar-tiny"
