"""A per-user cache of C libraries compiled at run time, checked before anything is loaded (issue 17).

slmkit's kernels (:mod:`slmkit.runtime.q4kernel`) are C sources compiled by the system compiler
the first time they are needed. Loading a shared library runs its code, so the cache is treated
like ``~/.ssh``:

* **The directory** (``$SLMKIT_CACHE/kernels``, else ``$XDG_CACHE_HOME/slmkit/kernels``, else
  ``~/.cache/slmkit/kernels``) is created owner-only (0700). An existing one that is not a
  directory, is owned by another user or is writable by group or others is **refused**
  (:class:`UnsafeCacheError`: nothing is built or loaded from it; the message names the directory
  and the fix). There is no silent fallback to another directory: the user decides.
* **Every library has a record beside it** (``NAME-KEY.so.json``): the build key (sha256 over
  the sources' names and bytes, the flags, the compiler's path and its ``--version``) and the
  sha256 of the library's bytes. Before ``dlopen`` the file is opened without following links,
  checked (a regular file of this user, not group/other-writable, non-empty), hashed and compared
  with the record, and the file loaded must be that same inode. A zero-length, truncated,
  foreign or unrecorded file is rebuilt.
* **Builds** run under an exclusive ``flock`` on ``DIR/.lock``: the compiler writes a temporary
  file (``.tmp-*``), which is fsynced and renamed into place, then its record, so any number of
  processes starting at once build once and all load the same file; a killed build leaves only a
  ``.tmp-*``, removed by the next build.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slmkit import settings

log = logging.getLogger(__name__)

#: seconds a compiler may run before the build is abandoned
BUILD_TIMEOUT_S = 600


class UnsafeCacheError(RuntimeError):
    """The cache directory could be written by someone else: nothing is built in or loaded from it."""


@dataclass(frozen=True)
class Recipe:
    """What one library is built from."""

    name: str  #: file stem: the library is ``NAME-KEY.so``
    sources: tuple[Path, ...]  #: compiled together, in this order
    headers: tuple[Path, ...] = ()  #: hashed into the key, not passed to the compiler
    flags: tuple[str, ...] = ()


def default_dir() -> Path:
    """``$SLMKIT_CACHE/kernels``, else ``$XDG_CACHE_HOME/slmkit/kernels``, else ``~/.cache/slmkit/kernels``."""
    return settings.cache_root() / "kernels"


def private_dir(path: Path) -> Path:
    """Create ``path`` owner-only (0700), or check an existing one: a directory of this user that
    group and others cannot write. Raises :class:`UnsafeCacheError` naming the problem and the fix."""
    fix = f"run `chmod 700 {path}` if it is yours, or point SLMKIT_CACHE at a private directory"
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as err:
        raise UnsafeCacheError(f"cannot create the kernel cache {path} ({err.strerror}); point SLMKIT_CACHE at a writable directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeCacheError(f"kernel cache {path} is not a directory; point SLMKIT_CACHE elsewhere")
    if st.st_uid != os.getuid():
        raise UnsafeCacheError(f"kernel cache {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}); "
                               "point SLMKIT_CACHE at a directory of your own")
    if st.st_mode & 0o022:
        raise UnsafeCacheError(f"kernel cache {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):03o}); {fix}")
    return path


def compiler() -> str:
    """``$CC``, else cc, gcc or g++ on PATH; RuntimeError when there is none."""
    cc = settings.c_compiler() or shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")
    if not cc:
        raise RuntimeError("no C compiler (cc, gcc or g++) on PATH")
    return cc


def build_key(recipe: Recipe, cc: str) -> str:
    """sha256 over the sources' and headers' names and bytes, the flags, the compiler and its version."""
    h = hashlib.sha256()
    for f in (*recipe.sources, *recipe.headers):
        data = f.read_bytes()
        h.update(f"{f.name}\0{len(data)}\0".encode() + data)
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as err:
        raise RuntimeError(f"cannot run the C compiler {cc}: {err}") from None
    h.update("\0".join([*recipe.flags, cc, version]).encode())
    return h.hexdigest()


def _record_path(so: Path) -> Path:
    return so.with_name(so.name + ".json")


def _open_verified(so: Path, key: str) -> tuple[int | None, str]:
    """An fd of ``so`` when it is this user's, intact and recorded under ``key``; else (None, why)."""
    try:
        fd = os.open(so, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, "not built yet"
    except OSError as err:  # ELOOP: a symbolic link
        return None, f"cannot be opened safely ({err.strerror})"
    ok = False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            return None, "not a regular file of yours that only you can write"
        if st.st_size == 0:
            return None, "zero-length"
        h = hashlib.sha256()
        with os.fdopen(os.dup(fd), "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        try:
            rfd = os.open(_record_path(so), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(rfd, "rb") as fh:
                record = json.loads(fh.read(1 << 16))
        except (OSError, ValueError):
            return None, "has no readable record beside it"
        if not isinstance(record, dict) or record.get("key") != key:
            return None, "was built from other sources, flags or compiler"
        if record.get("sha256") != h.hexdigest():
            return None, "differs from the library recorded (foreign or damaged)"
        ok = True
        return fd, ""
    finally:
        if not ok:
            os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _build_locked(recipe: Recipe, directory: Path, so: Path, key: str, cc: str) -> None:
    """Compile into a temporary file and rename it and its record into place (the caller holds the lock)."""
    for stale in directory.glob(".tmp-*"):  # left by a killed build; nobody else builds while we hold the lock
        with contextlib.suppress(OSError):
            stale.unlink()
    fd, tmp_name = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".so")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp_rec = tmp.with_name(tmp.name + ".json")
    try:
        cmd = [cc, *recipe.flags, "-o", str(tmp), *map(str, recipe.sources)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{cc} ran past {BUILD_TIMEOUT_S} s building {so.name}") from None
        if r.returncode:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[-400:]}")
        os.chmod(tmp, 0o700)
        with open(tmp, "rb+") as fh:
            data = fh.read()
            os.fsync(fh.fileno())
        if not data:
            raise RuntimeError(f"{cc} wrote an empty library")
        _write_synced(tmp_rec, json.dumps({"key": key, "sha256": hashlib.sha256(data).hexdigest(), "compiler": cc,
                                           "flags": list(recipe.flags), "sources": [f.name for f in recipe.sources]}).encode())
        os.replace(tmp, so)  # the library first: a reader that sees the new file with the old record rebuilds under the lock
        os.replace(tmp_rec, _record_path(so))
        _fsync_dir(directory)
    finally:
        for p in (tmp, tmp_rec):
            with contextlib.suppress(OSError):
                p.unlink()


def ensure(recipe: Recipe, directory: Path | None = None) -> tuple[int, Path]:
    """An open fd of the verified library built from ``recipe`` (building it first when missing,
    zero-length, foreign or stale), and its path. The caller closes the fd.

    Raises :class:`UnsafeCacheError` for an unsafe directory, RuntimeError when the build fails.
    """
    directory = private_dir(directory or default_dir())
    cc = compiler()
    key = build_key(recipe, cc)
    so = directory / f"{recipe.name}-{key[:16]}.so"
    fd, why = _open_verified(so, key)
    if fd is not None:
        return fd, so
    lock_fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)  # one build at a time; released by the kernel if we die
        fd, why = _open_verified(so, key)  # another process may have built it while we waited
        if fd is not None:
            return fd, so
        if why != "not built yet":
            log.warning("rebuilding %s: it %s", so, why)
        _build_locked(recipe, directory, so, key, cc)
        fd, why = _open_verified(so, key)
        if fd is None:
            raise RuntimeError(f"{so} does not verify right after its build: it {why}")
        return fd, so
    finally:
        os.close(lock_fd)  # closing the descriptor releases the flock


def load(recipe: Recipe, directory: Path | None = None) -> ctypes.CDLL:
    """``ctypes.CDLL`` of the verified library (see :func:`ensure`).

    The file loaded must be the one hashed: its device and inode are compared with the verified
    descriptor's after ``dlopen`` (only this user can rename files in the private directory, so
    this catches a concurrent rebuild, not an attacker). The path, not ``/proc/self/fd/N``, is
    given to ``dlopen``, because glibc matches already-loaded libraries by the name passed.
    """
    fd, so = ensure(recipe, directory)
    try:
        lib = ctypes.CDLL(str(so))
        a, b = os.fstat(fd), os.stat(so)
        if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
            raise RuntimeError(f"{so} was replaced while it was being loaded; run again")
        return lib
    finally:
        os.close(fd)
