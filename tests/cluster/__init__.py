"""A simulated multi-host cluster on this one machine, for launcher and fault tests:

    with Cluster(nodes=2) as c:
        c.nodes[0].name, c.nodes[0].ip          # "node1", "10.213.X.1"
        c.run(1, ["ssh", "node2", "hostname"], logs)        # on node1, to the end (harness.run_command)
        proc = c.start(2, argv, logs, env=...)  # on node2, in the background: a harness Background
        c.cut_link(2); c.restore_link(2); c.rate_limit(2, "100mbit"); c.kill_node(2)

Each node is a network, hostname and mount namespace held by one `sleep` (namespaces.py), on the same
filesystem as the host: the repository, the test's tmp_path and TORCH_EXTENSIONS_DIR are shared, as on a
cluster with a shared filesystem. Nodes reach each other by name over a bridge (network.py; the interface is
`eth0` in every node), and by passwordless root ssh (ssh.py); each node sees the cluster's /etc/hosts and
~root/.ssh through bind mounts in its own mount namespace, so this host's files are untouched. Teardown goes by
pid and name, and a run killed before it is cleaned up by the next one (registry.py).

Needs root, unshare/nsenter (util-linux), ip/tc (iproute2), sshd (openssh-server) and pdsh; `.ci/run` installs
them. tests/slurm_cluster.py runs a SLURM cluster on these hosts (`on_node=`).
"""
from __future__ import annotations

import os
import shutil
import subprocess

from cluster.simulated import Cluster, Node

__all__ = ["Cluster", "Node", "missing_tools", "no_namespaces"]

TOOLS = {"unshare": "util-linux", "nsenter": "util-linux", "ip": "iproute2", "tc": "iproute2",
         "sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client", "pdsh": "pdsh"}


def no_namespaces() -> str | None:
    """Why this machine cannot make namespaces (not root, or a sandbox that forbids them), or None."""
    if os.geteuid() != 0:
        return "the simulated cluster needs root (network namespaces, veth, bind mounts)"
    if shutil.which("unshare") is None:
        return None  # a missing tool is an install problem: missing_tools() says so
    probe = subprocess.run(["unshare", "--net", "--uts", "--mount", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"no namespaces on this machine: unshare: {probe.stderr.strip()}"
    return None


def missing_tools() -> list[str]:
    """'tool (package)' for each tool not installed."""
    return [f"{tool} ({package})" for tool, package in TOOLS.items()
            if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}")]
