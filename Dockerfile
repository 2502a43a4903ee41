# The orchestrator itself as a Docker host sidecar: it talks to the host's Docker
# daemon through the mounted socket and starts one agent container per session.
# See compose.yaml for how to run it. The agent image is a different image, built
# on the host once: `orchestrator image build` (or .ci/setup-docker.sh).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml ./
COPY orchestrator ./orchestrator
# pyproject names README.md as the long description; tolerate its absence.
RUN test -f README.md || echo "# orchestrator" > README.md \
 && pip install . \
 && rm -rf /src

# Access to the Docker socket is root-equivalent anyway; the agents themselves run
# unprivileged (see orchestrator/runtime/docker/runtime.py).
WORKDIR /
EXPOSE 8750
ENTRYPOINT ["orchestrator"]
CMD ["run", "--config", "/srv/orchestrator/data/config.toml"]
