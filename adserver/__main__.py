"""``python -m adserver [flags] MetricsServer`` — the same arguments as Seldon's server."""

from __future__ import annotations

import asyncio
import logging
import sys

from adserver.app import serve
from adserver.errors import StartupError
from adserver.logs import configure_logging
from adserver.settings import load_settings


def main(argv: list[str] | None = None) -> int:
    settings = load_settings(argv)
    configure_logging(settings.log_level)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:
        logging.getLogger("adserver").critical("cannot start: %s", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
