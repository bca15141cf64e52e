"""Where the ingress replicas serve HTTP themselves (Ray Serve's direct ingress, switched on in
ray_env.py): each replica listens on a port of its own besides the proxy's.

Why private Ray API: Ray 2.60 has no public call for these ports; the Serve controller's
get_target_groups is what Ray's own load-balancer integration (HAProxy mode) reads. Any failure
here means "none known" (an older Ray, direct ingress off), never an error for the caller.
"""

from __future__ import annotations

from dataclasses import dataclass

ALL_INTERFACES = ("0.0.0.0", "::", "")


@dataclass(frozen=True)
class ReplicaPort:
    replica: str  # Serve's replica name
    node_ip: str
    port: int

    def url(self, http_host: str) -> str:
        """The replica's base URL for a client, given the host the deployment listens on."""
        host = self.node_ip if http_host in ALL_INTERFACES else http_host
        return f"http://{host}:{self.port}"


def replica_http_ports(app_name: str, timeout_s: float = 10.0) -> list[ReplicaPort]:
    """The HTTP ports the application's running ingress replicas listen on ([] if none)."""
    try:
        import ray
        from ray.serve.context import _get_global_client

        controller = _get_global_client()._controller
        groups = ray.get(controller.get_target_groups.remote(app_name), timeout=timeout_s)
    except Exception:  # noqa: BLE001 - see the module docstring
        return []
    ports = []
    for group in groups:
        if str(getattr(group.protocol, "value", group.protocol)).upper() != "HTTP":
            continue
        for target in group.targets:
            if target.name.startswith("SERVE_REPLICA::"):  # the other targets are proxies
                ports.append(ReplicaPort(target.name.removeprefix("SERVE_REPLICA::"), target.ip, target.port))
    return sorted(ports, key=lambda p: (p.node_ip, p.port))
