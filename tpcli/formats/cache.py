"""A small result cache for the static commands (`inspect`, `verify --tp N` of a model folder), and for the layout
of `shard` / `gather` when they only move bytes (`sharding.ShardJob`, `gathering.GatherJob`: which bytes of which
source file go where; the bytes themselves are always read, written and hashed anew).

Building the meta model costs seconds of imports (torch, transformers, the model's modules) for a result that is a
pure function of a few small inputs. The cache stores that JSON result under a key that covers every input, so a
hit can never be stale:

    key = sha256(command, its parsed parameters (every option, present and future, generically), cwd,
                 for each parameter naming an existing path: its content (a file: its bytes; a folder: each top-level
                 file's name, size and mtime_ns, and the bytes of its *.json files such as config.json and the index),
                 the plan library files (plans/*.json), tpcli's own .py/.json files (size, mtime_ns),
                 the versions of python, tpcli, torch, transformers, safetensors and huggingface_hub)

A cached shard/gather layout is used only if every source file still has the size and safetensors header it was
planned with (checked at each hit), so even a file rewritten with the same size and mtime cannot send bytes to the
wrong place. Versions are read with importlib.metadata, so a hit imports neither torch nor transformers. A model
given as a hub id (no local folder) or with --revision is never cached (the hub can change under the same name).
Only successful results are stored (the caller decides: an error raises before `put`, a failed verify is not
stored).

Location: $TPCLI_CACHE_DIR, else $XDG_CACHE_HOME/tpcli, else ~/.cache/tpcli. TPCLI_CACHE_DIR=off (or 0, or empty)
disables it. Entries are small JSON files written atomically; `rm -rf ~/.cache/tpcli` is always safe.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

ENV = "TPCLI_CACHE_DIR"
SCHEMA = 1
_PACKAGE = Path(__file__).resolve().parents[1]  # the whole tpcli package: any source change is a miss
_PLAN_LIBRARIES = (_PACKAGE / "plans", _PACKAGE.parent / "plans")  # installed package data, or a source checkout
_VERSIONED = ("tpcli", "torch", "transformers", "safetensors", "huggingface_hub")


def cache_dir() -> Path | None:
    """Where entries live, or None when disabled."""
    value = os.environ.get(ENV)
    if value is not None:
        return None if value.strip().lower() in {"", "0", "off", "no", "false", "none"} else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tpcli"


def key(command: str, params: dict, *, sharded: bool = False) -> str | None:
    """The key of one invocation, or None when it must not be cached: cache disabled, a hub id or --revision,
    --numerics (real workers), or a sharded folder unless `sharded` (verify hashes its files, so its result is
    never cached; gather caches only its layout and still hashes the files)."""
    from tpcli.formats.dcp import is_sharded_dir

    if cache_dir() is None or params.get("revision") or params.get("numerics"):
        return None
    model = params.get("model", params.get("target"))
    if not isinstance(model, str) or not Path(model).expanduser().is_dir() or (
            is_sharded_dir(Path(model).expanduser()) and not sharded):
        return None
    h = hashlib.sha256()

    def add(*parts) -> None:
        for p in parts:
            h.update(repr(p).encode())
            h.update(b"\0")

    add(SCHEMA, command, sorted((k, repr(v)) for k, v in params.items()), os.getcwd(), sys.version)
    for name in _VERSIONED:
        add(name, _version(name))
    for value in params.values():
        if isinstance(value, str) and value:
            add(value, _fingerprint(Path(value).expanduser()))
    for folder in _PLAN_LIBRARIES:
        add(str(folder), _fingerprint(folder))
    add(sorted((str(p.relative_to(_PACKAGE)), p.stat().st_size, p.stat().st_mtime_ns) for p in _PACKAGE.rglob("*")
               if p.suffix in {".py", ".json"} and "__pycache__" not in p.parts))  # tpcli's code and data files
    return h.hexdigest()


def get(k: str | None) -> dict | None:
    """The stored result for key `k`, or None (no key, no entry, unreadable entry)."""
    folder = cache_dir()
    if k is None or folder is None:
        return None
    try:
        entry = json.loads((folder / f"{k}.json").read_text())
    except (OSError, ValueError):
        return None
    return entry.get("result") if isinstance(entry, dict) and entry.get("key") == k else None


def put(k: str | None, result: dict) -> dict:
    """Store `result` (JSON-ready) under `k` and return it as a hit would (through JSON), so that a first run and a
    cached one print the same; a cache that cannot be written is silently skipped."""
    folder = cache_dir()
    if k is None or folder is None:
        return result
    text = json.dumps({"key": k, "result": result})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, folder / f"{k}.json")  # readers see the old entry or the whole new one
    except OSError:
        pass
    return json.loads(text)["result"]


def _version(name: str) -> str | None:
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


def _fingerprint(path: Path):
    """What a result can depend on in `path`: a file's bytes; a folder's top-level file sizes, mtimes and JSON bytes."""
    try:
        if path.is_file():
            return hashlib.sha256(path.read_bytes()).hexdigest()
        if path.is_dir():
            out = []
            for p in sorted(path.iterdir()):
                if p.is_file():
                    st = p.stat()
                    digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.suffix == ".json" else None
                    out.append((p.name, st.st_size, st.st_mtime_ns, digest))
            return out
    except OSError:
        return "unreadable"
    return None
