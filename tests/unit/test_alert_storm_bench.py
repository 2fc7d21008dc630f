"""The storm bench's own arithmetic: delivery spread, throughput, percentiles, the table."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "alert_storm.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    """bench/alert_storm.py loaded as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("alert_storm_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_every_alert_reaches_both_receivers_and_the_load_is_even(bench: ModuleType) -> None:
    """500 alerts, 10,000 deliveries, 2 receivers: each alert 10 times to each receiver."""
    seen: Counter[tuple[int, int]] = Counter()
    for i in range(10_000):
        seen[(i % 500, bench.node_of(i, 500, 2))] += 1
    assert len(seen) == 1000
    assert set(seen.values()) == {10}
    # Within any window of consecutive deliveries both receivers are busy.
    assert {bench.node_of(i, 500, 2) for i in range(498, 502)} == {0, 1}


def test_one_receiver_gets_everything(bench: ModuleType) -> None:
    """With one receiver every delivery goes to it."""
    assert {bench.node_of(i, 50, 1) for i in range(1000)} == {0}


def test_distinct_alerts_once_each_alternate(bench: ModuleType) -> None:
    """100 alerts delivered once each over 2 receivers: 50 to each."""
    assert Counter(bench.node_of(i, 100, 2) for i in range(100)) == {0: 50, 1: 50}


def test_throughput_is_runs_per_second_from_first_delivery_to_last_run(
    bench: ModuleType,
) -> None:
    """500 runs, the last created 12.5 s after the first delivery: 40 runs/s."""
    assert bench.throughput(500, 1000.0, 1012.5) == pytest.approx(40.0)
    assert bench.throughput(0, 1000.0, 1000.0) == 0.0


def test_percentile_nearest_rank(bench: ModuleType) -> None:
    """Nearest rank over 1..100; no values -> 0."""
    values = [float(v) for v in range(1, 101)]
    assert bench.percentile(values, 50) == 51.0
    assert bench.percentile(values, 99) == 99.0
    assert bench.percentile(values, 100) == 100.0
    assert bench.percentile([], 99) == 0.0


def test_side_by_side_aligns_columns_and_marks_missing_cells(bench: ModuleType) -> None:
    """Rows in order of first appearance; a row one column lacks shows '-'."""
    table = bench.side_by_side(
        {
            "sqlite": {"runs": "500", "Prefect server": "40.1"},
            "postgres": {"runs": "500", "PostgreSQL": "12.0", "Prefect server": "20.5"},
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["sqlite", "postgres"]
    assert [line.split()[0] for line in lines[1:]] == ["runs", "Prefect", "PostgreSQL"]
    assert lines[3].split() == ["PostgreSQL", "-", "12.0"]
    # The columns line up: every value starts where its header starts.
    start = lines[0].index("postgres")
    assert all(line[start:].split()[0] in {"postgres", "500", "20.5", "12.0"} for line in lines)
