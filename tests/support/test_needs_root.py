"""``needs_root``: a root-only test is skipped for a normal user, FAILED under ``CI``."""

from __future__ import annotations

import pytest

from tests.support import helpers
from tests.support.helpers import needs_root, require_root


@pytest.mark.parametrize("ci, outcome", [
    ("true", pytest.fail.Exception), ("1", pytest.fail.Exception),
    ("", pytest.skip.Exception), ("false", pytest.skip.Exception),
])
def test_not_root(monkeypatch, ci: str, outcome: type) -> None:
    monkeypatch.setattr(helpers.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="chown: needs root"):
        require_root("chown")

    @needs_root("chown")
    def sync_test() -> str:
        return "ran"

    with pytest.raises(outcome):
        sync_test()


async def test_root_runs_the_test_sync_and_async(monkeypatch) -> None:
    monkeypatch.setattr(helpers.os, "geteuid", lambda: 0)
    monkeypatch.setenv("CI", "true")

    @needs_root("x")
    def sync_test(value: int) -> int:
        return value

    @needs_root("x")
    async def async_test(value: int) -> int:
        return value

    assert sync_test(1) == 1 and await async_test(2) == 2
