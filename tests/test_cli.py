import subprocess
import sys
from pathlib import Path

import pytest

from regnet_kernels import list_models
from regnet_kernels.__main__ import main


def run_cli(capsys, *argv):
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def stage_rows(out):
    """The stage table's rows as lists of cells (split on whitespace)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


@pytest.mark.parametrize("name", ["regnety_8gf", "RegNetY-8.0GF", "regnety_080"])
def test_info_paper_y_8gf(capsys, name):
    status, out, _ = run_cli(capsys, "info", name)
    assert status == 0
    rows = stage_rows(out)
    # stage, depth, width, group width, groups, SE width (first/rest), output
    assert rows == [
        ["1", "2", "168", "56", "3", "8/42", "56x56"],
        ["2", "4", "448", "56", "8", "42/112", "28x28"],
        ["3", "10", "896", "56", "16", "112/224", "14x14"],
        ["4", "1", "2016", "56", "36", "224", "7x7"],
    ]
    assert "39.180 M" in out and "7.963 GF" in out and "17.969 M" in out
    assert "rounding rule: pycls" in out
    assert out.startswith("regnety_8gf ")


def test_info_torchvision_y_8gf(capsys):
    status, out, _ = run_cli(capsys, "info", "regnet_y_8gf")
    assert status == 0
    assert [row[2] for row in stage_rows(out)] == ["224", "448", "896", "2016"]
    assert "39.381 M" in out and "8.473 GF" in out
    assert "rounding rule: torchvision" in out


def test_info_x_model_has_no_se_and_follows_resolution(capsys):
    status, out, _ = run_cli(capsys, "info", "regnetx_1.6gf", "--resolution", "256")
    assert status == 0
    rows = stage_rows(out)
    assert [row[5] for row in rows] == ["-"] * 4
    assert [row[6] for row in rows] == ["64x64", "32x32", "16x16", "8x8"]
    assert "at 256x256" in out


def test_list_shows_every_model_with_rounding_and_aliases(capsys):
    status, out, _ = run_cli(capsys, "list")
    assert status == 0
    rows = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert list(rows) == list_models()
    assert "torchvision" in rows["regnet_y_8gf"] and "regnety_080_tv" in rows["regnet_y_8gf"]
    assert "pycls" in rows["regnety_8gf"] and "RegNetY-8.0GF" in rows["regnety_8gf"]
    assert "regnety_1280" in rows["regnety_128gf"]


def test_unknown_model_fails_with_suggestion(capsys):
    status, out, err = run_cli(capsys, "info", "regnety_8g")
    assert status != 0 and out == ""
    assert "unknown model 'regnety_8g'" in err and "regnety_8gf" in err


def test_module_entry_point_exits_nonzero_without_traceback():
    proc = subprocess.run([sys.executable, "-m", "regnet_kernels", "info", "regnet_y_8gff"],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode != 0
    assert "regnet_y_8gf" in proc.stderr and "Traceback" not in proc.stderr


def test_a_command_is_required(capsys):
    with pytest.raises(SystemExit) as exited:
        main([])
    assert exited.value.code != 0


def test_env_reports_versions_and_every_backend(capsys):
    import torch

    status, out, _ = run_cli(capsys, "env")
    assert status == 0
    assert f"torch       {torch.__version__}" in out
    backends = {line.split()[0]: line.split()[1] for line in out.split("backends\n")[1].splitlines()}
    assert backends == {"triton": backends["triton"], "cpu": "yes", "cuda": backends["cuda"]}
    assert backends["cuda"] == "no" or torch.cuda.is_available()
