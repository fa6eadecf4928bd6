"""Several one-process job scripts run in turn in one interpreter: the daily pipeline's job on
``local_cwd`` when its steps are one process each (issue 15), so that torch, TorchRec and FBGEMM
are imported once per job rather than once per step.

Each step is a script of this repository and its arguments, steps separated by ``:::``; the script
``trainer/main.py`` runs as ``trainer.main.main(args)``, and every script so run must have a
``main(argv) -> int`` that joins and leaves its own process group (they all do:
``sharding.distributed``). The first step that returns non-zero (or raises) ends the job with its
status; the steps after it do not run, and the pipeline resubmits only the steps not done.

Usage::

    python -m pipeline.chain trainer/main.py --days=2026-01-01 ... ::: embeddings/daily.py --day=2026-01-01 ...
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path

SEPARATOR = ":::"
ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("derm.chain")


def parse_steps(argv: list[str]) -> list[tuple[str, list[str]]]:
    """``SCRIPT ARGS ::: SCRIPT ARGS ...`` -> [(module, args)], refusing an empty step or a script
    that is not a ``.py`` file of this repository."""
    steps, current = [], []
    for token in [*argv, SEPARATOR]:
        if token != SEPARATOR:
            current.append(token)
            continue
        if not current:
            raise ValueError(f"an empty step: write SCRIPT ARGS {SEPARATOR} SCRIPT ARGS ...")
        script, *args = current
        steps.append((_module_of(script), args))
        current = []
    return steps


def _module_of(script: str) -> str:
    path = Path(script)
    resolved = (ROOT / path).resolve() if not path.is_absolute() else path.resolve()
    if path.suffix != ".py" or not resolved.is_file() or not resolved.is_relative_to(ROOT):
        raise ValueError(f"{script}: not a script of this repository ({ROOT})")
    return ".".join(resolved.relative_to(ROOT).with_suffix("").parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        steps = parse_steps(argv)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, (module, args) in enumerate(steps):
        if i:  # nothing is logged before the first step: its first line marks the job's start-up
            log.info("step %d/%d: %s", i + 1, len(steps), module)
        rc = importlib.import_module(module).main(args)
        if rc:
            log.error("step %d/%d (%s) failed with status %d; the steps after it did not run", i + 1, len(steps), module, rc)
            return rc
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
