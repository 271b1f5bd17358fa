"""The operator CLI's side of the HTTP API: calls with the token, tried on each coordinator.

`--url` (env `ROTA_URL`) may list several coordinators, comma-separated: a call goes to the
first that answers and leads (a standby answers 503 and is passed over). The token comes from
`--token`, env `ROTA_TOKEN`, or the token file `rota up` writes (`token_file()`).
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode


class ClientError(Exception):
    """A call that did not succeed: `status` 0 when no coordinator could be reached."""

    def __init__(self, message: str, status: int = 0, body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.body = body or {}


def token_file() -> Path:
    """Where `rota up` writes the token it generates, and where the CLI looks for one."""
    if os.environ.get("ROTA_TOKEN_FILE"):
        return Path(os.environ["ROTA_TOKEN_FILE"])
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "rota" / "token"


def saved_token() -> str | None:
    try:
        text = token_file().read_text(encoding="utf-8")
    except OSError:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.lstrip().startswith("#"):
            return parts[1]
    return None


@dataclass
class Api:
    urls: list[str]
    token: str | None = None
    timeout: float = 15.0

    @staticmethod
    def of(url_text: str, token: str | None) -> Api:
        urls = [u.strip().rstrip("/") for u in url_text.split(",") if u.strip()]
        return Api(urls, token)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             query: dict[str, Any] | None = None,
             retry_for: float = 0.0) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) from the first coordinator that answers and leads; raises
        ClientError for a 4xx/5xx from the leader, or when none could be reached.

        With `retry_for`, keeps trying the list for that many seconds while no coordinator
        leads or answers (a failover takes a few seconds); only for calls that are safe to
        repeat (a manual run carries its own request id, so a repeat is the same request).
        """
        if query:
            kept = {k: v for k, v in query.items() if v is not None}
            if kept:
                path += "?" + urlencode(kept)
        deadline = time.monotonic() + retry_for
        while True:
            try:
                return self._once(method, path, body)
            except ClientError as exc:
                if exc.status not in (0, 503, 504) or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def _once(self, method: str, path: str,
              body: dict[str, Any] | None) -> tuple[int, dict[str, Any]]:
        data = None if body is None else json.dumps(body).encode()
        last: ClientError | None = None
        for base in self.urls:
            req = urllib.request.Request(base + path, data=data, method=method)
            req.add_header("Accept", "application/json")
            if data is not None:
                req.add_header("Content-Type", "application/json")
            if self.token:
                req.add_header("Authorization", f"Bearer {self.token}")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return resp.status, _json(resp.read())
            except urllib.error.HTTPError as err:
                with err:
                    answer = _json(err.read())
                error = ClientError(str(answer.get("error") or err.reason), err.code, answer)
                if err.code in (503, 504):
                    last = error  # a standby, or a leader that just lost its term: next
                    continue
                raise error from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                last = ClientError(f"cannot reach the Rota API at {base} ({reason}); check "
                                   "--url / ROTA_URL")
        raise last or ClientError("no --url given")

    def service_path(self, name: str, suffix: str = "") -> str:
        return f"/api/v1/services/{quote(name, safe='')}{suffix}"


def _json(data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data or b"{}")
    except ValueError:
        return {"error": data[:200].decode("utf-8", "replace")}
    return parsed if isinstance(parsed, dict) else {"value": parsed}
