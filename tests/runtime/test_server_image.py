"""The orchestrator image's build command, without Docker: what pip is asked for and
when the image counts as out of date (orchestrator/runtime/docker/server_image.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from orchestrator.runtime.docker import server_image as si


@pytest.mark.parametrize("arch, minor, first, last, count", [
    ("x86_64", 36, "manylinux_2_36_x86_64", "manylinux1_x86_64", 32 + 3),
    ("aarch64", 17, "manylinux_2_17_aarch64", "manylinux1_aarch64", 13 + 3),
    ("x86_64", 12, "manylinux_2_12_x86_64", "manylinux1_x86_64", 8 + 2),
])
def test_platform_tags_name_every_manylinux_up_to_the_glibc(
        arch: str, minor: int, first: str, last: str, count: int) -> None:
    tags = si.platform_tags(arch, minor)
    assert tags[0] == first and tags[-1] == last and len(tags) == len(set(tags)) == count
    assert ("manylinux2014_" + arch in tags) == (minor >= 17)


def test_pip_installs_wheels_only_for_the_images_interpreter(tmp_path: Path) -> None:
    cmd = si.pip_target_command(tmp_path / "deps", ["loguru>=0.7"], "x86_64", python="py")
    assert cmd[:4] == ["py", "-m", "pip", "install"]
    assert "--only-binary=:all:" in cmd and "--no-compile" in cmd
    assert cmd[cmd.index("--target") + 1] == str(tmp_path / "deps")
    assert cmd[cmd.index("--python-version") + 1] == "3.11"
    assert "--platform=manylinux_2_17_x86_64" in cmd and cmd[-1] == "loguru>=0.7"


def test_the_image_installs_the_projects_core_dependencies_only() -> None:
    deps = si.dependencies()
    assert any(d.startswith("uvicorn") for d in deps)
    assert not any(d.startswith(("pytest", "ruff", "psutil")) for d in deps)


@pytest.mark.parametrize("change", ["source", "new file", "dockerfile", "base", "deps"])
def test_the_code_hash_changes_with_everything_the_image_is_made_of(
        tmp_path: Path, change: str) -> None:
    pkg = tmp_path / "orchestrator"
    shutil.copytree(si.PACKAGE_DIR / "contract", pkg / "contract")
    (pkg / "__init__.py").write_text("")
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM x\n")
    before = si.code_hash("b", ["d"], pkg, dockerfile)
    assert si.code_hash("b", ["d"], pkg, dockerfile) == before  # stable
    base, deps = "b", ["d"]
    if change == "source":
        (pkg / "__init__.py").write_text("x = 1\n")
    elif change == "new file":
        (pkg / "contract" / "extra.py").write_text("")
    elif change == "dockerfile":
        dockerfile.write_text("FROM y\n")
    elif change == "base":
        base = "c"
    else:
        deps = ["d", "e"]
    assert si.code_hash(base, deps, pkg, dockerfile) != before


def test_byte_code_and_hidden_files_are_not_part_of_the_image(tmp_path: Path) -> None:
    pkg = tmp_path / "orchestrator"
    (pkg / "__pycache__").mkdir(parents=True)
    (pkg / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x")
    (pkg / ".hidden").write_text("x")
    (pkg / "a.py").write_text("")
    assert si.source_files(pkg) == [Path("orchestrator/a.py")]


def test_a_cached_dependency_set_is_copied_without_running_pip(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cached = cache / si.deps_key(["loguru"], "x86_64")
    (cached / "loguru").mkdir(parents=True)
    (cached / "loguru" / "__init__.py").write_text("# cached\n")
    ran = si.install_deps(tmp_path / "deps", ["loguru"], "x86_64", cache=cache)
    assert ran is False
    assert (tmp_path / "deps" / "loguru" / "__init__.py").read_text() == "# cached\n"


@pytest.mark.parametrize("other", [(["loguru", "x"], "x86_64"), (["loguru"], "aarch64")])
def test_the_cache_key_is_per_dependency_list_and_platform(other: tuple) -> None:
    assert si.deps_key(["loguru"], "x86_64") != si.deps_key(*other)
