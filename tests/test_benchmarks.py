"""The benchmark CLI and pytest-benchmark suite run end to end at a tiny shape."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_table_json_and_png(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--preset", "tiny", "--methods", "eager,spo_torch,nonexistent",
         "--repeats", "2", "--out-dir", str(tmp_path), "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spo_torch" in proc.stdout and "x eager" in proc.stdout
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert report["device"] and report["versions"]["torch"]
    for rec in report["records"]:
        by = {r["method"]: r for r in rec["results"]}
        assert by["nonexistent"]["status"] == "unavailable"
        for m in ("eager", "spo_torch"):
            r = by[m]
            assert r["status"] == "ok", r
            assert r["time_s_median"] > 0 and len(r["time_s_all"]) == 2
            assert r["errors"]["loss"] < 1e-5 and r["max_grad_err"] < 1e-4


def test_pytest_benchmark_suite_runs(tmp_path):
    env = dict(os.environ, SPO_BENCH_PRESET="tiny")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "benchmarks", "test_suite.py"),
         "--benchmark-disable", "-k", "eager or spo_torch"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
