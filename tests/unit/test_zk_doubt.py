"""The timing rules of a ZooKeeper session in doubt, and a term's doubt, without a server.

Against real servers (a reset or black-holed link through proxies) see
tests/integration/test_zk_doubt.py.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from kazoo.exceptions import (
    BadVersionError,
    ConnectionLoss,
    NodeExistsError,
    RolledBackError,
    RuntimeInconsistency,
)

from protocol.coordination import Fenced
from protocol.zk import (
    DELTAS,
    ZkTerm,
    _Op,
    _proves_itself,
    doubt_deadline,
    expiry_margin,
    suspend_grace,
)

# -- the timing rules --------------------------------------------------------------------------


def test_the_margin_is_what_kazoo_leaves_of_the_session_timeout() -> None:
    # kazoo suspends after at most 2/3 of the timeout without an answer to its ping
    assert expiry_margin(2.0) == pytest.approx(2.0 / 3)
    assert expiry_margin(9.0) == pytest.approx(3.0)


@pytest.mark.parametrize("timeout", [2.0, 4.0, 10.0, 30.0])
def test_deadline_and_grace_end_before_the_session_can_expire(timeout: float) -> None:
    margin = expiry_margin(timeout)
    assert 0 < suspend_grace(timeout) < doubt_deadline(timeout) < margin
    assert suspend_grace(timeout) == pytest.approx(margin / 2)  # the rest: time to stop runs
    assert doubt_deadline(timeout) == pytest.approx(margin * 3 / 4)


def test_the_numbers_for_the_default_two_second_session() -> None:
    assert doubt_deadline(2.0) == pytest.approx(0.5)
    assert suspend_grace(2.0) == pytest.approx(1 / 3)
    assert 0.3 <= suspend_grace(2.0) <= 0.4


# -- a term in doubt ---------------------------------------------------------------------------


def _term(epoch: int = 7) -> ZkTerm:
    return ZkTerm(SimpleNamespace(client=None), epoch, session=42)  # type: ignore[arg-type]


def test_a_term_in_doubt_is_not_lost_and_goes_on_once_confirmed() -> None:
    term = _term()
    doubt = term._suspend()
    assert term.in_doubt() and not term.lost()
    assert term._back(doubt)
    term._overdue(doubt, 0.5)  # the deadline passed after the connection came back
    assert not term.lost() and term.in_doubt(), "still waiting for the epoch check"
    term._confirm(doubt)
    assert not term.in_doubt() and not term.lost()
    term._await_sure()


def test_a_term_whose_doubt_outlasts_the_deadline_ends() -> None:
    term = _term()
    doubt = term._suspend()
    term._overdue(doubt, 0.5)
    assert term.lost() and not term.in_doubt()
    with pytest.raises(Fenced):
        term._await_sure()
    assert not term._back(doubt)


def test_only_the_latest_doubt_counts() -> None:
    term = _term()
    first = term._suspend()
    assert term._back(first)
    second = term._suspend()  # dropped again before the epoch check
    term._confirm(first)
    assert term.in_doubt(), "a confirmation of an older doubt must not end a newer one"
    term._overdue(first, 0.5)
    assert not term.lost(), "an older doubt's deadline must not end the term"
    term._overdue(second, 0.5)
    assert term.lost()


def test_a_commit_waits_while_in_doubt_and_fails_once_the_term_ended() -> None:
    term = _term()
    term._suspend()
    outcome: list[object] = []

    def commit() -> None:
        try:
            term.commit({"run/a": b"1"})
            outcome.append("committed")
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=commit, daemon=True)
    thread.start()
    time.sleep(0.3)
    assert thread.is_alive() and not outcome, "a commit must wait while the term is in doubt"
    term._end("the connection stayed suspended")
    thread.join(5)
    assert len(outcome) == 1 and isinstance(outcome[0], Fenced), outcome


# -- an interrupted commit ---------------------------------------------------------------------

DELTA = _Op("create", f"{DELTAS}/0000000007-0000000001-0000-0001", b"\x80")
BUCKET = _Op("set", "/rota/buckets/0003", b"\x80")


class _Sends:
    """Stands in for `ZkTerm._send`: the first call loses the connection, later ones answer."""

    def __init__(self, *answers: list[Any]) -> None:
        self.answers = list(answers)
        self.calls = 0

    def __call__(self, ops: list[_Op]) -> list[Any]:
        self.calls += 1
        if self.calls == 1 or not self.answers:
            raise ConnectionLoss()
        return self.answers.pop(0)


def _interrupted(term: ZkTerm, sends: _Sends, ops: list[_Op]) -> None:
    term._send = sends  # type: ignore[method-assign]
    term._transaction(ops)


def test_an_interrupted_commit_applied_before_the_drop_counts_once() -> None:
    term = _term()
    sends = _Sends([RolledBackError(), NodeExistsError(), RuntimeInconsistency()])
    _interrupted(term, sends, [DELTA, BUCKET])
    assert sends.calls == 2 and term.transactions == 1 and term.ops == 2
    assert not term.lost()


def test_an_interrupted_commit_not_applied_is_applied_by_its_retry() -> None:
    term = _term()
    sends = _Sends([None, None, None])
    _interrupted(term, sends, [DELTA, BUCKET])
    assert sends.calls == 2 and term.transactions == 1
    assert not term.lost()


def test_an_interrupted_commit_retried_after_the_epoch_moved_is_fenced() -> None:
    term = _term()
    sends = _Sends([BadVersionError(), RuntimeInconsistency(), RuntimeInconsistency()])
    with pytest.raises(Fenced, match="epoch moved"):
        _interrupted(term, sends, [DELTA, BUCKET])
    assert term.lost() and term.transactions == 0


def test_an_interrupted_commit_refused_otherwise_ends_the_term() -> None:
    term = _term()
    sends = _Sends([RolledBackError(), RolledBackError(), BadVersionError()])
    with pytest.raises(Fenced, match="could not be resolved"):
        _interrupted(term, sends, [DELTA, BUCKET])
    assert term.lost()


def test_an_interrupted_transaction_without_a_delta_of_its_own_ends_the_term() -> None:
    term = _term()
    log_only = [_Op("create", "/rota/log/run%2F1", b"x")]
    assert not _proves_itself(log_only) and _proves_itself([DELTA, BUCKET])
    sends = _Sends([None, None])
    with pytest.raises(Fenced, match="cannot be told"):
        _interrupted(term, sends, log_only)
    assert sends.calls == 1 and term.lost()


def test_an_interrupted_transaction_of_a_commit_in_parts_ends_the_term() -> None:
    term = _term()
    sends = _Sends([None, None])
    term._send = sends  # type: ignore[method-assign]
    with pytest.raises(Fenced):
        term._transaction([DELTA], journaled=True)
    assert sends.calls == 1 and term.lost()


def test_an_interrupted_commit_gives_up_after_repeated_losses() -> None:
    term = _term()
    sends = _Sends()  # every send loses the connection
    with pytest.raises(Fenced, match="attempts"):
        _interrupted(term, sends, [DELTA])
    assert term.lost()
