"""Passwordless root ssh between the nodes, without touching this host's ~/.ssh or sshd.

One client folder (key pair, authorized_keys, config) is bind-mounted over ~root/.ssh inside every node's
mount namespace, so `ssh node2 cmd` and `pdsh -R ssh -w node2 cmd` work from any node. Each node runs its own
sshd in the foreground (-D), logging to stderr (-e), on its own address, with a host key from the same temp dir.
An ssh session starts with a fresh environment (PATH, PYTHONPATH ... are not carried over), as on a cluster.
"""
from __future__ import annotations

import os
import pwd
import shutil
import subprocess

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"  # sshd re-executes itself: an absolute path
PRIVSEP_DIR = "/run/sshd"  # sshd's privilege separation folder; Debian's service creates it, nothing does here
CLIENT_CONFIG = """Host *
    StrictHostKeyChecking no
    UserKnownHostsFile /dev/null
    BatchMode yes
    LogLevel ERROR
    IdentityFile ~/.ssh/id_ed25519
"""


def root_ssh_dir() -> str:
    """The folder ssh reads for root (its home from the password database, not $HOME); made if missing so that
    the bind mount has a mount point."""
    path = os.path.join(pwd.getpwuid(0).pw_dir, ".ssh")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def make_client_dir(path: str) -> None:
    """A key pair, authorized_keys with its public half, and the client config: what every node sees as ~/.ssh."""
    os.makedirs(path, mode=0o700)
    key = os.path.join(path, "id_ed25519")
    _keygen(key)
    shutil.copyfile(key + ".pub", os.path.join(path, "authorized_keys"))
    os.chmod(os.path.join(path, "authorized_keys"), 0o600)
    with open(os.path.join(path, "config"), "w") as f:
        f.write(CLIENT_CONFIG)
    os.chmod(os.path.join(path, "config"), 0o600)


def write_sshd_config(folder: str, name: str, address: str) -> str:
    """Node `name`'s sshd_config (the host key made once per folder); returns its path."""
    host_key = os.path.join(folder, "ssh_host_ed25519_key")
    if not os.path.exists(host_key):
        _keygen(host_key)
    os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
    path = os.path.join(folder, f"sshd_config.{name}")
    with open(path, "w") as f:
        f.write(f"""ListenAddress {address}
Port 22
HostKey {host_key}
PidFile {os.path.join(folder, f"sshd.{name}.pid")}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# every launcher opens one session per node at once; a 2-3 node cluster never nears these
MaxStartups 64
MaxSessions 64
""")
    return path


def sshd_argv(config: str) -> list[str]:
    return [SSHD, "-D", "-e", "-f", config]


LISTENING = "Server listening on"  # what sshd -e prints once its socket is bound


def _keygen(path: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "megapile-cluster", "-f", path],
                   check=True, capture_output=True)
