"""`file://` backend: temp file in the same directory + fsync + rename."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import uuid
from pathlib import Path
from typing import BinaryIO, Iterator

from trajflow.storage.base import INTERNAL_PREFIX, ObjectInfo, Storage, check_key, check_prefix, check_range, is_internal

# Temporaries sit next to their final name, hidden behind the internal prefix that
# listings skip on every backend.
TMP_PREFIX = f"{INTERNAL_PREFIX}tmp-"
STALE_TEMPORARY_S = 3600.0  # a temporary unchanged this long is a killed writer's


# The longest file name ext4, XFS and NFS accept, in bytes.
NAME_MAX = 255


def temp_name(tag: str, name: str, reserve: int = 0) -> str:
    """`.trajflow-tmp-<tag>-<name>`, with a digest in place of `name` when that (plus
    `reserve` bytes of suffix) would exceed NAME_MAX: a name the filesystem accepts must
    never fail because of the prefix a temporary adds. Deterministic for a given name."""
    full = f"{TMP_PREFIX}{tag}-{name}"
    if len(full.encode()) + reserve <= NAME_MAX:
        return full
    return f"{TMP_PREFIX}{tag}-{hashlib.sha256(name.encode()).hexdigest()[:32]}"


def is_temporary(name: str) -> bool:
    """A writer's temporary file name, or any other backend-internal name."""
    return name.startswith(INTERNAL_PREFIX)


