"""A Ray that we start on this machine listens on loopback only.

`ray.init()` on Linux binds the GCS, the raylet, the object manager, every worker's gRPC server
and the dashboard agent on every network interface, and `RAY_AUTH_MODE=disabled` (which a local
Ray needs so that no token file is written under $HOME) leaves all of them open: anyone who can
reach the machine can connect and run code as the service's user. Measured with Ray 2.60:

- `ray.init(_node_ip_address="127.0.0.1")` is not enough: Ray replaces a loopback node address by
  the machine's routable one on Linux (`services.resolve_ip_for_localhost`).
- `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` (Ray's own single-node mode on macOS and Windows) makes the
  node address 127.0.0.1; then the GCS, raylet, workers, dashboard and runtime-env agents all
  bind 127.0.0.1. Ray reads the variable when it is imported, so `start_local_ray` also sets the
  constant it was read into.
- Every Serve replica still opens an inter-deployment gRPC server on `[::]:0` (hard-coded in
  `ray.serve._private.replica`, no setting: ray-project/ray#64544). `keep_replica_grpc_on_loopback`
  (run when a replica imports `services`) binds it to 127.0.0.1 when the node itself is on loopback.

`tests/services/test_serve_cli.py` lists the listening sockets of `vgpa serve`'s process tree, and
`vgpa serve` itself refuses to go on serving if one is bound beyond loopback (except the HTTP port
it was asked to open). On a cluster, nodes must reach each other: see docs/service.md (KubeRay:
network policy and Ray token authentication).
"""

from __future__ import annotations

import ipaddress
import os
import socket
import sys
from dataclasses import dataclass
from typing import Iterable, Optional

#: Environment of a local Ray: loopback only (see above), no token file, no usage report.
LOCAL_RAY_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def set_local_ray_env() -> None:
    """Put LOCAL_RAY_ENV in os.environ (before `import ray` where possible; child processes inherit it)."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    for key in ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED"):
        os.environ.setdefault(key, LOCAL_RAY_ENV[key])


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host == "localhost"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def start_local_ray(num_cpus: int, **init_kwargs) -> None:
    """`ray.init(address="local", ...)` with every Ray process bound to loopback; no dashboard by default.

    Raises RuntimeError (after shutting that Ray down) if the node address is not loopback.
    """
    set_local_ray_env()
    import ray
    from ray._private import ray_constants

    # Read from the environment when ray was first imported, which may have been before us.
    ray_constants.ENABLE_RAY_CLUSTER = False
    init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("configure_logging", False)
    ray.init(address="local", num_cpus=num_cpus, **init_kwargs)
    node_ip = ray.util.get_node_ip_address()
    if not is_loopback(node_ip):
        ray.shutdown()
        raise RuntimeError(f"the local Ray node took address {node_ip}, not loopback; refusing to run it")


def keep_replica_grpc_on_loopback() -> None:
    """In a Serve replica on a loopback node, bind its inter-deployment gRPC server to 127.0.0.1.

    Does nothing outside a replica process (the replica module is not loaded) and on cluster
    nodes (their address is routable, and other nodes may need that server).
    """
    replica = sys.modules.get("ray.serve._private.replica")
    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "_vgpa_loopback", False):
        return

    def add_port_on_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        if host in ("[::]", "0.0.0.0", "") and _node_is_loopback():
            address = f"127.0.0.1:{port}"
        return bind(server, address)

    add_port_on_loopback._vgpa_loopback = True  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port_on_loopback


def _node_is_loopback() -> bool:
    import ray

    return ray.is_initialized() and is_loopback(ray.util.get_node_ip_address())


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    host: str
    port: int


def listening_sockets(root_pid: Optional[int] = None) -> list[Listener]:
    """Listening TCP/UDP-bound sockets of a process and all its descendants (default: this process)."""
    import psutil

    root = psutil.Process(root_pid)
    found: list[Listener] = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            conns = proc.net_connections(kind="inet")
        except psutil.Error:  # exited meanwhile
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and conn.laddr):
                found.append(Listener(proc.pid, name, conn.laddr.ip, conn.laddr.port))
    return found


def exposed_listeners(listeners: Iterable[Listener], allowed_ports: Iterable[int] = ()) -> list[Listener]:
    """Those bound beyond loopback, apart from the ports asked for (the HTTP port)."""
    allowed = set(allowed_ports)
    return [s for s in listeners if not is_loopback(s.host) and s.port not in allowed]
