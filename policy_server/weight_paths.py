"""Where `POST /v1/admin/weights/load` may read: paths confined to the operator's `--weights-dir`s.

A request's `path` is relative to a root, or absolute and inside one; with several roots, the first
that allows it wins. The path is resolved with every symlink followed, and the result must still
be inside the root (`Path.resolve(strict=True)`, then `is_relative_to`): `..` and symlinks may move
around inside a root, never out of it. What it names must be a regular file called `*.safetensors`
(the name asked for carries the suffix, so that a Hugging Face cache's suffixless blobs, symlinked
from its snapshot directory, still load), or a directory whose `*.safetensors` entries all are.
Only `stat` is used to decide (it never blocks, whatever the file is), and the file is then opened
with O_NONBLOCK and O_NOFOLLOW and checked again with `fstat`, so that a FIFO or a device swapped in
meanwhile cannot block the read either.

`PathRefused` carries the real reason, for the server's log only: the client gets one answer for
every refusal, so that answers cannot be used to map the server's disk.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

SUFFIX = ".safetensors"


class Found(NamedTuple):
    """A file that passed the checks: its resolved path, the (device, inode) that passed, and the
    name it was asked for by (a symlink's, in a Hugging Face cache)."""

    path: Path
    identity: tuple[int, int]
    name: str


class PathRefused(Exception):
    """A `path` this server will not read; the message is the reason, for the server log only."""


def weight_roots(dirs: Sequence[str | os.PathLike]) -> tuple[Path, ...]:
    """The operator's `--weights-dir`s, resolved (symlinks followed): what `path`s are confined to."""
    roots = []
    for d in dirs:
        try:
            root = Path(d).resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise ValueError(f"--weights-dir {d}: {exc.strerror if isinstance(exc, OSError) else exc}") from None
        if not root.is_dir():
            raise ValueError(f"--weights-dir {d} is not a directory")
        roots.append(root)
    return tuple(roots)


def _inside(root: Path, path: Path) -> Path:
    """`path` resolved, if it exists and is inside `root` once every symlink is followed."""
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError) as exc:  # missing, no permission, a symlink loop, a NUL byte
        raise PathRefused(f"{path} cannot be resolved: {exc}") from None
    if not real.is_relative_to(root):
        raise PathRefused(f"{path} resolves to {real}, outside {root}")
    return real


def _regular(root: Path, path: Path) -> Found:
    real = _inside(root, path)
    info = os.stat(real)  # stat never blocks, whatever the file is
    if not stat.S_ISREG(info.st_mode):
        raise PathRefused(f"{path} ({real}) is not a regular file (mode {stat.filemode(info.st_mode)})")
    return Found(real, (info.st_dev, info.st_ino), path.name)


def _locate_in(root: Path, requested: str) -> list[Found]:
    candidate = root / requested  # an absolute `requested` replaces `root`: it must resolve inside it
    real = _inside(root, candidate)
    if real.is_dir():
        names = sorted(n for n in os.listdir(real) if n.endswith(SUFFIX))
        if not names:
            raise PathRefused(f"{real} holds no {SUFFIX} file")
        return [_regular(root, real / n) for n in names]  # one that is not a regular file refuses them all
    # the name asked for, not the target's: checkpoints in a Hub cache are symlinks to blobs without suffix
    if not candidate.name.endswith(SUFFIX):
        raise PathRefused(f"{candidate} is not named *{SUFFIX}")
    return [_regular(root, candidate)]


def locate(roots: Sequence[Path], requested: str) -> list[Found]:
    """The safetensors files `requested` names under the first root that allows it.

    PathRefused (its message for the log, never for the client) when no root does."""
    reasons = []
    for root in roots:
        try:
            return _locate_in(root, requested)
        except PathRefused as exc:
            reasons.append(str(exc))
        except OSError as exc:  # e.g. a directory that cannot be listed
            reasons.append(f"{root / requested}: {exc}")
    raise PathRefused("; ".join(reasons) or "no --weights-dir")


def open_regular(found: Found) -> tuple[Any, int]:
    """The file `found` open for reading, and its size. O_NONBLOCK so that opening a FIFO (swapped in
    since the check) returns at once, O_NOFOLLOW so that no symlink is followed; fstat makes sure the
    file opened is the one checked (a directory on the way swapped for a symlink would open another)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(found.path, flags)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino) != found.identity:
        os.close(fd)
        raise PathRefused(f"{found.path} changed since it was checked (now mode {stat.filemode(info.st_mode)})")
    return os.fdopen(fd, "rb"), info.st_size
