"""A scrollable stack of Rich renderables, rendered once per width into lines that the line API serves as they
scroll into view: a long neuron screen opens in the time Rich takes to render it, not Textual's per-widget
layout of every part."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.console import Group, RenderableType
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip


class LinesView(ScrollView, can_focus=True):
    """Renderables shown top to bottom; up/down/page keys scroll."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "scroll_up", "Up", show=False),
        Binding("down,j", "scroll_down", "Down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown,space", "page_down", "Page down", show=False),
        Binding("home", "scroll_home", "Top", show=False),
        Binding("end", "scroll_end", "Bottom", show=False),
    ]
    DEFAULT_CSS = "LinesView { height: 1fr; overflow-x: hidden; scrollbar-gutter: stable; }"
    """A stable gutter: the width, and so the lines rendered for it, do not change when a scrollbar appears."""

    def __init__(self, renderables: Sequence[RenderableType], *, id: str | None = None) -> None:  # noqa: A002
        super().__init__(id=id)
        self._renderables = list(renderables)
        self._lines: list[Strip] = []
        self._width = -1

    def update(self, renderables: Sequence[RenderableType]) -> None:
        """Show other renderables (kept at the same scroll position)."""
        self._renderables = list(renderables)
        self._width = -1
        self._render_all()
        self.refresh()

    def show_lines(self, renderables: Sequence[RenderableType], lines: list[Strip], width: int) -> None:
        """Show renderables already rendered into `lines` at `width` (by a worker, off the UI thread); they are
        rendered again here only if the width changes."""
        self._renderables, self._lines, self._width = list(renderables), lines, width
        self.virtual_size = Size(width, len(lines))
        self.refresh()

    def _render_all(self) -> None:
        width = self.scrollable_content_region.width
        if width <= 0 or width == self._width:
            return
        console = self.app.console
        options = console.options.update_width(width)
        self._lines = [Strip(line) for line in console.render_lines(Group(*self._renderables), options, pad=False)]
        self._width = width
        self.virtual_size = Size(width, len(self._lines))

    def on_resize(self) -> None:
        self._render_all()

    def render_line(self, y: int) -> Strip:
        self._render_all()
        index = int(self.scroll_offset.y) + y
        width = self.scrollable_content_region.width
        if 0 <= index < len(self._lines):
            return self._lines[index].adjust_cell_length(width, self.rich_style)
        return Strip.blank(width, self.rich_style)

    @property
    def text(self) -> str:
        """Every line as plain text (for tests and captures)."""
        self._render_all()
        return "\n".join(line.text.rstrip() for line in self._lines)
