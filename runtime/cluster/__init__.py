"""Multi-node stages: one stage across N machines ("nodes") that start together.

On Modal the N nodes are the containers of one clustered function call; in the rehearsal
(tests/fakes/fake_modal.py) they are N local processes on loopback; on Ray (SFT) they are
N actors, one per bundle of a STRICT_SPREAD placement group (runtime.ray.multinode). Every node runs the
same stage worker; its rank decides its role:

- rank 0 leads: it waits for every other rank to check in (bounded, naming the missing
  ranks), decides the checkpoint all ranks resume from, and runs the trainer's driver
  (torchrun's rendezvous store for SFT; the Ray head and `main_ppo` for RL);
- ranks 1..N-1 join: torchrun with the same arguments and their own `--node_rank` (SFT),
  or `ray start --address` and wait for the leader to finish (RL).

A partial cluster never trains: a cluster with fewer containers than nodes, a rank that
misses the join deadline, a rank that joins a cluster already training, or a rank lost
mid-run make every rank stop and fail, so the whole cluster restarts (Modal's retries, or
the next apply) from the latest valid checkpoint.

Modules: `layout` (ranks, addresses, ports, command lines: pure), `rendezvous` (the
leader/member control channel over TCP), `ray_nodes` and `ray_probe` (rank 0's Ray head
and its bounded wait for every rank's node), `node` (the role a stage worker plays, used
by runtime.modal.worker and runtime.ray.node_rank), `liveness` (per-rank liveness for
`retool status`).
Nothing here imports modal.
"""
