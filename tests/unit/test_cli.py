"""The `rota` command line, run as an operator runs it: in a subprocess.

Help reads well, `check` validates catalogues and names every problem, bad options of `up`
are refused with a clear message, and a short in-memory `up` runs and reports.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.catalogue import load_catalogue
from rota.cli import DEFAULT_CATALOGUE, build_parser

SUBCOMMANDS = ("up", "coordinator", "worker", "run", "set", "check", "services", "show",
               "history", "nodes", "changes", "rankings", "ranking", "enable", "disable")
_API = ["--url", "ROTA_URL", "--token", "ROTA_TOKEN", "--json"]
KEY_OPTIONS = {
    "up": ["--catalogue", "--nodes", "--speed", "--for", "--start", "--history", "--http-port",
           "--zk", "--amqp", "in memory"],
    "coordinator": ["--id", "--catalogue", "--http-port", "--session-timeout", "--zk", "--amqp",
                    "ROTA_ZK", "ROTA_AMQP_URL"],
    "worker": ["--node", "--roles", "--capacity", "--journal", "--http-port", "--zk", "--amqp"],
    "run": ["service", "--node", "--wait", "--by", "--amqp", "ROTA_AMQP_URL", *_API],
    "set": ["service", "--enable", "--disable", "--period", "--align", "--run-at", "--cron",
            "--amqp", "1..60", "HH:MM", *_API],
    "check": ["file"],
    "services": _API,
    "show": ["service", "--limit", *_API],
    "history": ["service", "--node", "--outcome", "--since", "--until", "--limit", *_API],
    "nodes": _API,
    "rankings": _API,
    "ranking": ["tenant", "id", *_API],
    "changes": ["service", "--limit", *_API],
    "enable": ["service", *_API],
    "disable": ["service", "--yes", *_API],
}


def rota(*args: str, timeout: float = 60, env: dict[str, str] | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("ROTA_ZK", "ROTA_AMQP_URL")}
    return subprocess.run(
        [sys.executable, "-m", "rota.cli", *args], capture_output=True, text=True,
        timeout=timeout, env={**base, **(env or {})}, cwd=cwd,
    )


# -- help ------------------------------------------------------------------------------------


def test_top_level_help_lists_every_command_with_examples() -> None:
    out = rota("--help")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert text.startswith("usage: rota ")
    for command in SUBCOMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", text, re.M), f"{command} not listed"
    assert "examples:" in text and "rota up --speed 60" in text and "rota check" in text
    assert "--verbose" in text


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_command_help_names_its_key_options(command: str) -> None:
    out = rota(command, "--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"usage: rota {command} ")
    for option in KEY_OPTIONS[command]:
        assert option in out.stdout, f"rota {command} --help does not mention {option}"
    assert not out.stderr


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_works_with_the_servers_in_the_environment(command: str) -> None:
    env = {"ROTA_ZK": "zk:2181", "ROTA_AMQP_URL": "amqp://guest:guest@mq:5672/"}
    out = rota(command, "--help", env=env)
    assert out.returncode == 0, out.stderr


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("rota has no subcommands")


def test_every_argument_of_every_command_is_explained() -> None:
    missing = []
    for name, sub in _subparsers().items():
        if not sub.description:
            missing.append(f"rota {name}: no description")
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help or action.help == argparse.SUPPRESS:
                flag = "/".join(action.option_strings) or action.dest
                missing.append(f"rota {name} {flag}: no help")
    assert not missing, "\n".join(missing)


_SERVERS = ["--zk", "127.0.0.1:1", "--amqp", "amqp://127.0.0.1:1/"]
VALID = {  # the least each command accepts, so that only the wrong option is wrong
    "up": [],
    "coordinator": _SERVERS,
    "worker": ["--node", "n", "--roles", "Master", *_SERVERS],
    "run": ["Summary", *_SERVERS[2:]],
    "set": ["Summary", "--disable", *_SERVERS[2:]],
    "check": ["catalogue.toml"],
    **{c: ["--url", "http://127.0.0.1:1"] for c in ("services", "nodes", "changes",
                                                     "history", "rankings")},
    "ranking": ["rota", "node-health", "--url", "http://127.0.0.1:1"],
    **{c: ["Summary", "--url", "http://127.0.0.1:1"] for c in ("show", "enable", "disable")},
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_a_wrong_option_shows_the_usage_of_its_command(command: str) -> None:
    out = rota(command, *VALID[command], "--no-such-option", timeout=30)
    assert out.returncode == 2
    assert out.stderr.startswith(f"usage: rota {command} "), out.stderr
    assert f"rota {command}: error: unrecognized arguments: --no-such-option" in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_command_and_missing_servers_are_usage_errors() -> None:
    out = rota()
    assert out.returncode == 2 and "required: COMMAND" in out.stderr
    for command in ("coordinator", "worker"):
        args = ["--node", "n", "--roles", "Master"] if command == "worker" else []
        out = rota(command, *args)
        assert out.returncode == 2
        assert "--zk" in out.stderr and "--amqp" in out.stderr, out.stderr
    for command in ("run", "set", "services", "show", "disable"):
        args = [] if command in ("services",) else ["Summary"]
        out = rota(command, *args, *(["--period", "5"] if command == "set" else []))
        assert out.returncode == 2, (command, out.stderr)
        assert "--url" in out.stderr and "ROTA_URL" in out.stderr, out.stderr
        if command in ("run", "set"):
            assert "--amqp" in out.stderr


# -- check -----------------------------------------------------------------------------------


def test_check_lists_the_shipped_catalogue() -> None:
    out = rota("check", str(DEFAULT_CATALOGUE))
    assert out.returncode == 0, out.stderr
    head, *lines = out.stdout.splitlines()
    assert "35 services" in head and "time zone UTC" in head
    assert "Master, Redundancy, Reporting, Processing, Calculation" in head
    assert len(lines) == 35
    for svc in load_catalogue(DEFAULT_CATALOGUE).services.values():
        line = next((x for x in lines if f" {svc.name} " in x), None)
        assert line is not None, f"{svc.name} not listed"
        assert line.split()[0] == svc.kind.value
    assert any("Cache Manager" in x and "6 min +3" in x for x in lines)
    assert any("Backup Manager" in x and "05:30" in x and "stats_processing" in x for x in lines)


BAD_CATALOGUE = """\
[system]
timezone = "UTC"
roles = ["Master", "Processing"]

