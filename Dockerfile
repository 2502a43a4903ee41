# The orchestrator itself: the Docker host sidecar (compose.yaml) and the Kubernetes
# DaemonSet (deploy/kubernetes/). Build it with the project's command, not plain
# `docker build .` — the command prepares the build context:
#
#   python -m orchestrator.runtime.docker.server_image build            # FROM python:3.11-slim
#   python -m orchestrator.runtime.docker.server_image build --base orchestrator-agent-base:bookworm
#
# The context it makes holds this file, deps/ (the [project] dependencies, installed by
# the host's pip with --target for CPython 3.11 / manylinux, wheels only) and app/ (the
# orchestrator package's sources). Nothing is fetched while the image builds, so it works
# from a locally built base without pip or network (CI), and the image carries no pip and
# no build tools. The agent image is a different image: `orchestrator image build`.
ARG BASE=python:3.11-slim
FROM ${BASE}

ENV PYTHONPATH=/opt/orchestrator/app:/opt/orchestrator/deps \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    LANG=C.UTF-8

# Dependencies first, byte-compiled by the image's own interpreter (the root file system
# may be read-only at run time): they change less often than the code, so Docker reuses
# both layers when only the code changed.
COPY deps /opt/orchestrator/deps
RUN python3 -m compileall -q /opt/orchestrator/deps
COPY app /opt/orchestrator/app
# ... and prove the whole program imports.
RUN python3 -m compileall -q /opt/orchestrator/app \
 && python3 -c "import orchestrator.cli.commands, orchestrator.cli.compose"

# Non-root by default (uid 10001, no passwd entry needed). Deployments that hand each
# session its own uid ([runtime] uid_range) run it as root with few capabilities:
# compose.yaml and deploy/kubernetes/ say so and why.
USER 10001:10001
WORKDIR /tmp
EXPOSE 8750
ENTRYPOINT ["python3", "-m", "orchestrator"]
CMD ["run", "--config", "/srv/orchestrator/data/config.toml"]
