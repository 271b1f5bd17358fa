"""RankingS in the catalogue: [rankings], [[stat]], [[ranking]], [[threshold]], validated
like services, each error naming the file, the table and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from protocol.catalogue import CatalogueError, load_catalogue, parse_catalogue
from protocol.rankings import RUN_METRICS, RankingProfile, StatQueueProfile, ThresholdProfile

SERVICE = """
[[service]]
name = "A"
kind = "periodic"
period = 5
allowed_roles = ["Master"]
command = ["true"]
"""

GOOD = SERVICE + """
[rankings]
store_interval = 30
scheduled_ids = { acme = ["health"], rota = [] }

[[stat]]
tenant = "acme"
id = "n1"
nodes = ["n1"]
services = ["A"]
outcomes = ["succeeded", "failed"]
triggers = ["scheduled"]
ttl = 3600
queue_length = 100
min_items = 3
metrics = ["*asr", "*acd", "*sum#acc"]

[[stat]]
id = "all"

[[threshold]]
tenant = "acme"
id = "n1-last"
stat_id = "n1"
kind = "last"
ranking_ids = ["health"]
updates = 3
take_out_node = "n1"

[[threshold]]
tenant = "acme"
id = "asr-low"
stat_id = "n1"
kind = "below"
metric = "*asr"
value = 90

[[ranking]]
tenant = "acme"
id = "health"
schedule = "*/15 * * * * 30"
stat_ids = ["n1"]
metric_ids = ["*asr", "*acd"]
sorting = "*desc"
sorting_parameters = ["*asr", "*acd:false"]
stored = true
threshold_ids = ["n1-last"]

[[ranking]]
id = "everything"
schedule = "@every 1m30s"
stat_ids = ["all"]
sorting = "*asc"
sorting_parameters = ["*p95_duration"]
"""


def test_a_full_rankings_configuration_loads() -> None:
    cfg = parse_catalogue(GOOD, "cat.toml").rankings
    assert cfg.settings.store_interval == 30.0
    assert cfg.settings.scheduled_ids == {"acme": ("health",), "rota": ()}
    assert cfg.stats[("acme", "n1")] == StatQueueProfile(
        "acme", "n1", services=frozenset({"A"}), nodes=frozenset({"n1"}),
        outcomes=frozenset({"succeeded", "failed"}), triggers=frozenset({"scheduled"}),
        ttl=3600.0, queue_length=100, min_items=3, metric_ids=("*asr", "*acd", "*sum#acc"))
    assert cfg.stats[("rota", "all")] == StatQueueProfile("rota", "all")  # defaults
    assert cfg.stats[("rota", "all")].metric_ids == RUN_METRICS
    assert cfg.rankings[("acme", "health")] == RankingProfile(
        "acme", "health", "*/15 * * * * 30", ("n1",), ("*asr", "*acd"), "*desc",
        ("*asr", "*acd:false"), True, ("n1-last",))
    assert cfg.rankings[("rota", "everything")].stored is False
    assert cfg.thresholds[("acme", "n1-last")] == ThresholdProfile(
        "acme", "n1-last", "n1", "last", ("health",), updates=3, take_out_node="n1")
    assert cfg.thresholds[("acme", "asr-low")].value == 90.0


def test_a_catalogue_without_rankings_has_an_empty_configuration() -> None:
    cfg = parse_catalogue(SERVICE, "cat.toml").rankings
    assert (cfg.stats, cfg.rankings, cfg.thresholds) == ({}, {}, {})
    assert cfg.settings.store_interval == 0.0 and cfg.settings.scheduled_ids is None


def test_store_interval_minus_one_is_accepted() -> None:
    cfg = parse_catalogue(SERVICE + "[rankings]\nstore_interval = -1\n", "c.toml").rankings
    assert cfg.settings.store_interval == -1.0


RANKING = """
[[stat]]
id = "s"

