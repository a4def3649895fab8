"""Multi-node roles (runtime/cluster): rank 0 leads, the others join; bounded joins that name
the missing ranks; a partial, foreign or late cluster never trains. Real sockets on
loopback, real threads; no Modal."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.cluster.layout import (
    ClusterError,
    ClusterInfo,
    cluster_problem,
    node_ports,
    ray_cpu_resources,
    ray_start_argv,
    torchrun_argv,
    with_sidecar_port,
)
from runtime.cluster.liveness import liveness_text
from runtime.cluster.node import ClusterNode
from runtime.cluster.ray_probe import alive_ranks
from runtime.cluster.rendezvous import Leader, Member
from runtime.modal.models import StagePayload
from runtime.modal.worker import ContainerSegment
from tests.fakes.fake_modal import FakeModal


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def loopback(rank: int, size: int = 2, cluster: str = "cu-1") -> ClusterInfo:
    return ClusterInfo(rank=rank, cluster_id=cluster, ips=["127.0.0.1"] * size, ipv4_ips=["127.0.0.1"] * size)


# --------------------------------------------------------------------------- layout


def test_each_node_runs_torchrun_with_its_rank_and_rank_0s_address() -> None:
    rendered = ["torchrun", "--nnodes=2", "--nproc_per_node=8", "-m", "verl.trainer.sft_trainer", "a=1"]
    info = ClusterInfo(rank=1, cluster_id="cu-9", ips=["fd00::1", "fd00::2"])
    ports = node_ports(1, shared_host=info.shared_host)
    argv = torchrun_argv(rendered, info, ports)
    assert argv == ["torchrun", "--nnodes=2", "--node_rank=1", "--master_addr=fd00::1",
                    f"--master_port={ports.torch_master}", "--nproc_per_node=8", "-m", "verl.trainer.sft_trainer", "a=1"]
    # a single-node render's --standalone never reaches a cluster; `python -m torch.distributed.run` too
    single = ["python", "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node=1", "x.py"]
    assert torchrun_argv(single, loopback(0), ports)[3:8] == [
        "--nnodes=2", "--node_rank=0", "--master_addr=127.0.0.1", f"--master_port={ports.torch_master}",
        "--nproc_per_node=1"]


def test_ipv4_addresses_are_preferred_and_nodes_on_one_host_get_their_own_ports() -> None:
    modal = ClusterInfo(rank=1, cluster_id="c", ips=["fd00::1", "fd00::2"], ipv4_ips=["10.0.0.1", "10.0.0.2"])
    assert modal.addresses == ["10.0.0.1", "10.0.0.2"] and not modal.shared_host
    assert node_ports(1, shared_host=False) == node_ports(0, shared_host=False)  # separate machines: same plan
    p0, p1 = node_ports(0, shared_host=True, base=40000), node_ports(1, shared_host=True, base=40000)
    per_node = ("node_manager", "object_manager", "agent_listen", "agent_grpc", "runtime_env_agent", "metrics")
    used0 = {getattr(p0, k) for k in per_node} | set(range(p0.min_worker, p0.max_worker + 1))
    used1 = {getattr(p1, k) for k in per_node} | set(range(p1.min_worker, p1.max_worker + 1))
    assert not used0 & used1 and p0.rendezvous == p1.rendezvous == 40000 and p1.sidecar_offset == 1
    env = with_sidecar_port({"RETOOL_SANDBOX_URL": "http://127.0.0.1:8765", "X": "1"}, "RETOOL_SANDBOX_URL", 1)
    assert env == {"RETOOL_SANDBOX_URL": "http://127.0.0.1:8766", "X": "1"}


def test_ray_head_on_rank_0_and_joiners_elsewhere_each_marked_with_its_rank() -> None:
    info = ClusterInfo(rank=0, cluster_id="c", ips=["fd00::1", "fd00::2"], ipv4_ips=["10.0.0.1", "10.0.0.2"])
    ports = node_ports(0, shared_host=False)
    head = ray_start_argv(info, ports, "/tmp/r0", None)
    assert "--head" in head and f"--port={ports.ray_gcs}" in head and "--block" in head
    assert '--resources={"retool_rank_0": 1}' in head and not any(a.startswith("--num-gpus") for a in head)
    join = ray_start_argv(info.model_copy(update={"rank": 1}), ports, "/tmp/r1", (11, 1))
    assert f"--address=10.0.0.1:{ports.ray_gcs}" in join and "--head" not in join
    assert "--node-ip-address=10.0.0.2" in join and "--num-gpus=1" in join and "--num-cpus=11" in join
    assert ray_cpu_resources(["trainer.n_gpus_per_node=2"], {"VERL_PLATFORM": "cpu"}) == (14, 2)
    assert ray_cpu_resources(["trainer.n_gpus_per_node=8"], {}) is None  # GPUs: Ray detects them
    nodes = [{"Alive": True, "Resources": {"CPU": 4.0, "retool_rank_0": 1.0}},
             {"Alive": False, "Resources": {"retool_rank_1": 1.0}}, {"Alive": True, "Resources": {"CPU": 1.0}}]
    assert alive_ranks(nodes) == [0]


def test_a_partial_cluster_is_refused_before_anything_starts() -> None:
    assert "needs 2 nodes but this cluster has 1 container" in cluster_problem(loopback(0, size=1), 2)
    assert cluster_problem(loopback(1, size=2), 2) == ""
    with pytest.raises(ClusterError, match="a partial cluster never trains"):
        ClusterNode(loopback(0, size=1), 2, kind="sft", run_dir=Path("/nonexistent"), join_timeout_s=1,
                    sandbox_url_var="X")


# --------------------------------------------------------------------------- the control channel


def join_in_thread(member: Member, timeout: float, out: dict[int, Any]) -> threading.Thread:
    def run() -> None:
        try:
            out[member.rank] = member.join(timeout)
        except ClusterError as exc:
            out[member.rank] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_rank_0_releases_every_rank_with_one_plan_and_waits_for_their_commits() -> None:
    port = free_port()
    leader = Leader("127.0.0.1", port, 3, "cu-1")
    got: dict[int, Any] = {}
    members = [Member(r, "127.0.0.1", port, "cu-1") for r in (1, 2)]
    threads = [join_in_thread(m, 20, got) for m in members]
    try:
        leader.wait_for_members(20)
        leader.start({"start_step": 4, "any_ckpt": True})
        for t in threads:
            t.join(20)
        assert got == {1: {"start_step": 4, "any_ckpt": True}, 2: {"start_step": 4, "any_ckpt": True}}
        assert leader.liveness()["2"]["state"] == "alive"

        def commit_later(m: Member) -> None:
            m.wait_ended(20)
            m.confirm_committed()

        for m in members:
            threading.Thread(target=commit_later, args=(m,), daemon=True).start()
        assert leader.finish("finished", 20) == []  # every rank committed before rank 0 reports
        assert all(m.done_status == "finished" and not m.leader_lost for m in members)
    finally:
        leader.close()
        for m in members:
            m.close()


def test_the_join_timeout_names_the_missing_ranks_and_tells_the_others() -> None:
    port = free_port()
    leader = Leader("127.0.0.1", port, 3, "cu-1")
    got: dict[int, Any] = {}
    m1 = Member(1, "127.0.0.1", port, "cu-1")
    t = join_in_thread(m1, 5, got)
    try:
        with pytest.raises(ClusterError, match=r"rank 2 of 3 did not join rank 0 within 1\.5 s"):
            leader.wait_for_members(1.5)
        t.join(10)
        assert isinstance(got[1], ClusterError) and "rank 2 did not join" in str(got[1])
    finally:
        leader.close()
        m1.close()


def test_a_rank_without_rank_0_gives_up_at_its_deadline() -> None:
    member = Member(1, "127.0.0.1", free_port(), "cu-1")  # nobody listens there
    with pytest.raises(ClusterError, match=r"rank 1: rank 0 at 127\.0\.0\.1:\d+ did not answer within 1 s"):
        member.join(1.0)


def test_foreign_and_late_ranks_are_refused_so_a_partial_cluster_never_trains() -> None:
    port = free_port()
    leader = Leader("127.0.0.1", port, 2, "cu-2")
    stale_got: dict[int, Any] = {}
    got: dict[int, Any] = {}
    stale = Member(1, "127.0.0.1", port, "cu-1")  # a container of the previous (failed) cluster
    t_stale = join_in_thread(stale, 10, stale_got)
    time.sleep(0.5)
    m1 = Member(1, "127.0.0.1", port, "cu-2")
    t = join_in_thread(m1, 10, got)
    late_got: dict[int, Any] = {}
    try:
        leader.wait_for_members(10)  # turns the stale rank away, admits the right one
        leader.start({"start_step": None})
        t.join(10)
        t_stale.join(10)
        assert got[1] == {"start_step": None}
        assert isinstance(stale_got[1], ClusterError) and "belongs to cluster 'cu-1', not 'cu-2'" in str(stale_got[1])
        # a rank restarted on its own while the cluster trains is turned away
        late = Member(1, "127.0.0.1", port, "cu-2")
        join_in_thread(late, 5, late_got).join(10)
        assert isinstance(late_got[1], ClusterError) and "after it started training" in str(late_got[1])
    finally:
        leader.close()
        m1.close()


def test_a_lost_rank_and_a_lost_leader_are_noticed() -> None:
    port = free_port()
    leader = Leader("127.0.0.1", port, 3, "cu-1")
    got: dict[int, Any] = {}
    m1, m2 = Member(1, "127.0.0.1", port, "cu-1"), Member(2, "127.0.0.1", port, "cu-1")
    threads = [join_in_thread(m, 10, got) for m in (m1, m2)]
    leader.wait_for_members(10)
    leader.start({})
    for t in threads:
        t.join(10)
    m2.close()  # rank 2's container dies
    deadline = time.monotonic() + 10
    while not leader.lost() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leader.lost() == [2]
    assert leader.liveness()["2"]["state"] == "lost"
    leader.close()  # rank 0's container dies
    assert m1.wait_ended(10) and m1.leader_lost and m1.done_status is None
    m1.close()


def test_a_rank_silent_past_the_bound_is_lost_though_its_connection_stays_open() -> None:
    """A member that joined and then sends nothing (a frozen host: no FIN ever comes) counts
    as lost once silent for `lost_after_s`; so does rank 0, as a member sees it."""
    port = free_port()
    leader = Leader("127.0.0.1", port, 2, "cu-1", lost_after_s=1.0)
    silent = socket.create_connection(("127.0.0.1", port))  # joins like rank 1, then never beats
    silent.sendall(b'{"op": "join", "rank": 1, "cluster": "cu-1"}\n')
    try:
        leader.wait_for_members(10)
        leader.start({})
        assert silent.recv(4096).startswith(b'{"op": "go"')
        deadline = time.monotonic() + 10
        while not leader.lost() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert leader.lost() == [1] and leader.liveness()["1"]["state"] == "lost"
        assert re.fullmatch(r"rank 1: no heartbeat for \d+ s \(bound 1 s\)", leader.lost_reason())
    finally:
        leader.close()
        silent.close()

    # rank 0 joins a member and then goes silent (its beats never come)
    server = socket.create_server(("127.0.0.1", 0))
    member = Member(1, "127.0.0.1", server.getsockname()[1], "cu-1", lost_after_s=1.0)
    got: dict[int, Any] = {}
    t = join_in_thread(member, 10, got)
    conn, _ = server.accept()
    try:
        conn.recv(4096)
        conn.sendall(b'{"op": "go"}\n')
        t.join(10)
        assert got[1] == {}
        assert member.wait_ended(10) and member.leader_lost and member.done_status is None
        assert member.leader_silent_s is not None and member.leader_silent_s >= 1.0
    finally:
        member.close()
        conn.close()
        server.close()


def test_beating_ranks_stay_alive_past_the_bound() -> None:
    port = free_port()
    leader = Leader("127.0.0.1", port, 2, "cu-1", lost_after_s=3.0)
    member = Member(1, "127.0.0.1", port, "cu-1", lost_after_s=3.0)
    got: dict[int, Any] = {}
    t = join_in_thread(member, 10, got)
    try:
        leader.wait_for_members(10)
        leader.start({})
        t.join(10)
        time.sleep(7.0)  # past two bounds: beats (every 0.75 s) keep both sides alive
        assert leader.lost() == [] and not member.ended()
    finally:
        member.close()
        leader.close()


def test_status_shows_per_rank_liveness() -> None:
    ranks = {"0": {"state": "alive", "seen_at": 100.0}, "1": {"state": "alive", "seen_at": 10.0},
             "2": {"state": "lost", "seen_at": 90.0}}
    assert liveness_text(ranks, 200.0) == "nodes: 0 alive, 1 silent 190 s, 2 lost"
    assert liveness_text({"0": {"state": "alive"}}, 1.0) == ""  # one node: nothing to say


# --------------------------------------------------------------------------- the worker


def test_the_worker_refuses_a_partial_cluster_and_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = tmp_path / "ckpt" / "sft" / ("r" * 16)
    marker = tmp_path / "ran"
    payload = StagePayload(
        app_name="a", function="stage-sft", stage="sft", kind="sft", restart_id="r" * 64, total_steps=2,
        world_size=2, nodes=2, checkpoint_dir=str(ckpt), checkpoint_volume="v", volumes={"v": str(tmp_path / "ckpt")},
        commands=[{"argv": ["touch", str(marker)], "env": {}, "secret_env": [], "description": "x"}],
        train_seconds=60.0, join_timeout_s=1.0,
    )
    fake = FakeModal(cluster=loopback(0, size=1))
    with pytest.raises(ClusterError, match="needs 2 nodes but this cluster has 1 container"):
        ContainerSegment(payload, fake).run()
    assert not marker.exists()
    # a whole cluster whose other rank never comes: the join times out naming it, nothing ran
    fake = FakeModal(cluster=ClusterInfo(rank=0, cluster_id="cu-x", ips=["127.0.0.1", "127.0.0.2"]))
    monkeypatch.setenv("RETOOL_CLUSTER_PORT_BASE", str(free_port()))
    with pytest.raises(ClusterError, match="rank 1 of 2 did not join rank 0 within 1 s"):
        ContainerSegment(payload, fake).run()
    assert not marker.exists()


# --------------------------------------------------------------------------- the container's role


def test_a_single_node_stage_is_solo_and_never_asks_for_a_cluster(tmp_path: Path) -> None:
    from runtime.modal.roles import Solo, role_for

    def no_cluster() -> ClusterInfo:
        raise AssertionError("a single-node call has no cluster to ask about")

    role = role_for(no_cluster, 1, kind="sft", run_dir=tmp_path, join_timeout_s=1.0, sandbox_url_var="URL")
    assert isinstance(role, Solo) and role.leads and role.rank == 0
    assert role.join() is None and role.interrupt() == "" and role.leader_outcome() is None
    assert role.command(["python", "x.py"], {"A": "1"}) == (["python", "x.py"], {"A": "1"})
    assert role.deadline(42.0) == 42.0 and role.liveness() is None


def test_rank_0_leads_and_a_member_follows_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.modal.roles import Leader, Member, role_for

    monkeypatch.setenv("RETOOL_CLUSTER_PORT_BASE", str(free_port()))

    kw: dict[str, Any] = dict(kind="sft", run_dir=tmp_path, join_timeout_s=5.0, sandbox_url_var="URL")
    leader = role_for(lambda: loopback(0), 2, **kw)
    member = role_for(lambda: loopback(1), 2, **kw)
    try:
        assert isinstance(leader, Leader) and leader.leads and leader.deadline(42.0) == 42.0
        assert isinstance(member, Member) and not member.leads and member.deadline(42.0) == float("inf")
        assert member.name_suffix == "-rank-1" and member.port_offset == member.node.ports.sidecar_offset
        plans: list[Any] = []
        joining = threading.Thread(target=lambda: plans.append(member.join()))
        joining.start()
        assert leader.join() is None  # rank 0 waits for every rank, then decides the plan
        leader.start({"start_step": 4, "any_ckpt": True}, rl_command=None)
        joining.join(10)
        assert plans == [{"start_step": 4, "any_ckpt": True}]
        liveness = leader.liveness()
        assert liveness is not None and {r: s.state for r, s in liveness.items()} == {"0": "alive", "1": "alive"}
    finally:
        member.close()
        leader.close()
