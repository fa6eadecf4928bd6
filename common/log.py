"""One logging set-up for every entry point of the project: rank-aware, quiet libraries."""

from __future__ import annotations

import logging
import warnings

# Library messages that say nothing actionable to our users, each checked once:
_QUIET_LOGGERS = (
    "torch.fx._symbolic_trace",  # "is_fx_tracing will return true ...", whenever TorchRec builds a KJT
    "torchrec.distributed.planner.types",  # "topology was constructed directly": we build it for the device we chose
    "torchrec.distributed.planner.storage_reservations",  # dry-run dense-size caveat; we plan on real modules
    "torchrec.distributed.utils",  # "data_parallel, caching params will be ignored": we set no caching
)
_QUIET_ROOT_PREFIXES = ("Sharding spec not found for",)  # DMP, for every data-parallel table (it needs none)
_QUIET_WARNINGS = (
    (FutureWarning, r"HeuristicalStorageReservation is known to cause issues"),
    (FutureWarning, r"`broadcast_buffers` is deprecated"),  # raised inside TorchRec's own DDP wrapping
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),  # DCP on TorchRec's tables
    # FBGEMM's CPU dense (data-parallel) lookup backpropagates through a Python autograd function;
    # tests/test_sharded_equals_unsharded.py checks that a sharded step (data-parallel tables included)
    # equals the plain model's step to 1e-5.
    (UserWarning, r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered"),
)


class _DropPrefixes(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith(_QUIET_ROOT_PREFIXES))


def setup_logging(level: int = logging.INFO, rank: int | None = None) -> None:
    """Timestamped ``name: message`` lines on stderr. Our ``derm.*`` loggers speak at ``level``
    on rank 0 (or without ranks) and only from WARNING on other ranks, whose lines carry their
    rank; libraries only from WARNING (fbgemm_gpu logs every library it loads on the root logger
    at INFO), and the known-noisy library messages above are muted."""
    tag = f"[rank {rank}] " if rank else ""
    # force: importing torchrec/fbgemm_gpu may already have configured the root logger.
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {tag}%(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropPrefixes())
    logging.getLogger("derm").setLevel(level if not rank else max(level, logging.WARNING))
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for category, message in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
