"""Output folders: written into a marked temporary folder, published by rename, replaced only when allowed.

`atomic_dir(out)` yields the temporary folder; `--out` is re-checked before publishing (only what was there at the
start under --force, or a tpcli output, is replaced); stale temporary folders of interrupted runs are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tpcli.errors import CheckpointError, OutputError
from tpcli.formats.jsonfile import read_json
from tpcli.formats.processes import alive as _alive
from tpcli.formats.processes import process_start
from tpcli.formats.units import decimal_bytes

OUTPUT_MARKER = ".tpcli-output"  # written into every folder tpcli publishes: what --force may replace
TEMP_MARKER = ".tpcli-tmp.json"  # written into every temporary folder: who made it, so a stale one can be removed


@dataclass(frozen=True)
class Words:
    """How the output checks' errors name the output (`out`, before its path; `another`, in "pick another ...")
    and the permission to replace it (`force`): the CLI's flags, or a Python API's arguments."""
    out: str = "--out"
    another: str = "--out"
    force: str = "--force"


CLI_WORDS = Words()


def prepare_output(out: str | Path, *, force: bool, inputs: list[Path] = (), words: Words = CLI_WORDS) -> Path:
    """Check OUT before any work: refuse a path that is, holds or lies inside an input; a file; a mount point; a
    non-empty folder without --force; and, even with --force, a non-empty folder that is not a tpcli output."""
    path = Path(out).expanduser().resolve()
    for src in inputs:
        src = Path(src).expanduser().resolve()
        relation = ("is the input folder" if path == src else "contains the input folder" if path in src.parents
                    else "lies inside the input folder" if src in path.parents else None)
        if relation:
            raise OutputError(f"{words.out} {out}: {relation} {src}; write somewhere else.")
    if path.exists():
        if not path.is_dir():
            raise OutputError(f"{words.out} {out}: exists and is not a directory; pick another path.")
        if os.path.ismount(path):
            raise OutputError(f"{words.out} {out}: is a mount point; tpcli builds the output beside it and renames it into "
                              f"place, which cannot cross filesystems: pass a folder inside it (e.g. {path / 'model'}).")
        if any(path.iterdir()):
            if not force:
                raise OutputError(f"{words.out} {out}: directory is not empty; pass {words.force} to replace it or pick another path.")
            if not is_tpcli_output(path):
                raise OutputError(f"{words.out} {out}: not empty and not a tpcli output (no {OUTPUT_MARKER} or tpcli.json); "
                                  f"{words.force} only replaces tpcli's own outputs: empty it yourself or pick another path.")
    if not path.parent.exists():
        raise OutputError(f"{words.out} {out}: parent directory {path.parent} does not exist.")
    return path


def is_tpcli_output(path: Path) -> bool:
    """A folder tpcli wrote: it holds the output marker, or (shard outputs of older versions) a tpcli manifest."""
    if (path / OUTPUT_MARKER).is_file():
        return True
    if not (path / "tpcli.json").is_file():
        return False
    try:
        doc = read_json(path / "tpcli.json")
    except CheckpointError:  # unreadable, not JSON, absurdly nested: not something tpcli wrote
        return False
    return isinstance(doc, dict) and doc.get("format") == "tpcli.sharded"


def check_free_space(out: Path, needed: int) -> None:
    """Refuse before writing when the filesystem of `out` has fewer than `needed` bytes free."""
    free = shutil.disk_usage(out.parent).free
    if needed > free:
        raise OutputError(f"--out {out}: needs {decimal_bytes(needed)}, {decimal_bytes(free)} free on {_mount_point(out.parent)}; "
                          "free some space or pick another filesystem.")


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def remove_stale_temps(parent: Path) -> list[str]:
    """Remove the temporary folders in `parent` that an interrupted tpcli left: only folders holding tpcli's temp
    marker, written on this host by a process that is gone. Returns their paths; nothing else is touched."""
    removed = []
    host = socket.gethostname()
    for p in sorted(parent.glob(".*.tpcli-tmp-*")):
        marker = p / TEMP_MARKER
        if p.is_symlink() or not p.is_dir() or marker.is_symlink() or not marker.is_file():
            continue
        try:
            info = read_json(marker, max_bytes=MARKER_SIZE)
        except CheckpointError:  # not a marker tpcli wrote: the folder is left alone
            continue
        if not isinstance(info, dict) or info.get("tool") != "tpcli" or info.get("host") != host:
            continue
        pid = info.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or _alive(pid, info.get("pid_start")):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(str(p))
    return removed


MARKER_SIZE = 512  # bytes: a hostname is at most 64


def _marker_text(info: dict) -> str:
    """`info` as one JSON line padded with spaces to MARKER_SIZE, so both markers have the same size."""
    return json.dumps(info).ljust(MARKER_SIZE - 1) + "\n"


def temp_folder(out: Path, command: str) -> Path:
    """A fresh hidden sibling of `out` holding TEMP_MARKER (host, pid, start time): remove_stale_temps removes it
    once this process is gone, whatever killed it."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tpcli-tmp-", dir=out.parent))
    (tmp / TEMP_MARKER).write_text(_marker_text({
        "tool": "tpcli", "command": command, "host": socket.gethostname(), "pid": os.getpid(),
        "pid_start": process_start(os.getpid()), "started": time.time()}))
    return tmp


