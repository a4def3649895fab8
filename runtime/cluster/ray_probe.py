"""`python -m runtime.cluster.ray_probe ADDRESS NODES TIMEOUT_S`: wait until the Ray cluster
at ADDRESS has an alive node for every rank 0..NODES-1 (the `retool_rank_<r>` resources
runtime.cluster.layout gives each node). Prints `{"ranks": [...]}` with the ranks present
and exits 0 when all are, 1 at the deadline. A separate process, so the stage worker
never holds a Ray driver connection of its own."""

from __future__ import annotations

import json
import logging
import socket
import sys
import time


def alive_ranks(nodes_info: list[dict]) -> list[int]:
    ranks: set[int] = set()
    for node in nodes_info:
        if not node.get("Alive"):
            continue
        for key in node.get("Resources", {}):
            if key.startswith("retool_rank_") and key[len("retool_rank_"):].isdigit():
                ranks.add(int(key[len("retool_rank_"):]))
    return sorted(ranks)


def main(argv: list[str]) -> int:
    address, nodes, timeout_s = argv[0], int(argv[1]), float(argv[2])
    import ray

    deadline = time.monotonic() + timeout_s
    host, _, port = address.rpartition(":")
    while True:  # the head may still be starting: wait for its GCS port within the same deadline
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            break
        except OSError:
            if time.monotonic() >= deadline:
                print(json.dumps({"ranks": []}), flush=True)
                return 1
            time.sleep(0.5)
    ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    try:
        present: list[int] = []
        while True:
            present = alive_ranks(ray.nodes())
            if all(r in present for r in range(nodes)) or time.monotonic() >= deadline:
                break
            time.sleep(1.0)
    finally:
        ray.shutdown()
    print(json.dumps({"ranks": present}), flush=True)
    return 0 if all(r in present for r in range(nodes)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
