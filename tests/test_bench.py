"""The README's data benchmark runs and prints its two tables (its figures are read, not asserted)."""

import re
import sys

import pytest

from conftest import ROOT, sh, shared


@pytest.mark.slow
def test_data_speed_prints_every_method_and_the_breakdown():
    shared("chest_xray_fullres_sample")
    out = sh(ROOT, sys.executable, "bench/data_speed.py", "--sets", "chest_xray_fullres_sample", "--repeat", "1")
    rows = re.findall(r"^\| chest_xray_fullres_sample \| ([^|]+) \| 220 \| [\d.]+ \| (\d+) \|", out, re.M)
    assert len(rows) == 4 and all(int(rate) > 0 for _, rate in rows), out
    assert "ours / report A" in out and "Where the time goes" in out
    breakdown = re.search(r"^\| chest_xray_fullres_sample \|((?: [\d.]+ \|)+)$", out, re.M)
    assert breakdown and len(breakdown.group(1).split("|")) - 1 == 6, out
