import json
import time

from pipeline import layout, runs


def test_run_facts_are_split_off_the_hashed_facts():
    facts, run_facts = runs.split({"tools": {"x": "1"}, "timings_s": {"convert_s": 1.5}, "peak_gpu_mb": None})
    assert facts == {"tools": {"x": "1"}}
    assert run_facts == {"timings_s": {"convert_s": 1.5}, "peak_gpu_mb": None}


def test_a_run_record_says_how_long_when_and_what_the_stage_measured(project):
    started = time.perf_counter() - 2.0
    record = runs.write("build@r", started, threads=4, status="ok")
    written = json.loads(layout.run_record("build@r").read_text())
    assert written == record
    assert record["stage"] == "build@r" and record["schema_version"] == layout.SCHEMA_VERSION
    assert record["wall_s"] >= 2.0 and record["peak_rss_mb"] > 0 and record["threads"] == 4
    assert record["created_at"].endswith("+00:00")
