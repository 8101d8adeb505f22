"""Streaming readers of run-time tensors, one small step at a time.

`CheckpointReader` reads an ordinary safetensors checkpoint (single file or index-sharded) and yields run-time
tensors through transformers' converters (`tpcli.planning.convert`). `ShardedReader` reassembles full tensors from a
DCP-style sharded folder (tpcli's or transformers'). Both expose the same two calls:

    reader.steps()          -> list of steps (opaque)
    reader.preview(step)    -> [(run-time name, shape, dtype)] without reading data (a meta-device dry run)
    reader.read(step)       -> {run-time name: full tensor}

so that a writer can lay out every output file before the first byte is read, and memory holds one step.
"""

from __future__ import annotations

from pathlib import Path

from tpcli.errors import CheckpointError
from tpcli.formats.dcp import ShardedTensor, scan
from tpcli.formats.rankfile import RankFile
from tpcli.formats.units import SAFETENSORS_DTYPES, tensor_bytes
from tpcli.planning.convert import Conversions


class _OpenFiles:
    """The safetensors files a reader has open, by path (`tpcli.formats.rankfile.RankFile`)."""

    def __init__(self):
        self._handles: dict[Path, RankFile] = {}

    def handle(self, path: Path) -> RankFile:
        """The open RankFile of `path` (opened once, header checked once)."""
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = RankFile(path)
        return h

    def close(self) -> None:
        for h in self._handles.values():
            h.close()
        self._handles.clear()


class CheckpointReader(_OpenFiles):
    def __init__(self, model, files: list[Path]):
        super().__init__()
        self.files = files
        self.key_file: dict[str, Path] = {}
        self.key_meta: dict[str, tuple[str, tuple[int, ...]]] = {}
        try:
            for f in files:
                header = self.handle(f).header  # kept open: `load` reads it without checking the header again
                for key, entry in header.items():
                    if entry["dtype"] not in SAFETENSORS_DTYPES:
                        raise CheckpointError(f"{f}: tensor {key} has dtype {entry['dtype']}, which tpcli does not "
                                              f"support ({', '.join(sorted(SAFETENSORS_DTYPES))}).")
                    self.key_file[key] = f
                    self.key_meta[key] = (SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"]))
        except BaseException:
            self.close()
            raise
        self.conversions = Conversions(model)
        self.groups, self.unexpected = self.conversions.groups(list(self.key_file))
        self.source_bytes = sum(f.stat().st_size for f in files)

    def steps(self):
        return self.groups

    def step_bytes(self, group) -> int:
        return sum(tensor_bytes(*self.key_meta[key]) for key in group.keys)

    def preview(self, group) -> list[tuple[str, tuple[int, ...], str]]:
        import torch

        def meta(key):
            dtype, shape = self.key_meta[key]
            return torch.empty(shape, dtype=getattr(torch, dtype), device="meta")

        out = self.conversions.realize(group, meta)
        return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in out.items()]

    def load(self, key: str):
        return self.handle(self.key_file[key]).get_tensor(key)

    def read(self, group) -> dict:
        return self.conversions.realize(group, self.load)


class ShardedReader(_OpenFiles):
    def __init__(self, folder: Path, tensors: dict[str, ShardedTensor] | None = None,
                 expected_files: list[str] | None = None):
        super().__init__()
        self.folder = folder
        self.tensors = tensors if tensors is not None else scan(folder, expected_files=expected_files)
        self.source_bytes = sum((folder / f).stat().st_size for f in {c.file for t in self.tensors.values() for c in t.chunks})
        self.unexpected: list[str] = []

    def steps(self):
        return list(self.tensors)

    def step_bytes(self, step: str | list[str]) -> int:
        return sum(self.tensors[n].nbytes for n in _names(step))

    def preview(self, name: str):
        t = self.tensors[name]
        return [(name, t.shape, t.dtype)]

    def read_full(self, name: str):
        import torch

        t = self.tensors[name]
        if len(t.chunks) == 1 and tuple(t.chunks[0].sizes) == t.shape:
            return self.handle(self.folder / t.chunks[0].file).get_tensor(name)
        full = torch.empty(t.shape, dtype=getattr(torch, t.dtype))
        for c in t.chunks:
            index = tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes, strict=True))
            region = full[index]
            if region.is_contiguous():  # a dim-0 chunk: read it in place, no extra copy
                self.handle(self.folder / c.file).read_into(name, region)
            else:
                region.copy_(self.handle(self.folder / c.file).get_tensor(name))
        return full

    def read(self, step: str | list[str]) -> dict:
        """A step is one run-time name, or a group of names read together."""
        return {n: self.read_full(n) for n in _names(step)}


def _names(step: str | list[str]) -> list[str]:
    return [step] if isinstance(step, str) else list(step)
