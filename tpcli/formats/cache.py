"""A small result cache for the static commands (`inspect`, `verify --tp N` of a model folder), and for the layout
of `shard` / `gather` when they only move bytes (a `tpcli.formats.byteplan.BytePlan`: which bytes of which source
file go where; the bytes themselves are always read, written and hashed anew).

Building the meta model costs seconds of imports (torch, transformers, the model's modules) for a result that is a
pure function of a few small inputs. The cache stores that JSON result under a key that covers every input, so a
hit can never be stale:

    key = sha256(command, its parsed parameters (every option, present and future, generically), cwd,
                 for each parameter naming an existing path: its content (a file: its bytes; a folder: each top-level
                 file's name, size and mtime_ns, and the bytes of its *.json files such as config.json and the index),
                 the plan library files (plans/*.json), tpcli's own .py/.json files (size, mtime_ns),
                 the versions of python, tpcli, torch, transformers, safetensors and huggingface_hub)

A path's fingerprint names the bytes, not the name: its resolved path, st_dev + st_ino, size, mtime_ns and
ctime_ns (a hub blob's path is its sha256), so flipping a `latest -> ckpt-N` link, or rewriting a file at the same
size and putting its mtime back (ctime cannot be put back), misses. A cached shard/gather layout is used only if
every source file still has the size and safetensors header it was planned with (checked at each hit), so even a
file rewritten with the same size and mtime cannot send bytes to the wrong place.

A cache is never a way in: the folder is created 0700, and a folder (or entry) not owned by the current user or
writable by group/others is not used at all (said once on stderr; tpcli then runs as without a cache). Every entry
is validated before use (`BytePlan.from_json`: every field present and typed, output names plain, boxes inside
their tensors and source files, sources regular files inside the model folder); anything else is a miss. At most MAX_ENTRIES entries and MAX_BYTES bytes
are kept: writing an entry evicts the least recently used (a hit refreshes an entry's mtime). Versions are read with importlib.metadata, so a hit imports neither torch nor transformers. A model
given as a hub id (no local folder) or with --revision is never cached (the hub can change under the same name).
Only successful results are stored (the caller decides: an error raises before `put`, a failed verify is not
stored).

Location: $TPCLI_CACHE_DIR, else $XDG_CACHE_HOME/tpcli, else ~/.cache/tpcli. TPCLI_CACHE_DIR=off (or 0, or empty)
disables it. Entries are small JSON files written atomically; `rm -rf ~/.cache/tpcli` is always safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import sys
import tempfile
from pathlib import Path

from tpcli.formats.jsonfile import MAX_DEPTH, nesting_depth

ENV = "TPCLI_CACHE_DIR"
SCHEMA = 3  # 3: a shard/gather layout is a BytePlan
_PACKAGE = Path(__file__).resolve().parents[1]  # the whole tpcli package: any source change is a miss
_PLAN_LIBRARIES = (_PACKAGE / "plans", _PACKAGE.parent / "plans")  # installed package data, or a source checkout
_VERSIONED = ("tpcli", "torch", "transformers", "safetensors", "huggingface_hub")
MAX_ENTRIES = 256  # entries kept; the least recently used beyond this (or beyond MAX_BYTES) are removed on write
MAX_BYTES = 256 * 2**20
TMP_PREFIX = ".tmp-"  # an entry being written; removed when the write fails, swept by the next put once stale
STALE_TMP_S = 600  # a put writes a few KB: a temporary file this old belongs to a process that died
_warned: set[str] = set()


def cache_dir() -> Path | None:
    """Where entries live, or None when disabled."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in {"", "0", "off", "no", "false", "none"} else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tpcli"


