"""Safe outputs. Atomic file writes: write a temporary file beside the target, then rename it
onto the target, so a crash or a full disk never leaves a half-written output (or checkpoint)
under the real name. And output folders that are not files of the user's.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from islet_imaging.errors import InputError

__all__ = ["atomic_write", "check_output_folder"]


def check_output_folder(path: Path, what: str, fix: str = "give a folder") -> None:
    """Refuse an output folder ``path`` that is an existing file (the user's, never replaced).

    ``what`` names the option or folder in the message, ``fix`` says what to do instead.
    """
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} names an existing file, not a folder; {fix}", path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``target``, then rename it onto ``target``.

    The folder is created if needed; the temporary file is removed if ``write`` fails; the result
    gets the usual permissions (``0o666`` less the umask) rather than ``mkstemp``'s private
    ``0o600``. An ``OSError`` (no space, no permission) becomes an :class:`InputError` naming
    ``target``.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> atomic_write(d / "a.txt", lambda p: p.write_text("hi")).read_text()
    'hi'
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot create the output folder or file: {exc}", target) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InputError(f"cannot write the file: {exc}", target) from exc
        raise
    return target
