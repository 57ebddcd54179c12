"""The two GPU calls' scripts (benchmarks/gpu_first_call.sh, benchmarks/gpu_suite.sh) in their
CPU dry runs: every step runs, the files appear flat under $OUT (at most 8: what the device tool
returns), the summary names every step, and a step that raises is reported while the next ones
still run. Plus the first call's pieces that need no run: the sm_90-only build flags and the
reading of the static report's predictions."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from regnet_kernels.bench import first_call, report

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("install", "env", "build", "warm", "parity", "eval", "static", "train", "stage3",
         "compile")


def run_script(name, out, **env):
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), PY=sys.executable, **env)
    return subprocess.run(["bash", str(ROOT / "benchmarks" / name)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)


def returned_files(out):
    """What the device tool would return: plain files directly under $OUT, at most 8."""
    entries = list(out.iterdir())
    assert all(p.is_file() for p in entries), entries
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in entries), entries
    assert len(entries) <= 8, entries
    return {p.name for p in entries}


def summary_rows(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("step", "phase"):
            rows[cells[0]] = cells
    return rows


def test_first_call_dry_run_every_step_and_an_injected_failure(tmp_path):
    proc = run_script("gpu_first_call.sh", tmp_path, FIRST_CALL_FAIL="parity")
    assert proc.returncode == 0, proc.stderr
    files = returned_files(tmp_path)
    assert files == {"00-summary.md", "log.txt", "env.txt", "parity.md", "eval.md", "train.md",
                     "stage3.md", "results.csv"}
    rows = summary_rows((tmp_path / "00-summary.md").read_text())
    assert list(rows) == list(STEPS)
    status = {step: rows[step][1] for step in STEPS}
    # the injected failure: reported with its reason, its traceback in the log, and every
    # step after it ran
    assert status["parity"].startswith("FAILED (RuntimeError: injected failure"), status
    log = (tmp_path / "log.txt").read_text()
    assert "Traceback" in log and "FIRST_CALL_FAIL=parity" in log
    for step in ("env", "warm", "eval", "train", "stage3"):
        assert status[step] == "ok", (step, status[step], log[-3000:])
    for step in ("install", "build", "static", "compile"):  # nothing to do here, said so
        assert status[step].startswith("skipped ("), (step, status[step])
    assert "no CUDA device" in status["build"]
    # the steps' files: the fused Triton model ran (the interpreter), CUDA is reported missing
    parity = (tmp_path / "parity.md").read_text()
    assert "| logits |" in parity and "cuda: unavailable (needs a CUDA device)" in parity
    assert "graph replay" in (tmp_path / "eval.md").read_text().lower()
    assert "skipped: no CUDA device" in (tmp_path / "eval.md").read_text()
    assert "| logits |" in (tmp_path / "train.md").read_text()
    stage3 = (tmp_path / "stage3.md").read_text()
    assert "prediction: unavailable (" in stage3 and "| s2.first.b | triton |" in stage3
    csv_rows = report.read_csv(tmp_path / "results.csv")
    assert {(r["mode"], r["provider"], r["status"]) for r in csv_rows} >= {
        ("eval", "eager", "ok"), ("eval", "triton", "ok"), ("eval", "cuda", "unavailable"),
        ("train", "eager_cl", "ok"), ("train", "triton", "ok")}


def test_gpu_suite_dry_run_lists_failures_first(tmp_path):
    tests = tmp_path / "planted" / "test_planted.py"
    tests.parent.mkdir()
    tests.write_text("def test_passes():\n    pass\n\n\n"
                     "def test_fails():\n    assert False, 'planted failure'\n")
    out = tmp_path / "out"
    proc = run_script("gpu_suite.sh", out, SUITE_DRY_TESTS=str(tests))
    assert proc.returncode == 0, proc.stderr
    assert returned_files(out) == {"00-summary.md", "tests.log", "junit-dry.xml", "env.txt"}
    summary = (out / "00-summary.md").read_text()
    failures, phases = summary.index("## Failures"), summary.index("## Phases")
    assert failures < summary.index("planted failure") < phases
    rows = summary_rows(summary)
    assert rows["build"][1] == "skipped (no CUDA device)"
    assert rows["dry"][2].startswith("1 failed, 1 passed") and "(exit 1)" in rows["dry"][2]
    assert "test_passes PASSED" in (out / "tests.log").read_text()


STATIC_CSV = (Path(__file__).resolve().parents[1] / "benchmarks" / "results"
              / "static-sm90-regnety_8gf-after-2026-12-01.csv")


def test_predictions_from_the_static_report_csv():
    """The rows `bench --static` writes (its CSV, as committed under benchmarks/results)."""
    import csv
    with open(STATIC_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    found = first_call.predictions(rows, ("s3.first.b", "s3.rest.b"))
    first = next(r for r in rows if r["mode"] == "eval" and r["layers"] == "s3.b1"
                 and r["op"] == "conv_bn_act_squeeze")
    rest = next(r for r in rows if r["mode"] == "eval" and r["layers"].startswith("s3.b2..")
                and r["op"] == "conv_bn_act_squeeze")
    assert found == {"s3.first.b": {"triton": ("predicted us",
                                               f"{float(first['predicted_us']):.0f}")},
                     "s3.rest.b": {"triton": ("predicted us",
                                              f"{float(rest['predicted_us']):.0f}")}}
    assert first_call.predictions(rows, ("s5.first.b",)) == {}
    assert first_call._range_ratio(1500, "1338-2175") == "inside"
    assert first_call._range_ratio(4350, "1338-2175") == "2.00x above"
    assert first_call._range_ratio(500, "1000") == "0.50x"


PLAN = first_call.Plan(False, "cuda", "regnety_8gf", "regnety_8gf", 224, "bf16", "fp32",
                       (256, 1), 1, 64, 3, 256, 1)


def test_static_report_missing_is_a_reason_not_a_failure():
    """Before `bench --static` exists (or when it fails), the reason from its stderr."""
    fake = [sys.executable, "-c", "import sys; sys.exit('error: unrecognized arguments: --static')"]
    with pytest.raises(first_call.Skipped, match="unrecognized arguments: --static"):
        first_call.static_predictions(PLAN, 30, fake)


def test_static_report_read_from_its_csv_file():
    """The command gets --markdown PATH --csv PATH; the predictions come from the CSV."""
    fake = [sys.executable, "-c", "import shutil, sys; a = sys.argv; "
            f"shutil.copy({str(STATIC_CSV)!r}, a[a.index('--csv') + 1])"]
    found = first_call.static_predictions(PLAN, 30, fake)
    assert set(found) == {"s3.first.b", "s3.rest.b"}
    assert found["s3.rest.b"]["triton"][0] == "predicted us"
