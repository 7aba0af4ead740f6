"""The line of keys at the bottom of each screen: one widget rendering one line of text, where Textual's Footer
composes a widget per key and restyles them all whenever a screen is shown (measured: most of the time an Enter or
an escape took to paint). A click on a key runs its action, as the Footer's do."""

from __future__ import annotations

from typing import Any, ClassVar

from rich.text import Text
from textual import events
from textual.screen import Screen
from textual.widget import Widget


class KeysLine(Widget):
    """The keys the focused widget and its screen and app offer now (those shown), greyed where unavailable, and the
    command palette's key on the right."""

    COMPONENT_CLASSES: ClassVar[set[str]] = {"keys--key", "keys--description", "keys--disabled"}
    DEFAULT_CSS = """
    KeysLine { dock: bottom; height: 1; background: $footer-background; }
    KeysLine > .keys--key { color: $footer-key-foreground; background: $footer-key-background; text-style: bold; }
    KeysLine > .keys--description { color: $footer-description-foreground; }
    KeysLine > .keys--disabled { color: $text-disabled; }
    """

    def __init__(self) -> None:
        super().__init__()
        self._spans: list[tuple[int, int, Any, str]] = []  # start, end, node, action of each key shown

    def on_mount(self) -> None:
        self.screen.bindings_updated_signal.subscribe(self, self._changed)

    def on_unmount(self) -> None:
        self.screen.bindings_updated_signal.unsubscribe(self)

    def _changed(self, screen: Screen[Any]) -> None:
        if screen is self.screen:
            self.refresh()

    def render(self) -> Text:
        key, description, disabled = (self.get_component_rich_style(f"keys--{name}", partial=True)
                                      for name in ("key", "description", "disabled"))
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        self._spans = []
        active = self.screen.active_bindings
        shown: set[str] = set()
        for node, binding, enabled, _tooltip in active.values():
            if not binding.show or binding.action in shown:
                continue
            shown.add(binding.action)
            start = len(text)
            text.append(f" {self.app.get_key_display(binding)} ", style=key if enabled else disabled)
            text.append(f" {binding.description} ", style=description if enabled else disabled)
            if enabled:
                self._spans.append((start, len(text), node, binding.action))
        palette = active.get(self.app.COMMAND_PALETTE_BINDING) if self.app.ENABLE_COMMAND_PALETTE else None
        if palette is not None:
            hint = Text.assemble((f" {self.app.get_key_display(palette.binding)} ", key), (" palette ", description))
            room = self.size.width - len(text) - len(hint)
            if room > 0:
                text.append(" " * room)
                self._spans.append((len(text), len(text) + len(hint), palette.node, palette.binding.action))
                text.append_text(hint)
        return text

    async def on_click(self, event: events.Click) -> None:
        for start, end, node, action in self._spans:
            if start <= event.x < end:
                await self.app.run_action(action, node)
                return
