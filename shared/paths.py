"""Output paths refused in one line before any work starts (and before torch is imported)."""

from __future__ import annotations

import os
from pathlib import Path

from ar2mdm.shared.errors import UserError


def check_output_folder(path: Path, flag: str) -> None:
    """Refuse an output folder that is a file, or that cannot be created or written, naming ``flag``."""
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a folder (it is created if missing)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {path}: {existing} is a file, so the folder cannot be created; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {existing} is not writable; choose another {flag}")


def check_output_file(path: Path, flag: str) -> None:
    """Refuse an output file that is a folder, or whose folder cannot be created or written, naming ``flag``."""
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder; give a file name")
    check_output_folder(path.parent if str(path.parent) else Path("."), flag)