[[ranking]]
id = "r"
schedule = "@hourly"
stat_ids = ["s"]
sorting = "*desc"
sorting_parameters = ["*asr"]
"""


def errors(text: str) -> list[str]:
    with pytest.raises(CatalogueError) as info:
        parse_catalogue(SERVICE + text, "cat.toml")
    return info.value.errors


@pytest.mark.parametrize("text, expected", [
    (RANKING.replace('"*desc"', '"*up"'),
     "cat.toml: ranking \"rota/r\": sorting: unknown sorting '*up': expected *asc | *desc"),
    (RANKING.replace('"@hourly"', '"0 */5 * * * *"'),
     'cat.toml: ranking "rota/r": schedule: cron \'0 */5 * * * *\' is ambiguous'),
    (RANKING.replace('"@hourly"', '"@every 5"'),
     "cat.toml: ranking \"rota/r\": schedule: bad duration ' 5'"),
    (RANKING.replace('["s"]', '["s", "t"]'),
     "cat.toml: ranking \"rota/r\": stat_ids: unknown stat 't': no [[stat]] of tenant 'rota'"),
    (RANKING.replace('["*asr"]', '["*asr", "*wat:false"]'),
     "cat.toml: ranking \"rota/r\": sorting_parameters: unknown metric '*wat'"),
    (RANKING.replace('["*asr"]', '[]'),
     'cat.toml: ranking "rota/r": sorting_parameters: must not be empty'),
    (RANKING + 'metric_ids = ["*acd"]\n',
     "cat.toml: ranking \"rota/r\": sorting_parameters: '*asr' is not among metric_ids"),
    (RANKING + 'threshold_ids = ["t"]\n',
     "cat.toml: ranking \"rota/r\": threshold_ids: unknown threshold 't'"),
    (RANKING + 'stored = "yes"\n',
     "cat.toml: ranking \"rota/r\": stored: expected true or false, got string 'yes'"),
    (RANKING + 'sortng = "*asc"\n',
     "cat.toml: ranking \"rota/r\": sortng: unknown key (did you mean 'sorting'?)"),
    (RANKING + '[[ranking]]\nid = "r"\nschedule = "@daily"\nstat_ids = ["s"]\n'
     'sorting = "*asc"\nsorting_parameters = ["*asr"]\n',
     "cat.toml: ranking \"rota/r\": id: duplicate: another ranking of tenant 'rota' has id 'r'"),
    ('[[ranking]]\nschedule = "@daily"\n', "cat.toml: ranking #1: id: missing"),
    ('[[ranking]]\nid = "r"\n', 'cat.toml: ranking "rota/r": schedule: missing'),
    ("[ranking]\nid = 'r'\n", "cat.toml: ranking: write each one as [[ranking]]"),
    ('[[stat]]\nid = "s"\nmetrics = ["*asr", "*sum"]\n',
     "cat.toml: stat \"rota/s\": metrics: unknown metric '*sum'"),
    ('[[stat]]\nid = "s"\nmetrics = ["*sum#a:b"]\n',
     "cat.toml: stat \"rota/s\": metrics: bad metric id '*sum#a:b': ':' is reserved"),
    ('[[stat]]\nid = "s"\nmetrics = []\n',
     'cat.toml: stat "rota/s": metrics: must not be empty'),
    ('[[stat]]\nid = "s"\nttl = 0\n', 'cat.toml: stat "rota/s": ttl: must be above 0, got 0'),
    ('[[stat]]\nid = "s"\nqueue_length = 0\n',
     'cat.toml: stat "rota/s": queue_length: must be 1 or more, got 0'),
    ('[[stat]]\nid = "s"\nmin_items = -1\n',
     'cat.toml: stat "rota/s": min_items: must be 0 or more, got -1'),
    ('[[stat]]\nid = "s"\noutcomes = ["succeded"]\n',
     "cat.toml: stat \"rota/s\": outcomes: unknown value 'succeded' (did you mean "
     "'succeeded'?)"),
    ('[[stat]]\nid = "s"\ntriggers = ["cron"]\n',
     "cat.toml: stat \"rota/s\": triggers: unknown value 'cron'"),
    ('[[stat]]\nid = "s"\n[[stat]]\nid = "s"\n',
     "cat.toml: stat \"rota/s\": id: duplicate"),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "s"\nkind = "above"\n',
     'cat.toml: threshold "rota/t": metric: missing'),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "s"\nkind = "first"\n',
     "cat.toml: threshold \"rota/t\": kind: unknown kind 'first'"),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "x"\nkind = "last"\n',
     "cat.toml: threshold \"rota/t\": stat_id: unknown stat 'x'"),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "s"\nkind = "last"\nranking_ids = ["q"]\n',
     "cat.toml: threshold \"rota/t\": ranking_ids: unknown ranking 'q'"),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "s"\nkind = "last"\nvalue = 3\n',
     'cat.toml: threshold "rota/t": value: only for kind above | below'),
    (RANKING + '[[threshold]]\nid = "t"\nstat_id = "s"\nkind = "last"\nupdates = 0\n',
     'cat.toml: threshold "rota/t": updates: must be 1 or more, got 0'),
    (RANKING + "[rankings]\nstore_interval = -5\n",
     "cat.toml: [rankings]: store_interval: expected 0 (never stored), -1"),
    (RANKING + "[rankings]\nstore_intervall = 5\n",
     "cat.toml: [rankings]: store_intervall: unknown key (did you mean 'store_interval'?)"),
    (RANKING + '[rankings]\nscheduled_ids = { rota = ["x"] }\n',
     "cat.toml: [rankings]: scheduled_ids: tenant 'rota': unknown ranking 'x'"),
    (RANKING + '[rankings]\nscheduled_ids = { acme = [] }\n',
     "cat.toml: [rankings]: scheduled_ids: tenant 'acme' has no [[ranking]]"),
    (RANKING + '[rankings]\nscheduled_ids = ["r"]\n',
     "cat.toml: [rankings]: scheduled_ids: expected a table of tenant = [ranking ids]"),
])
def test_each_problem_names_file_table_and_field(text: str, expected: str) -> None:
    found = errors(text)
    assert any(e.startswith(expected) for e in found), found


def test_a_faulty_stat_is_not_also_reported_unknown_by_its_ranking() -> None:
    found = errors(RANKING.replace('id = "s"', 'id = "s"\nttl = -1', 1))
    assert found == ['cat.toml: stat "rota/s": ttl: must be above 0, got -1']


def test_every_problem_is_reported_at_once() -> None:
    found = errors(RANKING.replace('"*desc"', '"*up"').replace('"@hourly"', '"@often"')
                   + '[[stat]]\nid = "z"\nttl = 0\n')
    assert len(found) == 3, found


def test_the_shipped_catalogue_loads_with_its_rankings_example() -> None:
    path = Path(__file__).parents[2] / "rota" / "catalogues" / "system-services.toml"
    cfg = load_catalogue(path).rankings
    assert cfg.rankings and cfg.stats
    for profile in cfg.rankings.values():
        assert all((profile.tenant, s) in cfg.stats for s in profile.stat_ids)


def test_the_example_in_docs_rankings_loads() -> None:
    doc = (Path(__file__).parents[2] / "docs" / "rankings.md").read_text()
    example = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    cfg = parse_catalogue(SERVICE + example, "rankings.md").rankings
    assert set(cfg.rankings) == {("rota", "node-health")}
    assert cfg.thresholds[("rota", "master-last")].take_out_node == "master-1"
