"""Operator tokens: who may change anything through the HTTP API.

Tokens come from a file (`--tokens FILE`: one `name token` per line, `#` comments) or from
the environment (`ROTA_OPERATOR_TOKENS=name=token,name2=token2`). A request names itself with
`Authorization: Bearer <token>`; the token's name is who the change log says made an edit.
Tokens are compared in constant time, against every configured token.
"""

from __future__ import annotations

import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

ENV = "ROTA_OPERATOR_TOKENS"
MIN_TOKEN_CHARS = 16


class TokenError(ValueError):
    """A token file or variable that cannot be used; the message names the line."""


@dataclass(frozen=True)
class Tokens:
    by_name: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.by_name)

    def who(self, authorization: str | None) -> str | None:
        """The name of the token in an `Authorization: Bearer …` header, or None."""
        if not authorization:
            return None
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        offered = given.strip().encode()
        found = None
        for name, token in self.by_name.items():  # every one compared: no early exit
            if hmac.compare_digest(offered, token.encode()):
                found = name
        return found

    @staticmethod
    def parse_file(path: str | Path) -> Tokens:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise TokenError(f"{path}: cannot read: {exc.strerror or exc}") from None
        pairs: dict[str, str] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2:
                raise TokenError(f"{path}:{number}: expected `name token`")
            _add(pairs, parts[0], parts[1], f"{path}:{number}")
        return Tokens(pairs)

    @staticmethod
    def parse_env(text: str) -> Tokens:
        pairs: dict[str, str] = {}
        for number, item in enumerate(filter(None, (p.strip() for p in text.split(","))), 1):
            name, sep, token = item.partition("=")
            if not sep:
                raise TokenError(f"{ENV}: item {number}: expected name=token")
            _add(pairs, name.strip(), token.strip(), f"{ENV}: item {number}")
        return Tokens(pairs)


def _add(pairs: dict[str, str], name: str, token: str, where: str) -> None:
    if not name or not token:
        raise TokenError(f"{where}: a name and a token are both needed")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"{where}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} "
                         "characters")
    if name in pairs:
        raise TokenError(f"{where}: {name!r} is given twice")
    pairs[name] = token


def load(path: str | None, environ: dict[str, str] | None = None) -> Tokens:
    """The tokens of `--tokens FILE` and of `ROTA_OPERATOR_TOKENS`, together."""
    env = os.environ if environ is None else environ
    merged: dict[str, str] = {}
    if path:
        merged.update(Tokens.parse_file(path).by_name)
    if env.get(ENV):
        for name, token in Tokens.parse_env(env[ENV]).by_name.items():
            if name in merged:
                raise TokenError(f"{ENV}: {name!r} is also in {path}")
            merged[name] = token
    return Tokens(merged)


def generate(path: Path, name: str = "operator") -> Tokens:
    """A fresh token, written to `path` (owner-only) as a tokens file."""
    token = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(f"# operator token written by `rota up`; give it with --token or ROTA_TOKEN\n"
                 f"{name} {token}\n")
    return Tokens({name: token})
