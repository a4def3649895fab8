"""The rows of `retool doctor`, and the checks every backend shares.

A backend that checks a real workspace declares `reconciler.backend.ChecksReadiness` and
returns `DoctorCheck` rows; every backend's rows end with `store_checks` (the state can be
read, and the apply lock taken and released), which needs nothing of the backend but a way
to open its state store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from reconciler.errors import RetoolError, StateLockedError
from reconciler.records import Frozen
from reconciler.state.base import LockInfo, StateStore

Status = Literal["ready", "to fix", "skipped", "note"]


class DoctorCheck(Frozen):
    """One row of `retool doctor`'s table: what was checked, its verdict, what was seen,
    and how to fix it."""

    check: str
    status: Status
    detail: str = ""
    fix: str = ""


def _why(exc: Exception) -> str:
    return exc.summary if isinstance(exc, RetoolError) else f"{type(exc).__name__}: {exc}"


def store_checks(open_store: Callable[[], StateStore]) -> list[DoctorCheck]:
    """The state can be read, and the apply lock taken and released."""
    try:
        store = open_store()
        state = store.read()
    except Exception as exc:  # noqa: BLE001 - any failure here is the row's answer
        hint = exc.hint if isinstance(exc, RetoolError) else ""
        return [DoctorCheck(check="state store", status="to fix", detail=_why(exc), fix=hint),
                DoctorCheck(check="state lock", status="skipped", detail="the store could not be read")]
    where = store.describe()
    rows = [DoctorCheck(check="state store", status="ready",
                        detail=f"{where}: " + (f"serial {state.serial}" if state is not None else "empty (first apply)"))]
    try:
        lock_id = store.lock(LockInfo(command="retool doctor"))
    except StateLockedError as exc:
        rows.append(DoctorCheck(check="state lock", status="note", detail=exc.summary,
                                fix=exc.hint or "wait for that apply, or `retool state unlock ID` if it is gone"))
        return rows
    except Exception as exc:  # noqa: BLE001
        rows.append(DoctorCheck(check="state lock", status="to fix", detail=_why(exc)))
        return rows
    try:
        store.unlock(lock_id)
    except Exception as exc:  # noqa: BLE001
        rows.append(DoctorCheck(check="state lock", status="to fix", detail=f"taken but not released: {_why(exc)}",
                                fix=f"`retool state unlock {lock_id}`"))
        return rows
    rows.append(DoctorCheck(check="state lock", status="ready", detail="taken and released"))
    return rows
