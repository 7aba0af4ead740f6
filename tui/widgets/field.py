"""A text field whose editing keys keep their place among the letters typed.

Textual's Input puts a printable key in at once, when the key reaches it, but runs its bound keys (backspace,
ctrl+u, the arrows, enter) only once the key has passed up through every ancestor to the app. Keys that arrive
together (typed fast over a slow SSH link, sent by a script, or read late on a loaded machine) were therefore applied
out of order: `a b backspace c` gave "ab", and `ctrl+u 3..10` an empty field (Textualize/textual#6605, open in
the Textual we use). Field runs its own bindings where the key reaches it, as the app would have run them: the
focused widget's bindings come first in the app's lookup, and the priority bindings (a form's enter) have already
been tried before the key is handed to the field.
"""

from __future__ import annotations

from textual import events
from textual.widgets import Input


class Field(Input):
    """An Input whose bound keys apply in the order typed."""

    async def _on_key(self, event: events.Key) -> None:
        if event.is_printable:
            return  # Input's own handler (next in the MRO) puts it in
        for binding in self._bindings.key_to_bindings.get(event.key, ()):
            if not binding.priority and await self.app.run_action(binding.action, self):
                event.stop()  # handled here: it goes no further up (Input's handler still restarts the cursor's blink)
                return
