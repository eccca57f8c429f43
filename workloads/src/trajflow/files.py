"""Files replaced whole (the work dir's state, configs and reports; generated datasets): a
reader sees the old file or the new one, and a write that fails (a full disk) leaves
neither a torn file nor its temporary behind."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable


def write_via_temporary(path: Path, write: Callable[[Path], object], suffix: str = "") -> None:
    """`write(temporary)`, then the temporary replaces `path`; `suffix` ends the temporary's
    name (writers that pick the format from it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename in (None, str(tmp)):
            exc.filename = str(path)  # errors name the file being written, not its temporary
        raise


def replace_file(path: Path, data: bytes | str) -> None:
    raw = data.encode() if isinstance(data, str) else data
    write_via_temporary(path, lambda tmp: tmp.write_bytes(raw))
