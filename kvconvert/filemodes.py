"""Give written files the usual permissions: some writers (safetensors' `save_file`, `tempfile.mkdtemp`) create
them private (0600/0700); outputs and caches are meant to be readable as the user's umask allows."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """This process's umask (read from /proc where possible: setting it to read it is not thread-safe)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def use_umask(root: Path) -> None:
    """chmod `root` and everything under it to 0666 (files) / 0777 (directories) less the umask."""
    mask = current_umask()
    root = Path(root)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
