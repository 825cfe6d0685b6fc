"""Writing a local file the SDK or ``kmsctl`` produces: what holds health data or audit
findings is its owner's alone, whatever the umask (mode 0600, also when the file was
there before with a wider mode)."""

from __future__ import annotations

from pathlib import Path


def private_file(path: Path) -> Path:
    """``path``, created if need be and narrowed to mode 0600, ready to be written."""
    path.touch(mode=0o600)
    path.chmod(0o600)
    return path


def private_dir(path: Path) -> Path:
    """``path``, a directory created if need be with mode 0700 (an existing one is left
    as it is: the files written into it are private either way)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
