"""Operator tokens: read from a file and from the environment, refused when unusable, and
matched to the name the change log records."""

from __future__ import annotations

from pathlib import Path

import pytest

from rota import auth
from rota.auth import TokenError, Tokens

A = "a" * 20
B = "b" * 24


def test_a_file_and_the_environment_give_named_tokens(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text(f"# operators\n\nalice {A}\n")
    tokens = auth.load(str(f), {auth.ENV: f"bob={B}"})
    assert tokens.by_name == {"alice": A, "bob": B}
    assert tokens.who(f"Bearer {A}") == "alice"
    assert tokens.who(f"bearer  {B} ") == "bob"


@pytest.mark.parametrize("header", [None, "", A, f"Basic {A}", "Bearer ", f"Bearer {A}x",
                                    f"Bearer {A[:-1]}"])
def test_anything_but_a_configured_bearer_token_names_nobody(header: str | None) -> None:
    assert Tokens({"alice": A}).who(header) is None


def test_no_tokens_means_nobody_may_change_anything() -> None:
    tokens = auth.load(None, {})
    assert not tokens and tokens.who(f"Bearer {A}") is None


@pytest.mark.parametrize("text, says", [
    ("alice", ":1: expected `name token`"),
    (f"alice {A} extra", ":1: expected `name token`"),
    ("alice short", "shorter than 16 characters"),
    (f"alice {A}\nalice {B}", ":2: 'alice' is given twice"),
])
def test_a_bad_token_file_names_the_line(tmp_path: Path, text: str, says: str) -> None:
    f = tmp_path / "tokens"
    f.write_text(text)
    with pytest.raises(TokenError, match=says):
        auth.load(str(f), {})


@pytest.mark.parametrize("value, says", [
    ("alice", "item 1: expected name=token"),
    (f"alice={A},bob=", "item 2: a name and a token are both needed"),
])
def test_a_bad_environment_value_names_the_item(value: str, says: str) -> None:
    with pytest.raises(TokenError, match=says):
        auth.load(None, {auth.ENV: value})


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="cannot read"):
        auth.load(str(tmp_path / "absent"), {})


def test_a_generated_token_is_saved_for_the_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "rota" / "token"
    tokens = auth.generate(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert Tokens.parse_file(path) == tokens
    (token,) = tokens.by_name.values()
    assert len(token) >= 16 and tokens.who(f"Bearer {token}") == "operator"
