"""torchrun once per node of a simulated cluster, as on a real one: every node's launcher with the same
rendezvous, one process per node here."""
from __future__ import annotations

import subprocess
import sys
from typing import Callable

from cluster.simulated import Cluster, Node


def static(port: int) -> Callable[[Node], list[str]]:
    """Static rendezvous at node1: node_rank from the node's index."""
    return lambda node: ["--node_rank", str(node.index - 1), "--master_addr", "node1", "--master_port", str(port)]


def c10d(port: int) -> Callable[[Node], list[str]]:
    """The c10d rendezvous backend, its store on node1."""
    return lambda node: ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"node1:{port}", "--rdzv_id", "megapile"]


def start_on_every_node(cluster: Cluster, rendezvous: Callable[[Node], list[str]], target: list[str], logs,
                        env: dict) -> dict:
    """torchrun with one rank on each node, node1 last (the others wait for it); node name → harness Background."""
    started = {}
    for node in reversed(cluster.nodes):
        argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(cluster.nodes)),
                "--nproc_per_node", "1", *rendezvous(node), *target]
        started[node.name] = cluster.start(node, argv, logs, env=env, name=f"{node.name}-torchrun")
    return started


def run_on_every_node(cluster: Cluster, rendezvous: Callable[[Node], list[str]], target: list[str], logs, env: dict,
                      timeout: float) -> dict[str, subprocess.CompletedProcess]:
    """The same, to the end: every node's torchrun must succeed within `timeout` s."""
    started = start_on_every_node(cluster, rendezvous, target, logs, env)
    try:
        return {name: proc.finish(timeout) for name, proc in started.items()}
    finally:
        for proc in started.values():
            proc.stop()
