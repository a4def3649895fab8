"""What the server and the executor processes say to each other.

Processes, and who talks to whom (Unix SEQPACKET sockets: one JSON message per datagram,
file descriptors attached with SCM_RIGHTS):

    server ──SpawnForker + socket fd──▶ zygote          (preloaded; forks one forker per slot)
    server ──Prepare──────────────────▶ forker (slot i) (forks the program process, which waits)
    server ◀─Prepared + 6 fds─────────  forker          (go, stdin, stdout, stderr, status, pidfd)
    server ──Go (over the go pipe)────▶ program process (runs the program)
    server ◀─Exited───────────────────  forker          (program reaped, leftovers killed)

The zygote says `ZygoteReady` once, at start. The forker never sees a program, its input or
its output - so a program process, forked from it, cannot find another request's data in
the memory it inherited.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def encode(self) -> bytes:
        return self.model_dump_json().encode()


class ChildLimits(Msg):
    address_space_bytes: int | None  # RLIMIT_AS; None = unlimited
    stack_bytes: int
    cpu_seconds: int
    processes: int | None  # RLIMIT_NPROC; only meaningful with a per-slot uid
    file_size_bytes: int
    open_files: int


class SlotSpec(Msg):
    index: int
    scratch: str  # host path of the slot's directory: upper/ (upper/tmp is the workdir), work/, root/
    workdir: str  # host path of the slot's working directory (the program's /tmp)
    uid: int | None  # None: executions keep the server's uid


class ZygoteConfig(Msg):
    control_fd: int
    work_root: str  # hidden inside the programs' views
    filesystem_view: bool  # try the private view (else: per-slot namespaces with a private /tmp)
    preload: list[str]
    warmup: bool
    slots: list[SlotSpec]


class Isolation(Msg):
    """Which protections are really active (the kernel or the container may refuse some)."""

    network: bool = False  # executions run in an empty network namespace
    separate_uid: bool = False  # each slot runs as its own unprivileged uid
    private_root: bool = False  # a private copy-on-write view of the whole filesystem per execution
    private_tmp: bool = False  # /tmp, /var/tmp, /dev/shm are the slot's own working directory
    proc_hidden: bool = False  # /proc shows only the execution's own processes
    notes: list[str] = Field(default_factory=list)


class ZygoteReady(Msg):
    pid: int
    isolation: Isolation
    preloaded: list[str]
    preload_failures: dict[str, str]


class SpawnForker(Msg):
    slot: int


class Prepare(Msg):
    dirty: bool  # the slot's last program may have left processes: kill everything of its uid first


class Prepared(Msg):
    pid: int  # the program process, waiting for its Go; fds: go, stdin, stdout, stderr, status, pidfd


class Exited(Msg):
    status: int  # the wait status of the program process
    leftovers: bool  # processes it left behind were found and killed


class Go(Msg):
    """What the waiting program process needs to start the program."""

    code: str
    filename: str
    files: dict[str, str] = Field(default_factory=dict)  # path (relative to the cwd, or absolute) -> base64
    env: dict[str, str]
    limits: ChildLimits


class ExecutionOutcome(Msg):
    """The end of one execution, as the HTTP layer maps it onto SandboxFusion's statuses."""

    kind: Literal["finished", "timeout", "error"]
    return_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    execution_time: float = 0.0
    files: dict[str, str] = Field(default_factory=dict)
    message: str = ""
