"""Atomic file and directory writes: readers (a resume, the next stage, a server) see the old content or the
new one, never a part of it, whatever kills the writer (a crash, SIGKILL, a lost node).

A file: written to a hidden temporary sibling, fsynced, ``os.replace``d over the target, directory fsynced.
A directory: written into a hidden temporary sibling, every file fsynced, then renamed into place (an
existing directory is swapped out with ``renameat2(RENAME_EXCHANGE)`` where the OS has it, else renamed
away just before). A killed writer leaves a hidden ``.<name>.tmp-<pid>-<hex>`` sibling behind, which no
loader reads.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory: the rename is still atomic
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (``root`` included), files before their directory."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


def _temp_sibling(path: Path, kind: str) -> Path:
    return path.parent / f".{path.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def write_atomic(path: str | Path, data: str | bytes) -> None:
    """Write a file so that readers see the old content or the new one, never a part: a temporary sibling,
    fsync, ``os.replace``, fsync of the directory."""
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


@contextlib.contextmanager
def atomic_directory(directory: str | Path, keep_others: tuple[str, ...] | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``directory`` to write into; when the block ends without error,
    its files are fsynced and it takes ``directory``'s place in one rename (an existing directory is swapped
    out atomically where the OS can, else renamed away just before; then removed). On an error, or a kill,
    ``directory`` is untouched (a kill leaves a hidden ``.<name>.tmp-<pid>-*`` sibling behind).

    ``keep_others``: names the new content owns; other entries of an existing ``directory`` are carried
    over into the new one (hard links where possible). None: carry nothing over."""
    d = Path(directory)
    d.parent.mkdir(parents=True, exist_ok=True)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d} exists and is not a directory")
    tmp = _temp_sibling(d, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        if keep_others is not None and d.is_dir():
            for entry in d.iterdir():
                if entry.name in keep_others or (tmp / entry.name).exists():
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.copytree(entry, tmp / entry.name, symlinks=True, copy_function=_link_or_copy)
                elif entry.is_symlink():
                    os.symlink(os.readlink(entry), tmp / entry.name)
                else:
                    _link_or_copy(str(entry), str(tmp / entry.name))
        _fsync_tree(tmp)
        if not d.exists():
            os.rename(tmp, d)
        elif _exchange(tmp, d):  # d now holds the new content, tmp the old
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            old = _temp_sibling(d, "old")
            os.rename(d, old)
            try:
                os.rename(tmp, d)
            except BaseException:
                os.rename(old, d)  # put the previous one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_path(d.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