class _RangeReader:
    """A file object limited to [start, end)."""

    def __init__(self, fh: BinaryIO, remaining: int | None):
        self._fh, self._remaining = fh, remaining

    def read(self, n: int = -1) -> bytes:
        if self._remaining is not None:
            if self._remaining <= 0:
                return b""
            n = self._remaining if n is None or n < 0 else min(n, self._remaining)
        data = self._fh.read(n)
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "_RangeReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Errors only a write gets, which the OS reports without a file name (os.write, fsync):
# the path is added so that "No space left on device" says which volume filled up.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@contextlib.contextmanager
def naming_write_errors(path: str | Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _WRITE_ERRNOS:
            raise
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_without_blocking(path: str, flags: int) -> int:
    # opening a FIFO would wait for a writer that never comes; nor may a terminal become ours
    return os.open(path, flags | os.O_NONBLOCK | os.O_NOCTTY)


def check_regular(path: str, mode: int) -> None:
    """Raise OSError naming ``path`` unless ``mode`` (its st_mode) is a regular file's: only
    regular files are objects, and a read of a FIFO or a device would wait or never end."""
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else \
            "a directory" if stat.S_ISDIR(mode) else "a device"
        raise OSError(f"{path}: not a regular file but {kind}")


class LocalStorage(Storage):
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def largest_object(self) -> int | None:
        """The volume's capacity (of the nearest directory that exists); None where statvfs
        knows none, as FUSE mounts of object stores report 0 blocks."""
        for directory in (self.root, *self.root.parents):
            try:
                st = os.statvfs(directory)
            except FileNotFoundError:
                continue
            except OSError:
                return None
            return st.f_blocks * st.f_frsize or None
        return None

    def _os_path(self, key: str) -> str:
        # for calls made once per raw file: joining strings is several times cheaper than Path
        return f"{self.root}{os.sep}{check_key(key)}"

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        directory, _, partial = prefix.rpartition("/")
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return
        infos = []
        for dirpath, dirnames, filenames in os.walk(base, onerror=self._unlistable):
            here = Path(dirpath)
            at_base = here == base
            # below the prefix's directory only names starting with its last part can match
            dirnames[:] = sorted(
                d for d in dirnames if not is_temporary(d) and (not at_base or d.startswith(partial))
            )
            for name in filenames:
                if is_temporary(name) or (at_base and not name.startswith(partial)):
                    continue
                path = here / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # removed while listing
                key = path.relative_to(self.root).as_posix()
                if key.startswith(prefix) and not is_internal(key):
                    infos.append(ObjectInfo(key, st.st_size, modified_ns=st.st_mtime_ns))
        yield from sorted(infos, key=lambda i: i.key)

    def _unlistable(self, exc: OSError) -> None:
        # a directory removed while listing holds nothing; one that cannot be read (a PVC
        # written under another uid) would otherwise look empty, and waiters wait forever
        if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
            raise type(exc)(exc.errno, f"cannot list {exc.filename}: {exc.strerror}") from None

    def stat(self, key: str) -> ObjectInfo | None:
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        return ObjectInfo(key, st.st_size, modified_ns=st.st_mtime_ns) if not os.path.isdir(self._path(key)) else None

    def _open(self, key: str, buffering: int = -1) -> BinaryIO:
        try:
            fh = open(self._os_path(key), "rb", buffering=buffering, opener=_open_without_blocking)
        except IsADirectoryError:
            raise FileNotFoundError(f"{self.uri}/{key}: no such object (a directory)") from None
        except NotADirectoryError:
            raise FileNotFoundError(f"{self.uri}/{key}: no such object") from None
        try:
            check_regular(fh.name, os.fstat(fh.fileno()).st_mode)
            os.set_blocking(fh.fileno(), True)
        except BaseException:
            fh.close()
            raise
        return fh  # type: ignore[return-value]

    def open_read(self, key: str, start: int = 0, end: int | None = None) -> BinaryIO:
        check_range(start, end)
        fh = self._open(key)
        if start:
            fh.seek(start)
        if end is None:
            return fh
        return _RangeReader(fh, max(end - start, 0))  # type: ignore[return-value]

    def read_bytes(self, key: str) -> bytes:
        # unbuffered: one fstat and one read, with no buffer layer copying in between
        with self._open(key, buffering=0) as fh:
            return fh.read()

    def prefetch(self, key: str) -> None:
        # the kernel reads the file into the page cache while this process works on others
        try:
            fd = _open_without_blocking(self._os_path(key), os.O_RDONLY)
        except OSError:
            return  # the read itself reports what is wrong
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except (OSError, AttributeError):  # no posix_fadvise on macOS
            pass
        finally:
            os.close(fd)

    def _temp_path(self, final: Path) -> Path:
        return final.with_name(temp_name(uuid.uuid4().hex[:16], final.name))

    @contextlib.contextmanager
    def writer(self, key: str) -> Iterator[BinaryIO]:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_path(final)
        try:
            with naming_write_errors(final), open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
            fsync_dir(final.parent)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def write_if_absent(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp_path(final)
        try:
            with naming_write_errors(final), open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            try:
                os.link(tmp, final)  # fails if final exists: exactly one creator wins
            except FileExistsError:
                return False
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                    raise
                # filesystems without hard links: O_EXCL creation of the final name
                try:
                    fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                try:
                    with naming_write_errors(final), os.fdopen(fd, "wb") as out:
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
                except BaseException:
                    final.unlink()  # a part must not win: the next caller writes it whole
                    raise
            fsync_dir(final.parent)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def delete(self, key: str) -> None:
        # a directory or a path through a file is no object, and absent objects are no error
        with contextlib.suppress(FileNotFoundError, IsADirectoryError, NotADirectoryError):
            self._path(key).unlink()

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def child(self, prefix: str) -> "LocalStorage":
        return LocalStorage(self._path(prefix))

    def remove_stale_temporaries(self, prefix: str = "", older_than_s: float = STALE_TEMPORARY_S, keep: str = "") -> int:
        """Delete temporaries left by killed writers, but those whose name starts with
        `keep` (a writer that can tell its own abandoned ones apart); returns how many."""
        import time

        base = self.root / prefix if prefix else self.root
        removed, cutoff = 0, time.time() - older_than_s
        for dirpath, _, filenames in os.walk(base):
            for name in filenames:
                if name.startswith(TMP_PREFIX) and not (keep and name.startswith(keep)):
                    p = Path(dirpath) / name
                    with contextlib.suppress(FileNotFoundError):
                        if p.stat().st_mtime < cutoff:
                            p.unlink()
                            removed += 1
        return removed
