"""commands: one module per CLI command (inspect, verify, shard, gather, run) plus what several share.

A sharded or training-state folder is checked once, by `tpcli.runtime.folders.ShardedFolder.open` /
`StateFolder.open`, and the object is passed along: no command reads tpcli.json or tpcli-state.json itself.

Each command is a pipeline over the layers below (source -> plan -> layout -> write) and returns a JSON-ready dict;
none prints. Long ones take a `progress` callback, `progress(total_bytes, description)`, a context manager whose
value has `.advance(n_bytes)` (the CLI passes `tpcli.render.progress_bar`; the default draws nothing); some take a
`status(text)` callback saying what they are doing (`tpcli.render.status_line`; the default shows nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext


class _Silent:
    def advance(self, n: int) -> None:
        pass


def no_progress(total: int, description: str) -> AbstractContextManager:
    """The default `progress` callback: counts nothing, draws nothing."""
    return nullcontext(_Silent())


Progress = Callable[[int, str], AbstractContextManager]


def no_status(text: str) -> None:
    """The default `status` callback (what a command is doing, for a terminal spinner): shows nothing."""
