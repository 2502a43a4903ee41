"""[kubernetes] and the per-group Kubernetes keys: loading, refusals, resolution, digest."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from orchestrator.config.groups import resolve
from orchestrator.config.load import load_config
from orchestrator.config.render import render_default
from orchestrator.config.sections import ConfigError, KubernetesConfig

BASE = Path("/base/dir")


def load(**sections) -> object:
    return load_config(sections, BASE)


def test_the_defaults_and_kind_kubernetes():
    cfg = load(runtime={"kind": "kubernetes"})
    assert cfg.runtime.kind == "kubernetes"
    assert cfg.kubernetes == KubernetesConfig()
    assert cfg.kubernetes.image_pull_policy == "IfNotPresent"
    assert cfg.kubernetes.service_account == "" and cfg.kubernetes.kubeconfig == ""


def test_every_kubernetes_key_is_loaded():
    cfg = load(kubernetes={
        "namespace": "agents", "kubeconfig": "/etc/kube.conf", "node_name": "node-1",
        "instance": "prod", "image": "agent:2", "image_pull_policy": "Never",
        "command": ["bot"], "user": "1000:1000", "service_account": "agents",
        "runtime_class": "gvisor", "node_selector": {"pool": "agents", "example.com/disk": "ssd"},
        "tolerations": [{"key": "agents", "operator": "Exists", "effect": "NoSchedule",
                         "tolerationSeconds": 30}],
        "cpu_request": "250m", "cpu_limit": "2", "memory_request": "256Mi",
        "memory_limit": "1Gi", "group_folder": "{data_dir}/g/{group}", "start_timeout": 30})
    k = cfg.kubernetes
    assert (k.namespace, k.node_name, k.instance, k.user) == ("agents", "node-1", "prod",
                                                             "1000:1000")
    assert k.node_selector == (("example.com/disk", "ssd"), ("pool", "agents"))
    assert k.tolerations == ((("effect", "NoSchedule"), ("key", "agents"),
                              ("operator", "Exists"), ("tolerationSeconds", 30)),)
    assert k.start_timeout == 30.0 and k.command == ("bot",)


@pytest.mark.parametrize("section, words", [
    ({"namespace": "Agents"}, "[kubernetes] namespace 'Agents' is not a DNS-1123 label"),
    ({"namespace": "a" * 64}, "is not a DNS-1123 label"),
    ({"instance": "has space"}, "[kubernetes] instance 'has space' must be a label value"),
    ({"instance": ""}, "[kubernetes] instance '' must be a label value"),
    ({"cpu_limit": "two"}, "[kubernetes] cpu_limit 'two' is not a Kubernetes quantity"),
    ({"memory_limit": "1 GB"}, "[kubernetes] memory_limit '1 GB' is not a Kubernetes quantity"),
    ({"image_pull_policy": "Sometimes"}, "[kubernetes] image_pull_policy must be one of"),
    ({"node_selector": ["pool=agents"]}, "[kubernetes] node_selector must be a table"),
    ({"node_selector": {"pool": "has space"}}, "[kubernetes] node_selector pool must be a "
                                                "label value"),
    ({"node_selector": {"bad key!": "x"}}, "'bad key!' is not a Kubernetes label key"),
    ({"tolerations": {"key": "x"}}, "[kubernetes] tolerations must be a list of tables"),
    ({"tolerations": [{"keys": "x"}]}, "unknown toleration field 'keys'"),
    ({"tolerations": [{"operator": "Maybe"}]}, "operator must be 'Equal' or 'Exists'"),
    ({"tolerations": [{"effect": "Never"}]}, "effect must be 'NoSchedule'"),
    ({"tolerations": [{"tolerationSeconds": "5"}]}, "tolerationSeconds must be an integer"),
    ({"user": "root"}, "[kubernetes] user 'root': write 'auto' or 'UID:GID'"),
    ({"user": "0:0"}, "never run as root"),
    ({"service_account": "Bad_Name"}, "[kubernetes] service_account 'Bad_Name' is not a "
                                      "DNS-1123 name"),
    ({"start_timeout": 0}, "[kubernetes] start_timeout must be between 1 and"),
    ({"command": []}, "[kubernetes] command must be a non-empty list"),
    ({"bogus": 1}, "unknown key [kubernetes] bogus"),
])
def test_bad_kubernetes_values_are_one_line(section, words):
    with pytest.raises(ConfigError) as failed:
        load(kubernetes=section)
    assert words in str(failed.value) and "\n" not in str(failed.value)


@pytest.mark.parametrize("group, words", [
    ({"cpu_limit": "lots"}, "[groups.g] cpu_limit 'lots' is not a Kubernetes quantity"),
    ({"memory_request": 5}, "[groups.g] memory_request must be a string"),
    ({"node_selector": {"pool": "a b"}}, "[groups.g] node_selector pool must be a label value"),
    ({"tolerations": [{"effect": "x"}]}, "[groups.g] tolerations effect must be"),
    ({"service_account": "UPPER"}, "[groups.g] service_account 'UPPER' is not a DNS-1123"),
    ({"runtime_class": "a_b"}, "[groups.g] runtime_class 'a_b' is not a DNS-1123"),
])
def test_bad_group_kubernetes_values_are_one_line(group, words):
    with pytest.raises(ConfigError, match=None) as failed:
        load_config({"groups": {"g": group}}, BASE)
    assert words in str(failed.value)


def test_a_groups_keys_reach_its_kubernetes_settings():
    cfg = load_config({"runtime": {"kind": "kubernetes"},
                       "kubernetes": {"image": "base:1", "memory_limit": "512Mi"},
                       "groups": {"g": {"image": "g:2", "command": ["bot"],
                                        "group_folder": "/srv/g", "memory_limit": "2Gi",
                                        "cpu_request": "1", "service_account": "g-agent",
                                        "runtime_class": "gvisor",
                                        "node_selector": {"pool": "g"},
                                        "tolerations": [{"key": "g", "operator": "Exists"}],
                                        "env": {"MODEL": "big"}}}}, BASE)
    s = resolve(cfg, "g")
    k = s.kubernetes
    assert (k.image, k.command, k.group_folder) == ("g:2", ("bot",), "/srv/g")
    assert (k.memory_limit, k.cpu_request, k.service_account, k.runtime_class) == (
        "2Gi", "1", "g-agent", "gvisor")
    assert k.node_selector == (("pool", "g"),)
    assert s.image == "g:2" and s.env == (("MODEL", "big"),)
    other = resolve(cfg, "other")
    assert (other.kubernetes.image, other.kubernetes.memory_limit) == ("base:1", "512Mi")
    assert s.digest != other.digest


@pytest.mark.parametrize("change", [
    {"image": "x:2"}, {"command": ["other"]}, {"memory_limit": "1Gi"}, {"cpu_request": "1"},
    {"node_selector": {"a": "b"}}, {"tolerations": [{"key": "k", "operator": "Exists"}]},
    {"service_account": "sa"}, {"runtime_class": "rc"},
])
def test_the_digest_covers_the_kubernetes_keys(change):
    plain = load_config({"runtime": {"kind": "kubernetes"}}, BASE)
    changed = load_config({"runtime": {"kind": "kubernetes"}, "groups": {"g": change}}, BASE)
    assert resolve(plain, "g").digest != resolve(changed, "g").digest


def test_with_kind_docker_the_kubernetes_keys_change_nothing_docker_runs_with():
    plain = load_config({"runtime": {"kind": "docker"}}, BASE)
    changed = load_config({"runtime": {"kind": "docker"},
                           "groups": {"g": {"memory_limit": "1Gi"}}}, BASE)
    assert resolve(plain, "g").digest == resolve(changed, "g").digest
    assert resolve(changed, "g").image == plain.docker.image


def test_the_rendered_default_loads_back_with_its_kubernetes_section():
    data = tomllib.loads(render_default())
    assert data["kubernetes"]["node_selector"] == {} and data["kubernetes"]["tolerations"] == []
    assert load_config(data, BASE).kubernetes == KubernetesConfig()
