"""The iptables rules that confine an internal network to the gateway's ports (pure)."""

from __future__ import annotations

import pytest

from orchestrator.gateway.network import bridge_address, chain_name, confine_rules


@pytest.mark.parametrize("ports, accepts", [
    ([8760], ["8760"]),
    ([8761, 8760, 8761], ["8760", "8761"]),  # sorted, once each
    ([], []),  # no door: the bridge reaches nothing on the host
])
def test_the_chain_is_emptied_then_accepts_the_doors_then_rejects(ports, accepts) -> None:
    rules = confine_rules("ORCH-EG-x", ports)
    assert rules[0] == ["-F", "ORCH-EG-x"]
    assert rules[-1] == ["-A", "ORCH-EG-x", "-j", "REJECT"]
    assert [r[r.index("--dport") + 1] for r in rules[1:-1]] == accepts
    assert all(r[:2] == ["-A", "ORCH-EG-x"] and r[-2:] == ["-j", "ACCEPT"] for r in rules[1:-1])


def test_chain_names_fit_iptables_and_differ_per_instance_and_bridge() -> None:
    names = {chain_name(i, b) for i in ("a", "b") for b in ("br-1", "br-2")}
    assert len(names) == 4
    assert all(len(n) <= 28 and n.startswith("ORCH-EG-") for n in names)
    assert chain_name("a", "br-1") == chain_name("a", "br-1")  # the same after a restart


@pytest.mark.parametrize("pools, address", [
    ([{"Subnet": "172.18.0.0/16", "Gateway": "172.18.0.1"}], "172.18.0.1"),
    ([{"Subnet": "10.9.0.0/24", "Gateway": "10.9.0.254/24"}], "10.9.0.254"),
    ([{"Subnet": "172.17.0.0/16"}], "172.17.0.1"),  # no Gateway given: the first address
    ([{"Subnet": "not a subnet"}, {"Subnet": "192.168.5.0/24"}], "192.168.5.1"),
    ([{"Subnet": "fd00::/64"}, {"Subnet": "10.1.0.0/16", "Gateway": "10.1.0.9"}], "10.1.0.9"),
    ([], None),
    ([{}], None),
])
def test_the_bridge_address_is_its_gateway_or_its_subnets_first(pools, address) -> None:
    assert bridge_address(pools) == address
