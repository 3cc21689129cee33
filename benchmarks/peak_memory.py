"""Run a command and write its peak memory to a JSON file.

    python benchmarks/peak_memory.py OUT.json COMMAND [ARGS...]

Two figures, in bytes:
- `max_rss`: the kernel's ru_maxrss of the command's process tree, the peak RSS of its largest
  single process;
- `tree_pss`: the highest sum of PSS over the whole tree, sampled every 0.2 s. Processes that
  run at once (a gate and the llama-bench it starts) add up here, and pages they share (a GGUF
  file both map) count once. A spike shorter than the sampling interval can be missed, so the
  peak a host must hold is taken as the larger of the two;
- `tree_anonymous`: the highest sum of anonymous memory over the tree, sampled alike: what the
  kernel cannot reclaim by dropping pages of a mapped file. A tool that maps a file and reads
  it once (llama-quantize) has a resident size up to the file's; the host needs to hold only
  this part of it.

This runs as its own small process because Linux starts a new process's peak RSS at the RSS of
the process it was forked from (exec keeps the pre-exec high-water mark): a stage started from a
benchmark that holds gigabytes after writing a checkpoint would report at least that.
The exit status is the command's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

SAMPLE_SECONDS = 0.2


def tree_pids(root: int) -> list[int]:
    """`root` and every process descended from it, from /proc's parent ids."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # the name in parentheses can hold spaces: the fields after its closing bracket
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def pss_and_anonymous_bytes(pid: int) -> tuple[int, int]:
    found = {"Pss:": 0, "Anonymous:": 0}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            key = line.split(maxsplit=1)[0] if line else ""
            if key in found:
                found[key] = int(line.split()[1]) * 1024
    except OSError:  # the process ended between listing and reading
        pass
    return found["Pss:"], found["Anonymous:"]


def main() -> int:
    out, command = Path(sys.argv[1]), sys.argv[2:]
    process = subprocess.Popen(command)
    peak_pss = peak_anonymous = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak_pss, peak_anonymous
        while not done.wait(SAMPLE_SECONDS):
            sizes = [pss_and_anonymous_bytes(pid) for pid in tree_pids(process.pid)]
            peak_pss = max(peak_pss, sum(pss for pss, _ in sizes))
            peak_anonymous = max(peak_anonymous, sum(anonymous for _, anonymous in sizes))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    done.set()
    sampler.join()
    out.write_text(json.dumps({"max_rss": usage.ru_maxrss * 1024, "tree_pss": peak_pss,
                               "tree_anonymous": peak_anonymous}))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
