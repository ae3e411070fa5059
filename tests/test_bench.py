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


@pytest.mark.slow
def test_the_gpu_decode_bench_runs_its_code_on_the_cpu_and_matches_the_stage():
    """bench/decode_gpu.py's device path (decode_jpeg, resize on the device) with the CPU as the device: the
    images come out within a gray level or two of the grayscale stage's on average."""
    folder = shared("chest_xray_fullres_sample")
    out = sh(ROOT, sys.executable, "bench/decode_gpu.py", "--device", "cpu", "--limit", "12", "--folder", str(folder))
    row = re.search(r"^\| decode_jpeg on cpu \| [\d,]+ \| [\d.]+x \| ([\d.]+) \| \d+ \|$", out, re.M)
    assert row and float(row[1]) < 3, out


@pytest.mark.slow
def test_the_training_speed_bench_prints_every_mode_beside_the_naive_loop():
    out = sh(ROOT, sys.executable, "bench/train_speed.py", "--archs", "linear,xrnet", "--sizes", "32", "--repeats", "1",
             "--seconds", "0.2")
    rows = re.findall(r"^\| (linear|xrnet) \| 32 \| \d+ \|((?: [\d,]+ \([\d,]+\) \|){5}) (\S+) \| ([\d.]+)x \|$", out,
                      re.M)
    assert [r[0] for r in rows] == ["linear", "xrnet"], out
    assert all(r[2] in {"float32", "bf16", "float32+cl", "bf16+cl"} for r in rows), out


def test_the_bootstrap_bench_prints_both_ways_and_how_far_apart_they_lie():
    out = sh(ROOT, sys.executable, "bench/bootstrap_speed.py", "--resamples", "300", "--repeats", "1")
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| binary") or
            line.startswith("| three")]
    assert len(rows) == 2
    for row in rows:
        naive, fast, gap = float(row[1]), float(row[2]), float(row[4])
        assert naive > fast > 0 and gap < 0.05  # the same intervals within Monte Carlo error of 300 resamples
