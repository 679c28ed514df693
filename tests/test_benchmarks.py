"""The benchmark CLI and pytest-benchmark suite run end to end at a tiny shape."""

import json
import os
import re
import subprocess
import sys
import time
from unittest import mock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_writes_table_json_and_png(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--preset", "tiny", "--methods", "eager,spo_torch,cce_exact,nonexistent",
         "--repeats", "2", "--out-dir", str(tmp_path), "--name", "smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "spo (torch)" in proc.stdout and "x eager" in proc.stdout and "peak extra MiB" in proc.stdout
    # every method asked for has a row, with the reason when it could not run
    assert "unavailable: cut-cross-entropy's kernels need CUDA" in proc.stdout
    assert "unavailable: unknown method 'nonexistent'" in proc.stdout
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert (tmp_path / "smoke.png").stat().st_size > 1000
    assert (tmp_path / "smoke.md").read_text().count("| spo (torch) |") == 2
    assert report["device"] and report["versions"]["torch"]
    assert len(report["tables"]) == 2
    for table in report["tables"]:
        by = {r["method"]: r for r in table["results"]}
        assert by["nonexistent"]["status"] == "unavailable"
        for m in ("eager", "spo_torch"):
            r = by[m]
            assert r["status"] == "ok", r
            assert r["time_s_median"] > 0 and len(r["time_s_all"]) == 2
            assert r["errors"]["loss"] < 1e-5 and r["max_grad_err"] < 1e-4


def test_cli_default_output_is_outside_the_package_and_never_overwrites(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks", "--workload", "logits", "--P", "1", "--T", "8", "--V", "33",
           "--methods", "spo_torch", "--repeats", "1"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "runs" / "bench"
    (name,) = [p[:-len(".jsonl")] for p in os.listdir(out) if p.endswith(".jsonl")]
    assert re.fullmatch(r"logits-P1-T8-V33-fp32-c0\.5-random-cpu-\d{8}-\d{6}", name), name
    assert (out / f"{name}.md").read_text().count("| spo (torch) |") == 1
    assert not os.path.exists(os.path.join(ROOT, "benchmarks", "results", f"{name}.jsonl"))
    # runs started in the same second (the clock stopped here) get names of their own
    from benchmarks import cli
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with mock.patch.object(cli.time, "strftime", return_value=stamp):
        names = [cli.claim_default_name(str(out), "same") for _ in range(3)]
    assert names == [f"same-{stamp}", f"same-{stamp}-2", f"same-{stamp}-3"]
    assert all((out / f"{n}.jsonl").exists() for n in names)


def test_pytest_benchmark_suite_runs(tmp_path):
    env = dict(os.environ, SPO_BENCH_PRESET="tiny")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join(ROOT, "benchmarks", "test_suite.py"),
         "--benchmark-disable", "-k", "eager or spo_torch"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_stats_cost_measures_both_settings(capsys):
    """The statistics' cost script times the forward with token_stats off and on for each backend and path
    (it asserts the statistics were computed exactly when asked) and prints one row each."""
    from benchmarks import stats_cost
    assert stats_cost.main(["--backends", "torch", "--tokens", "24", "--hidden", "16", "--vocab", "97",
                            "--repeats", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| torch |")]
    assert len(rows) == 2 and all(float(r.split("|")[5].strip().rstrip("x")) > 0 for r in rows)
