"""The one place the CLI's rich consoles are made.

On a terminal a console is rich's own: coloured, as wide as the window. When its stream is
not a terminal (output piped or redirected to a file, a CI log), rich would still lay tables
out for 80 columns (or $COLUMNS), cutting cells ("agreeme…") and wrapping values over two
lines ("201.3" / "KB"). There the console is plain instead: no colour, and wide enough that
every table and line comes out complete, one row per line; rules span their title, not
the (unbounded) width."""

from __future__ import annotations

from typing import IO, Optional

from rich.console import Console, ConsoleDimensions, RenderableType
from rich.rule import Rule

#: The width a console that does not write to a terminal lays its output out for: no table
#: of ours comes near it, so nothing is cut or wrapped (a table is only as wide as its cells).
PLAIN_WIDTH = 100_000

#: The width of a rule (``console.rule``) in plain output: that of an 80-column terminal, or
#: its title's when that is longer.
PLAIN_RULE_WIDTH = 80


class CliConsole(Console):
    """A rich Console that writes plain, complete output when its stream is not a terminal
    (checked at each print, so a console made at import follows a later redirection)."""

    def __init__(self, *args, **kwargs) -> None:
        self._explicit_width = kwargs.get("width") is not None
        super().__init__(*args, **kwargs)

    @property
    def plain(self) -> bool:
        """True when this console writes plain, complete output (its stream is not a terminal)."""
        return not self._explicit_width and not self.is_terminal

    @property
    def size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        return ConsoleDimensions(PLAIN_WIDTH, size.height) if self.plain else size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)
        self._explicit_width = True

    @property
    def width(self) -> int:
        return self.size.width

    @width.setter
    def width(self, width: int) -> None:
        self._width = width
        self._explicit_width = True

    def rule(self, title: RenderableType = "", *, characters: str = "─", style="rule.line",
             align="center") -> None:
        if not self.plain:
            super().rule(title, characters=characters, style=style, align=align)
            return
        from rich.text import Text

        title_width = Text.from_markup(title).cell_len if isinstance(title, str) else self.measure(title).maximum
        self.print(Rule(title, characters=characters, style=style, align=align),
                   width=max(PLAIN_RULE_WIDTH, title_width + 6))


def make_console(*, stderr: bool = False, file: Optional[IO[str]] = None) -> CliConsole:
    """A console for the CLI's output: rich on a terminal, plain and complete otherwise (see
    the module docstring). ``file`` None: the process's stdout (stderr with ``stderr``), looked
    up at each print."""
    return CliConsole(stderr=stderr, file=file)
