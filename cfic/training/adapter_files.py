"""The adapter folder the fits write into, and its ``cfic.json`` settings file.

Why a module: ``cfic fit-prior`` and ``cfic fit-abstention`` each own one part of ``cfic.json`` and must keep the
other's part, so both read-modify-write it the same way, atomically (a kill never leaves a half-written settings
file next to the shipped weights).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cfic.errors import CficError
from cfic.files import write_atomic


def adapter_folder(adapter: str | None, purpose: str) -> Path:
    """``--adapter`` as a folder: the one given, else the bundled one (``cfic.config.adapter_choice``'s "auto")."""
    from cfic.config import adapter_choice
    from cfic.models import bundled_adapter

    choice = adapter_choice(adapter, no_adapter=False)
    path = bundled_adapter() if choice == "auto" else Path(choice)
    if path is None or not (path / "adapter_config.json").is_file():
        raise CficError(f"no adapter to fit {purpose} for (pass --adapter FOLDER)")
    return path


def update_settings(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``change`` to the JSON object in ``path`` (empty when there is none) and write it back atomically."""
    settings = json.loads(path.read_text()) if path.is_file() else {}
    change(settings)
    write_atomic(path, json.dumps(settings, indent=2) + "\n")
