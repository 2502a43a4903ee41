"""The real single-node Kubernetes test cluster, as tests see it
(``from tests.support.kube import Cluster``; the ``kube_cluster`` and ``kube_namespace``
fixtures in conftest.py are built on this).

The cluster is built and started by ``.ci/setup-kubernetes.sh`` (Kubernetes v1.20.2 from
Debian's source package; see the README's "Kubernetes test cluster"): etcd, kube-apiserver on
https://127.0.0.1:6443, controller-manager, scheduler, a containerd of its own and a kubelet
whose node is ``localhost``. Tests drive it with the v1.20 kubectl built from the same tree
(a newer kubectl warns about version skew), through the admin kubeconfig.

Nothing can be pulled here: every image a test Pod runs is imported from Docker into the
cluster's containerd first (``Cluster.import_image``) and named with
``imagePullPolicy: Never``. There is no kube-proxy: ClusterIP Services do not route; a Pod
that needs the API server uses ``hostNetwork`` and ``KUBERNETES_SERVICE_HOST=127.0.0.1``.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tests.support.helpers import wait_for

KUBECONFIG = Path(os.environ.get("ORCHESTRATOR_TEST_KUBECONFIG",
                                 "/var/lib/orchestrator-k8s/admin.kubeconfig"))
K8S_VERSION = "v1.20.2"
KUBECTL = Path(os.environ.get("ORCHESTRATOR_TEST_KUBECTL",
                              f"/var/cache/orchestrator-k8s/{K8S_VERSION}/bin/kubectl"))
CONTAINERD_ADDRESS = os.environ.get("ORCHESTRATOR_TEST_CONTAINERD",
                                    "/run/orchestrator-k8s/containerd.sock")
SERVER = "https://127.0.0.1:6443"
NODE_NAME = "localhost"
# where .ci/setup-kubernetes.sh records each process's pid (<name>.pid)
PIDS_DIR = Path("/var/lib/orchestrator-k8s/pids")
SETUP_SCRIPT = ".ci/setup-kubernetes.sh"


class ClusterUnavailable(Exception):
    """The test cluster cannot be used; the message is one line saying why."""


def containerd_ref(tag: str) -> str:
    """The name containerd (and the kubelet) give a Docker tag: ``x:1`` ->
    ``docker.io/library/x:1``, ``me/x`` -> ``docker.io/me/x:latest``."""
    name, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "")
    version = version or "latest"
    first = name.split("/", 1)[0]
    if "/" not in name:
        name = f"docker.io/library/{name}"
    elif "." not in first and ":" not in first and first != "localhost":
        name = f"docker.io/{name}"
    return f"{name}:{version}"


def use_data_dir(spec: dict[str, Any], container: dict[str, Any], data_dir: Path) -> None:
    """Point a deploy manifest's Pod spec at ``data_dir``: its hostPath data volume and
    the container's mount of it (a test's own data dir on the node)."""
    data = next(v for v in spec["volumes"] if "hostPath" in v)
    old = data["hostPath"]["path"]
    data["hostPath"]["path"] = str(data_dir)
    for mount in container["volumeMounts"]:
        if mount["mountPath"] == old:
            mount["mountPath"] = str(data_dir)


def pod_phase_settled(pod: dict[str, Any], phases: Iterable[str]) -> bool:
    """True when the Pod reached one of ``phases`` (``Running``, ``Succeeded``, ``Failed``)."""
    return (pod.get("status") or {}).get("phase") in set(phases)


def condition_true(obj: dict[str, Any], kind: str) -> bool:
    """True when ``obj.status.conditions`` holds ``kind`` with status ``True``."""
    conditions = (obj.get("status") or {}).get("conditions") or []
    return any(c.get("type") == kind and c.get("status") == "True" for c in conditions)


@dataclass(frozen=True)
class Cluster:
    """A handle on the running test cluster: kubectl with the admin kubeconfig, and the
    cluster's own containerd for image imports."""

    kubeconfig: Path = KUBECONFIG
    server: str = SERVER
    node_name: str = NODE_NAME
    containerd_address: str = CONTAINERD_ADDRESS
    kubectl_path: Path = KUBECTL

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run the v1.20 kubectl against the cluster; ``check``: a non-zero exit raises
        AssertionError carrying kubectl's stderr."""
        cmd = [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), *args]
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        """The object as JSON, or None when it does not exist."""
        ns = ["-n", namespace] if namespace else []
        proc = self.kubectl("get", kind, name, *ns, "-o", "json", "--ignore-not-found",
                            check=True)
        return json.loads(proc.stdout) if proc.stdout.strip() else None

    def apply(self, manifest: dict[str, Any] | str, namespace: str | None = None) -> None:
        """``kubectl apply -f -`` of one object (a dict is sent as JSON) or a YAML text."""
        text = manifest if isinstance(manifest, str) else json.dumps(manifest)
        ns = ["-n", namespace] if namespace else []
        self.kubectl("apply", *ns, "-f", "-", input=text)

    def node_ready(self) -> bool:
        node = self.get("node", self.node_name)
        return bool(node) and condition_true(node, "Ready")

    def wait_for_pod(self, namespace: str, name: str, phases: Iterable[str] = ("Running",),
                     timeout: float = 60) -> dict[str, Any]:
        """Wait until the Pod is in one of ``phases``; returns the Pod."""
        wanted = tuple(phases)

        def settled() -> dict[str, Any] | None:
            pod = self.get("pod", name, namespace)
            return pod if pod and pod_phase_settled(pod, wanted) else None

        return wait_for(settled, timeout=timeout, interval=0.25,
                        message=f"pod {namespace}/{name} in {'/'.join(wanted)}")

    def wait_for_gone(self, kind: str, name: str, namespace: str | None = None,
                      timeout: float = 60) -> None:
        wait_for(lambda: self.get(kind, name, namespace) is None, timeout=timeout,
                 interval=0.25, message=f"{kind} {name} deleted")

    def create_namespace(self, name: str) -> None:
        self.kubectl("create", "namespace", name)

    def delete_namespace(self, name: str) -> None:
        """Delete without waiting (its Pods go in the background)."""
        self.kubectl("delete", "namespace", name, "--wait=false", "--ignore-not-found",
                     check=False)

    # ---- images ---------------------------------------------------------------------
    def _ctr(self, *args: str, input: bytes | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["ctr", "--address", self.containerd_address, "-n", "k8s.io",
                               *args], input=input, capture_output=True, timeout=timeout)

    def image_id(self, tag: str) -> str | None:
        """The image id (config digest) containerd holds under the Docker ``tag``, or None."""
        ref = containerd_ref(tag)
        listing = self._ctr("images", "ls")
        for line in listing.stdout.decode().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 3 and cols[0] == ref:
                manifest = self._ctr("content", "get", cols[2])
                if manifest.returncode != 0:
                    return None
                doc = json.loads(manifest.stdout)
                if "config" not in doc and doc.get("manifests"):  # an index: first manifest
                    inner = self._ctr("content", "get", doc["manifests"][0]["digest"])
                    doc = json.loads(inner.stdout)
                return (doc.get("config") or {}).get("digest")
        return None

    def import_image(self, tag: str) -> None:
        """``docker save TAG | ctr import``, skipped when containerd already holds that
        image id under that name (the kubelet never pulls: Pods name it with
        ``imagePullPolicy: Never``)."""
        docker_id = subprocess.run(
            ["docker", "image", "inspect", "--format", "{{.Id}}", tag],
            capture_output=True, text=True, timeout=60)
        if docker_id.returncode != 0:
            raise AssertionError(f"docker image {tag} not found: {docker_id.stderr.strip()}")
        if self.image_id(tag) == docker_id.stdout.strip():
            return
        save = subprocess.Popen(["docker", "save", tag], stdout=subprocess.PIPE)
        try:
            imp = subprocess.run(["ctr", "--address", self.containerd_address, "-n", "k8s.io",
                                  "images", "import", "-"], stdin=save.stdout,
                                 capture_output=True, timeout=300)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save_rc = save.wait(timeout=60)
        if save_rc != 0 or imp.returncode != 0:
            raise AssertionError(f"importing {tag} into the cluster's containerd failed: "
                                 f"{imp.stderr.decode(errors='replace').strip()}")


