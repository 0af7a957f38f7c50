"""The text of one generated sequence as it grows: where a stop string ends it, and what may be streamed so far."""

from dataclasses import dataclass, field

INCOMPLETE_CHARACTER = "\ufffd"  # what decoding gives for a character whose bytes have not all come yet


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

    def add(self, token_id: int) -> None:
        if self.stopped:
            return
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
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

    def _possible_stop_start(self) -> int:
        """How many of the last characters are the beginning of some stop string."""
        longest = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
