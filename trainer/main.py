"""The training job, the TorchX / torchrun script of both tasks: an upstream DERM model (``--task
upstream``, the default; ``trainer.loop``) or a downstream CTR / CVR model on DERM embeddings
(``--task downstream``; ``trainer.downstream``, docs/pipeline.md).

With no arguments it trains the default config (the ctr model of the tiny synthetic world, which it
generates into runs/demo/data if absent) on every day but the last, snapshots each day under
runs/demo/ctr/snapshots/, and evaluates on the last day.

Usage::

    python trainer/main.py                                            # one CPU process, defaults
    torchx run -s local_cwd dist.ddp -j 1x2 trainer/main.py           # 2 ranks (8 on a GPU box: -j 1x8)
    torchrun --nproc_per_node 2 trainer/main.py --config run.toml --mode initial --days 2026-01-01,2026-01-02
    python trainer/main.py --mode incremental --day 2026-01-03        # from the latest snapshot before it
    python trainer/main.py --data.source=cvr --train.run_dir=runs/demo/cvr --model.token_dim=64
    python trainer/main.py --task downstream --kind=cvr --derm.features='["ctr_user"]' --derm.store_root=...

Outputs in RUN_DIR: snapshots/day=YYYY-MM-DD/ (sharded, torch.distributed.checkpoint), tb/
(TensorBoard), config.toml (the resolved config), summary.json (per-day throughput, evaluation).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (torchrun trainer/main.py): import from the repo root
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from common.config import dump_config  # noqa: E402
from common.log import setup_logging  # noqa: E402
from trainer.config import TASKS, load_run_config  # noqa: E402

log = logging.getLogger("derm.main")


def parse_args(argv: list[str] | None):
    """The task's run config from the command line (``trainer.config.load_run_config``)."""
    p = argparse.ArgumentParser(prog="trainer/main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=list(TASKS), default="upstream",
                   help="upstream: a DERM model (RunConfig); downstream: a CTR / CVR model on DERM embeddings "
                        "(DownstreamRunConfig: kind, [derm]) (default: upstream)")
    p.add_argument("--config", help="run config TOML (default: built-in defaults)")
    p.add_argument("--mode", choices=["initial", "incremental"], help="sets train.mode")
    p.add_argument("--days", help="initial mode: comma-separated days to train, in order (sets train.days)")
    p.add_argument("--day", help="incremental mode: the day to train (sets train.day)")
    p.add_argument("--eval-day", help="held-out day to evaluate, or 'none' (sets train.eval_day)")
    args, rest = p.parse_known_args(argv)
    bad = [r for r in rest if not (r.startswith("--") and "=" in r)]
    if bad:
        p.error(f"unrecognised arguments {bad}; overrides are written --section.field=value")
    overrides = list(rest)
    if args.mode:
        overrides.append(f"train.mode={args.mode}")
    if args.days:
        overrides.append("train.days=" + json.dumps(args.days.split(",")))
    if args.day:
        overrides.append(f'train.day="{args.day}"')
    if args.eval_day:
        overrides.append(f'train.eval_day="{args.eval_day}"')
    return args.task, load_run_config(args.task, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Trains the task's model, snapshots it each day and evaluates it; prints a summary table."""
    setup_logging()
    try:
        task, config = parse_args(argv)  # validated before any process group starts
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # Imported here so that `--help` and config errors answer without loading TorchRec.
    import torch
    from redis.exceptions import RedisError

    from common.files import os_error_line
    from data.columns import DataError
    from data.spec import SpecError
    from sharding.checkpoint import SnapshotError
    from sharding.distributed import init_distributed, shutdown
    from trainer.loop import run

    ctx = init_distributed(config.train.device, threads=config.train.threads)
    setup_logging(rank=ctx.rank)
    failed = True  # until the run returns: any exception leaves the group without a barrier
    try:
        _ensure_data(config, ctx)
        if ctx.is_main:
            dump_config(config, Path(config.train.run_dir) / "config.toml")
        log.info("rank %d/%d on %s (%s), %d intra-op thread(s); run dir %s", ctx.rank, ctx.world_size, ctx.device,
                 ctx.backend, torch.get_num_threads(), config.train.run_dir)
        if task == "downstream":
            from trainer.downstream import run_downstream

            summary = run_downstream(config, ctx)
        else:
            summary = run(config, ctx)
        failed = False
        if ctx.is_main:
            print(_summary_table(summary, config))
        return 0
    except (ValueError, SnapshotError, DataError, SpecError, FileExistsError) as e:
        log.error("%s", e)
        return 2
    except OSError as e:  # disk full, a vanished mount: one line naming the path
        log.error("%s", os_error_line(e))
        return 1
    except RedisError as e:  # the downstream join's feature store (its URL holds no password)
        log.error("feature store (Redis) unreachable or failing: %s", e)
        return 1
    finally:
        shutdown(failed=failed)


def _summary_table(summary: dict, config) -> str:
    days = summary["days"]
    steps = sum(d["steps"] for d in days)
    rate = sum(d["examples"] for d in days) / max(sum(d["seconds"] for d in days), 1e-9)
    lines = [
        f"\n{summary['model']} model ({summary['source']} data), {summary['mode']} training on {days[0]['day']}..{days[-1]['day']} "
        f"({summary['world_size']} rank(s)): {steps} steps, {rate:,.0f} examples/s",
    ]
    if "eval" in summary:
        oracle = any("oracle_roc_auc" in m for m in summary["eval"].values())  # real data has none: no column
        lines.append(f"{'eval ' + summary['eval_day']:<22}{'ROC-AUC':>9}{'PR-AUC':>9}{'NE':>8}{'calib':>8}{'positives':>11}"
                     + (f"{'oracle AUC':>12}" if oracle else ""))
        for label, m in summary["eval"].items():
            lines.append(f"{label:<22}{m['roc_auc']:>9.4f}{m['pr_auc']:>9.4f}{m['ne']:>8.4f}{m['calibration']:>8.3f}"
                         f"{m.get('positives', -1):>11}" + (f"{m.get('oracle_roc_auc', float('nan')):>12.4f}" if oracle else ""))
        if summary.get("coverage"):
            lines.append("DERM coverage of the eval rows: " + "  ".join(f"{k} {v:.1%}" for k, v in summary["coverage"].items()))
    q = summary.get("embedding_quality")
    if q:  # upstream models (trainer/metrics.py embedding_quality)
        spread = "  ".join(f"{e} cos {q.get(f'{e}_mean_pairwise_cosine', float('nan')):.3f} rank {q.get(f'{e}_effective_rank', float('nan')):.1f}"
                           for e in ("user", "pin"))
        recall = f"recall@100 {q.get('recall_at_100', float('nan')):.4f} (popularity {q.get('popularity_recall_at_100', float('nan')):.4f})"
        lines.append(f"embeddings: {spread}  {recall}  contrastive {q['contrastive_loss']:.3f} (ln B {q['ln_batch']:.3f})")
    run_dir = config.train.run_dir
    lines.append(f"snapshot {summary['snapshot']}; summary {run_dir}/summary.json; tensorboard --logdir {run_dir}/tb")
    return "\n".join(lines)


def _ensure_data(config, ctx) -> None:
    """Generates the synthetic world into a missing data root (rank 0; the others wait)."""
    import torch.distributed as dist

    root = Path(config.data.root)
    if not (root / "spec.toml").exists():
        if not config.data.synthetic_preset:
            raise ValueError(f"{root}: no dataset (spec.toml) there, and data.synthetic_preset is empty")
        if ctx.is_main:
            from data.synthetic import PRESETS, generate

            log.info("no data in %s: generating the %s synthetic world there", root, config.data.synthetic_preset)
            generate(root, PRESETS[config.data.synthetic_preset], seed=0)
    dist.barrier()


if __name__ == "__main__":
    raise SystemExit(main())
