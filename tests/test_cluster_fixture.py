"""The simulated cluster itself (tests/cluster/): nodes that reach each other by name and by ssh, faults that
do what they say, and nothing left behind, even by a run killed before its teardown."""
import json
import os
import signal
import sys
import time

from cluster import Cluster, namespaces, network, registry
from harness import ROOT, start_command, wait_for


def test_nodes_have_their_own_names_and_reach_each_other_by_ssh_and_pdsh(cluster, tmp_path):
    logs = tmp_path / "logs"
    assert [n.name for n in cluster.nodes] == ["node1", "node2"]
    out = cluster.run(1, ["bash", "-c", "hostname; ssh node2 hostname; pdsh -R ssh -w node1,node2 hostname | sort"],
                      logs, timeout=60).stdout
    assert out.split("\n") == ["node1", "node2", "node1: node1", "node2: node2", ""]
    assert cluster.run(2, ["getent", "hosts", "node1"], logs, timeout=10).stdout.split() == [cluster.nodes[0].ip,
                                                                                             "node1"]
    with open("/etc/hosts") as f:
        assert "node1" not in f.read().split()  # this host's own files are untouched


def test_a_cut_link_drops_everything_until_restored(cluster, tmp_path):
    logs = tmp_path / "logs"
    ssh = ["ssh", "-o", "ConnectTimeout=2", "node2", "true"]
    cluster.cut_link(2)
    try:
        failed = cluster.run(1, ssh, logs, timeout=30, check=False)
        assert failed.returncode == 255 and "timed out" in failed.stderr, failed.stderr
    finally:
        cluster.restore_link(2)
    cluster.run(1, ssh, logs, timeout=30)


def test_a_rate_limit_bounds_the_throughput(cluster, tmp_path):
    logs = tmp_path / "logs"
    cluster.rate_limit(2, "20mbit")
    try:
        start = time.monotonic()
        out = cluster.run(1, ["bash", "-c", "ssh node2 'head -c 2500000 /dev/zero' | wc -c"], logs, timeout=60)
        elapsed = time.monotonic() - start
    finally:
        cluster.restore_link(2)
    assert out.stdout.strip() == "2500000"
    assert elapsed >= 0.8, elapsed  # 20 Mbit in at most 20 Mbit/s: 1 s (less a burst)


def test_kill_node_leaves_no_process_on_it(cluster, tmp_path):
    with Cluster(nodes=2) as c:  # a second cluster beside the fixture's, on its own subnet
        assert c.subnet.third != cluster.subnet.third
        sleeper = c.start(2, ["sleep", "600"], tmp_path / "logs")
        via_ssh = c.start(1, ["ssh", "node2", "sleep 600"], tmp_path / "logs")
        wait_for(lambda: len(c.pids(2)) >= 4, via_ssh, 20, "sshd, its session and two sleeps on node2", every=0.05)
        c.kill_node(2)
        assert c.pids(2) == []
        wait_for(lambda: sleeper.poll() is not None and via_ssh.poll() is not None, None, 20, "both clients gone")
        holders = [n.holder for n in c.nodes]
        links = [c.subnet.bridge] + [c.subnet.host_veth(n.index) for n in c.nodes]
    assert not any(os.path.exists(f"/proc/{h}") for h in holders)
    assert not set(links) & set(network.links_named(network.PREFIX))


KILLED_OWNER = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from cluster import Cluster
c = Cluster(nodes=2).__enter__()
c.start(2, ["sleep", "600"], c.logs)
print(json.dumps({"holders": [n.holder for n in c.nodes], "third": c.subnet.third, "root": c.root}), flush=True)
time.sleep(600)
"""


def test_the_next_cluster_removes_what_a_killed_run_left(cluster, tmp_path):
    owner = start_command([sys.executable, "-c", KILLED_OWNER, os.path.join(ROOT, "tests")], tmp_path / "logs",
                          name="owner")
    try:
        wait_for(lambda: owner.stdout().strip(), owner, 30, "the cluster up")
        left = json.loads(owner.stdout())
    finally:
        owner.signal_group(signal.SIGKILL)  # no teardown runs; the holders and the sleep in node2 survive it
        owner.proc.wait()
    assert all(namespaces.is_holder(h) for h in left["holders"])
    inside = namespaces.pids_in(left["holders"][1])
    assert inside
    removed = registry.reap_leftovers()
    assert f"cluster 10.213.{left['third']}.0/24 of dead pid {owner.pid}" in removed
    assert not any(namespaces.alive(pid) for pid in left["holders"] + inside)
    assert not [name for name in network.links_named(f"{network.PREFIX}{left['third']}")]
    assert not os.path.exists(os.path.join(registry.RECORDS, f"{left['third']}.json"))
    assert not os.path.exists(left["root"])
    cluster.run(1, ["ssh", "node2", "true"], tmp_path / "logs", timeout=30)  # a live cluster is left alone
