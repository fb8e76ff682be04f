"""Stop strings and incremental detokenization (`serving/text.py`), with a character tokenizer."""

from __future__ import annotations

from loopcoder_jax.serving.text import TextStream


class _Chars:
    """id = a character's code point; 0 is the stop id; 1 decodes to a partial character."""

    def decode(self, ids):
        return "".join("\ufffd" if i == 1 else chr(i) for i in ids)


def _ids(s: str) -> list[int]:
    return [ord(c) for c in s]


def _run(pieces, stop=()):
    ts = TextStream(_Chars(), [0], stop)
    out = [ts.feed(_ids(p) if isinstance(p, str) else p) for p in pieces]
    return out, ts


def test_text_arrives_as_it_is_generated_and_stop_ids_are_dropped():
    out, ts = _run(["ab", "c", [0]])
    assert out == ["ab", "c", ""] and ts.flush() == "" and not ts.stopped


def test_stop_string_split_over_tokens_is_held_back_then_cut():
    out, ts = _run(["x = 1", "\n", "\nnext"], stop=["\n\n"])
    assert out == ["x = 1", "", ""]  # the lone "\n" could start the stop string
    assert ts.stopped and ts.text == "x = 1"


def test_held_back_text_is_released_when_it_cannot_be_a_stop_string():
    out, ts = _run(["a\n", "b"], stop=["\n\n"])
    assert out == ["a", "\nb"]
    assert not ts.stopped


def test_earliest_of_several_stop_strings_wins_and_nothing_follows():
    out, ts = _run(["hello END world STOP", "more"], stop=["STOP", "END"])
    assert out == ["hello ", ""] and ts.stopped


def test_partial_character_waits_for_the_rest():
    ts = TextStream(_Chars(), [0])
    assert ts.feed([ord("a"), 1]) == "a"
    assert ts.feed([ord("b")]) == "\ufffdb"  # the tokenizer never completed it: sent as is
