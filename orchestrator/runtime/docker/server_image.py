"""Build the orchestrator's own image (``orchestrator:latest``) without pulling, the
same way for users and CI.

    python -m orchestrator.runtime.docker.server_image build [--base B] [--tag T] [--force]

Why the dependencies are installed on the host, not inside ``docker build``: the
image must build on machines that cannot pull (CI passes ``--base
orchestrator-agent-base:bookworm``, the locally debootstrapped Debian root that
has python3 but no pip, no ``ensurepip`` and no CA certificates), and this
Docker has only the legacy builder (no BuildKit: every stage of a multi-stage
file is built, so a "pip inside" stage cannot be skipped either). The host's pip
already reaches PyPI — or whatever index the machine is configured for — so it
installs the project's ``[project] dependencies`` into the build context with
``pip install --target``, for the image's interpreter and platform (CPython
3.11, manylinux up to glibc 2.36 = bookworm, the Docker daemon's architecture,
wheels only: no compiler in the image or on the host is needed). The Dockerfile
then only copies: no pip, no build tools, nothing fetched at build time. Users
get the public ``python:3.11-slim`` as the default base (their Docker pulls it).

Idempotent like the agent image: the image is labelled with a hash over the
Dockerfile, the base tag, the dependency list and every source file of the
package; when the tag already carries that hash the build is skipped. The
installed dependencies are cached on the host per dependency list and platform
(``deps_cache_root``), so a change of the sources alone does not run pip again;
``--force`` rebuilds with a fresh install.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from loguru import logger

from orchestrator.runtime.docker.image import (
    CODE_LABEL,
    ImageBuildError,
    _client,
    _image_labels,
)

DEFAULT_TAG = "orchestrator:latest"
DEFAULT_BASE = "python:3.11-slim"
LOCAL_BASE = "orchestrator-agent-base:bookworm"  # what CI passes (built by image.py)
BASE_LABEL = "orchestrator.base"

REPO = Path(__file__).resolve().parents[3]
PACKAGE_DIR = REPO / "orchestrator"
DOCKERFILE = REPO / "Dockerfile"
PYPROJECT = REPO / "pyproject.toml"

# The image's interpreter: python:3.11-slim and bookworm's python3 are both 3.11 on
# glibc 2.36. pip (23.x) takes --platform tags literally, so every manylinux tag up to
# that glibc is named (platform_tags).
PY_VERSION = "3.11"
GLIBC_MINOR = 36
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


@dataclass(frozen=True)
class ServerBuild:
    tag: str
    image_id: str
    code_hash: str
    built: bool  # False when the tag already carried the current hash
    seconds: float


def dependencies(pyproject: Path = PYPROJECT) -> list[str]:
    """``[project] dependencies`` of pyproject.toml: what the image installs (not the
    test or bench extras)."""
    try:
        data = tomllib.loads(pyproject.read_text())
        deps = data["project"]["dependencies"]
    except (OSError, tomllib.TOMLDecodeError, KeyError) as exc:
        raise ImageBuildError(f"cannot read [project] dependencies from {pyproject}: {exc}") \
            from None
    return [str(d) for d in deps]


def source_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """Every file of the package (no byte code, hidden files or symlinks), relative to
    the package's parent, sorted."""
    out: list[Path] = []
    root = package_dir.parent
    for dirpath, dirnames, filenames in os.walk(package_dir):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            if name.endswith(_SKIP_SUFFIXES) or name.startswith("."):
                continue
            if path.is_symlink() or not path.is_file():
                continue
            out.append(path.relative_to(root))
    return sorted(out)