def key(command: str, params: dict, *, sharded: bool = False) -> str | None:
    """The key of one invocation, or None when it must not be cached: cache disabled, a hub id or --revision,
    --numerics (real workers), or a sharded folder or training checkpoint unless `sharded` (verify hashes its
    files, so its result is never cached; gather caches only its layout and still hashes the files)."""
    from tpcli.formats.dcp import is_sharded_dir
    from tpcli.formats.train_folder import is_train_folder

    if cache_dir() is None or params.get("revision") or params.get("numerics"):
        return None
    try:
        cwd = os.getcwd()  # relative paths in params mean something else elsewhere
    except OSError:  # run from a deleted folder: nothing relative can be trusted; just do not cache
        return None
    model = params.get("model", params.get("target"))
    if not isinstance(model, str) or not Path(model).expanduser().is_dir() or (
            (is_sharded_dir(Path(model).expanduser()) or is_train_folder(Path(model).expanduser())) and not sharded):
        return None
    h = hashlib.sha256()

    def add(*parts) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add(SCHEMA, command, sorted((k, repr(v)) for k, v in params.items()), cwd, sys.version)
    for name in _VERSIONED:
        add(name, installed_version(name))
    for value in params.values():
        if isinstance(value, str) and value:
            add(value, _fingerprint(Path(value).expanduser()))
    for folder in _PLAN_LIBRARIES:
        add(str(folder), _fingerprint(folder))
    add(sorted((str(p.relative_to(_PACKAGE)), p.stat().st_size, p.stat().st_mtime_ns) for p in _PACKAGE.rglob("*")
               if p.suffix in {".py", ".json"} and "__pycache__" not in p.parts))  # tpcli's code and data files
    return h.hexdigest()


def get(k: str | None, required: tuple[str, ...] = ()) -> dict | None:
    """The stored result for key `k`, or None (no key, no usable cache folder, no entry, an unreadable or edited
    entry, or a result without one of the `required` top-level fields)."""
    folder = _usable_dir(create=False)
    if k is None or folder is None:
        return None
    path = folder / f"{k}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not _private(st) or st.st_size > MAX_BYTES:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            text = f.read(MAX_BYTES + 1).decode()
        if nesting_depth(text) > MAX_DEPTH:  # an entry tpcli wrote nests a few levels: a planted one is a miss
            return None
        entry = json.loads(text)
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    if not (isinstance(entry, dict) and entry.get("key") == k and isinstance(entry.get("result"), dict)
            and entry.get("digest") == digest(entry["result"])  # a truncated or hand-edited entry is a miss
            and all(name in entry["result"] for name in required)):
        return None
    try:
        os.utime(path)  # least recently used goes first
    except OSError:
        pass
    return entry["result"]


def put(k: str | None, result: dict) -> dict:
    """Store `result` (JSON-ready) under `k` and return it as a hit would (through JSON), so that a first run and a
    cached one print the same; a cache that cannot be written is silently skipped."""
    text = json.dumps({"key": k, "digest": digest(result), "result": result})
    folder = _usable_dir(create=True) if k is not None else None
    if folder is None or len(text.encode()) > MAX_BYTES:  # an entry over the bound is not stored (nor evicts all)
        return json.loads(text)["result"]
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=folder)
        with os.fdopen(fd, "w") as f:
            write_entry(f, text)
        os.replace(tmp, folder / f"{k}.json")  # readers see the old entry or the whole new one
        tmp = None
    except OSError:  # a full disk, a read-only folder: no cache, and no half-written file left behind
        pass
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    with contextlib.suppress(OSError):
        evict(folder)  # also sweeps what an earlier, killed put left
    return json.loads(text)["result"]


def write_entry(f, text: str) -> None:
    """Write an entry's text to the open temporary file `f` (a test injects a full disk here)."""
    f.write(text)


def digest(result: dict) -> str:
    """sha256 of a result's canonical JSON: stored with it, checked at each hit."""
    return hashlib.sha256(json.dumps(result, sort_keys=True).encode()).hexdigest()


