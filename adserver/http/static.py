"""The dashboard's files, package data read once at start-up: serving them never touches the disk
(nothing blocks the IOLoop) and nothing outside the fixed list can be asked for."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboard"
INDEX = "index.html"
#: Every file the page is made of, by the name it is served under, with its content type.
FILES = {
    INDEX: "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
}
#: The page loads nothing but its own files and the server's JSON and text: no CDN, no inline
#: script, and a browser refuses any request that would leave the origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class StaticFile:
    body: bytes
    content_type: str


def load_dashboard(directory: Path = DASHBOARD_DIR) -> dict[str, StaticFile]:
    """Every file of :data:`FILES` (a missing one fails start-up, not a request)."""
    return {name: StaticFile((directory / name).read_bytes(), kind) for name, kind in FILES.items()}
