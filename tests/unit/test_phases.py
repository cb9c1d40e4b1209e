"""The phase timer: laps, nested phases taken out of their parent, ``other`` the rest."""

from __future__ import annotations

import time

from airflow_provider_llmq.spark.phases import Phases, describe


def test_laps_and_nested_phases_add_up_to_the_wall_time_without_counting_twice() -> None:
    phases = Phases()
    time.sleep(0.02)
    phases.lap("spark_start")
    with phases("flush", within="ask"):
        time.sleep(0.03)
    time.sleep(0.01)
    phases.lap("ask")
    report = phases.report(wall=1.0)
    assert list(report) == ["spark_start", "ask", "flush", "other"]
    assert report["spark_start"] >= 0.02 and report["flush"] >= 0.03
    assert 0.01 <= report["ask"] < 0.03  # the flush's 30 ms are not in it
    assert abs(sum(report.values()) - 1.0) < 0.002


def test_other_is_never_negative_and_the_log_line_names_each_phase() -> None:
    phases = Phases()
    phases.add("write", 2.0)
    report = phases.report(wall=1.5)
    assert report == {"write": 2.0, "other": 0.0}
    assert describe({"ask": 3.0, "write": 1.0}) == "ask 3.0 s (75 %), write 1.0 s (25 %)"
