"""Running a training command in the background: hours on a laptop outlive the terminal that started them.

The child is the same ``cfic`` command line without the background flag, in a new session (a closed terminal
does not stop it), logging to a file in the run folder; its pid is written next to the log. Because every job
resumes from its run folder, running the same command again continues an interrupted run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cfic.files import write_atomic


def relaunch_detached(command: str, flag: str, out: str | os.PathLike, log_name: str) -> int:
    """Start ``cfic COMMAND <this process's options minus FLAG>`` detached; returns the child's pid.

    ``log_name`` (e.g. ``train``) names ``<out>/<log_name>.log`` and ``<out>/<log_name>.pid``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    args = [a for a in sys.argv[1:] if a != flag]
    if args[:1] == [command]:  # started as `cfic COMMAND ...` (not as a bare typer app)
        args = args[1:]
    with open(folder / f"{log_name}.log", "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", "cfic.cli", command, *args], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                env=os.environ.copy())
    write_atomic(folder / f"{log_name}.pid", str(proc.pid))
    return proc.pid
