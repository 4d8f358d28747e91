"""The one place the CLI's rich consoles are made.

On a terminal a console is rich's own: coloured, as wide as the window. When its stream is
not a terminal (output piped or redirected to a file, a CI log), rich would still lay tables
out for 80 columns (or $COLUMNS), cutting cells ("agreeme…") and wrapping values over two
lines ("201.3" / "KB"). There the console is plain instead: no colour, and wide enough that
every table and line comes out complete, one row per line; rules span their title, not
the (unbounded) width.

Progress of the long steps outside the federated rounds (the public teacher's training, the
simulation's baselines, the audit) goes through :func:`progress`: a live rich bar on a terminal,
a few plain lines when the stream is not one (no carriage returns, nothing redrawn)."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

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

    def rule(self, title: RenderableType = "", *, characters: str = "─", style="rule.line", align="center") -> None:
        if not self.plain:
            super().rule(title, characters=characters, style=style, align=align)
            return
        from rich.text import Text

        title_width = Text.from_markup(title).cell_len if isinstance(title, str) else self.measure(title).maximum
        self.print(
            Rule(title, characters=characters, style=style, align=align), width=max(PLAIN_RULE_WIDTH, title_width + 6)
        )


def make_console(*, stderr: bool = False, file: IO[str] | None = None) -> CliConsole:
    """A console for the CLI's output: rich on a terminal, plain and complete otherwise (see
    the module docstring). ``file`` None: the process's stdout (stderr with ``stderr``), looked
    up at each print."""
    return CliConsole(stderr=stderr, file=file)


# --------------------------------------------------------------------------- progress
#: Milestone lines a task prints in plain output (at a quarter, half, three quarters, the end),
#: after the line that says it started.
PLAIN_LINES = 4


def _elapsed(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _amount(x: float) -> str:
    return f"{int(x)}" if float(x).is_integer() else f"{x:.1f}"


def progress_console() -> Console:
    """The console progress goes to: the one the root logger's rich handler prints log lines
    with (so that log lines scroll above a live bar), else a console on stderr."""
    from rich.logging import RichHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            return handler.console
    return make_console(stderr=True)


class _Shared:
    """The one live rich Progress of the process: tasks started while another runs (nested, or
    from another thread) become rows of the same display instead of a second live display."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.progress = None
        self.users = 0

    def enter(self, console: Console):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with self.lock:
            if self.progress is None:
                self.progress = Progress(
                    TextColumn("{task.description}"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TextColumn("{task.fields[unit]}"),
                    TimeElapsedColumn(),
                    TextColumn("eta"),
                    TimeRemainingColumn(),
                    console=console,
                )
                self.progress.start()
            self.users += 1
            return self.progress

    def leave(self) -> None:
        with self.lock:
            self.users -= 1
            if self.users == 0 and self.progress is not None:
                self.progress.stop()
                self.progress = None


_SHARED = _Shared()


class ProgressTask:
    """One task's progress: a live bar on a terminal, a few plain lines anywhere else.

    Made by :func:`progress`; ``advance`` and ``update`` move it, ``phase`` names what it does
    now. Plain output (a pipe, a file, a CI log, a test's capture) gets a line when the task
    starts (unless ``lines`` is 0: a task told by its phases), one at each of ``lines`` evenly
    spaced milestones, one per ``phase``, one at the end and none in between: no carriage
    returns, no cursor movement, no colour."""

    def __init__(self, description: str, total: float, unit: str, console: Console, lines: int) -> None:
        self.description, self.total, self.unit, self.console, self.lines = (
            description,
            float(total),
            unit,
            console,
            lines,
        )
        self.completed, self.current_phase, self.done = 0.0, "", False
        self._milestone = 0
        self._start = time.monotonic()
        self._live = None
        self._task = None
        if console.is_terminal and not console.is_dumb_terminal:
            self._live = _SHARED.enter(console)
            self._task = self._live.add_task(description, total=max(self.total, 1e-9), unit=unit)

    # ---- plain output
    def _line(self) -> None:
        # whole units when the total is whole (epochs counted by batch: "37/150", not "37.7/150")
        done = math.floor(self.completed + 1e-9) if self.total.is_integer() else self.completed
        text = f"{self.description}: {_amount(done)}/{_amount(self.total)} {self.unit}"
        if self.current_phase:
            text += f", {self.current_phase}"
        if self.completed or self.done:
            text += f" ({_elapsed(time.monotonic() - self._start)})"
        self.console.print(text, markup=False, highlight=False, soft_wrap=True, emoji=False)

    def _plain_milestones(self) -> None:
        if self.lines <= 0 or self.total <= 0:
            return
        reached = min(self.lines, int(self.lines * self.completed / self.total + 1e-9))
        if reached > self._milestone:
            self._milestone = reached
            self._line()

    # ---- the task's interface
    def update(self, completed: float) -> None:
        """Set how much is done (in ``unit``), between 0 and ``total``."""
        self.completed = min(max(float(completed), 0.0), self.total)
        if self._live is not None:
            self._live.update(self._task, completed=self.completed)
        else:
            self._plain_milestones()

    def advance(self, amount: float = 1.0) -> None:
        self.update(self.completed + amount)

    def phase(self, name: str) -> None:
        """Say what the task does now (a plain line in plain output, the bar's label on a terminal)."""
        self.current_phase = name
        if self._live is not None:
            self._live.update(self._task, description=f"{self.description}: {name}" if name else self.description)
        else:
            self._line()

    def _start_line(self) -> None:
        if self._live is None and self.lines > 0:  # a task of phases (lines=0) starts with its first phase
            self._line()

    def _finish(self, completed: bool) -> None:
        if completed:
            self.current_phase = ""
            if self._live is not None:
                self._live.update(self._task, completed=self.total, description=self.description)
            self.completed = self.total
            self.done = True
            if self._live is None and (self.lines <= 0 or self._milestone < self.lines):
                self._line()
        if self._live is not None:
            _SHARED.leave()
            self._live = None


@contextmanager
def progress(
    description: str, total: float, *, unit: str = "steps", console: Console | None = None, lines: int = PLAIN_LINES
) -> Iterator[ProgressTask]:
    """Show the progress of a long step: ``with progress("public teacher", 150, unit="epochs") as p:``
    then ``p.advance()`` per epoch. On a terminal a live rich bar (elapsed time, estimate of the
    time left); elsewhere a few plain lines (see :class:`ProgressTask`). A task that ends without
    an exception is shown complete. ``console``: default :func:`progress_console` (stderr).

    For the server, the simulation's baselines and the audit only: never on the ClientApp's path
    (a device has no one watching, and its imports stay lean)."""
    task = ProgressTask(description, total, unit, console or progress_console(), lines)
    task._start_line()
    ok = False
    try:
        yield task
        ok = True
    finally:
        task._finish(ok)


@contextmanager
def training_progress(
    model: Any, description: str, *, epochs: int, rows: int, batch_size: int, console: Console | None = None
) -> Iterator[ProgressTask]:
    """:func:`progress` over the epochs of one call of ``feddistill.training``'s loops on ``model``.

    The training loops take no callback, so this counts the model's forward passes in training
    mode (one per batch of ``batch_size`` of the ``rows`` examples, ``ceil(rows / batch_size)``
    per epoch) with a forward pre-hook, removed on exit; evaluation (``model.eval()``) is not
    counted. Nothing about the training changes: no extra RNG draw, no extra step."""
    per_epoch = max(1, math.ceil(rows / max(1, batch_size)))
    batches = 0

    def count(module: Any, _inputs: Any) -> None:
        nonlocal batches
        if module.training:
            batches += 1
            task.update(batches / per_epoch)

    with progress(description, epochs, unit="epochs", console=console) as task:
        handle = model.register_forward_pre_hook(count)
        try:
            yield task
        finally:
            handle.remove()
