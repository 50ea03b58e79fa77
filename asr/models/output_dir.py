"""Writing a model folder: never over a folder the command did not write itself (a folder of results was lost so)."""
from __future__ import annotations

import shutil
from pathlib import Path

from asr.errors import AsrError


def check_overwritable(out: Path, marker: str, command: str) -> None:
    """Refuse, before any work, an --out that exists with content but without `marker`, the file `command` writes
    into every folder it makes (its own folder from an earlier run is replaced)."""
    if out.exists() and not out.is_dir():
        raise AsrError(f"{out}: is a file; choose a folder for --out")
    if out.is_dir() and any(out.iterdir()) and not (out / marker).is_file():
        raise AsrError(f"{out}: not empty and not written by `{command}` (no {marker}); choose a new --out, or remove "
                       "the folder yourself if you mean to replace it")


def replace_dir(tmp: Path, out: Path) -> None:
    """Move a finished folder into place, replacing the command's own earlier output there."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
