"""What the server and the executor processes say to each other over Unix sockets and pipes.

Frames are a 4-byte big-endian length and a JSON body. One supervisor serves one execution:

    server ─Prepare─▶ supervisor        (forks the program process, which waits)
    server ◀─Hello──  supervisor        (its pid: the worker is ready for a request)
    server ──Job───▶  supervisor ─Go─▶ program process (over a pipe)
    server ◀─Outcome─ supervisor        (as soon as the program is done)
    server ◀─Cleaned─ supervisor        (leftovers killed, slot emptied: the slot is free again)

The zygote talks to the server once, at start, with `ZygoteReady`.
"""

from __future__ import annotations

import socket
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_HEADER = struct.Struct(">I")
MAX_FRAME = 1 << 30


class Msg(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChildLimits(Msg):
    address_space_bytes: int | None  # RLIMIT_AS; None = unlimited
    stack_bytes: int
    cpu_seconds: int
    processes: int | None  # RLIMIT_NPROC; only meaningful with a per-slot uid
    file_size_bytes: int
    open_files: int


class SlotSpec(Msg):
    index: int
    workdir: str  # host path of the slot's working directory
    uid: int | None  # None: executions keep the server's uid


class ZygoteConfig(Msg):
    control_fd: int
    preload: list[str]
    warmup: bool
    slots: list[SlotSpec]


class Isolation(Msg):
    """Which protections are really active (the kernel or the container may refuse some)."""

    network: bool = False  # executions run in an empty network namespace
    separate_uid: bool = False  # each slot runs as its own unprivileged uid
    private_tmp: bool = False  # /tmp, /var/tmp, /dev/shm are the slot's own working directory
    proc_hidden: bool = False  # /proc shows only the execution's own processes
    notes: list[str] = Field(default_factory=list)


class ZygoteReady(Msg):
    pid: int
    isolation: Isolation
    preloaded: list[str]
    preload_failures: dict[str, str]


class Prepare(Msg):
    slot: SlotSpec
    dirty: bool  # the previous execution in this slot did not clean up: reset first


class Job(Msg):
    code: str
    stdin: str | None
    files: dict[str, str]  # relative path -> base64 content
    fetch_files: list[str]
    run_timeout: float
    max_output_bytes: int
    max_fetch_bytes: int
    limits: ChildLimits
    env: dict[str, str]


class Go(Msg):
    """What the waiting program process needs to start the program."""

    code: str
    filename: str
    env: dict[str, str]
    limits: ChildLimits


class Hello(Msg):
    pid: int


class Outcome(Msg):
    kind: Literal["finished", "timeout", "error"]
    return_code: int | None = None
    stdout: str = ""
    stderr: str = ""
    execution_time: float = 0.0
    files: dict[str, str] = Field(default_factory=dict)
    message: str = ""


class Cleaned(Msg):
    ok: bool


def encode_frame(msg: BaseModel) -> bytes:
    body = msg.model_dump_json().encode()
    return _HEADER.pack(len(body)) + body


def send_msg(sock: socket.socket, msg: BaseModel) -> None:
    sock.sendall(encode_frame(msg))


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(min(size - len(buf), 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        buf += chunk
    return bytes(buf)


def recv_body(sock: socket.socket) -> bytes:
    (size,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size))
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    return _recv_exact(sock, size)


def header_size() -> int:
    return _HEADER.size


def parse_header(header: bytes) -> int:
    (size,) = _HEADER.unpack(header)
    if size > MAX_FRAME:
        raise ValueError(f"frame of {size} bytes is too large")
    return size
