"""Logging that the libraries we build on would make too noisy."""

import contextlib
import logging
from collections.abc import Iterator

# bitsandbytes and torchao log at import that optional GPU kernels are absent, and torch that torchao registers enums
# it no longer needs to (transformers imports torchao too, e.g. for a checkpoint with a quantization config): a
# peer's console is no place for that.
IMPORT_NOISE_LOGGERS = ("torchao", "bitsandbytes", "torch.utils._pytree")


def quiet_import_noise() -> None:
    """For the command-line programs, which own their logging: those loggers say only errors."""
    for name in IMPORT_NOISE_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """IMPORT_NOISE_LOGGERS say only errors while inside (our own imports of those libraries)."""
    loggers = [logging.getLogger(name) for name in IMPORT_NOISE_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
