"""The Docker side of the gateway: an internal network per orchestrator.

``docker network create --internal``: a bridge with no route out of the host (Docker
drops forwarded traffic to and from it), but the host's own addresses stay reachable
from it — the gateway listens on the bridge's gateway address. Created labelled with
this orchestrator's instance label when missing, never removed (agents of a previous
run may still be attached); a network of that name that is not ours, or not internal,
is refused with one line.
"""

from __future__ import annotations

import docker
from docker.errors import DockerException

LABEL_INSTANCE = "orchestrator.instance"  # as runtime.docker.spec (a sibling package)


class NetworkRefused(RuntimeError):
    pass


def ensure_network(base_url: str, name: str, instance: str) -> str:
    """The gateway address of the internal network ``name`` (created if missing)."""
    try:
        client = docker.DockerClient(base_url=base_url) if base_url else docker.from_env()
    except DockerException as exc:
        raise NetworkRefused(f"egress gateway: Docker unreachable ({exc}); it needs the "
                             f"internal network {name}") from None
    try:
        api = client.api
        found = [n for n in api.networks(names=[name]) if n.get("Name") == name]
        if not found:
            api.create_network(name, driver="bridge", internal=True, check_duplicate=True,
                               labels={LABEL_INSTANCE: instance})
        info = api.inspect_network(name)
        labels = info.get("Labels") or {}
        if labels.get(LABEL_INSTANCE) != instance or not info.get("Internal"):
            raise NetworkRefused(
                f"Docker network {name} exists but is not this orchestrator's internal "
                f"network (label {LABEL_INSTANCE}={instance}, internal): remove it or set "
                "[gateway] network to another name")
        for pool in (info.get("IPAM") or {}).get("Config") or []:
            if pool.get("Gateway"):
                return str(pool["Gateway"]).split("/")[0]
        raise NetworkRefused(f"Docker network {name} has no gateway address")
    except DockerException as exc:
        raise NetworkRefused(f"egress gateway: network {name}: {exc}") from None
    finally:
        client.close()
