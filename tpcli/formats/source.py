"""Where a model comes from: a local directory or a hub id resolved through the HF cache.

Only `config.json` is fetched for planning; weights are fetched (safetensors only) when a command needs them.
`HF_HUB_OFFLINE=1` and `HF_HOME` are honoured because everything goes through `huggingface_hub`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tpcli.errors import CheckpointError, ModelError
from tpcli.formats.jsonfile import read_json
from tpcli.formats.rankfile import check_inside  # noqa: F401 - callers import it from here too

# Files worth carrying next to weights: config, generation config, tokenizer and chat template.
AUX_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template*",
    "added_tokens.json",
    "preprocessor_config.json",
)


@dataclass
class Source:
    """A resolved model: `path` is a local folder holding at least `config.json`."""

    spec: str
    path: Path
    hub_id: str | None = None
    revision: str | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"path": str(self.path), "hub_id": self.hub_id, "revision": self.revision}


HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")  # huggingface_hub's rules
PROBE_TIMEOUT_S = 3.0  # how long to wait for the hub's address before treating the network as down


def _looks_like_hub_id(spec: str) -> bool:
    """`org/name` shaped (two non-empty parts, not an explicit path); `_resolve_hub` checks the characters."""
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def resolve(spec: str, *, revision: str | None = None, weights: bool = False) -> Source:
    """Resolve MODEL to a local folder. With `weights=True` the safetensors files are made available too."""
    local = Path(spec).expanduser()
    if local.exists() or not _looks_like_hub_id(spec):
        if local.exists() and not local.is_dir():
            raise ModelError(f"MODEL {spec!r} is a file, not a folder; pass the model folder (the one holding "
                             "config.json) or a hub id org/name.")
        if not local.is_dir():
            raise ModelError(f"MODEL {spec!r}: no such directory (pass a local model folder or a hub id org/name).")
        if not (local / "config.json").is_file():
            raise ModelError(f"MODEL {spec!r}: {local / 'config.json'} is missing; point MODEL at a transformers model folder.")
        return Source(spec=spec, path=local.resolve(), revision=None)
    if not HUB_ID.fullmatch(spec) or ".." in spec or "--" in spec:
        raise ModelError(f"MODEL {spec!r}: no such local folder, and not a valid hub id (org/name: letters, digits, "
                         "'-', '_' and '.'); check the spelling.")
    return _resolve_hub(spec, revision=revision, weights=weights)


def _hub_reachable() -> bool:
    """Can the hub's host be resolved and connected to within PROBE_TIMEOUT_S? (huggingface_hub itself retries an
    unreachable host for about 25 s before it falls back to the cache.)"""
    import socket
    import threading
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=PROBE_TIMEOUT_S).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(PROBE_TIMEOUT_S)
    return bool(ok)


def _resolve_hub(repo_id: str, *, revision: str | None, weights: bool) -> Source:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"}
    unreachable = not offline and not _hub_reachable()
    local_only = offline or unreachable
    first = f"MODEL {repo_id!r}: no such local folder; as a hub id"
    try:
        config_file = hf_hub_download(repo_id, "config.json", revision=revision, local_files_only=local_only)
        path = Path(config_file).parent
        if weights:
            path = Path(
                snapshot_download(
                    repo_id, revision=revision, local_files_only=local_only,
                    allow_patterns=["*.safetensors", "*.safetensors.index.json", *AUX_PATTERNS],
                )
            )
    except LocalEntryNotFoundError:
        if unreachable:
            hint = "the hub is unreachable (no network?); download it where there is one, or fix the local path"
        else:
            hint = "unset HF_HUB_OFFLINE or download it first" if offline else "check your network or HF_HOME"
        raise ModelError(f"{first} (revision {revision or 'main'}) it is not in the HF cache; {hint}.") from None
    except RepositoryNotFoundError:
        raise ModelError(f"{first}: no such repository on the hub (or it is gated: log in first).") from None
    except HfHubHTTPError as exc:
        raise ModelError(f"{first}: hub request failed ({' '.join(str(exc).split())}).") from None
    return Source(spec=repo_id, path=path, hub_id=repo_id, revision=revision)


def is_plain_name(name) -> bool:
    """A file name with no folder part: what index.json, tpcli.json and DCP metadata may name."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def weight_files(source: Source) -> list[Path]:
    """The safetensors files of an ordinary checkpoint, in index order; refuses pickled checkpoints, names that leave
    the folder, links out of it, and anything that is not a regular file."""
    folder = source.path
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        check_inside(folder, index, "the safetensors index")
        doc = read_json(index, what="the safetensors index", fix="restore it or re-download the checkpoint")
        try:
            weight_map = doc["weight_map"]
            names = set(weight_map.values())
        except (KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r}).") from None
        bad = sorted(str(n) for n in names if not is_plain_name(n))
        if bad:
            raise CheckpointError(f"{index}: weight_map names {bad[0]!r}, which is not a file name inside {folder}; "
                                  "the index is corrupt or unsafe.")
        files = sorted(folder / name for name in names)
        missing = [f for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{missing[0]} is listed in {index.name} but missing; re-download the checkpoint.")
        return [check_inside(folder, f, "weights") for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return [check_inside(folder, f, "weights") for f in files]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise CheckpointError(
            f"{folder} holds only pickled weights (*.bin); convert them first: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) writes safetensors."
        )
    raise CheckpointError(f"{folder} has no *.safetensors weights.")


def aux_files(folder: Path) -> list[Path]:
    """Config, generation config and tokenizer files to copy next to written weights: regular files inside the
    folder (or its hub cache blobs) only, so a link cannot smuggle another file into an output."""
    out: list[Path] = []
    for pattern in AUX_PATTERNS:
        for p in sorted(folder.glob(pattern)):
            if p not in out and p.exists() and not p.is_dir():  # a FIFO or a link out is refused, not skipped
                out.append(check_inside(folder, p, "files copied into the output"))
    return out


def checkpoint_summary(source: Source) -> dict | None:
    """What the weights on disk hold (files, bytes, parameters per dtype), from safetensors headers only.

    Local folders: the headers of the files present (validated: a bad one raises CheckpointError). Hub ids: huggingface_hub's safetensors metadata API (a few
    KB per file, no weights), skipped when offline; None when nothing can be read.
    """
    from collections import Counter

    from tpcli.formats.rankfile import read_header

    files = sorted(source.path.glob("*.safetensors"))
    dtypes: Counter = Counter()
    if files:
        for f in files:  # a lying header or a FIFO is an error here too, not a silently missing summary
            header, _ = read_header(check_inside(source.path, f, "weights"))
            for entry in header.values():
                dtypes[entry["dtype"]] += math.prod(entry["shape"])
        return {"files": len(files), "bytes": sum(f.stat().st_size for f in files), "parameters_by_dtype": dict(dtypes)}
    if source.hub_id and os.environ.get("HF_HUB_OFFLINE", "0").lower() not in {"1", "true", "yes"}:
        try:
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(source.hub_id, revision=source.revision)
        except Exception:  # no safetensors on the hub, gated, network: the plan does not need it
            return None
        return {"files": len(meta.files_metadata), "bytes": None, "parameters_by_dtype": dict(meta.parameter_count)}
    return None
