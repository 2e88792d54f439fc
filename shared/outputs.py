"""Turning token events into text: incremental detokenization and stop strings.

Two rules make streamed text correct:

* Never emit half a character. A byte-level or byte-fallback tokenizer can split one UTF-8
  character over several tokens; decoding such a prefix yields U+FFFD, so text is emitted only
  once the decoded tail no longer ends in it (vLLM's prefix/read offsets). A few prompt tokens
  seed the window so that a leading space decodes as the tokenizer means it.
* Never emit what a stop string will take back. The last ``len(longest stop) - 1`` characters are
  held back until the next token proves they do not begin a stop string; the stop string itself
  is not returned, as in OpenAI's API.
"""
from __future__ import annotations

import dataclasses

from shared.engine import TokenEvent

_CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer: object, prompt_ids: tuple[int, ...]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (maybe empty)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(_REPLACEMENT):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """At the end, emit what is left even if it is an incomplete character."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return after[len(before):]


@dataclasses.dataclass(slots=True)
class TextDelta:
    """What a client is told after one token event."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[tuple[tuple[int, float], ...] | None]
    finish_reason: str | None  # "stop" or "length"; set once, on the last delta


class OutputProcessor:
    """Per-choice state: detokenizer, stop strings, hold-back, totals."""

    def __init__(self, tokenizer: object, prompt_ids: tuple[int, ...], stop: tuple[str, ...]) -> None:
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self._text = ""  # everything decoded so far (stop string not yet cut)
        self._sent = 0  # characters already handed out
        self.num_tokens = 0
        self.finish_reason: str | None = None

    @property
    def text(self) -> str:
        return self._text[: self._sent]

    def process(self, event: TokenEvent) -> TextDelta:
        self.num_tokens += 1
        piece = self._detok.push(event.token_id)
        if event.finish_reason is not None:
            piece += self._detok.flush()
        start = max(0, len(self._text) - self._hold)
        self._text += piece
        finish = event.finish_reason
        cut = self._find_stop(start)
        if cut is not None:
            self._text, finish = self._text[:cut], "stop"
        end = len(self._text) if finish is not None else max(self._sent, len(self._text) - self._hold)
        delta, self._sent = self._text[self._sent:end], end
        self.finish_reason = finish
        return TextDelta(text=delta, token_ids=[event.token_id], logprobs=[event.logprob],
                         top_logprobs=[event.top_logprobs], finish_reason=finish)

    def _find_stop(self, start: int) -> int | None:
        hits = [i for s in self._stop if (i := self._text.find(s, start)) >= 0]
        return min(hits) if hits else None
