"""Ranking: every CGRateS sorting rule, MetricIDs, the Ranking forms and what moved."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from coordinator.core.ranking import (
    Moved,
    Ranking,
    compute_ranking,
    ranking_update,
    sort_stat_ids,
)
from protocol.rankings import NA, RankingError, RankingProfile, parse_sorting_parameter

RNG = random.Random(7)


def order(metrics: dict[str, dict[str, float]], sorting: str, *params: str,
          seed: int = 7) -> list[str]:
    return sort_stat_ids(metrics, sorting, params, random.Random(seed))


def test_asc_puts_lower_values_first_desc_higher() -> None:
    m = {"a": {"*acd": 30.0}, "b": {"*acd": 10.0}, "c": {"*acd": 20.0}}
    assert order(m, "*asc", "*acd") == ["b", "c", "a"]
    assert order(m, "*desc", "*acd") == ["a", "c", "b"]


@pytest.mark.parametrize("sorting, expected", [("*asc", ["b", "a", "c"]),
                                               ("*desc", ["c", "a", "b"])])
def test_missing_metric_sorts_last_in_both_directions(sorting: str, expected: list[str]) -> None:
    # "x" has other metrics but not *asr: it comes after every stat that has *asr.
    m = {"x": {"*acd": 1.0}, "a": {"*asr": 50.0}, "b": {"*asr": 10.0}, "c": {"*asr": 90.0}}
    assert order(m, sorting, "*asr") == [*expected, "x"]


@pytest.mark.parametrize("sorting", ["*asc", "*desc"])
@pytest.mark.parametrize("suffix", [":false", ":true", ":maybe", ""])
def test_missing_metric_sorts_last_whatever_the_suffix(sorting: str, suffix: str) -> None:
    m = {"x": {"*acd": 1.0}, "a": {"*asr": 50.0}, "b": {"*asr": 10.0}}
    assert order(m, sorting, "*asr" + suffix)[-1] == "x"


def test_false_reverses_that_metric_on_desc() -> None:
    # The CGRateS documentation's example: ["*tcc:true", "*pdd:false"] with *desc — highest
    # tcc first, and among equal tcc the lowest pdd first.
    m = {"a": {"*tcc": 5.0, "*pdd": 3.0}, "b": {"*tcc": 5.0, "*pdd": 1.0},
         "c": {"*tcc": 9.0, "*pdd": 7.0}, "d": {"*tcc": 5.0, "*pdd": 2.0}}
    assert order(m, "*desc", "*tcc:true", "*pdd:false") == ["c", "b", "d", "a"]
    # Without :false *desc puts the highest pdd first among the ties.
    assert order(m, "*desc", "*tcc:true", "*pdd") == ["c", "a", "d", "b"]


def test_false_reverses_that_metric_on_asc() -> None:
    m = {"a": {"*asr": 50.0, "*acd": 3.0}, "b": {"*asr": 50.0, "*acd": 9.0},
         "c": {"*asr": 20.0, "*acd": 1.0}}
    assert order(m, "*asc", "*asr", "*acd:false") == ["c", "b", "a"]
    assert order(m, "*asc", "*asr:false", "*acd") == ["a", "b", "c"]


def test_any_suffix_other_than_false_keeps_normal_order() -> None:
    m = {"a": {"*asr": 1.0}, "b": {"*asr": 2.0}}
    for suffix in ("", ":true", ":True", ":FALSE", ":0", ":no"):
        assert order(m, "*asc", "*asr" + suffix) == ["a", "b"], suffix
    assert parse_sorting_parameter("*asr:false") == ("*asr", True)
    assert parse_sorting_parameter("*sum#acc:true") == ("*sum#acc", False)
    assert parse_sorting_parameter("*asr") == ("*asr", False)


def test_equal_values_go_to_the_next_parameter() -> None:
    m = {"a": {"*asr": 90.0, "*acd": 5.0, "*pdd": 1.0},
         "b": {"*asr": 90.0, "*acd": 5.0, "*pdd": 2.0},
         "c": {"*asr": 90.0, "*acd": 4.0, "*pdd": 9.0}}
    assert order(m, "*desc", "*asr", "*acd", "*pdd") == ["b", "a", "c"]
    assert order(m, "*asc", "*asr", "*acd", "*pdd") == ["c", "a", "b"]


def test_missing_on_a_later_parameter_sorts_after_within_the_tie() -> None:
    m = {"a": {"*asr": 90.0}, "b": {"*asr": 90.0, "*acd": 1.0}, "c": {"*asr": 10.0}}
    assert order(m, "*desc", "*asr", "*acd") == ["b", "a", "c"]
    assert order(m, "*asc", "*asr", "*acd") == ["c", "b", "a"]


@pytest.mark.parametrize("sorting, expected", [("*asc", ["na", "low", "high", "none"]),
                                               ("*desc", ["high", "low", "na", "none"])])
def test_na_is_a_value_not_a_missing_metric(sorting: str, expected: list[str]) -> None:
    m = {"high": {"*asr": 80.0}, "na": {"*asr": NA}, "low": {"*asr": 0.0},
         "none": {"*acd": 3.0}}
    assert order(m, sorting, "*asr") == expected


def test_stats_with_no_metrics_are_left_out() -> None:
    m = {"a": {"*asr": 1.0}, "empty": {}, "b": {"*asr": 2.0}}
    assert order(m, "*desc", "*asr") == ["b", "a"]


@pytest.mark.parametrize("sorting", ["*random", "asc", "", "*ASC"])
def test_unknown_sorting_is_a_clear_error(sorting: str) -> None:
    with pytest.raises(RankingError, match=r"unknown sorting .*expected one of \*asc \| \*desc"):
        order({"a": {"*asr": 1.0}}, sorting, "*asr")
    profile = RankingProfile("rota", "r", "@hourly", ("a",), sorting=sorting,
                             sorting_parameters=("*asr",))
    with pytest.raises(RankingError, match="unknown sorting"):
        compute_ranking(profile, {"a": {"*asr": 1.0}}, 0.0, RNG)


def test_full_ties_are_in_random_order_every_order_occurring_evenly() -> None:
    m = {"a": {"*asr": 50.0, "*acd": 2.0}, "b": {"*asr": 50.0, "*acd": 2.0},
         "c": {"*asr": 50.0, "*acd": 2.0}, "top": {"*asr": 99.0}}
    rng = random.Random(2024)
    seen: Counter[tuple[str, ...]] = Counter()
    runs = 6000
    for _ in range(runs):
        got = sort_stat_ids(m, "*desc", ["*asr", "*acd"], rng)
        assert got[0] == "top"  # only the tied ones move
        seen[tuple(got[1:])] += 1
    assert len(seen) == 6  # every permutation of a, b, c occurs
    for permutation, count in seen.items():
        # each near 1/6: 1000 expected, a 5-sigma band is about ±144
        assert 800 <= count <= 1200, (permutation, count)


def test_two_tied_stats_come_in_both_orders() -> None:
    m = {"a": {"*asr": 1.0}, "b": {"*asr": 1.0}}
    rng = random.Random(1)
    firsts = Counter(sort_stat_ids(m, "*asc", ["*asr"], rng)[0] for _ in range(1000))
    assert set(firsts) == {"a", "b"}
    assert 400 <= firsts["a"] <= 600


def test_same_seed_same_order() -> None:
    m = {f"s{i}": {"*asr": 1.0} for i in range(20)}
    assert order(m, "*asc", "*asr", seed=3) == order(m, "*asc", "*asr", seed=3)


def profile(**kw: object) -> RankingProfile:
    base: dict[str, object] = dict(tenant="rota", id="r", schedule="@every 1m",
                                   stat_ids=("a", "b", "c", "ghost"), sorting="*desc",
                                   sorting_parameters=("*asr",))
    base.update(kw)
    return RankingProfile(**base)  # type: ignore[arg-type]


def test_compute_ranking_limits_metrics_to_metric_ids() -> None:
    metrics = {"a": {"*asr": 50.0, "*acd": 3.0, "*runs": 4.0},
               "b": {"*asr": 80.0, "*runs": 2.0},
               "c": {"*runs": 1.0},  # nothing among MetricIDs: left out
               "ghost": None}
    r = compute_ranking(profile(metric_ids=("*asr", "*acd")), metrics, 100.0, RNG)
    assert r.metrics == {"a": {"*asr": 50.0, "*acd": 3.0}, "b": {"*asr": 80.0}}
    assert r.sorted_stat_ids == ("b", "a")
    assert (r.tenant, r.id, r.last_update, r.sorting, r.sorting_parameters) == (
        "rota", "r", 100.0, "*desc", ("*asr",))
    # Without MetricIDs every metric is kept, and "c" (no *asr) sorts last.
    r = compute_ranking(profile(), metrics, 100.0, RNG)
    assert r.sorted_stat_ids == ("b", "a", "c")
    assert r.metrics["c"] == {"*runs": 1.0}


def test_ranking_forms_use_cgrates_names() -> None:
    r = Ranking("rota", "r", 1_700_000_000.0, {"a": {"*asr": 50.0}}, "*desc",
                ("*asr:false",), ("a",))
    d = r.to_dict()
    assert d == {"Tenant": "rota", "ID": "r", "LastUpdate": "2023-11-14T22:13:20Z",
                 "Metrics": {"a": {"*asr": 50.0}}, "Sorting": "*desc",
                 "SortingParameters": ["*asr:false"], "SortedStatIDs": ["a"]}
    assert Ranking.from_dict(d) == r
    assert r.summary().to_dict() == {"Tenant": "rota", "ID": "r",
                                     "LastUpdate": "2023-11-14T22:13:20Z",
                                     "SortedStatIDs": ["a"]}
    p = profile(threshold_ids=("t",), stored=True)
    assert RankingProfile.from_dict(p.to_dict()) == p
    assert list(p.to_dict()) == ["Tenant", "ID", "Schedule", "StatIDs", "MetricIDs", "Sorting",
                                 "SortingParameters", "Stored", "ThresholdIDs"]


def test_ranking_update_says_what_moved() -> None:
    one = Ranking("rota", "r", 1.0, {"a": {"x": 1.0}, "b": {"x": 2.0}, "c": {"x": 3.0}},
                  "*desc", ("x",), ("c", "b", "a"))
    first = ranking_update(None, one)
    assert first is not None
    assert first.moved == (Moved("c", None, 0), Moved("b", None, 1), Moved("a", None, 2))
    same = Ranking("rota", "r", 2.0, one.metrics, "*desc", ("x",), ("c", "b", "a"))
    assert ranking_update(one, same) is None
    two = Ranking("rota", "r", 3.0, {"a": {"x": 9.0}, "c": {"x": 3.0}}, "*desc", ("x",),
                  ("a", "c"))
    update = ranking_update(same, two)
    assert update is not None
    assert update.sorted_stat_ids == ("a", "c") and update.last_update == 3.0
    assert set(update.moved) == {Moved("a", 2, 0), Moved("c", 0, 1), Moved("b", 1, None)}
    # Metrics changed, order did not: still an update, nothing moved.
    three = Ranking("rota", "r", 4.0, {"a": {"x": 8.0}, "c": {"x": 3.0}}, "*desc", ("x",),
                    ("a", "c"))
    update = ranking_update(two, three)
    assert update is not None and update.moved == ()
