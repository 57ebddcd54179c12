"""The (5, C) batch-statistics rows are defined once per language: csrc/rk_stats.h for C
and C++ (CPU, CUDA and the running-statistics update) and STAT_ROWS in Python (Triton,
the fakes, the tests). This checks that the two say the same, row by row."""
from __future__ import annotations

import re
from pathlib import Path

from cuda_emu.structs import stat_rows  # the header's parser the CUDA emulation uses
from regnet_kernels.ops.types import STAT_ROWS

ROOT = Path(__file__).resolve().parents[1]


def test_c_header_rows_match_python_stat_rows():
    rows = {name[len("RK_STAT_"):]: v for name, v in stat_rows().items()}
    assert rows.pop("ROWS") == len(STAT_ROWS)
    assert sorted(rows, key=rows.get) == [r.upper() for r in STAT_ROWS]
    assert sorted(rows.values()) == list(range(len(STAT_ROWS)))


def test_no_other_file_spells_out_the_rows():
    """Every C/C++ source takes the rows from rk_stats.h (no second enum or literal row
    numbers for the statistics)."""
    offenders = []
    for path in (ROOT / "csrc").rglob("*"):
        if path.suffix not in (".h", ".cuh", ".cu", ".cpp") or path.name == "rk_stats.h":
            continue
        text = path.read_text()
        if re.search(r"RK_STAT_\w+\s*=|\bkMean\s*=\s*0|enum\s+StatRow", text):
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders
