"""Embedding-lifecycle jobs: daily inference and back-inference of ``embeddings/infer.py``.

Built on ``torchx.components.dist.ddp`` (torchrun), like the training components, so the sharded
snapshot is read by as many ranks as the job has, each loading only its shards::

    # back-inference of three days with the day-3 snapshot, 2 local processes
    torchx run -s local_cwd torchx_components/lifecycle.py:infer \\
        --snapshot runs/demo/ctr/snapshots/day=2026-01-03 --data runs/demo/data \\
        --days 2026-01-01,2026-01-02,2026-01-03 --out runs/demo/emb
    # the same on Kubernetes, 2 nodes x 8 GPUs (print the job instead of submitting it)
    torchx run --dryrun -s kubernetes torchx_components/lifecycle.py:infer -j 2x8 --gpu 8 ...
"""
from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist as builtin_dist

from torchx_components.train import DERM_IMAGE, _one_gpu_per_rank, _split_days

INFER_SCRIPT = "embeddings/infer.py"


def infer(
    snapshot: str,
    data: str,
    days: str,
    out: str,
    batch_size: int = 4096,
    overwrite: bool = False,
    image: str = DERM_IMAGE,
    name: str = "derm/derm-infer",
    j: str = "1x2",
    h: Optional[str] = None,
    cpu: int = 4,
    gpu: int = 0,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """
    Daily inference (one day) or back-inference (several) of user and Pin embeddings from a snapshot.

    Each entity is embedded once per day, from its last row of the day (dedup first), by the rank
    its id hashes to; output goes to OUT/<source>/<user|pin>/day=YYYY-MM-DD/.

    Args:
        snapshot: snapshot directory, RUN_DIR/snapshots/day=YYYY-MM-DD
        data: dataset root (spec.toml and the source's day partitions)
        days: comma-separated days to embed; several days are back-inference with the one snapshot
        out: output root of the daily embeddings
        batch_size: rows per forward per rank
        overwrite: replace days that already have output
        image: container image with the project at its WORKDIR (ignored by local_cwd)
        name: job name
        j: [{min_nnodes}:]{nnodes}x{nproc_per_node}
        h: a registered named resource per node; takes precedence over cpu, gpu, memMB
        cpu: CPUs per node
        gpu: GPUs per node
        memMB: memory per node in MB
        env: extra environment variables of the job
        max_retries: how many times the scheduler may restart the job after a failure
        mounts: mounts into the containers, e.g. type=bind,src=/data,dst=/data[,readonly]
    """
    args = ["--snapshot", snapshot, "--data", data, "--days", ",".join(_split_days(days)), "--out", out,
            "--batch-size", str(batch_size), *(["--overwrite"] if overwrite else [])]
    app = builtin_dist.ddp(
        *args, script=INFER_SCRIPT, image=image, name=name, h=h, cpu=cpu, gpu=gpu, memMB=memMB, j=j,
        env=dict(env) if env else None, max_retries=max_retries, mounts=mounts,
    )
    return _one_gpu_per_rank(app, j)