def code_hash(base: str, deps: list[str], package_dir: Path = PACKAGE_DIR,
              dockerfile: Path = DOCKERFILE) -> str:
    """sha256 over the base tag, the Dockerfile, the dependency list and the sources."""
    h = hashlib.sha256()
    h.update(b"base\0" + base.encode() + b"\0")
    h.update(b"dockerfile\0" + dockerfile.read_bytes() + b"\0")
    h.update(b"deps\0" + "\n".join(deps).encode() + b"\0")
    root = package_dir.parent
    for rel in source_files(package_dir):
        data = (root / rel).read_bytes()
        h.update(rel.as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def platform_tags(arch: str, glibc_minor: int = GLIBC_MINOR) -> list[str]:
    """Every manylinux tag a glibc 2.<minor> system runs, newest first, with the legacy
    aliases (manylinux2014 = 2.17, manylinux2010 = 2.12, manylinux1 = 2.5)."""
    tags = [f"manylinux_2_{m}_{arch}" for m in range(glibc_minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    return tags + [f"{name}_{arch}" for m, name in legacy.items() if m <= glibc_minor]


def pip_target_command(target: Path, deps: list[str], arch: str,
                       python: str = sys.executable) -> list[str]:
    """``pip install --target`` for the image's interpreter and platform, wheels only."""
    return [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
            "--no-compile", "--target", str(target), "--only-binary=:all:",
            "--implementation", "cp", "--python-version", PY_VERSION,
            "--abi", "cp" + PY_VERSION.replace(".", ""), "--abi", "abi3", "--abi", "none",
            *[f"--platform={tag}" for tag in platform_tags(arch)], *deps]


def image_arch(client: Any) -> str:
    """The Docker daemon's architecture as a wheel platform suffix."""
    raw = str(client.info().get("Architecture", ""))
    arch = _ARCH.get(raw)
    if arch is None:
        raise ImageBuildError(f"Docker daemon architecture {raw!r} is not one this build "
                              f"knows ({', '.join(sorted(set(_ARCH.values())))})")
    return arch


def deps_cache_root() -> Path:
    """Where installed dependency sets are kept between builds ($XDG_CACHE_HOME or
    ~/.cache, then orchestrator/server-image-deps)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "orchestrator" / "server-image-deps"


def deps_key(deps: list[str], arch: str) -> str:
    """One installed set per dependency list, interpreter and platform."""
    raw = "\n".join([PY_VERSION, str(GLIBC_MINOR), arch, *deps])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def install_deps(target: Path, deps: list[str], arch: str, *, cache: Path | None,
                 refresh: bool = False) -> bool:
    """deps/ of the context: a copy of the cached set for this key, else pip's install
    (then cached, replacing older sets). A source-only change thus skips pip. Returns
    True when pip ran."""
    cached = cache / deps_key(deps, arch) if cache is not None else None
    if cached is not None and cached.is_dir() and not refresh:
        shutil.copytree(cached, target, symlinks=True)
        logger.info("dependencies from the cache {}", cached)
        return False
    started = time.monotonic()
    logger.info("installing {} dependencies for CPython {} on manylinux (glibc <= 2.{}) {}",
                len(deps), PY_VERSION, GLIBC_MINOR, arch)
    proc = subprocess.run(pip_target_command(target, deps, arch), capture_output=True,
                          text=True, errors="replace")
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stdout + proc.stderr).strip().splitlines()
                 if "is ignored: it is neither a file nor a directory" not in ln]
        for line in lines[-15:]:
            logger.error("  {}", line)
        raise ImageBuildError("pip could not install the image's dependencies (output above): "
                              "check the index is reachable (pip config list)")
    # pip's console scripts carry this host's interpreter in their shebang: useless inside.
    shutil.rmtree(target / "bin", ignore_errors=True)
    logger.info("dependencies ready in {:.1f}s", time.monotonic() - started)
    if cached is not None:
        _keep(target, cached)
    return True


def _keep(source: Path, cached: Path) -> None:
    """Store ``source`` as the one cached set (best effort: a cache that cannot be
    written costs the next build a pip run, nothing else)."""
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        for old in cached.parent.iterdir():
            shutil.rmtree(old, ignore_errors=True)
        partial = cached.parent / f".{cached.name}.{os.getpid()}"
        shutil.copytree(source, partial, symlinks=True)
        partial.rename(cached)
    except OSError as exc:
        logger.warning("cannot cache the dependencies in {} ({})", cached.parent, exc.strerror)


def make_context(ctx: Path, deps: list[str], arch: str, *, cache: Path | None = None,
                 refresh: bool = False, package_dir: Path = PACKAGE_DIR,
                 dockerfile: Path = DOCKERFILE) -> None:
    """The build context: Dockerfile, deps/ (site-packages made by the host's pip) and
    app/orchestrator (the package's sources)."""
    shutil.copy2(dockerfile, ctx / "Dockerfile")
    install_deps(ctx / "deps", deps, arch, cache=cache, refresh=refresh)
    root = package_dir.parent
    for rel in source_files(package_dir):
        dest = ctx / "app" / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)
        dest.chmod(0o644)


def _docker_build(client: Any, ctx: Path, tag: str, base: str, labels: dict[str, str]) -> str:
    """``docker build`` of the context with ``BASE`` as the build argument; the image id."""
    image_id = ""
    for chunk in client.api.build(path=str(ctx), tag=tag, labels=labels, pull=False, rm=True,
                                  forcerm=True, decode=True, buildargs={"BASE": base}):
        line = str(chunk.get("stream", "")).rstrip()
        if line.startswith(("Step ", "Successfully")):
            logger.info("docker build: {}", line)
        if "error" in chunk:
            raise ImageBuildError(f"docker build of {tag} failed: {str(chunk['error']).strip()}")
        image_id = (chunk.get("aux") or {}).get("ID", image_id)
    return image_id


def _drop_previous(client: Any, new_id: str) -> None:
    """Remove superseded orchestrator builds (dangling, carrying our base label)."""
    from docker.errors import APIError

    for image in client.images.list(filters={"dangling": True, "label": BASE_LABEL}):
        if image.id != new_id:
            try:
                client.images.remove(image.id, noprune=False)
            except APIError:
                pass  # still used by a container: Docker keeps it


def build_server_image(tag: str = DEFAULT_TAG, *, base: str = DEFAULT_BASE, force: bool = False,
                       base_url: str = "", client: Any = None) -> ServerBuild:
    """Make sure ``tag`` is the orchestrator image of the current code on ``base``.
    Raises ImageBuildError (one line) on failure."""
    from docker.errors import DockerException

    if not DOCKERFILE.is_file():
        raise ImageBuildError(f"{DOCKERFILE} is missing: build from a source checkout")
    started = time.monotonic()
    client = client or _client(base_url)
    try:
        deps = dependencies()
        digest = code_hash(base, deps)
        labels = _image_labels(client, tag)
        if not force and labels is not None and labels.get(CODE_LABEL) == digest:
            logger.info("{} is up to date (code {}); skipping build", tag, digest[:12])
            return ServerBuild(tag, client.images.get(tag).id, digest, False,
                               time.monotonic() - started)
        if base != DEFAULT_BASE and _image_labels(client, base) is None:
            raise ImageBuildError(f"base image {base} not found: build it first "
                                  f"(sudo python -m orchestrator.runtime.docker.image build "
                                  f"makes {LOCAL_BASE})")
        arch = image_arch(client)
        logger.info("building {} on {} (code {})", tag, base, digest[:12])
        with tempfile.TemporaryDirectory(prefix="orch-server-ctx-") as tmp:
            ctx = Path(tmp)
            make_context(ctx, deps, arch, cache=deps_cache_root(), refresh=force)
            image_id = _docker_build(client, ctx, tag, base,
                                     {CODE_LABEL: digest, BASE_LABEL: base})
        image_id = image_id or client.images.get(tag).id
        _drop_previous(client, image_id)
        seconds = time.monotonic() - started
        logger.info("built {} ({}) in {:.1f}s", tag, image_id[:19], seconds)
        return ServerBuild(tag, image_id, digest, True, seconds)
    except DockerException as exc:
        raise ImageBuildError(f"building {tag} failed: {str(exc).splitlines()[0]}") from None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.runtime.docker.server_image",
                                     description="Build the orchestrator's image (no pulls "
                                                 "with a local --base).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the image (skipped when up to date)")
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    b.add_argument("--base", default=DEFAULT_BASE,
                   help=f"base image with python3.11 (default {DEFAULT_BASE}; "
                        f"offline: {LOCAL_BASE})")
    b.add_argument("--force", action="store_true",
                   help="rebuild even when up to date, dependencies freshly from the index")
    b.add_argument("--base-url", default="", help="Docker daemon URL (default: DOCKER_HOST)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result = build_server_image(args.tag, base=args.base, force=args.force,
                                    base_url=args.base_url)
    except ImageBuildError as exc:
        logger.error("{}", exc)
        return 1
    state = "built" if result.built else "up to date"
    print(f"{result.tag} {state} {result.image_id} ({result.seconds:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
