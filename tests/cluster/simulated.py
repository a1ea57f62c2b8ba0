"""The Cluster: N nodes on this machine, each its own network, hostname and mount namespaces on the same
filesystem, reachable from one another by name over a bridge, with sshd on each. See __init__.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass

from harness import ROOT, Background, start_command, wait_for

from cluster import namespaces, network, registry, ssh

SSHD_START_S = 20.0


@dataclass(frozen=True)
class Node:
    index: int  # 1-based, as in the name
    name: str  # node1, node2, ...: its hostname, resolvable on every node
    ip: str
    holder: int  # pid of the process that owns its namespaces


class Cluster:
    def __init__(self, nodes: int = 2) -> None:
        assert 1 <= nodes <= 253, nodes  # .1 to .253 of the /24
        self.size = nodes
        self.nodes: list[Node] = []
        self.root = tempfile.mkdtemp(prefix=os.path.basename(registry.ROOT_PREFIX))
        self.logs = os.path.join(self.root, "logs")  # the nodes' daemons write here
        self.hosts_file = os.path.join(self.root, "hosts")
        self.ssh_dir = os.path.join(self.root, "ssh")  # every node's ~root/.ssh
        self.subnet: network.Subnet | None = None
        self._daemons: list[Background] = []

    # -- life cycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> "Cluster":
        try:
            self.up()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self) -> None:
        registry.reap_leftovers()
        self.subnet = network.Subnet(registry.reserve(os.getpid(), self.root))
        network.create_bridge(self.subnet)
        holders: list[int] = []
        for index in range(1, self.size + 1):
            holders.append(namespaces.start_holder())
            registry.record_holders(self.subnet.third, holders)
            self.nodes.append(Node(index, f"node{index}", self.subnet.ip(index), holders[-1]))
        self._write_hosts()
        ssh.make_client_dir(self.ssh_dir)
        home_ssh = ssh.root_ssh_dir()
        for node in self.nodes:
            network.attach(self.subnet, node.index, node.holder)
            inside = namespaces.enter(node.holder)
            for argv in (["hostname", node.name], ["mount", "--bind", self.hosts_file, "/etc/hosts"],
                         ["mount", "--bind", self.ssh_dir, home_ssh]):
                network.run(inside + argv)
        for node in self.nodes:
            config = ssh.write_sshd_config(self.root, node.name, node.ip)
            self._daemons.append(self.start(node, ssh.sshd_argv(config), self.logs, name=f"sshd-{node.name}"))
        for node, sshd in zip(self.nodes, self._daemons):
            wait_for(lambda: ssh.LISTENING in sshd.stderr(), sshd, SSHD_START_S, f"sshd on {node.name}", every=0.05)

    def down(self) -> None:
        """Everything started in a node dies with it; then the holders, the links, the record, the temp dir."""
        for node in self.nodes:
            namespaces.stop_holder(node.holder)
        for daemon in self._daemons:
            daemon.stop()  # reaps it
        if self.subnet is not None:
            for node in self.nodes:
                network.delete_link(self.subnet.host_veth(node.index))
            network.delete_link(self.subnet.bridge)
            registry.release(self.subnet.third)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- running things on a node ----------------------------------------------------------------------------
    def argv(self, node: Node | int | str, argv: list[str], cwd: str | None = ROOT) -> list[str]:
        """`argv` as run on `node`, in `cwd` (the filesystem is the same everywhere; None: in /)."""
        return namespaces.enter(self.node(node).holder, cwd) + argv

    def start(self, node: Node | int, argv: list[str], logs, env: dict | None = None, cwd: str = ROOT,
              name: str | None = None) -> Background:
        """In the background on `node`, through the harness: output in logs/NAME-K.{out,err}, bounded waits."""
        node = self.node(node)
        return start_command(self.argv(node, argv, cwd), logs, name or f"{node.name}-{os.path.basename(argv[0])}",
                             env, cwd)

    def run(self, node: Node | int, argv: list[str], logs, timeout: float = 600, env: dict | None = None,
            cwd: str = ROOT, check: bool = True, name: str | None = None) -> subprocess.CompletedProcess:
        return self.start(node, argv, logs, env, cwd, name).finish(timeout, check)

    def node(self, node: Node | int | str) -> Node:
        """A node by its 1-based index (node1 is 1) or its name, or itself."""
        if isinstance(node, str):
            return next(n for n in self.nodes if n.name == node)
        return node if isinstance(node, Node) else self.nodes[node - 1]

    def pids(self, node: Node | int) -> list[int]:
        """Every process running on `node` (sshd, its sessions, whatever they started)."""
        return namespaces.pids_in(self.node(node).holder)

    # -- faults ----------------------------------------------------------------------------------------------
    def kill_node(self, node: Node | int) -> None:
        """SIGKILL every process on `node`, sshd included: a power cut (its network and name stay)."""
        namespaces.kill_all_in(self.node(node).holder)

    def cut_link(self, node: Node | int) -> None:
        """No packet in or out of `node`, its link staying up: connections hang rather than fail."""
        node = self.node(node)
        network.cut(self.subnet, node.index, node.holder)

    def rate_limit(self, node: Node | int, rate: str) -> None:
        """`node`'s link at most `rate` each way ("100mbit", "10mbit": tc's units)."""
        node = self.node(node)
        network.rate_limit(self.subnet, node.index, node.holder, rate)

    def restore_link(self, node: Node | int) -> None:
        node = self.node(node)
        network.restore(self.subnet, node.index, node.holder)

    # -- internals -------------------------------------------------------------------------------------------
    def _write_hosts(self) -> None:
        with open(self.hosts_file, "w") as f:
            f.write("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
            f.writelines(f"{node.ip}\t{node.name}\n" for node in self.nodes)
