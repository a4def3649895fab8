"""Rank 0's Ray head for real (runtime/cluster/ray_nodes.py): its wait for the other ranks' Ray
nodes is bounded and names the ranks that never joined, and stopping it leaves no Ray process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runtime.cluster.layout import ClusterError, ClusterInfo, node_ports
from runtime.cluster.ray_nodes import RayNode
from tests.fakes.fake_cluster import free_port_base


def ray_processes(temp_dir: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if temp_dir.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def test_the_ray_head_names_the_ranks_missing_at_its_deadline_and_stops_clean(tmp_path: Path) -> None:
    info = ClusterInfo(rank=0, cluster_id="cu-1", ips=["127.0.0.1"] * 3)
    ports = node_ports(0, shared_host=True, base=free_port_base())
    env = {**os.environ, "VERL_PLATFORM": "cpu"}
    head = RayNode(info, ports, env, tmp_path / "ray-head.log", cpu=(4, 1))
    head.start()
    try:
        head.wait_for_ranks(1, 180.0)  # its own node (rank 0) is up
        with pytest.raises(ClusterError, match=r"ranks 1, 2 did not join the Ray cluster at 127\.0\.0\.1:\d+ within 3 s"):
            head.wait_for_ranks(3, 3.0)
        assert head.alive(), head.log_tail()
    finally:
        head.stop()
    assert not head.alive() and ray_processes(head.temp_dir) == []
