"""Run records: what a stage measured about its own run (seconds, peak memory, threads, when).

They live in artifacts/runs/<stage>.json, DVC metrics of their stage that nothing depends on,
beside its hashed outputs: a rerun that writes byte-identical outputs leaves every downstream
stage cached (docs/design.md, "Run records").
"""

from __future__ import annotations

from typing import Any

from pipeline import layout

# what a stage's facts (a format's build or engine step) hold that depends on the run, not the
# inputs: these go to the run record, never into the hashed output
RUN_FACTS = ("timings_s", "peak_gpu_mb")


def split(facts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(facts for the hashed output, facts for the run record)."""
    return ({key: value for key, value in facts.items() if key not in RUN_FACTS},
            {key: value for key, value in facts.items() if key in RUN_FACTS})


def write(stage: str, started: float, **facts: Any) -> dict[str, Any]:
    """artifacts/runs/<stage>.json, with the seconds since ``started`` (time.perf_counter) and
    this process's and its children's peak RSS."""
    import resource
    import time
    from datetime import datetime, timezone

    from pipeline.files import write_json

    peak_kib = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                   resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    record = {"schema_version": layout.SCHEMA_VERSION, "stage": stage,
              "wall_s": round(time.perf_counter() - started, 2), "peak_rss_mb": round(peak_kib / 1024, 1),
              **facts, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json(layout.run_record(stage), record)
    return record
