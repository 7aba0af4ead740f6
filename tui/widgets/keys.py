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
        """Each key with its description, padded; where that is too wide for the terminal (80 columns), unpadded, and
        then the last keys without their descriptions, so that every key stays on the line (? lists them all)."""
        active = self.screen.active_bindings
        keys: dict[str, tuple[Any, Any, bool]] = {}
        for node, binding, enabled, _tooltip in active.values():
            if binding.show and binding.action not in keys:
                keys[binding.action] = (node, binding, enabled)
        shown = list(keys.values())
        text = self._line(shown, " ", len(shown))
        if text.cell_len > self.size.width:
            described = len(shown)
            text = self._line(shown, "", described)
            while text.cell_len > self.size.width and described:
                described -= 1
                text = self._line(shown, "", described)
        palette = active.get(self.app.COMMAND_PALETTE_BINDING) if self.app.ENABLE_COMMAND_PALETTE else None
        if palette is not None:
            key, description, _ = self._styles()
            hint = Text.assemble((f" {self.app.get_key_display(palette.binding)} ", key), (" palette ", description))
            room = self.size.width - len(text) - len(hint)
            if room > 0:
                text.append(" " * room)
                self._spans.append((len(text), len(text) + len(hint), palette.node, palette.binding.action))
                text.append_text(hint)
        return text

    def _styles(self) -> tuple[Any, Any, Any]:
        key, description, disabled = (self.get_component_rich_style(f"keys--{name}", partial=True)
                                      for name in ("key", "description", "disabled"))
        return key, description, disabled

    def _line(self, shown: list[tuple[Any, Any, bool]], pad: str, described: int) -> Text:
        """The keys, `pad` inside each key's and description's cell, the first `described` keys with descriptions."""
        key, description, disabled = self._styles()
        text = Text(no_wrap=True, overflow="ellipsis", end="")
        self._spans = []
        for index, (node, binding, enabled) in enumerate(shown):
            start = len(text)
            text.append(f"{pad or ' '}{self.app.get_key_display(binding)}{pad}", style=key if enabled else disabled)
            if index < described:
                text.append(f"{pad}{binding.description}{pad}" if pad else f" {binding.description}",
                            style=description if enabled else disabled)
            if enabled:
                self._spans.append((start, len(text), node, binding.action))
        return text

    async def on_click(self, event: events.Click) -> None:
        for start, end, node, action in self._spans:
            if start <= event.x < end:
                await self.app.run_action(action, node)
                return
