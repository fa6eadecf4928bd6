"""One logging set-up for every entry point of the project."""

from __future__ import annotations

import logging

# Third-party messages that say nothing to our users: torch warns once per process that
# `is_fx_tracing` is ambiguous whenever TorchRec builds a KeyedJaggedTensor.
_QUIET = ("torch.fx._symbolic_trace",)


def setup_logging(level: int = logging.INFO) -> None:
    """Timestamped ``name: message`` lines on stderr. Our ``derm.*`` loggers speak at ``level``;
    libraries only from WARNING (fbgemm_gpu logs every library it loads on the root logger at
    INFO), and known-noisy library warnings are muted."""
    # force: importing torchrec/fbgemm_gpu may already have configured the root logger.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)
    logging.getLogger("derm").setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)
