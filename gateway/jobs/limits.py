"""Per-user limits on creating jobs: which apply, whether a create fits, and how the
answer states them (the `RateLimit-Policy` / `RateLimit` fields of the IETF httpapi draft).

Pure: the counts come from the store, read under the lock the create holds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from typing import Final

from gateway.jobs.kinds import Kind

WINDOW: Final = dt.timedelta(hours=1)
# a client over its active-jobs limit waits for one of them to finish: no exact time exists
ACTIVE_RETRY_AFTER_SECONDS: Final = 5


@dataclasses.dataclass(frozen=True, slots=True)
class Limits:
    """One user's limits for one kind; 0 turns a limit off."""

    active: int
    per_hour: int


@dataclasses.dataclass(frozen=True, slots=True)
class Override:
    """An operator's limits for one user; None leaves the setting's default."""

    active_images: int | None = None
    active_videos: int | None = None
    images_per_hour: int | None = None
    videos_per_hour: int | None = None

    def applied(self, kind: Kind, default: Limits) -> Limits:
        active, per_hour = (
            (self.active_images, self.images_per_hour)
            if kind is Kind.IMAGE
            else (self.active_videos, self.videos_per_hour)
        )
        return Limits(
            default.active if active is None else active,
            default.per_hour if per_hour is None else per_hour,
        )


@dataclasses.dataclass(frozen=True, slots=True)
class Usage:
    """A user's jobs of one kind: not yet terminal, and created within the last hour."""

    active: int
    in_window: int
    # when the oldest counted creation leaves the window (None: none counted)
    oldest_leaves_at: dt.datetime | None = None
    # when the creation that must leave for one more to fit leaves (None: one more fits)
    frees_at: dt.datetime | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    limit: str  # the setting's name
    value: int
    retry_after: int  # whole seconds


def name(kind: Kind, *, hourly: bool) -> str:
    """The setting that holds the limit, e.g. USER_MAX_ACTIVE_IMAGE_JOBS."""
    noun = kind.label
    return f"USER_MAX_{noun}_JOBS_PER_HOUR" if hourly else f"USER_MAX_ACTIVE_{noun}_JOBS"


def check(kind: Kind, limits: Limits, usage: Usage, now: dt.datetime) -> Refusal | None:
    """Why one more job of `kind` does not fit, or None when it does."""
    if limits.active and usage.active >= limits.active:
        return Refusal(name(kind, hourly=False), limits.active, ACTIVE_RETRY_AFTER_SECONDS)
    if limits.per_hour and usage.in_window >= limits.per_hour:
        wait = (usage.frees_at - now).total_seconds() if usage.frees_at else 1.0
        return Refusal(name(kind, hourly=True), limits.per_hour, max(1, math.ceil(wait)))
    return None


def window_reset(usage: Usage, now: dt.datetime) -> int:
    """Seconds until the oldest creation counted in the window leaves it."""
    if usage.oldest_leaves_at is None:
        return 0
    return max(0, math.ceil((usage.oldest_leaves_at - now).total_seconds()))


def headers(kind: Kind, limits: Limits, usage: Usage, now: dt.datetime) -> dict[str, str]:
    """The RateLimit-Policy and RateLimit fields for a user's `usage` of `limits`; none
    when both limits are off."""
    policies: list[str] = []
    states: list[str] = []
    if limits.per_hour:
        policy = f'"{kind.plural}-hour"'
        policies.append(f"{policy};q={limits.per_hour};w={int(WINDOW.total_seconds())}")
        remaining = max(0, limits.per_hour - usage.in_window)
        states.append(f"{policy};r={remaining};t={window_reset(usage, now)}")
    if limits.active:
        policy = f'"{kind.plural}-active"'
        policies.append(f"{policy};q={limits.active}")
        states.append(f"{policy};r={max(0, limits.active - usage.active)}")
    if not policies:
        return {}
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}