[[service]]
name = "Too Slow"
kind = "periodic"
period = 90
allowed_roles = ["Master"]
utility = "workers.demo:noop"

[[service]]
name = "Nowhere"
kind = "periodic"
period = 5
align = 2
allowed_roles = ["Wizard"]
utility = "workers.demo:noop"

[[service]]
name = "Bad Cron"
kind = "cron"
cron = "61 * * * *"
allowed_roles = ["Master"]
utility = "workers.demo:noop"
"""


def test_check_names_file_service_and_field_of_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_CATALOGUE)
    out = rota("check", str(path))
    assert out.returncode != 0
    assert not out.stdout
    assert "Traceback" not in out.stderr
    err = out.stderr
    for service, field, says in (
        ("Too Slow", "period", "use fixed time"),
        ("Nowhere", "allowed_roles", "Wizard"),
        ("Bad Cron", "cron", "61 * * * *"),
    ):
        line = next((x for x in err.splitlines() if f'service "{service}"' in x), None)
        assert line is not None, f"no error for {service}:\n{err}"
        assert str(path) in line and f"{field}:" in line and says in line, line


def test_check_names_the_line_of_a_toml_syntax_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text('[system]\ntimezone = "UTC"\n[[service]\nname = "x"\n')
    out = rota("check", str(path))
    assert out.returncode != 0
    assert str(path) in out.stderr and "line 3" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_check_of_a_missing_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    out = rota("check", str(path))
    assert out.returncode != 0
    assert str(path) in out.stderr and "cannot read" in out.stderr
    assert "Traceback" not in out.stderr


# -- up --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "says"), [
    (["--nodes", "bad"], ["--nodes", "bad node spec 'bad'", "expected id=Role"]),
    (["--nodes", "a=Master;a=Processing"], ["--nodes", "duplicate node id"]),
    (["--nodes", ";"], ["--nodes", "no nodes given"]),
    (["--nodes", "a=Wizard"], ["node a", "unknown role(s) Wizard", "Master"]),
    (["--speed", "0"], ["--speed must be positive"]),
    (["--speed", "-2"], ["--speed must be positive"]),
    (["--speed", "fast"], ["--speed", "invalid float value: 'fast'"]),
    (["--for", "-1"], ["usage: rota up", "--for", "must be a positive number of seconds"]),
    (["--for", "0"], ["usage: rota up", "--for", "must be a positive number of seconds"]),
    (["--for", "soon"], ["usage: rota up", "--for", "'soon' is not a number of seconds"]),
    (["--start", "yesterday"], ["--start", "'yesterday' is not an ISO 8601 time"]),
    (["--zk", "127.0.0.1:2181"], ["give both --zk and --amqp"]),
    (["--catalogue", "/nonexistent/rota.toml"], ["/nonexistent/rota.toml", "cannot read"]),
])
def test_up_refuses_bad_options_clearly(args: list[str], says: list[str]) -> None:
    out = rota("up", *args, timeout=30)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    for text in says:
        assert text in out.stderr, f"{args}: {out.stderr!r} does not say {text!r}"
    assert "services on" not in out.stdout  # refused before starting anything


def test_up_runs_the_in_memory_cluster_and_prints_a_summary(tmp_path: Path) -> None:
    history = tmp_path / "runs.jsonl"
    out = rota("up", "--for", "3", "--speed", "60", "--history", str(history), timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == (
        "rota: 35 services on 3 nodes (in memory), speed x60, for 3s"), lines[0]
    status = [x for x in lines if " finished " in x and "daemons running" in x]
    assert status, out.stdout
    assert re.search(r"finished \d+ \((?:[a-z_]+ \d+(?:, )?)+\)", status[-1]), status[-1]
    last = lines[-1]
    match = re.fullmatch(r"rota: stopped; (\d+) runs finished, history in (.+)", last)
    assert match, last
    assert match[2] == str(history)
    finished = int(match[1])
    assert finished > 0
    assert len(history.read_text().splitlines()) == finished
    assert "Traceback" not in out.stderr


# -- operator commands against an unreachable broker -------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


def test_set_refuses_a_malformed_time_before_sending() -> None:
    url = f"amqp://guest:guest@127.0.0.1:{_closed_port()}/"
    out = rota("set", "Summary", "--run-at", "25:00", "--amqp", url)
    assert out.returncode != 0
    assert "run_at" in out.stderr and "'25:00'" in out.stderr and "HH:MM" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("args", [
    ["run", "Summary"],
    ["set", "Summary", "--period", "61"],
    ["set", "Summary", "--period", "5", "--align", "5"],
    ["set", "Summary", "--cron", "61 * * * *"],
])
def test_operator_commands_fail_with_one_clear_line(args: list[str]) -> None:
    port = _closed_port()
    out = rota(*args, "--amqp", f"amqp://guest:secret@127.0.0.1:{port}/", timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "secret" not in out.stderr
    if args[0] == "run":
        assert f"127.0.0.1:{port}" in out.stderr, out.stderr
    else:
        assert any(w in out.stderr for w in ("period", "align", "cron")), out.stderr


# -- the README, read as a newcomer reads it ---------------------------------------------------


README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_states_the_python_version_the_package_requires() -> None:
    text = README.read_text()
    pyproject = (README.parent / "pyproject.toml").read_text()
    required = re.search(r'requires-python = ">=(\d+\.\d+)"', pyproject)
    assert required, "pyproject.toml states no requires-python"
    assert f"Python {required[1]} or later" in text


def test_readme_says_how_long_the_tests_take_and_how_to_choose_their_ports() -> None:
    text = README.read_text()
    assert re.search(r"whole run takes about [\d–-]+ minutes on a 2-core machine", text)
    assert "ROTA_LOCAL_AMQP_PORT" in text and "ROTA_LOCAL_ZK_PORT" in text


@pytest.mark.parametrize("jargon", ["the seed", "seed's", "the brief", "where the brief"])
def test_readme_uses_no_words_only_its_authors_can_decode(jargon: str) -> None:
    assert jargon not in README.read_text()


def test_readme_explains_the_marks_of_the_live_table() -> None:
    text = README.read_text()
    assert "`▶ N`" in text and "legend" in text
    assert "--http-port" in text and "not shown" in text



@pytest.mark.parametrize("command", ["coordinator", "worker", "up"])
def test_zk_takes_every_ensemble_member_and_says_to_list_them(command: str) -> None:
    ensemble = "zk1:2181,zk2:2181,zk3:2181/rota-prod"
    parser = _subparsers()[command]
    required = {"coordinator": [], "worker": ["--node", "w1", "--roles", "Master"], "up": []}
    args = parser.parse_args(["--zk", ensemble, "--amqp", "amqp://guest:guest@mq:5672/",
                              *required[command]])
    assert args.zk == ensemble
    help_text = " ".join(parser.format_help().split())
    assert "every member of the ensemble" in help_text
