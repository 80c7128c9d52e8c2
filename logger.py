"""Rank-aware logging: a coloured console on rank 0, one plain log file per rank in the output folder."""
from __future__ import annotations

import functools
import logging
import os
import sys

from termcolor import colored

from output_folder import OutputError


class _LogFile(logging.FileHandler):
    """A log file whose write errors end the run with one line: logging's default prints a 'Logging error' block
    per record and goes on, so a full disk would leave a run with no log and an exit code of 0."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging API
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise OutputError(f"could not write the log file '{self.baseFilename}': "
                              f"{error.strerror or error}; free space or choose another --output") from None
        super().handleError(record)


@functools.lru_cache()
def create_logger(output_dir: str, dist_rank: int = 0, name: str = '') -> logging.Logger:
    """Logger writing ``<output_dir>/log_rank<R>.txt`` on every rank and to stdout on rank 0."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.handlers.clear()

    fmt = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
    color_fmt = (colored('[%(asctime)s %(name)s]', 'green')
                 + colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s')
    if dist_rank == 0:
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        use_color = sys.stdout.isatty()
        console.setFormatter(logging.Formatter(color_fmt if use_color else fmt, datefmt='%Y-%m-%d %H:%M:%S'))
        logger.addHandler(console)

    os.makedirs(output_dir, exist_ok=True)
    file_handler = _LogFile(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a', encoding='utf-8')
    file_handler.setLevel(logging.DEBUG)
    file_handler.setFormatter(logging.Formatter(fmt, datefmt='%Y-%m-%d %H:%M:%S'))
    logger.addHandler(file_handler)
    return logger