def evict(folder: Path, max_entries: int | None = None, max_bytes: int | None = None) -> list[str]:
    """Remove the least recently used entries beyond `max_entries` / `max_bytes` (default MAX_ENTRIES, MAX_BYTES),
    and temporary files older than STALE_TMP_S (a put killed mid-write); returns the names removed.

    Newest first, an entry is kept while the kept ones so far, itself included, stay within both bounds: a removed
    entry counts toward neither, so one entry over `max_bytes` removes itself, not everything older."""
    import time

    max_entries = MAX_ENTRIES if max_entries is None else max_entries
    max_bytes = MAX_BYTES if max_bytes is None else max_bytes
    entries, removed = [], []
    for p in folder.iterdir():
        try:
            st = p.lstat()
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if p.name.startswith(TMP_PREFIX):
            if st.st_mtime < time.time() - STALE_TMP_S:
                entries.append((-1.0, st.st_size, p))  # stale: always removed
            continue
        if p.suffix == ".json":
            entries.append((st.st_mtime, st.st_size, p))
    entries.sort(key=lambda e: e[0], reverse=True)  # newest first
    count = total = 0
    for mtime, size, p in entries:
        if mtime >= 0 and count + 1 <= max_entries and total + size <= max_bytes:
            count, total = count + 1, total + size  # kept
        else:
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def _private(st: os.stat_result) -> bool:
    """Owned by this user, and nobody else may write it."""
    return st.st_uid == os.geteuid() and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)


def _usable_dir(*, create: bool) -> Path | None:
    """The cache folder if it may be trusted: created 0700 when missing (`create`); an existing one must be a folder
    owned by this user and not writable by group/others, else None and one line on stderr (once per folder)."""
    folder = cache_dir()
    if folder is None:
        return None
    try:
        st = os.stat(folder)
    except FileNotFoundError:
        if not create:
            return None
        try:
            folder.parent.mkdir(parents=True, exist_ok=True)
            folder.mkdir(mode=0o700)
            st = os.stat(folder)
        except OSError:
            return None
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and _private(st):
        return folder
    if str(folder) not in _warned:
        _warned.add(str(folder))
        why = ("is not a folder" if not stat.S_ISDIR(st.st_mode) else
               f"is owned by uid {st.st_uid}, not you" if st.st_uid != os.geteuid() else
               f"is writable by group/others (mode {stat.S_IMODE(st.st_mode):o})")
        print(f"tpcli: not using the cache: {folder} {why}; use a private folder (chmod 700) or set {ENV}=off.",
              file=sys.stderr)
    return None


def installed_version(name: str) -> str | None:
    """The installed version of `name`, from the Version: line of its metadata (importlib.metadata.version parses
    the whole file with the email parser: a third of a cache hit's time)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(name)
        text = dist.read_text("METADATA") or dist.read_text("PKG-INFO") or ""  # wheels; eggs and editable installs
    except PackageNotFoundError:
        return None
    for line in text.splitlines():
        if line.startswith("Version:"):
            return line.split(":", 1)[1].strip()
        if not line:  # end of the headers
            break
    return None


def _identity(path: Path) -> tuple:
    """What names a file's (or folder's) bytes: resolved path, device, inode, size, mtime_ns, ctime_ns. A rewrite at
    the same size with its mtime put back still changes ctime (and a copy-and-rename, the inode); a hub blob's
    resolved path is its sha256."""
    st = path.stat()
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _fingerprint(path: Path):
    """What a result can depend on in `path`: a file's identity and bytes; a folder's identity, and its top-level
    files' identities and JSON bytes."""
    from tpcli.formats.hashing import sha256_file

    try:
        if path.is_file():
            return _identity(path), sha256_file(path)
        if path.is_dir():
            out = [_identity(path)]
            for p in sorted(path.iterdir()):
                if p.is_file():  # a link's target is named by its identity; its bytes are not read (a `x.json`
                    # link to a large file elsewhere was read whole into memory)
                    digest = sha256_file(p) if p.suffix == ".json" and not p.is_symlink() else None
                    out.append((p.name, _identity(p), digest))
            return out
    except OSError:
        return "unreadable"
    return None
