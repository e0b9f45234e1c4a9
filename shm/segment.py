"""POSIX shared-memory segments with explicit ownership.

Ownership contract:
- the *creator* makes a segment under a name that carries a per-launch id and its own
  pid (``/dpserve.<pid>.<launch_id>.<kind>``), and is the only one that unlinks it
  (``SharedSegment.create`` used as a context manager unlinks in ``__exit__``);
- *attachers* open an existing segment by name and never unlink it;
- a segment whose creator pid is dead was left by a crashed run and is reclaimed by
  ``reclaim_stale_segments`` (run at start-up and by ``python -m shm.cleanup``).

Trust: names are predictable (two PD servers find each other's tables by name), so
another local user could create one first. ``create`` is exclusive (O_CREAT|O_EXCL,
never opens what exists) with mode 0600; ``attach`` and ``find_segment`` refuse
(``ShmOwnerError``) a segment that another uid owns or whose mode is not 0600: it
was not made by this user's server, and its contents cannot be trusted.

Why ``posix_ipc`` and not ``multiprocessing.shared_memory``: on Python 3.11 the
latter registers attached segments with the resource tracker, which unlinks them when
an attaching process exits.

Why ``posix_fallocate``: ``ftruncate`` on tmpfs reserves nothing, so an oversized
segment only fails with SIGBUS on first touch. Allocating up front turns that into an
``ShmSpaceError`` at creation.
"""

from __future__ import annotations

import mmap
import os
import secrets

import posix_ipc

SHM_DIR = "/dev/shm"
SHM_PREFIX_ENV = "DPSERVE_SHM_PREFIX"


def name_prefix(namespace: str) -> str:
    """``dpserve.``, or ``$DPSERVE_SHM_PREFIX.``: a namespace for every segment name.

    Processes inherit it, so a launch and its ranks agree; two servers that pair through
    shared memory (PD prefill + decode) must run with the same one. The test suite sets
    its own, so its leak check sees exactly the segments the run created and no other
    engine's on the machine."""
    if not namespace or not namespace.replace("_", "").replace("-", "").isalnum() \
            or not namespace.isascii():
        raise ValueError(f"{SHM_PREFIX_ENV} must be letters, digits, '-' or '_', got {namespace!r}")
    return namespace + "."


NAME_PREFIX = name_prefix(os.environ.get(SHM_PREFIX_ENV, "dpserve"))


class ShmError(RuntimeError):
    """Base class of shared-memory errors."""


class ShmSpaceError(ShmError):
    """/dev/shm has no room for the segment asked for."""


class ShmLayoutError(ShmError):
    """An attached segment does not have the layout this code expects."""


class ShmNotReadyError(ShmLayoutError):
    """The segment exists but its creator has not finished making it (size or header not
    written yet): no layout to check yet; attaching again a moment later succeeds."""


class ShmOwnerError(ShmError):
    """A segment under one of our names that this user's server did not create."""


SEGMENT_MODE = 0o600


def check_owner(name: str, st: os.stat_result) -> None:
    """Raise ``ShmOwnerError`` unless ``st`` (the segment's stat) is ours: owned by this
    process's uid, mode 0600."""
    mode = st.st_mode & 0o777
    if st.st_uid != os.getuid() or mode != SEGMENT_MODE:
        raise ShmOwnerError(
            f"shared-memory segment {name} is owned by uid {st.st_uid} with mode {mode:o}, "
            f"not by this user (uid {os.getuid()}) with mode {SEGMENT_MODE:o}: it was not "
            f"created by a dpserve server of this user, so it is not used. Remove "
            f"{SHM_DIR}{name} if it is stale, or use another name (for a PD pair, another "
            f"--disaggregation-bootstrap-port).")


def new_launch_id() -> str:
    """A short random id shared by every segment of one launch."""
    return secrets.token_hex(4)


def segment_name(kind: str, launch_id: str, pid: int | None = None) -> str:
    """The POSIX name (leading slash) of a segment of this launch."""
    if not kind.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"segment kind must be alphanumeric, got {kind!r}")
    return f"/{NAME_PREFIX}{pid or os.getpid()}.{launch_id}.{kind}"


def launch_id_of(name: str) -> str:
    """The launch id in a ``segment_name`` (the other segments of that launch share it)."""
    base = name.lstrip("/")
    parts = base[len(NAME_PREFIX):].split(".") if base.startswith(NAME_PREFIX) else []
    if len(parts) != 3 or not parts[0].isdigit():
        raise ValueError(f"{name!r} is not a segment name of this engine")
    return parts[1]


def owner_pid(name: str, prefix: str = NAME_PREFIX) -> int | None:
    """The creator pid encoded in a segment name, or None if the name is not ours
    (does not start with ``prefix``)."""
    base = name.lstrip("/")
    if not base.startswith(prefix):
        return None
    pid_text = base[len(prefix):].split(".", 1)[0]
    return int(pid_text) if pid_text.isdigit() else None