def process_pid(name: str) -> int | None:
    """The pid ``.ci/setup-kubernetes.sh`` recorded for a cluster process (``kubelet``,
    ``kube-apiserver``, ...), if that process is alive."""
    try:
        pid = int((PIDS_DIR / f"{name}.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if Path(f"/proc/{pid}").exists() else None


def process_environ(pid: int) -> dict[str, str]:
    """A process's environment from ``/proc/<pid>/environ``."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if item)
    return {k: v for k, _, v in pairs}


def connect(kubeconfig: Path = KUBECONFIG) -> Cluster:
    """A ``Cluster`` once the API server answers ``/readyz`` with this kubeconfig;
    ClusterUnavailable (one line) when it cannot be used."""
    if not KUBECTL.is_file():
        raise ClusterUnavailable(f"no kubectl at {KUBECTL}")
    try:
        with open(kubeconfig, "rb"):
            pass
    except OSError as exc:
        raise ClusterUnavailable(
            f"cannot read the kubeconfig {kubeconfig}: {exc.strerror}") from None
    cluster = Cluster(kubeconfig=kubeconfig)
    try:
        proc = cluster.kubectl("get", "--raw", "/readyz", check=False, timeout=20)
    except subprocess.TimeoutExpired:
        raise ClusterUnavailable(
            f"the API server at {SERVER} did not answer within 20s") from None
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise ClusterUnavailable(f"the API server at {SERVER} is not ready: "
                                 f"{detail[-1] if detail else 'no answer'}")
    return cluster
