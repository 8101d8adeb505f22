"""Output that fits a terminal's width without cutting anything: tables fold their cells, prose wraps between words.

A table whose natural width w_nat = sum(c_i) + e (c_i the widest cell of column i, header included; e the borders
and padding) exceeds the terminal's W is first drawn without its outer box (e shrinks to about one column per
column), then every column is capped at the largest c with sum(min(c_i, max(c, f_i))) + e <= W (f_i, `_floors`:
a numeric column keeps its widest number, every column its longest header word, a name column 4 characters; when
those do not fit, 4 and then 1 for all), and each cell wider than its cap is folded into lines: after a
space, `.`, `_`, `/`, `,` or `-` where one falls inside the line (so `model.layers.*.mlp.up_proj` breaks at its
joints), else after exactly cap characters. Every character of every cell is still printed, in order; nothing
ends in "…". Output that is not a terminal has no width limit (`render.UNLIMITED`), so nothing here changes it.

Prose lines printed as one string wrap in a terminal at spaces only, continuation lines indented two more
columns than the first; a single word longer than the line (a path, a hash) is left whole for the terminal.
"""

from __future__ import annotations

import io
import re

from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

BREAK_AFTER = " ./_,-"
FLOOR = 4  # no column is capped below this (or its natural width, if narrower)


def fold_points(plain: str, width: int) -> list[int]:
    """Offsets that cut one line `plain` into pieces of at most `width` characters, each cut just after the last
    BREAK_AFTER character that keeps the piece within `width`, or at `width` when there is none."""
    cuts, start = [], 0
    while len(plain) - start > width:
        window = plain[start:start + width]
        at = max((i for i, ch in enumerate(window) if ch in BREAK_AFTER), default=-1)
        start += at + 1 if at >= 0 else width
        cuts.append(start)
    return cuts


def fold_text(text: Text, width: int) -> Text:
    """`text` with every line longer than `width` folded (`fold_points`), styles kept."""
    pieces: list[Text] = []
    for line in text.split("\n", allow_blank=True):
        cuts = fold_points(line.plain, width)
        pieces.extend(line.divide(cuts) if cuts else [line])
    return Text("\n").join(pieces)


def _width(cell) -> int:
    plain = cell.plain if isinstance(cell, Text) else Text.from_markup(str(cell)).plain
    return max((cell_len(line) for line in plain.split("\n")), default=0)


def _as_text(cell) -> Text:
    return cell if isinstance(cell, Text) else Text.from_markup(str(cell))


def _drawn_width(table: Table) -> int:
    out = io.StringIO()
    Console(file=out, width=100_000, force_terminal=False, color_system=None).print(table)
    return max((cell_len(line) for line in out.getvalue().splitlines()), default=0)


def _floors(columns, natural: list[int]) -> list[int]:
    """Per column, the width below which it is not capped while the table can fit otherwise: a right-justified
    (numeric) column keeps its widest cell, any column its longest header word, a name column at least FLOOR."""
    out = []
    for c, n in zip(columns, natural, strict=True):
        word = max((cell_len(w) for w in _as_text(c.header).plain.split()), default=0)
        cells = max((_width(cell) for cell in c._cells), default=0) if c.justify == "right" else FLOOR
        out.append(min(n, max(word, cells)))
    return out


def fit_table(table: Table, width: int) -> Table:
    """Make `table` (a Rich table of str/Text cells) at most `width` columns wide; see the module docstring."""
    columns = table.columns
    natural = [max([_width(c.header), *(_width(cell) for cell in c._cells)]) for c in columns]
    for c in columns:
        c.min_width = None  # the natural width is measured from the cells themselves
    if _drawn_width(table) <= width:
        return table
    table.box, table.show_edge, table.padding = box.SIMPLE_HEAD, False, (0, 1, 0, 0)
    if table.title:
        table.title_justify = "left"
    extra = _drawn_width(table) - sum(natural)
    budget = width - extra
    for floors in (_floors(columns, natural), [min(n, FLOOR) for n in natural], [1] * len(natural)):
        cap = next((c for c in range(max(natural), 0, -1)
                    if sum(min(n, max(c, f)) for n, f in zip(natural, floors, strict=True)) <= budget), 0)
        if cap:
            break
    cap = max(cap, 1)
    for c, n, f in zip(columns, natural, floors, strict=True):
        limit = max(cap, f)
        if n <= limit:
            continue
        c.header = fold_text(_as_text(c.header), limit)
        c._cells = [fold_text(_as_text(cell), limit) for cell in c._cells]
        c.no_wrap, c.overflow, c.max_width = True, "fold", limit
    return table


def wrap_points(plain: str, width: int, hang: int) -> list[int]:
    """Offsets that wrap one prose line at spaces into lines of at most `width` (continuations `hang` narrower);
    a word longer than its line is never cut."""
    cuts, line_start, room = [], 0, width
    for m in re.finditer(r"\S+\s*", plain):
        word_end = m.start() + len(m.group().rstrip())
        if word_end - line_start > room and m.start() > line_start:
            cuts.append(m.start())
            line_start, room = m.start(), width - hang
    return cuts


class FittingConsole(Console):
    """A Console whose one-string prints wrap between words when it writes to a terminal of limited width."""

    def print(self, *objects, **kwargs):  # noqa: D102 - Console.print
        if (len(objects) == 1 and isinstance(objects[0], str) and "soft_wrap" not in kwargs and self.is_terminal
                and "\n" not in objects[0] and cell_len(objects[0]) > self.width):
            text = self.render_str(objects[0], markup=kwargs.get("markup"), highlight=kwargs.get("highlight"),
                                   emoji=kwargs.get("emoji"))
            indent = len(text.plain) - len(text.plain.lstrip(" "))
            hang = min(indent + 2, self.width // 2)
            cuts = wrap_points(text.plain, self.width, hang)
            if cuts:
                lines = text.divide(cuts)
                for i, line in enumerate(lines):
                    line.rstrip()
                    if i:
                        line.pad_left(hang)
                objects = (Text("\n").join(lines),)
        return super().print(*objects, **kwargs)