class SharedSegment:
    """One mapped POSIX shared-memory segment.

    ``buf`` is the mmap. Any numpy array or memoryview made over it must be dropped
    before ``close()``: reading an array over a closed mapping segfaults, so ``close``
    refuses (BufferError from mmap) while views exist.
    """

    def __init__(self, name: str, buf: mmap.mmap, is_owner: bool):
        self.name = name
        self.buf = buf
        self.size = len(buf)
        self.is_owner = is_owner
        self._unlinked = False

    @classmethod
    def create(cls, name: str, size: int) -> "SharedSegment":
        """Create, size, zero-fill and map a new segment. Fails if it exists."""
        if size <= 0:
            raise ValueError(f"segment size must be positive, got {size}")
        check_shm_space(size)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=SEGMENT_MODE, size=0)
        try:
            os.fchmod(shm.fd, SEGMENT_MODE)  # exactly 0600, whatever the umask
            try:
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as exc:
                raise ShmSpaceError(
                    f"cannot reserve {size} bytes in {SHM_DIR} for {name}: {exc}. "
                    f"Free space there or run `python -m shm.cleanup`."
                ) from exc
            buf = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(name)
            raise
        shm.close_fd()
        return cls(name, buf, is_owner=True)

    @classmethod
    def attach(cls, name: str) -> "SharedSegment":
        """Map an existing segment of this user (``check_owner``). Attachers never unlink."""
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError as exc:
            raise ShmError(f"shared-memory segment {name} does not exist") from exc
        try:
            check_owner(name, os.fstat(shm.fd))
            if shm.size == 0:  # created, not sized yet (create reserves after O_EXCL)
                raise ShmNotReadyError(f"shared-memory segment {name} is still being created")
            buf = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        return cls(name, buf, is_owner=False)

    def close(self) -> None:
        """Unmap. Raises BufferError if views over ``buf`` are still alive."""
        if not self.buf.closed:
            self.buf.close()

    def unlink(self) -> None:
        """Remove the name (owner only). Idempotent."""
        if not self.is_owner:
            raise ShmError(f"{self.name}: only the creator unlinks a segment")
        if not self._unlinked:
            self._unlinked = True
            try:
                posix_ipc.unlink_shared_memory(self.name)
            except posix_ipc.ExistentialError:
                pass

    def __enter__(self) -> "SharedSegment":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        except BufferError:
            pass  # a view outlives the block; the mapping stays until it goes
        finally:
            if self.is_owner:
                self.unlink()


def find_segment(kind: str, launch_id: str) -> str | None:
    """The name of the live segment ``kind`` of launch ``launch_id``, whoever created it.

    For segments two servers share (PD prefill and decode servers on one node): the
    attacher knows the kind and the shared launch id but not the creator's pid, which
    is in the name. Segments left by dead creators are ignored. Raises ``ShmError`` if
    two live processes created one (two servers claim the same shared name), and
    ``ShmOwnerError`` if the live one is not this user's (``check_owner``).
    """
    suffix = f".{launch_id}.{kind}"
    live = [n for n in list_segments() if n.endswith(suffix)
            and (pid := owner_pid(n)) is not None and pid_alive(pid)]
    for name in live:
        try:
            st = os.stat(SHM_DIR + name)
        except FileNotFoundError:
            continue  # unlinked meanwhile: the len check below still sees it, harmlessly
        check_owner(name, st)
    if len(live) > 1:
        raise ShmError(f"several live segments end in {suffix}: {live}")
    return live[0] if live else None


def check_shm_space(size: int) -> None:
    """Raise ShmSpaceError if /dev/shm cannot hold ``size`` more bytes."""
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return  # no /dev/shm to inspect (non-Linux); posix_fallocate still guards
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ShmSpaceError(
            f"{SHM_DIR} has {free} bytes free, {size} needed. Free space there, "
            f"enlarge it (docker --shm-size) or run `python -m shm.cleanup`."
        )


def list_segments(prefix: str = NAME_PREFIX) -> list[str]:
    """POSIX names of every segment in /dev/shm whose name starts with ``prefix``."""
    try:
        entries = os.listdir(SHM_DIR)
    except FileNotFoundError:
        return []
    return sorted("/" + e for e in entries if e.startswith(prefix))


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process. A zombie (exited, not yet reaped by its
    parent) counts as dead: it holds its pid but will never write or unlink again."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return not _is_zombie(pid)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return False  # no procfs (non-Linux) or the pid just went: kill(0) decides
    # The state letter follows the command name, which is in parentheses and may
    # itself contain ") ", so split at the last one.
    state_at = stat.rfind(b")") + 2
    return stat[state_at:state_at + 1] in (b"Z", b"X")


METRICS_DIR_PREFIX = "dpserve-metrics."


def reclaim_stale_metrics_dirs(root: str | None = None, dry_run: bool = False) -> list[str]:
    """Remove the metrics folders (``dpserve-metrics.<pid>.*`` in the temporary
    directory, where several API processes keep their counters) whose launcher pid is
    dead. Returns the paths removed (with ``dry_run``, those it would remove)."""
    import shutil
    import tempfile
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(root)
    except OSError:
        return removed
    for name in names:
        pid = name[len(METRICS_DIR_PREFIX):].split(".", 1)[0]
        if not name.startswith(METRICS_DIR_PREFIX) or not pid.isdigit() or pid_alive(int(pid)):
            continue
        path = os.path.join(root, name)
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True)
        if dry_run or not os.path.exists(path):
            removed.append(path)
    return removed


def reclaim_stale_segments(prefix: str = NAME_PREFIX) -> list[str]:
    """Unlink our segments whose creator pid is dead. Returns the names removed."""
    removed = []
    for name in list_segments(prefix):
        pid = owner_pid(name, prefix)
        if pid is None or pid_alive(pid):
            continue
        try:
            posix_ipc.unlink_shared_memory(name)
            removed.append(name)
        except posix_ipc.ExistentialError:
            pass
    return removed
