"""`ray start` for a Ray cluster on one machine that listens on 127.0.0.1 only: `python infra/ray_loopback.py start ...`
takes the same arguments as `ray start` (give it `--node-ip-address 127.0.0.1`, and `--address 127.0.0.1:PORT` for a
worker node).

Why: Ray rewrites a loopback node address or bootstrap address to the machine's outbound IP
(`ray._private.services.resolve_ip_for_localhost`), and its gRPC servers listen on every interface unless the node's
address is 127.0.0.1, so plain `ray start --node-ip-address 127.0.0.1` still opens the cluster to the network. Its
one switch that keeps loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) makes `ray start --address` refuse to add a
worker node. This launcher keeps an explicit 127.0.0.1 as given in this process, and sets that switch for the
processes the node starts (raylet, job drivers), so that a job's `ray.init()` joins 127.0.0.1 as well. Test and
development use only: a real cluster spans machines and uses plain `ray start` (or KubeRay).
"""

from __future__ import annotations

import os
import sys

# Ray reads the switch once, at import: this process must see it unset (a worker node would refuse to start), the
# processes it starts see it set (below).
os.environ.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)

import ray._private.ray_constants  # noqa: E402,F401
import ray._private.services as services  # noqa: E402

LOOPBACK = "127.0.0.1"
_resolve_ip_for_localhost = services.resolve_ip_for_localhost


def _keep_loopback(host: str) -> str:
    return host if host == LOOPBACK else _resolve_ip_for_localhost(host)


def main(argv: list[str]) -> int:
    if "--node-ip-address" not in " ".join(argv).replace("=", " ").split():
        argv = [*argv, "--node-ip-address", LOOPBACK]
    services.resolve_ip_for_localhost = _keep_loopback
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # inherited by the node's processes, not read again here
    from ray.scripts.scripts import main as ray_main

    sys.argv = ["ray", *argv]
    return ray_main()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
