"""Build the agent image locally, without pulling anything from a registry.

    python -m orchestrator.runtime.docker.image build [--tag T] [--force]

Step A (slow, ~35 s, once per machine): ``debootstrap --variant=minbase
--include=python3 bookworm`` into a temporary folder, tar it and import it as
``orchestrator-agent-base:bookworm``. Skipped when that tag exists. Needs root,
``debootstrap`` and a reachable Debian mirror (``--mirror`` /
``ORCHESTRATOR_DEBIAN_MIRROR``).

Step B (a few seconds): ``docker build`` of ``Dockerfile.agent`` (``FROM`` the
local base image, ``pull=False``) with a copy of the agent's sources
(``AGENT_SOURCES``: the package root, contract/ and agent/).
The image is labelled with a hash of the Dockerfile and the copied files; when
the tag already carries that hash the build is skipped, so running the command
twice is cheap. ``--force`` rebuilds step B (and with ``--force-base`` step A).
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from loguru import logger

BASE_TAG = "orchestrator-agent-base:bookworm"
DEFAULT_TAG = "orchestrator-agent:latest"
CODE_LABEL = "orchestrator.code-hash"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

PACKAGE_DIR = Path(__file__).resolve().parents[2]  # .../orchestrator
DOCKERFILE = Path(__file__).resolve().parent / "Dockerfile.agent"

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = (".pyc", ".pyo")


class ImageBuildError(RuntimeError):
    """One line: which step failed and what to do."""


@dataclass(frozen=True)
class BuildResult:
    tag: str
    image_id: str
    code_hash: str
    built: bool  # False when an up-to-date image was already there
    base_built: bool


# What the agent needs inside the image: it is stdlib-only apart from these
# (see orchestrator/agent/__init__.py). Copying only these keeps the image's code
# hash stable while the host-side modules change; the build imports the agent to
# prove nothing is missing.
AGENT_SOURCES = (
    "orchestrator/__init__.py",
    "orchestrator/contract",
    "orchestrator/agent",
)


def package_files(package_dir: Path = PACKAGE_DIR) -> list[Path]:
    """The files copied into the image (AGENT_SOURCES, folders walked without byte
    code, hidden files or symlinks), relative to the package's parent, sorted."""
    out: list[Path] = []
    root = package_dir.parent
    for source in AGENT_SOURCES:
        top = root / package_dir.name / Path(source).relative_to("orchestrator")
        if top.is_file() and not top.is_symlink():
            out.append(top.relative_to(root))
            continue
        if not top.is_dir():
            raise ImageBuildError(f"{top} is missing: the agent image needs it")
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in _SKIP_DIRS and not d.startswith("."))
            for name in sorted(filenames):
                if name.endswith(_SKIP_SUFFIXES) or name.startswith("."):
                    continue
                path = Path(dirpath) / name
                if path.is_symlink() or not path.is_file():
                    continue
                out.append(path.relative_to(root))
    return sorted(set(out))


def code_hash(package_dir: Path = PACKAGE_DIR, dockerfile: Path = DOCKERFILE) -> str:
    """sha256 over the Dockerfile, the base tag and every copied file (path + bytes)."""
    h = hashlib.sha256()
    h.update(b"base\0" + BASE_TAG.encode() + b"\0")
    h.update(b"dockerfile\0" + dockerfile.read_bytes() + b"\0")
    root = package_dir.parent
    for rel in package_files(package_dir):
        data = (root / rel).read_bytes()
        h.update(rel.as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def _client(base_url: str = "") -> Any:
    import docker
    from docker.errors import DockerException

    try:
        if base_url:
            return docker.DockerClient(base_url=base_url, timeout=600)
        return docker.from_env(timeout=600)
    except DockerException as exc:
        where = base_url or os.environ.get("DOCKER_HOST") or "the local socket"
        raise ImageBuildError(
            f"Docker daemon unreachable at {where}: start it (e.g. .ci/setup-docker.sh) "
            f"or set DOCKER_HOST ({exc})"
        ) from None


def _image_labels(client: Any, tag: str) -> dict[str, str] | None:
    from docker.errors import ImageNotFound

    try:
        image = client.images.get(tag)
    except ImageNotFound:
        return None
    return dict(image.labels or {})


def _run_logged(cmd: Sequence[str], what: str, *, every: float = 5.0) -> None:
    """Run a command, logging a progress line at most every ``every`` s and the
    tail of its output on failure."""
    logger.info("{}: {}", what, " ".join(cmd))
    started = time.monotonic()
    tail: list[str] = []
    last = started
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace")
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = (tail + [line])[-20:]
        now = time.monotonic()
        if now - last >= every:
            logger.info("{} ({:.0f}s): {}", what, now - started, line[:160])
            last = now
    rc = proc.wait()
    if rc != 0:
        for line in tail:
            logger.error("  {}", line)
        raise ImageBuildError(f"{what} failed with exit code {rc} (output above)")
    logger.info("{}: done in {:.1f}s", what, time.monotonic() - started)


def build_base(client: Any, *, mirror: str | None = None, workdir: Path | None = None,
               force: bool = False) -> bool:
    """Step A. Returns True if the base image was (re)built, False if it existed."""
    if not force and _image_labels(client, BASE_TAG) is not None:
        logger.info("base image {} present; skipping debootstrap", BASE_TAG)
        return False
    if shutil.which("debootstrap") is None:
        raise ImageBuildError("debootstrap not found: apt-get install -y debootstrap "
                              "(or run .ci/setup-docker.sh)")
    if os.geteuid() != 0:
        raise ImageBuildError(f"building {BASE_TAG} needs root (debootstrap): "
                              "run this command with sudo once")
    mirror = mirror or os.environ.get("ORCHESTRATOR_DEBIAN_MIRROR") or DEFAULT_MIRROR
    with tempfile.TemporaryDirectory(prefix="orch-base-", dir=workdir) as tmp:
        rootfs = Path(tmp) / "rootfs"
        _run_logged(["debootstrap", "--variant=minbase", "--include=python3", SUITE,
                     str(rootfs), mirror], "debootstrap (about 35 s)")
        # Trim what an agent never needs; keeps the image small.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            target = rootfs / sub
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_file():
                        child.unlink()
        tarball = Path(tmp) / "rootfs.tar"
        _run_logged(["tar", "-C", str(rootfs), "--numeric-owner", "-cf", str(tarball), "."],
                    "tar rootfs")
        logger.info("importing {} ({:.0f} MB)", BASE_TAG, tarball.stat().st_size / 1e6)
        repo, _, tag = BASE_TAG.partition(":")
        client.api.import_image_from_file(str(tarball), repository=repo, tag=tag)
    if _image_labels(client, BASE_TAG) is None:
        raise ImageBuildError(f"docker import did not produce {BASE_TAG}")
    logger.info("base image {} ready", BASE_TAG)
    return True


def _make_context(ctx: Path, package_dir: Path, dockerfile: Path) -> None:
    shutil.copy2(dockerfile, ctx / "Dockerfile")
    root = package_dir.parent
    for rel in package_files(package_dir):
        dest = ctx / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, dest)
        dest.chmod(0o644)


