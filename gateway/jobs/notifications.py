"""What a job's owner is told when the job ends: the notification's type, title and words."""

from __future__ import annotations

import dataclasses
from typing import Any

from gateway.jobs.kinds import Kind
from gateway.jobs.records import JobUpdate
from gateway.jobs.state import Status

_TITLES = {
    Status.COMPLETED: "{noun} ready",
    Status.FAILED: "{noun} generation failed",
    Status.TIMED_OUT: "{noun} generation timed out",
}


@dataclasses.dataclass(frozen=True, slots=True)
class OwnerNotification:
    type: str
    title: str
    message: str
    metadata: dict[str, Any]


def owner_notification(
    kind: Kind, status: Status, update: JobUpdate
) -> OwnerNotification | None:
    """What the owner is told when `update` makes a job of `kind` `status`; None for a cancel.
    The statement that writes it adds the job's id to the metadata.

    One notification per job and terminal type: the constraint makes repeats no-ops.
    """
    if status not in _TITLES:
        return None
    noun = "Images" if kind is Kind.IMAGE else "Videos"
    if status is Status.COMPLETED:
        count = len(update.files)
        message = f"{count} {kind.value}(s) created."
    elif status is Status.FAILED:
        message = update.error_message or update.message or "The generator reported a failure."
    else:
        message = update.message or "The generator stopped reporting progress."
    return OwnerNotification(
        type=f"{kind.label}_{status.value}",
        title=_TITLES[status].format(noun=noun),
        message=message,
        metadata={"kind": kind.value, "files": len(update.files)},
    )
