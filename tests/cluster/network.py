"""The cluster's network: one bridge on the host, one veth pair per node (the host end on the bridge, the other
end inside the node as `eth0`, so GLOO_SOCKET_IFNAME=eth0 and `--mca btl_tcp_if_include eth0` hold on every
node), addresses on a private /24, and faults on a node's link (cut, rate limit) with tc on both ends.

Interface names start with PREFIX and carry the subnet's third byte, so a crashed run's leftovers are found by
name (registry.py).
"""
from __future__ import annotations

import random
import subprocess

from cluster.namespaces import enter

PREFIX = "mpc"  # megapile cluster
NODE_IF = "eth0"
# tbf drops a packet larger than its burst: with a 10-byte burst, every frame (no sch_netem in this kernel)
CUT_QDISC = ["tbf", "rate", "8bit", "burst", "10", "limit", "10"]


class Subnet:
    """10.213.X.0/24: node i is .i (from 1), the bridge has no address (the host stays out of the cluster)."""

    def __init__(self, third: int) -> None:
        self.third = third
        self.bridge = f"{PREFIX}{third}br"

    def ip(self, index: int) -> str:
        return f"10.213.{self.third}.{index}"

    def host_veth(self, index: int) -> str:
        return f"{PREFIX}{self.third}n{index}"


def free_thirds() -> list[int]:
    """Third bytes of 10.213.X.0/24 that no address or route of this host uses, in random order (two CI jobs on
    one machine pick different ones; registry.py makes the choice exclusive)."""
    used = ip(["-4", "addr"]).stdout + ip(["-4", "route"]).stdout
    thirds = [x for x in range(1, 255) if f"10.213.{x}." not in used]
    random.shuffle(thirds)
    return thirds


def create_bridge(subnet: Subnet) -> None:
    ip(["link", "add", subnet.bridge, "type", "bridge"])
    ip(["link", "set", subnet.bridge, "up"])


def attach(subnet: Subnet, index: int, holder: int) -> None:
    """Node `index`'s veth pair: the host end on the bridge, `eth0` with its address inside, loopback up."""
    veth = subnet.host_veth(index)
    ip(["link", "add", veth, "type", "veth", "peer", "name", NODE_IF, "netns", str(holder)])
    ip(["link", "set", veth, "master", subnet.bridge, "up"])
    inside = enter(holder)
    for args in (["addr", "add", f"{subnet.ip(index)}/24", "dev", NODE_IF], ["link", "set", NODE_IF, "up"],
                 ["link", "set", "lo", "up"]):
        run(inside + ["ip"] + args)


def cut(subnet: Subnet, index: int, holder: int) -> None:
    """Drop every packet both ways, the links staying up (a dead switch port, not an unplugged cable)."""
    limit(subnet, index, holder, CUT_QDISC)


def rate_limit(subnet: Subnet, index: int, holder: int, rate: str) -> None:
    """At most `rate` (tc units: "100mbit") each way."""
    limit(subnet, index, holder, ["tbf", "rate", rate, "burst", "64kb", "latency", "50ms"])


def restore(subnet: Subnet, index: int, holder: int) -> None:
    for prefix, dev in ((["tc"], subnet.host_veth(index)), (enter(holder) + ["tc"], NODE_IF)):
        subprocess.run(prefix + ["qdisc", "del", "dev", dev, "root"], capture_output=True)  # none: fine


def limit(subnet: Subnet, index: int, holder: int, qdisc: list[str]) -> None:
    """`qdisc` as the root of both ends' egress: the host end's is the node's ingress."""
    run(["tc", "qdisc", "replace", "dev", subnet.host_veth(index), "root"] + qdisc)
    run(enter(holder) + ["tc", "qdisc", "replace", "dev", NODE_IF, "root"] + qdisc)


def delete_link(name: str) -> None:
    subprocess.run(["ip", "link", "del", name], capture_output=True)  # gone with its namespace: fine


def links_named(prefix: str) -> list[str]:
    names = []
    for line in ip(["-o", "link"]).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(prefix):
            names.append(name)
    return names


def ip(args: list[str]) -> subprocess.CompletedProcess:
    return run(["ip"] + args)


def run(argv: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc
