"""The iptables rules that confine an internal network to the gateway's ports (pure)."""

from __future__ import annotations

import pytest

from orchestrator.gateway.network import chain_name, confine_rules


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
