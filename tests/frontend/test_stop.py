"""The stop matcher: stops spanning pieces, never included, only a possible-prefix tail held back."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from infermesh.frontend.request.stop import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[str, list[str], bool]:
    m = StopMatcher(stops)
    out = [m.feed(p) for p in pieces]
    if not m.stopped:
        out.append(m.flush())
    return "".join(out), out, m.stopped


def test_stop_spanning_three_pieces_is_cut_and_not_included() -> None:
    text, _, stopped = run(["o wo"], ["Hel", "lo w", "orld"])
    assert stopped
    assert text == "Hell"


def test_text_that_cannot_start_a_stop_is_sent_at_once() -> None:
    m = StopMatcher(["xyz"])
    assert m.feed("abc") == "abc"
    assert m.feed("abx") == "ab"  # "x" may begin "xyz"
    assert m.feed("y!") == "xy!"  # it did not
    assert m.held == ""


def test_only_the_possible_prefix_tail_is_held() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("answer </e") == "answer "
    assert m.held == "</e"
    assert m.feed("nd> tail") == ""
    assert m.stopped and m.matched == "</end>"
    assert m.feed("more") == ""


def test_earliest_stop_wins_and_flush_releases_held_text() -> None:
    assert run(["cd", "b"], ["abcd"])[0] == "a"
    assert run(["stop"], ["no st", "o"]) == ("no sto", ["no ", "", "sto"], False)


def test_no_stops_passes_through() -> None:
    m = StopMatcher([])
    assert m.feed("anything") == "anything"
    assert m.flush() == ""


def test_stop_at_the_very_start() -> None:
    assert run(["\n"], ["\nrest"]) == ("", [""], True)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc d\n😀é", max_size=30),
       stops=st.lists(st.text(alphabet="abc d\n😀é", min_size=1, max_size=4), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 30), max_size=8))
def test_any_split_matches_searching_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    found = [i for i in (text.find(s) for s in stops) if i != -1]
    expected = text[:min(found)] if found else text
    out, _, stopped = run(stops, pieces)
    assert out == expected
    assert stopped == bool(found)
