"""Where the store lives when nothing says: a constant with no imports, so the settings every command reads do
not import SQLAlchemy and the store to learn a path (``labtwin --help`` paid for them)."""

from __future__ import annotations

from pathlib import Path

DEFAULT_SQLITE = Path("labtwin-data") / "labtwin.db"