@contextlib.contextmanager
def atomic_dir(out: Path, *, command: str = "tpcli", force: bool = False):
    """Yield a temporary sibling folder; on success it replaces `out`, on any error (or Ctrl-C) it is removed.

    The temporary folder holds TEMP_MARKER (host, pid, start time) while it is written, so a later run can prove a
    leftover one is stale; the published folder holds OUTPUT_MARKER, so a later --force knows it may replace it.
    The one becomes the other in place: the temp marker is overwritten with the output marker's text (both padded
    to MARKER_SIZE, so no block is freed and the published marker holds no host or pid) and renamed. Unlinking it
    instead stalled 0.2-2 s on ext4 (measured with strace after writing 4.7 GB: the unlink waited for the journal
    to commit the fresh data; the overwrite and the rename do not).
    A full disk, or a final rename that fails, becomes one OutputError line; nothing is left behind either way.
    `out` is checked again just before it is replaced (`check_replaceable`): whatever appeared there meanwhile is
    only replaced if `prepare_output` would have allowed it (empty, or a tpcli output under `force`).
    """
    tmp = temp_folder(out, command)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result should look like any other folder
        yield tmp
        publish(tmp, out, command=command, force=force)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            what = f" while writing {Path(exc.filename).name}" if exc.filename else ""
            raise OutputError(f"--out {out}: no space left on the device{what}; nothing was kept: free some space "
                              "and re-run.") from None
        raise


def publish(tmp: Path, out: Path, *, command: str, force: bool, words: Words = CLI_WORDS) -> None:
    """Turn the finished temporary folder `tmp` (from `temp_folder`) into `out`: its temp marker becomes the output
    marker in place (see `atomic_dir`), `out` is re-checked (`check_replaceable`) and replaced (`_publish`)."""
    with open(tmp / TEMP_MARKER, "r+") as f:  # same size, overwritten in place: no block is freed
        f.write(_marker_text({"tool": "tpcli", "command": command}))
        f.truncate()
    os.replace(tmp / TEMP_MARKER, tmp / OUTPUT_MARKER)
    check_replaceable(out, force=force, words=words)
    _publish(tmp, out, command, force, words)


def check_replaceable(out: Path, *, force: bool, words: Words = CLI_WORDS) -> None:
    """Raise OutputError unless `out` may be replaced now: absent, an empty folder, or (with `force`) a tpcli
    output. `prepare_output` checked this before any work; this re-check, just before the rename, catches a folder
    someone created or filled while tpcli was writing (a race `prepare_output` cannot see). A folder that was
    there at the start under --force passes only if it still is a tpcli output. `_publish` checks once more what
    it actually moved aside, where nobody else can change it, and puts it back if it fails."""
    why = _not_replaceable(out, force=force, words=words)
    if why:
        raise OutputError(f"{words.out} {out}: {_changed(why, words)}")


def _changed(why: str, words: Words) -> str:
    return (f"changed while tpcli was writing: it {why}; nothing was replaced and the new output was discarded: move "
            f"it away (or pick another {words.another}) and re-run.")


def _not_replaceable(path: Path, *, force: bool, words: Words = CLI_WORDS) -> str | None:
    """Why `path` may not be replaced (see `check_replaceable`), or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return "is now a symlink" if stat.S_ISLNK(st.st_mode) else "is now a file"
    try:
        names = sorted(os.listdir(path))[:3]
    except OSError as exc:
        names = [f"unreadable: {exc.strerror}"]
    if not names or (force and is_tpcli_output(path)):
        return None
    return f"now holds {', '.join(names)}" + ("" if force else f" (and {words.force} was not given)")


def _publish(tmp: Path, out: Path, command: str, force: bool = False, words: Words = CLI_WORDS) -> None:
    """Move the finished `tmp` to `out`; on failure put the previous output back.

    A previous output (--force) is first moved into a marked temporary folder, `out` -> `.OUT.tpcli-tmp-X/old`,
    then deleted: if this process dies before the deletion ends, the next run's remove_stale_temps finds it as it
    finds any interrupted write, instead of a hidden copy of the old output lingering forever.
    """
    holder = None
    try:
        if out.exists() or out.is_symlink():
            holder = temp_folder(out, command)
            os.replace(out, holder / "old")
            why = _not_replaceable(holder / "old", force=force, words=words)  # moved: can no longer change under us
            if why:
                os.replace(holder / "old", out)  # put it back untouched
                shutil.rmtree(holder, ignore_errors=True)
                raise OutputError(f"{words.out} {out}: {_changed(why, words)}")
        os.replace(tmp, out)  # onto a missing or empty folder; a folder filled meanwhile fails (ENOTEMPTY)
    except OSError as exc:
        kept = ""
        if holder is not None:
            if not out.exists() and (holder / "old").exists():
                with contextlib.suppress(OSError):
                    os.replace(holder / "old", out)
            if (holder / "old").exists():  # could not be put back: unmark it so no later run deletes it
                (holder / TEMP_MARKER).unlink(missing_ok=True)
                kept = f"; the previous output is in {holder / 'old'}"
            else:
                shutil.rmtree(holder, ignore_errors=True)
        raise OutputError(f"{words.out} {out}: could not move the finished output into place ({exc.strerror}); nothing "
                          f"was written{kept}.") from None
    if holder is not None:
        shutil.rmtree(holder, ignore_errors=True)


def copy_aux(src_folder: Path, dst: Path, files: list[Path]) -> list[str]:
    copied = []
    for f in files:
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    return copied
