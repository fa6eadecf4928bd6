"""Start-up overhead of the daily pipeline's jobs (issue 15): the demo pipeline run end to end with
each way of starting its jobs, and how much of each job's wall time passes before the job's script logs its
first line (process start, torchrun's agent when there is one, imports of torch / TorchRec /
FBGEMM, the process group).

For each way of starting the jobs the demo pipeline (configs/pipeline-demo.toml) runs into a fresh
work folder; the driver's log gives each job's submission time and wall time, the job's own log its
first line. The modes:

- ``torchrun``: every step a job through torchrun's agent, as on a cluster (28 jobs);
- ``python``: every step a one-process job started directly (``launcher = "python"``, ``chain =
  false``; 28 jobs);
- ``chained``: one-process jobs, each running several steps in one interpreter (``pipeline/chain.py``:
  a source's upstream training and lifecycle, the day's downstream models in ``max_parallel``
  jobs; 14 jobs), the pipeline's default on local_cwd with ``j = "1x1"``.

Timestamps have one-second resolution, so per-job figures are ±1 s; the sums are what to read.

Usage::

    python bench/bench_startup.py                       # all three, ~13 minutes on 2 cores
    python bench/bench_startup.py --modes python,chained
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBMITTED = re.compile(r"^(\d\d:\d\d:\d\d) derm\.pipeline: (\S+) (.+?)\s+submitted: (\S+)")
SUCCEEDED = re.compile(r"^\d\d:\d\d:\d\d derm\.pipeline: (\S+) (.+?)\s+succeeded in (\d+) s")
FIRST_LINE = re.compile(r"(?:\[\d+\]:)?(\d\d:\d\d:\d\d) derm\.")


def _seconds(hms: str) -> int:
    h, m, s = map(int, hms.split(":"))
    return h * 3600 + m * 60 + s


MODES = {"torchrun": ["--launcher=torchrun"], "python": ["--launcher=python", "--chain=false"],
         "chained": ["--launcher=python", "--chain=true"]}


def run(mode: str, work: Path) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pipeline", "--config", "configs/pipeline-demo.toml", f"--work={work}",
                           *MODES[mode]], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{mode}: the pipeline failed:\n{done.stderr[-3000:]}")
    submitted, walls = {}, {}
    for line in done.stderr.splitlines():
        if m := SUBMITTED.match(line):
            submitted[(m[2], m[3].strip())] = (m[1], m[4].rsplit("/", 1)[-1])
        elif m := SUCCEEDED.match(line):
            walls[(m[1], m[2].strip())] = int(m[3])
    startup = []
    for key, (at, app_id) in submitted.items():
        logs = sorted(work.glob(f"logs/*/{app_id}/*/0/stderr.log"))
        first = next((m[1] for m in map(FIRST_LINE.match, logs[0].read_text().splitlines()) if m), None) if logs else None
        if first is not None:
            startup.append((_seconds(first) - _seconds(at)) % 86400)
    jobs_wall = sum(walls.values())
    return {"mode": mode, "jobs": len(walls), "wall_s": wall, "jobs_wall_s": jobs_wall, "startup_s": sum(startup),
            "startup_share": sum(startup) / max(jobs_wall, 1), "startup_per_job_s": sum(startup) / max(len(startup), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_startup.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)} (default: all)")
    args = p.parse_args(argv)
    modes = args.modes.split(",")
    if unknown := [m for m in modes if m not in MODES]:
        p.error(f"--modes: {unknown} unknown; expected some of {', '.join(MODES)}")
    rows = []
    (ROOT / "runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="derm-startup-", dir=ROOT / "runs") as tmp:
        for mode in modes:
            print(f"running the demo pipeline, jobs started {mode} ...", file=sys.stderr, flush=True)
            rows.append(run(mode, Path(tmp) / mode))
    print(f"\nDemo pipeline start-up ({dt.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"{platform.python_version()}):\n")
    print("| jobs started | jobs | pipeline wall | jobs' wall (sum) | start-up (sum) | start-up per job | start-up share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['jobs']} | {r['wall_s']:.0f} s | {r['jobs_wall_s']} s | {r['startup_s']} s | "
              f"{r['startup_per_job_s']:.1f} s | {r['startup_share']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
