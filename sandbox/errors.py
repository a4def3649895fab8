"""The sandbox's own errors (it imports nothing of retool's; callers in runtime/ translate).

`SandboxError` carries a one-line summary, optional detail and a hint, like retool's errors,
so the translation at the runtime boundary loses nothing. `SandboxUnavailableError` may go
away by itself (connection refused, HTTP 5xx, not ready yet); the others will not.
"""

from __future__ import annotations


class SandboxError(Exception):
    """Base of every error the sandbox package raises on purpose."""

    def __init__(self, summary: str, detail: str = "", hint: str = "") -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        parts = [self.summary]
        if self.detail:
            parts.append(self.detail)
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class SandboxUnavailableError(SandboxError):
    """The server could not be reached or failed (HTTP 5xx, not ready): retrying may help."""


class SandboxRefusedError(SandboxError):
    """The server refused the request (HTTP 4xx): the request must change."""


class SandboxSettingsError(SandboxError):
    """Invalid server settings (arguments or RETOOL_SANDBOX_* variables)."""


class SandboxNotStartedError(SandboxUnavailableError):
    """No worker became free within the call's queue bound: the program did not run (not a
    program outcome; a later call may run it)."""
