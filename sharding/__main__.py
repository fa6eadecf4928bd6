"""``python -m sharding COMMAND ...``: the sharding tools that run without a cluster.

Commands::

    plan    dry-run plan: how the tables shard over N ranks and whether they fit
            (``python -m sharding plan --help``; the same as ``python -m sharding.plan_cli``)
"""

from __future__ import annotations

import sys

COMMANDS = ("plan",)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    from sharding.plan_cli import main as plan_main  # imports torchrec: only when asked

    return plan_main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
