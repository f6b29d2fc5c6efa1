"""The progress bar and summary table every long command shows (rich)."""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

stderr = Console(stderr=True)


def progress_bar(label: str, disable: bool = False) -> Progress:
    """A bar with a count, a free-form ``info`` field (loss, reward, tokens/s) and elapsed time; shown
    by rank 0 alone under several processes."""
    disable = disable or int(os.environ.get("RANK", "0")) != 0
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=stderr,
        disable=disable,
    )


def print_table(title: str, rows: dict[str, object], console: Console | None = None) -> None:
    """Two columns, name and value; floats to four significant digits, text shown verbatim. Under
    several processes (``torchrun``, ``accelerate launch``) rank 0 alone prints."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    table = Table(title=title)
    table.add_column("")
    table.add_column("", justify="right")
    for key, value in rows.items():
        table.add_row(key, Text(f"{value:.4g}" if isinstance(value, float) else str(value)))
    (console or Console()).print(table)
