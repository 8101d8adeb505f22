"""`tpcli-state.json`: what a training-state folder (`tpcli.save_state`) holds, and how to check it without torch.

A training-state folder:

    STATE/
      config.json, generation_config.json          the model's config (as save_pretrained writes it)
      shard-0000R-model-00001-of-00001.safetensors the parameters, one file per rank, in the layout
                                                   `save_pretrained(distributed_checkpoint=True)` writes (DCP HF)
      optimizer/.metadata, optimizer/__R_0.distcp  the optimizer state (torch DCP, flattened by parameter name)
      tpcli-state.json                             this manifest
      .tpcli-output                                the marker of a folder tpcli published

Format (version 1), all keys always present:

    format          "tpcli.training-state"
    format_version  1
    versions        {"tpcli", "transformers", "torch"}
    step            the training step the state was saved after (int >= 0)
    extra           whatever JSON the caller passed (scheduler state, data position, ...), or null
    mesh            {"tp", "fsdp", "dp_replicate", "ep"}: the mesh it was saved on (world = tp x fsdp x dp_replicate)
    model           {"model_type", "architectures", "tensors": count, "signature": sha256 of the sorted
                     "name shape dtype" lines of the model's state dict (global shapes)}
    optimizer       {"class", "tensors": count of optimizer tensors, "state_keys": sorted per-parameter keys}
    files           {relative path: {"bytes", "sha256"}} for every file above except this manifest and the marker
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.jsonfile import read_json

NAME = "tpcli-state.json"
FORMAT = "tpcli.training-state"
VERSION = 1
OPTIMIZER_DIR = "optimizer"
MESH_KEYS = ("tp", "fsdp", "dp_replicate", "ep")


def is_state_dir(folder: Path) -> bool:
    return (Path(folder) / NAME).is_file()


def signature(entries: list[tuple[str, tuple[int, ...], str]]) -> str:
    """sha256 of the sorted 'name shape dtype' lines: two models with the same signature have the same tensors."""
    lines = sorted(f"{name} {list(shape)} {dtype}" for name, shape, dtype in entries)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def mesh_text(mesh: dict) -> str:
    """{"tp": 2, "fsdp": 2, ...} -> 'tp=2 x fsdp=2' (sizes of 1 left out; plain TP is 'tp=T'; all 1: 'one process')."""
    if all(mesh[k] == 1 for k in MESH_KEYS):
        return "one process"
    return " x ".join(f"{k}={mesh[k]}" for k in MESH_KEYS if mesh[k] > 1 or k == "tp")


def write(folder: Path, doc: dict) -> None:
    (Path(folder) / NAME).write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")


def read(folder: Path) -> dict:
    """The validated manifest of `folder`; a CheckpointError naming the file and the bad field otherwise."""
    path = Path(folder) / NAME
    if not path.is_file() or path.is_symlink():
        raise CheckpointError(f"{path}: missing (or not a regular file): {folder} is not a training-state folder "
                              "written by tpcli.save_state.")
    doc = read_json(path, what="the training state's manifest", fix="the training state is damaged")
    _validate(path, doc)
    return doc


def _validate(path: Path, doc) -> None:
    def bad(field: str, want: str):
        raise CheckpointError(f"{path}: field {field!r} should be {want}; the manifest is damaged or not tpcli's.")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        bad("format", repr(FORMAT))
    if doc.get("format_version") != VERSION:
        raise CheckpointError(f"{path}: format_version {doc.get('format_version')!r}; this tpcli reads version "
                              f"{VERSION}: use the tpcli that wrote it.")
    if not count(doc.get("step")):
        bad("step", "a non-negative integer")
    mesh = doc.get("mesh")
    if not isinstance(mesh, dict) or sorted(mesh) != sorted(MESH_KEYS) or not all(
            count(mesh[k]) and mesh[k] >= 1 for k in MESH_KEYS):
        bad("mesh", "{tp, fsdp, dp_replicate, ep} positive integers")
    model = doc.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("model_type"), str) \
            or not isinstance(model.get("signature"), str) or not count(model.get("tensors")):
        bad("model", "{model_type, architectures, tensors, signature}")
    opt = doc.get("optimizer")
    if not isinstance(opt, dict) or not isinstance(opt.get("class"), str) or not count(opt.get("tensors")) \
            or not isinstance(opt.get("state_keys"), list):
        bad("optimizer", "{class, tensors, state_keys}")
    files = doc.get("files")
    if not isinstance(files, dict) or not files:
        bad("files", "a non-empty {path: {bytes, sha256}} map")
    for name, entry in files.items():
        parts = Path(name).parts
        if Path(name).is_absolute() or ".." in parts or not parts or len(parts) > 2 \
                or (len(parts) == 2 and parts[0] != OPTIMIZER_DIR):
            bad(f"files[{name!r}]", f"a file of the folder or of {OPTIMIZER_DIR}/")
        if not isinstance(entry, dict) or not count(entry.get("bytes")) or not isinstance(entry.get("sha256"), str):
            bad(f"files[{name!r}]", "{bytes, sha256}")


def listed_files(folder: Path, doc: dict) -> list[Path]:
    return [Path(folder) / name for name in sorted(doc["files"])]


def unlisted_files(folder: Path, doc: dict) -> list[str]:
    """Weight or optimizer files in `folder` the manifest does not list: torch's readers would read them too."""
    folder = Path(folder)
    found = [p.name for p in folder.glob("*.safetensors")]
    opt = folder / OPTIMIZER_DIR
    if opt.is_dir():
        found += [f"{OPTIMIZER_DIR}/{p.name}" for p in opt.iterdir()]
    return sorted(set(found) - set(doc["files"]))


def check_sizes(folder: Path, doc: dict) -> None:
    """Every listed file is present with its recorded size, and no unlisted weight/optimizer file lies beside them."""
    for path in listed_files(folder, doc):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink() or not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {NAME}); the training state is incomplete.")
        size = path.stat().st_size
        if size != doc["files"][name]["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, {NAME} says {doc['files'][name]['bytes']}: the file was "
                                  "truncated or replaced.")
    extra = unlisted_files(folder, doc)
    if extra:
        raise CheckpointError(f"{Path(folder) / extra[0]}: not listed in {NAME} (a file from another save?); torch "
                              "would read it with the state: move it out of the folder.")


def check_hashes(folder: Path, doc: dict, names: list[str], digests: list[str]) -> None:
    """`digests` (sha256 of `names`, computed by the caller, maybe spread over ranks) equal the manifest's."""
    for name, digest in zip(names, digests, strict=True):
        if digest != doc["files"][name]["sha256"]:
            raise CheckpointError(f"{Path(folder) / name}: sha256 differs from {NAME}: the file is corrupt or was "
                                  "changed after the save; nothing was loaded.")
