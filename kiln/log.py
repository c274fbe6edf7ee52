"""kiln's logger: ERROR/WARNING/INFO/VERBOSE severities over stdlib logging, set by KILN_LOG or --verbose."""
from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager

VERBOSE = 15
logging.addLevelName(VERBOSE, "VERBOSE")

logger = logging.getLogger("kiln")
_LEVELS = {"error": logging.ERROR, "warning": logging.WARNING, "info": logging.INFO, "verbose": VERBOSE}


def set_level(name: str) -> None:
    """Set kiln's log level by name: error, warning, info or verbose."""
    logger.setLevel(_LEVELS[name.lower()])
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[kiln %(levelname)s] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


set_level(os.environ.get("KILN_LOG", "warning"))


def verbose(msg: str, *args) -> None:
    logger.log(VERBOSE, msg, *args)


def info(msg: str, *args) -> None:
    logger.info(msg, *args)


def warning(msg: str, *args) -> None:
    logger.warning(msg, *args)


def is_verbose() -> bool:
    return logger.isEnabledFor(VERBOSE)


@contextmanager
def timed(what: str):
    """Log at verbose level how long a block took."""
    start = time.perf_counter()
    yield
    verbose("%s took %.1f ms", what, (time.perf_counter() - start) * 1e3)
