"""The one writer of `shard` and `gather` outputs: `execute(plan, out)` turns a `BytePlan` into a published folder.

    check free space (every file's size from its header, the aux files, ~512 B per tensor of metadata)
    atomic_dir(out):                         a marked temporary folder beside OUT
        byte copy  (bytecopy.write_files)    every tensor has boxes: kernel copies / numpy strided copies
        or stream  (tensor_file.StreamWriter) the plan's stream reads, converts and yields tensors; each is cast
                                             to its planned dtype and appended to its file
        check_inputs()                       the inputs are still what was checked (hashes of a sharded input)
        aux files, config dtype, quantization_config, index.json, tpcli.json (with the files' sizes and sha256)
    publish by rename                        (any exception above: the temporary folder is removed, nothing is
                                             published, OUT is untouched)

A stream is any object with `run(write, advance)` (`write(file name, tensor name, tensor)` in each file's order;
`advance(nbytes)` for the progress bar) and `close()`; it is closed whatever happens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tpcli.formats import bytecopy, manifest
from tpcli.formats.byteplan import BytePlan
from tpcli.formats.jsonfile import read_json
from tpcli.formats.output import atomic_dir, check_free_space, copy_aux
from tpcli.formats.tensor_file import StreamWriter, file_size

INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Written:
    """What `execute` wrote: {file name: (bytes, sha256 or None)} in plan order, and the aux files copied."""

    files: dict[str, tuple[int, str | None]]
    copied: list[str]


def metadata_allowance(entries: int) -> int:
    """Bytes to reserve for what is written after the weights (tpcli.json or index.json, markers): ~200 B per
    chunk or key in practice; 512 B each plus 4 KB keeps the free-space check on the safe side."""
    return 4096 + 512 * entries


def execute(plan: BytePlan, out: Path, *, progress, force: bool = False, sha256: bool = False,
            check_inputs=lambda: None, stream=None) -> Written:
    """Write `plan` into a temporary folder and publish it as `out` (see the module docstring).

    `progress(total, label)` is a context manager whose value has `advance(nbytes)` (`tpcli.commands.Progress`);
    `sha256`: hash every output file as it is written (recorded in the manifest)."""
    from tpcli.formats.source import check_inside

    aux_folder = Path(plan.aux_folder)
    try:
        aux = [check_inside(aux_folder, aux_folder / name, "files copied into the output") for name in plan.aux]
        check_free_space(out, sum(file_size(f.entries, f.metadata) for f in plan.files) +
                         sum(p.stat().st_size for p in aux) + metadata_allowance(plan.tensor_count))
        with atomic_dir(out, command=plan.command, force=force) as tmp:
            if plan.copies:
                hashes = _copy(plan, tmp, progress, sha256)
            else:
                if stream is None:
                    raise AssertionError("a plan with streamed tensors needs its stream")
                hashes = _stream(plan, tmp, stream, progress, sha256)
            check_inputs()  # a corrupt or changed input: raise before anything is published
            copied = copy_aux(aux_folder, tmp, aux)
            if plan.config_dtype or plan.strip_quantization:
                edit_config(tmp / "config.json", dtype=plan.config_dtype, strip_quantization=plan.strip_quantization)
            files = {f.name: ((tmp / f.name).stat().st_size, h) for f, h in zip(plan.files, hashes, strict=True)}
            if plan.index is not None:
                (tmp / INDEX_FILE).write_text(json.dumps(plan.index, indent=2, sort_keys=True) + "\n")
            if plan.manifest is not None:
                _write_manifest(plan.manifest, tmp, files)
    finally:
        if stream is not None:
            stream.close()
    return Written(files, copied)


def _copy(plan: BytePlan, tmp: Path, progress, sha256: bool) -> list[str | None]:
    """Every file by `bytecopy.write_files`: each tensor's boxes turned into `bytecopy.Box`es at its offset."""
    from tpcli.formats.units import dtype_size

    source = Path(plan.source)
    outputs = []
    for f in plan.files:
        out_file, starts = bytecopy.lay_out(tmp / f.name, f.entries, f.metadata)
        for t in f.tensors:
            out_file.units.append([bytecopy.Box(source / b.file, b.start, starts[t.name], b.shape, b.offsets, b.sizes,
                                                dtype_size(t.dtype), box_in=b.box_in) for b in t.boxes])
        outputs.append(out_file)
    with progress(plan.total, plan.label) as bar:
        return bytecopy.write_files(outputs, sha256=sha256, advance=bar.advance)


def _stream(plan: BytePlan, tmp: Path, stream, progress, sha256: bool) -> list[str | None]:
    """Every file by a `StreamWriter`, fed by the plan's stream; each tensor cast to its planned dtype."""
    writers, dtypes = {}, {}
    try:
        for f in plan.files:
            writers[f.name] = StreamWriter(tmp / f.name, f.entries, f.metadata, sha256=sha256)
            dtypes[f.name] = {t.name: t.dtype for t in f.tensors}

        def write(file: str, name: str, tensor) -> None:
            writers[file].write(name, cast_tensor(tensor, dtypes[file][name]))

        with progress(plan.total, plan.label) as bar:
            stream.run(write, bar.advance)
        return [w.close() for w in writers.values()]
    except BaseException:
        for w in writers.values():
            w.abort()
        raise


def cast_tensor(t, dtype: str):
    """`t` in torch dtype `dtype` (itself when it already is)."""
    import torch

    target = getattr(torch, dtype)
    return t if t.dtype == target else t.to(target)


def edit_config(path: Path, *, dtype: str | None, strip_quantization: bool = False) -> None:
    """Record `dtype` as config.json's dtype (transformers 5's key; the older torch_dtype is dropped); with
    `strip_quantization`, drop `quantization_config`: a dequantized output is an ordinary checkpoint (as
    transformers' `postprocess_model` removes it from a model it dequantized)."""
    if path.is_file():
        cfg = read_json(path, what="the model's config")
        if dtype:
            cfg["dtype"] = dtype
            cfg.pop("torch_dtype", None)
        if strip_quantization:
            cfg.pop("quantization_config", None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _write_manifest(doc: dict, tmp: Path, files: dict[str, tuple[int, str | None]]) -> None:
    """tpcli.json: the planned manifest with each file's rank (its place in the plan), size and sha256, and
    config.json's sha256 in its `names` record (dropped when no config.json was copied)."""
    from tpcli.formats.manifest_gather import config_sha256

    doc = {**doc, "files": {name: {"rank": r, "bytes": size, "sha256": h}
                            for r, (name, (size, h)) in enumerate(files.items())}}  # "files" keeps its place
    if "names" in doc:
        sha = config_sha256(tmp)
        if sha:
            doc["names"] = {**doc["names"], "config_sha256": sha}
        else:
            del doc["names"]
    manifest.write(tmp, doc)
