"""Structured JSON log lines, one per record, at the configured level."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

from pythonjsonlogger.json import JsonFormatter


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "{asctime}{levelname}{name}{message}",
            style="{",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


@dataclass
class ThrottledWarning:
    """One warning per interval at most, saying how often it happened since the last one: a
    fault that repeats with every event or connection must not flood the log."""

    logger: logging.Logger
    message: str
    interval: float = 60.0
    count: int = 0
    last: float = -math.inf

    def note(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.logger.warning(self.message, extra={"count": self.count, **fields})
            self.count = 0
            self.last = now
