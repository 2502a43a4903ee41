"""runtime.identity: which ids an agent runs as and who owns its group's folder, the
one rule the Docker and Kubernetes runtimes share (real registry, real chown as root)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.runtime.identity import SHARED_MODE, AgentIds, FolderRefused, group_folder
from tests.support.helpers import needs_root

RANGE = (200300, 200399)


def test_one_uid_for_every_agent_without_a_range(tmp_path: Path) -> None:
    ids = AgentIds(tmp_path, "1234:55", RANGE)  # not "auto": the range does not apply
    try:
        assert not ids.per_session
        assert ids.user_of("a") == ids.user_of("b") == ("1234:55", 1234, 55)
        assert ids.shared_gids("g", True) == ()
        assert ids.group_owner("g", 1234, 55) == (1234, 55, None)
    finally:
        ids.close()


@needs_root("per-session uids")
def test_a_uid_per_session_and_a_gid_per_group_folder(tmp_path: Path) -> None:
    ids = AgentIds(tmp_path, "auto", RANGE)
    try:
        assert ids.per_session
        a, b = ids.user_of("a"), ids.user_of("b")
        assert a != b and a == ids.user_of("a")  # stable
        (gid,) = ids.shared_gids("g", True)
        assert gid not in (a[1], b[1]) and RANGE[0] <= gid <= RANGE[1]
        assert ids.shared_gids("g", False) == ()  # no folder: no gid is used up
        assert ids.group_owner("g", a[1], a[2]) == (0, gid, SHARED_MODE)
        assert ids.shared_gids("other", True) != (gid,)
    finally:
        ids.close()


@pytest.mark.parametrize("section", ["docker", "kubernetes"])
def test_a_bad_group_folder_template_names_its_section(tmp_path: Path, section: str) -> None:
    with pytest.raises(FolderRefused, match=rf"\[{section}\] group_folder '{{home}}/x'"):
        group_folder("{home}/x", tmp_path, "g", section)
