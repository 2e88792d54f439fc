"""The n-gram proposer: the longest suffix n-gram in [min, max] wins; its latest earlier occurrence
decides what is proposed; no match proposes nothing."""
from __future__ import annotations

from step09_speculative.ngram import NgramProposer


def test_proposes_what_followed_the_suffix_earlier() -> None:
    assert NgramProposer(2, 4).propose([1, 2, 3, 4, 5, 9, 2, 3], 3) == [4, 5, 9]


def test_proposes_at_most_k_and_stops_at_the_sequence_end() -> None:
    p = NgramProposer(1, 3)
    assert p.propose([7, 8, 9, 7, 8], 1) == [9]
    assert p.propose([7, 8, 7, 8], 5) == [7, 8]  # what followed runs into the suffix itself


def test_the_longest_matching_ngram_wins_over_a_later_shorter_one() -> None:
    # "3" alone last occurred before 6; the 2-gram "2 3" occurred before 4: the longer match wins.
    assert NgramProposer(1, 2).propose([2, 3, 4, 0, 3, 6, 2, 3], 1) == [4]


def test_the_latest_occurrence_wins_among_equally_long_matches() -> None:
    assert NgramProposer(2, 2).propose([5, 6, 1, 5, 6, 2, 5, 6], 1) == [2]


def test_no_match_or_too_short_proposes_nothing() -> None:
    p = NgramProposer(2, 4)
    assert p.propose([1, 2, 3, 4, 5, 6], 4) == []
    assert p.propose([1, 1], 4) == []  # a 2-gram needs an earlier occurrence
    assert p.propose([1, 2, 1, 2], 0) == []
    assert NgramProposer(3, 4).propose([1, 2, 9, 1, 2], 2) == []  # "1 2" repeats, but min is 3
