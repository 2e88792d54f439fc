"""Streaming text never splits a character and never shows what a stop string takes back."""
from __future__ import annotations

from shared.engine import TokenEvent
from shared.outputs import OutputProcessor
from shared.tiny import tiny_tokenizer

TOK = tiny_tokenizer()


def _run(text: str, stop: tuple[str, ...] = (), finish_last: bool = True) -> tuple[list[str], str, str | None]:
    ids = TOK(text, add_special_tokens=False).input_ids
    proc = OutputProcessor(TOK, (2,), stop)
    deltas = []
    for i, t in enumerate(ids):
        d = proc.process(TokenEvent(t, finish_reason="length" if finish_last and i == len(ids) - 1 else None))
        deltas.append(d.text)
        if d.finish_reason:
            break
    return deltas, proc.text, proc.finish_reason


def test_multibyte_characters_are_never_split() -> None:
    deltas, text, _ = _run("héllo 図書館")
    assert "".join(deltas) == text == "héllo 図書館"
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[1] == "" and deltas[2] == "é"  # 'é' is two byte tokens: nothing after the first


def test_stop_string_is_cut_and_never_streamed() -> None:
    deltas, text, finish = _run("abc STOP def", stop=("STOP",), finish_last=False)
    assert text == "abc " and finish == "stop"
    assert "".join(deltas) == "abc " and not any("S" in d for d in deltas)


def test_earliest_of_several_stop_strings_wins() -> None:
    _, text, _ = _run("one two three", stop=("three", "two"), finish_last=False)
    assert text == "one "


def test_held_back_prefix_is_released_when_it_is_not_a_stop() -> None:
    deltas, text, finish = _run("ab STAR", stop=("STOP",))
    assert text == "ab STAR" and "".join(deltas) == "ab STAR" and finish == "length"


def test_special_tokens_are_not_rendered() -> None:
    proc = OutputProcessor(TOK, (2,), ())
    assert proc.process(TokenEvent(1, finish_reason="stop")).text == ""  # <eos>
