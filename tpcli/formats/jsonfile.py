"""The one reader of JSON files tpcli did not write in this process (manifests, indexes, configs, markers).

Every such file may be hostile: it is read with its size bounded before anything is allocated, and a document
nested deeper than Python's parser can follow (`[[[[...]]]]`, RecursionError) or that is not valid UTF-8 / JSON is
one `CheckpointError` naming the file, never a traceback. Callers validate the structure they use afterwards.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from tpcli.errors import CheckpointError

MAX_BYTES = 256 * 2**20  # a 256 MiB manifest or index is far beyond any real one (a 1T-parameter index is ~10 MB)
MAX_DEPTH = 64  # real manifests, indexes and configs nest < 10 levels


def read_json(path: Path | str, *, what: str = "", fix: str = "", max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH):
    """The parsed content of `path`. `what` names the file's role in errors, `fix` says what to do.

    Raises CheckpointError for a file that cannot be read, is larger than `max_bytes`, is not UTF-8 JSON, or nests
    containers deeper than `max_depth` (checked on the text before parsing, so the parser never recurses deeply).
    """
    path = Path(path)
    label = f"{path}" + (f" ({what})" if what else "")
    tail = f"; {fix}" if fix else ""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise CheckpointError(f"{label}: {size:,} bytes, more than the {max_bytes:,} a JSON file of this "
                                      f"kind may have{tail}.")
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot be read ({exc.strerror or exc}){tail}.") from None
    if len(raw) > max_bytes:  # grew while read (a pipe or a file being written)
        raise CheckpointError(f"{label}: more than {max_bytes:,} bytes{tail}.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{label}: not UTF-8 text{tail}.") from None
    depth = nesting_depth(text)
    if depth > max_depth:
        raise CheckpointError(f"{label}: JSON nested {depth} levels deep (at most {max_depth}); not a file tpcli or "
                              f"transformers writes{tail}.")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{label}: not valid JSON ({exc}){tail}.") from None


_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]')


def nesting_depth(text: str) -> int:
    """The deepest nesting of `[`/`{` in JSON `text`, brackets inside strings ignored (escapes honoured).

    One regular-expression pass (strings are skipped whole by the C matcher): ~10 ms for a 10 MB index.
    """
    depth = deepest = 0
    for m in _TOKENS.finditer(text):
        c = m.group()
        if c == "[" or c == "{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif c == "]" or c == "}":
            depth -= 1
    return deepest
