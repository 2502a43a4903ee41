"""A first start over many session folders with no registry rows (issue #29): one INFO
line with the count, not one per session; progress lines on a long start-up."""

from __future__ import annotations

import shutil
from pathlib import Path

from loguru import logger

from orchestrator.contract.layout import sessions_root
from orchestrator.engine import discovery
from orchestrator.host.sessions import create_folder
from tests.support.e2e import make_config, supervised

COUNT = 1000
GROUP = "grp"


def folders_without_rows(tmp_path: Path, n: int) -> None:
    """``create_folder`` for the first; copies of it for the rest (its fsyncs would
    take ~10 ms each), as bench/fixture.py does. No registry rows."""
    data = tmp_path / "data"
    first = create_folder(data, GROUP, "sess-00000")
    for i in range(1, n):
        shutil.copytree(first.root, sessions_root(data) / GROUP / f"sess-{i:05d}")


async def start_and_collect(tmp_path: Path) -> tuple[list[str], int]:
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(f"{m.record['level'].name} {m.record['message']}"),
                      level="DEBUG")
    try:
        async with supervised(make_config(tmp_path), ready_timeout=120) as sup:
            tracked = len(sup.tracked)
    finally:
        logger.remove(sink)
    return lines, tracked


async def test_a_first_start_over_1000_folders_says_it_once(tmp_path: Path) -> None:
    folders_without_rows(tmp_path, COUNT)
    lines, tracked = await start_and_collect(tmp_path)
    assert tracked == COUNT
    info = [x for x in lines if not x.startswith(("DEBUG ", "TRACE "))]
    assert len(info) < 20, "\n".join(info)
    assert f"INFO registered {COUNT} session folders found on disk (each at DEBUG)" in info
    debug = [x for x in lines if x.startswith("DEBUG registered session folder ")]
    assert len(debug) == COUNT


async def test_a_long_start_up_shows_progress(tmp_path: Path, monkeypatch) -> None:
    folders_without_rows(tmp_path, 50)
    monkeypatch.setattr(discovery, "PROGRESS_EVERY", 0.0)  # every folder is "long"
    lines, tracked = await start_and_collect(tmp_path)
    assert tracked == 50
    progress = [x for x in lines if x.startswith("INFO checking session folders found on disk:")]
    assert progress[0] == "INFO checking session folders found on disk: 1 of 50"
    assert progress[-1] == "INFO checking session folders found on disk: 49 of 50"
