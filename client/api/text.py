"""The text of one generated sequence as it grows: where a stop string ends it, and what may be streamed so far."""

from dataclasses import dataclass, field

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding gives for a character whose bytes have not all come yet
# Each token decodes only a window of the latest tokens, the text before it kept: decoding the whole sequence at
# every token costs quadratic time. Every ANCHOR_EVERY tokens the anchor (where the kept text ends) tries to move up to
# ANCHOR_CONTEXT tokens short of the end. The window starts ANCHOR_CONTEXT tokens before the anchor (its first
# tokens' text, the seam, is cut off again), since a token decodes differently at the start of a sequence (a
# SentencePiece word loses its space); the anchor moves only where this gives exactly the whole text.
ANCHOR_EVERY = 64
ANCHOR_CONTEXT = 8


@dataclass
class GrowingText:
    """Token ids in, text out. `release()` holds back what could still turn out to begin a stop string, and a
    character whose bytes are still coming; once `stopped`, the text ends before the stop string (OpenAI's way)."""

    tokenizer: object
    stops: tuple[str, ...] = ()
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    stopped: bool = False
    released_length: int = 0  # characters of `text` that can no longer change
    _anchor_text: str = ""  # the text of the tokens before the anchor
    _seam: int = 0  # where the decoded window starts
    _seam_text: str = ""  # the window's text up to the anchor
    _next_anchoring: int = ANCHOR_EVERY  # token count at which the anchor tries to move next

    def add(self, token_id: int) -> None:
        if self.stopped:
            return
        self.token_ids.append(token_id)
        if len(self.token_ids) >= self._next_anchoring:
            self._move_anchor(len(self.token_ids) - ANCHOR_CONTEXT)
            self._next_anchoring = len(self.token_ids) + ANCHOR_EVERY
        window = self._decode(self.token_ids[self._seam :])
        if window.startswith(self._seam_text):
            self.text = self._anchor_text + window[len(self._seam_text) :]
        else:  # a tokenizer whose seam decodes differently once more tokens follow: the whole text, then
            self.text = self._decode(self.token_ids)
        ends = [self.text.find(stop) for stop in self.stops if stop in self.text]
        if ends:
            self.text, self.stopped = self.text[: min(ends)], True

    @property
    def released(self) -> str:
        return self.text[: self.released_length]

    def release(self, final: bool = False) -> None:
        """Moves `released` on to all the text that can no longer change; to all of it when `final`."""
        end = len(self.text)
        if not (final or self.stopped):
            end -= self._possible_stop_start()
            while end > self.released_length and self.text[end - 1] == INCOMPLETE_CHARACTER:
                end -= 1
        self.released_length = max(end, self.released_length)

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _move_anchor(self, anchor: int) -> None:
        """Anchors at `anchor` if the text splits cleanly there; else the anchor stays, to be tried again later."""
        seam = max(anchor - ANCHOR_CONTEXT, 0)
        head, seam_text = self._decode(self.token_ids[:anchor]), self._decode(self.token_ids[seam:anchor])
        window = self._decode(self.token_ids[seam:])
        clean = not head.endswith(INCOMPLETE_CHARACTER) and window.startswith(seam_text)
        if clean and head + window[len(seam_text) :] == self._decode(self.token_ids):
            self._anchor_text, self._seam, self._seam_text = head, seam, seam_text

    def _possible_stop_start(self) -> int:
        """How many of the last characters are the beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
