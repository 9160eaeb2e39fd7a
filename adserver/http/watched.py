"""Files re-read when they change: the bearer tokens of ``--auth_token_file``, the TLS pair.

A mounted Secret (Kubernetes, cert-manager, Knative) changes by an atomic swap of its ``..data``
symlink: the path resolves to a new file whose mtime may be older than the old one's. So files
are known by their resolved path, inode, mtime and size together, looked at no more often than
once a check interval, and a change that does not load keeps what was loaded, with a throttled
warning: a rotation caught half-written never locks every sender out.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from adserver.logs import ThrottledWarning

T = TypeVar("T")

# (resolved path, inode, mtime in ns, size) of each file.
Signature = tuple[tuple[str, int, int, int], ...]


def signature(paths: Sequence[str]) -> Signature:
    stats = []
    for path in paths:
        real = os.path.realpath(path)
        info = os.stat(real)
        stats.append((real, info.st_ino, info.st_mtime_ns, info.st_size))
    return tuple(stats)


class WatchedFiles(Generic[T]):
    """What ``load`` makes of ``paths``, made again when a check finds them changed.

    The first load happens here and its errors propagate (start-up decides what they mean, so
    it loads before it looks at the files: ``load`` names a missing file best); a later one
    that raises one of ``errors`` keeps the value loaded before. ``detail`` says what the
    warning may tell of such an error; ``reloaded``, if given, is logged after a re-load.
    """

    def __init__(
        self,
        paths: Sequence[str],
        load: Callable[[], T],
        *,
        check_seconds: float,
        errors: tuple[type[Exception], ...],
        warning: ThrottledWarning,
        detail: Callable[[Exception], str] = str,
        reloaded: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.paths = tuple(paths)
        self.load = load
        self.check_seconds = check_seconds
        self.errors = errors
        self.warning = warning
        self.detail = detail
        self.reloaded = reloaded
        self.clock = clock
        self.value = load()
        self.loaded = signature(self.paths)
        self.checked = clock()

    def current(self) -> T:
        """The value, after a check if one is due (one clock read otherwise)."""
        now = self.clock()
        if now - self.checked >= self.check_seconds:
            self.checked = now
            self._reload()
        return self.value

    def _reload(self) -> None:
        try:
            seen = signature(self.paths)
            if seen == self.loaded:
                return
            self.value = self.load()
        except self.errors as exc:
            self.warning.note(detail=self.detail(exc))
            return
        self.loaded = seen
        if self.reloaded is not None:
            self.warning.logger.info(self.reloaded, extra={"files": list(self.paths)})
