"""The Docker side of the gateway: an internal network per orchestrator.

``docker network create --internal``: a bridge with no route out of the host (Docker
drops forwarded traffic to and from it), but the host's own addresses stay reachable
from it — the gateway listens on the bridge's gateway address. Created labelled with
this orchestrator's instance label when missing, never removed (agents of a previous
run may still be attached); a network of that name that is not ours, or not internal,
is refused with one line.

Docker leaves the host itself open to an internal network: any host service listening
on all addresses (an SSH daemon, a database, the orchestrator's own API on 0.0.0.0)
answers its containers. ``confine`` closes that: packets from the bridge to the host
reach the gateway's ports and nothing else (an iptables chain of ours, jumped to from
INPUT for that bridge only). It needs root and iptables; without them the start says
so in one line and goes on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass

import docker
from docker.errors import DockerException

LABEL_INSTANCE = "orchestrator.instance"  # as runtime.docker.spec (a sibling package)


class NetworkRefused(RuntimeError):
    pass


@dataclass(frozen=True)
class Bridge:
    address: str  # the host's address on it: where the gateway listens
    interface: str  # the host-side bridge device, e.g. br-0123456789ab


def ensure_network(base_url: str, name: str, instance: str) -> Bridge:
    """The internal network ``name`` (created if missing): its gateway address and
    bridge device."""
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
        device = ((info.get("Options") or {}).get("com.docker.network.bridge.name")
                  or f"br-{str(info.get('Id', ''))[:12]}")
        address = bridge_address((info.get("IPAM") or {}).get("Config") or [])
        if address is None:
            raise NetworkRefused(f"Docker network {name} has no gateway address")
        return Bridge(address, device)
    except DockerException as exc:
        raise NetworkRefused(f"egress gateway: network {name}: {exc}") from None
    finally:
        client.close()


def bridge_address(pools: list[dict]) -> str | None:
    """The host's address on a bridge network, from its IPAM pools: the ``Gateway``
    given, else the first address of the ``Subnet`` (what Docker gives a bridge with
    none set; Debian's dockerd 20.10 was seen leaving ``Gateway`` out of the default
    bridge's config on a fresh machine)."""
    for pool in pools:
        if pool.get("Gateway"):
            return str(pool["Gateway"]).split("/")[0]
    for pool in pools:
        try:
            return str(next(ipaddress.ip_network(str(pool.get("Subnet")), strict=False).hosts()))
        except (ValueError, StopIteration):
            continue
    return None


def chain_name(instance: str, interface: str) -> str:
    """Our iptables chain for one bridge (iptables allows 28 characters)."""
    return "ORCH-EG-" + hashlib.sha256(f"{instance}/{interface}".encode()).hexdigest()[:12]


def confine_rules(chain: str, ports: list[int]) -> list[list[str]]:
    """The iptables commands (after ``-w``) that let the bridge reach the host only at
    the gateway's ports (whatever address it listens on: ``[gateway] host`` may name
    another): the chain emptied, then one accept per port, then reject."""
    rules = [["-F", chain]]
    rules += [["-A", chain, "-p", "tcp", "--dport", str(port), "-j", "ACCEPT"]
              for port in sorted(set(ports))]
    rules.append(["-A", chain, "-j", "REJECT"])
    return rules


def confine(bridge: Bridge, ports: list[int], instance: str) -> str | None:
    """Packets from ``bridge`` to this host reach ``ports`` on its address, nothing
    else. None when done, else the one line saying why not (not root, no iptables)."""
    iptables = shutil.which("iptables")
    if os.geteuid() != 0 or iptables is None:
        why = "not running as root" if os.geteuid() != 0 else "no iptables command"
        return (f"egress gateway: host services listening on all addresses are reachable "
                f"from the agents on {bridge.interface} ({why}): run the orchestrator as "
                "root with iptables, or bind host services to loopback")
    chain = chain_name(instance, bridge.interface)

    def ipt(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([iptables, "-w", *args], capture_output=True, text=True,
                              timeout=30, check=False)
    ipt("-N", chain)  # exists already after a restart: fine, it is emptied below
    for rule in confine_rules(chain, ports):
        done = ipt(*rule)
        if done.returncode != 0:
            return (f"egress gateway: iptables {' '.join(rule)} failed "
                    f"({done.stderr.strip()[:200]}): host services are reachable from the "
                    f"agents on {bridge.interface}")
    jump = ["INPUT", "-i", bridge.interface, "-j", chain]
    if ipt("-C", *jump).returncode != 0:
        done = ipt("-I", *jump[:1], "1", *jump[1:])
        if done.returncode != 0:
            return (f"egress gateway: iptables -I INPUT failed ({done.stderr.strip()[:200]}): "
                    f"host services are reachable from the agents on {bridge.interface}")
    return None
