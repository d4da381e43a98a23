"""benchmarks/memory.py: the model config it writes, the per-model slope and the per-child peak it reads."""
import sys

import pytest


def test_model_config_lists_every_model_and_parses_with_the_servers_reader(tmp_path):
    from benchmarks.memory import write_model_config
    from serving.config import load_model_config

    path = tmp_path / "models.config"
    write_model_config(str(path), [("m0", "/models/a"), ("m1", "/models/b")])
    entries = load_model_config(str(path))
    assert [(e.name, e.base_path) for e in entries] == [("m0", "/models/a"), ("m1", "/models/b")]


def test_per_model_slope_recovers_a_linear_footprint():
    from benchmarks.memory import per_model_slope

    rows = [{"models": n, "rss_mb": 600.0 + 90.0 * n} for n in (1, 2, 4, 8)]
    slope, intercept = per_model_slope(rows)
    assert slope == pytest.approx(90.0)
    assert intercept == pytest.approx(600.0)
    assert per_model_slope(rows[:1]) != per_model_slope(rows[:1])  # nan: one count has no slope


def test_child_peak_is_that_childs_own_peak(tmp_path):
    from benchmarks.memory import child_peak_mb

    big = child_peak_mb([sys.executable, "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"])
    small = child_peak_mb([sys.executable, "-S", "-c", "pass"])
    assert big > 300
    # Not this (pytest) process's peak, which Linux would carry into a child forked from it directly.
    assert small < 40
    with pytest.raises(RuntimeError, match="failed"):
        child_peak_mb([sys.executable, "-c", "raise SystemExit(3)"])


def test_counts_below_one_are_refused(capsys):
    from benchmarks.memory import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--counts", "1", "0"])
    assert exit_info.value.code == 2
    assert "--counts must be >= 1" in capsys.readouterr().err