def _stream_build(client: Any, ctx: Path, tag: str, labels: dict[str, str]) -> str:
    image_id = ""
    errors: list[str] = []
    for chunk in client.api.build(path=str(ctx), tag=tag, labels=labels, pull=False, rm=True,
                                  forcerm=True, decode=True):
        if "stream" in chunk:
            line = chunk["stream"].rstrip()
            if line.startswith("Step ") or line.startswith("Successfully"):
                logger.info("docker build: {}", line)
        if "error" in chunk:
            errors.append(str(chunk["error"]).strip())
        aux = chunk.get("aux") or {}
        if "ID" in aux:
            image_id = aux["ID"]
    if errors:
        raise ImageBuildError(f"docker build of {tag} failed: {errors[-1]}")
    return image_id


def _drop_previous(client: Any, tag: str, new_id: str) -> None:
    """Remove superseded agent builds (dangling images carrying our code label), so
    rebuilds do not pile up. Best effort: Docker refuses while a container still
    uses one."""
    from docker.errors import APIError

    for image in client.images.list(filters={"dangling": True, "label": CODE_LABEL}):
        if image.id == new_id:
            continue
        try:
            client.images.remove(image.id, noprune=False)
            logger.debug("removed previous {} image {}", tag, image.id[:19])
        except APIError:
            pass


def build_image(tag: str = DEFAULT_TAG, *, force: bool = False, force_base: bool = False,
                base_url: str = "", mirror: str | None = None, client: Any = None,
                package_dir: Path = PACKAGE_DIR, dockerfile: Path = DOCKERFILE) -> BuildResult:
    """Make sure ``tag`` is an agent image built from the current code.

    Idempotent: returns ``built=False`` without touching Docker's build cache
    when ``tag`` already carries the current code hash (unless ``force``).
    Raises ImageBuildError with a one-line message on failure.
    """
    from docker.errors import DockerException

    if not dockerfile.is_file():
        raise ImageBuildError(f"{dockerfile} is missing: build from a source checkout")
    client = client or _client(base_url)
    try:
        digest = code_hash(package_dir, dockerfile)
        base_built = build_base(client, mirror=mirror, force=force_base)
        labels = _image_labels(client, tag)
        if not force and not base_built and labels is not None and labels.get(CODE_LABEL) == digest:
            image_id = client.images.get(tag).id
            logger.info("{} is up to date (code {}); skipping build", tag, digest[:12])
            return BuildResult(tag, image_id, digest, built=False, base_built=False)
        logger.info("building {} (code {})", tag, digest[:12])
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="orch-agent-ctx-") as tmp:
            ctx = Path(tmp)
            _make_context(ctx, package_dir, dockerfile)
            image_id = _stream_build(client, ctx, tag, {CODE_LABEL: digest})
        if not image_id:
            image_id = client.images.get(tag).id
        _drop_previous(client, tag, image_id)
        logger.info("built {} ({}) in {:.1f}s", tag, image_id[:19], time.monotonic() - started)
        return BuildResult(tag, image_id, digest, built=True, base_built=base_built)
    except DockerException as exc:
        raise ImageBuildError(f"building {tag} failed: {str(exc).splitlines()[0]}") from None


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.runtime.docker.image",
                                     description="Build the agent image locally (no pulls).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the agent image (skipped when up to date)")
    b.add_argument("--tag", default=DEFAULT_TAG, help=f"image tag (default {DEFAULT_TAG})")
    b.add_argument("--force", action="store_true", help="rebuild even when up to date")
    b.add_argument("--force-base", action="store_true",
                   help=f"also re-run debootstrap for {BASE_TAG}")
    b.add_argument("--base-url", default="", help="Docker daemon URL (default: DOCKER_HOST)")
    b.add_argument("--mirror", default=None,
                   help=f"Debian mirror for debootstrap (default {DEFAULT_MIRROR})")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        result = build_image(args.tag, force=args.force, force_base=args.force_base,
                             base_url=args.base_url, mirror=args.mirror)
    except ImageBuildError as exc:
        logger.error("{}", exc)
        return 1
    state = "built" if result.built else "up to date"
    print(f"{result.tag} {state} {result.image_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
