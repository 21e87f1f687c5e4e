"""Temporaries of the atomic writers: named by host and process, made as the umask asks, swept when stale.

`tempfile.mkstemp` / `mkdtemp` create 0600 / 0700 whatever the umask; a file renamed into place would keep
that, so `match_umask` gives it the mode a plain `open` / `mkdir` would have. A process killed mid-write (SIGKILL,
SIGTERM, power loss) leaves its temporary behind; the next writer of the same path removes those whose process
on this host is gone (`sweep_stale`).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
from pathlib import Path

_HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname())[:40] or "host"


def current_umask() -> int:
    """The process umask, read without changing it where /proc says it (os.umask alone must set it to read it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def match_umask(path: str | Path) -> None:
    """Give `path` the mode `open` (0666) or `mkdir` (0777) would have given it under the current umask."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def tmp_prefix(name: str) -> str:
    """Prefix of a temporary for the final name `name`: `.NAME.HOST-PID.` (then tempfile's random part)."""
    return f".{name}.{_HOST}-{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(parent: Path, name: str) -> list[Path]:
    """Remove temporaries for `parent/name` left by processes of this host that no longer run; returns them."""
    pattern = re.compile(rf"^\.{re.escape(name)}\.{re.escape(_HOST)}-(\d+)\..*\.tmp$")
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
