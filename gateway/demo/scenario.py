"""The demo's scenario: three users, every backend behaviour, and what each job must become."""

from __future__ import annotations

import dataclasses

from gateway.jobs.state import Status

DEMO_DATABASE = "sorami_demo"
USERS = ("alice", "bob", "chloe")


@dataclasses.dataclass(frozen=True, slots=True)
class Planned:
    """One job of the demo and what the gateway must make of it."""

    user: str
    kind: str
    prompt: str
    mode: str
    expect_status: Status | None  # None: no gateway job
    expect_resolution: str
    # sent straight to the backend, as the old app did for videos: no gateway job
    direct_to_backend: bool = False
    group: int = 0  # jobs of one group are sent at the same moment


BASE_PLAN = (
    Planned("alice", "image", "a lighthouse at dawn, watercolor", "honest", Status.COMPLETED,
            "direct"),
    Planned("bob", "video", "waves rolling on a black sand beach", "honest", Status.COMPLETED,
            "direct"),
    Planned("chloe", "image", "a red fox curled up in fresh snow", "own-uuid", Status.COMPLETED,
            "alias"),
    Planned("alice", "image", "a bowl of ramen, studio lighting", "lost-answer", Status.COMPLETED,
            "direct"),
    Planned("bob", "image", "an origami crane on a wooden desk", "duplicates", Status.COMPLETED,
            "direct"),
    Planned("chloe", "video", "a hummingbird drinking from a flower", "out-of-order",
            Status.COMPLETED, "direct"),
    Planned("alice", "image", "a neon city street in the rain", "fail", Status.FAILED, "direct"),
    Planned("bob", "image", "a mountain cabin under the northern lights", "slow", Status.COMPLETED,
            "direct"),
    Planned("chloe", "image", "a cup of coffee with latte art", "no-hints", Status.COMPLETED,
            "direct"),
    Planned("alice", "image", "a sailboat on a calm lake", "own-uuid+lost-answer", Status.COMPLETED,
            "reconciled"),
    Planned("bob", "video", "a paper boat in a puddle", "own-uuid+lost-answer+no-hints",
            Status.COMPLETED, "reconciled"),
    # two users, the same prompt, the same moment: each result must reach its own user
    Planned("alice", "image", "a cat wearing sunglasses", "own-uuid+lost-answer", Status.COMPLETED,
            "reconciled", group=1),
    Planned("bob", "image", "a cat wearing sunglasses", "own-uuid+lost-answer", Status.COMPLETED,
            "reconciled", group=1),
    # the same again without any hint: nobody can tell whose it is, so a person decides
    Planned("chloe", "image", "a cat astronaut floating in space",
            "own-uuid+lost-answer+no-hints", Status.QUEUED, "needs review", group=2),
    Planned("alice", "image", "a cat astronaut floating in space",
            "own-uuid+lost-answer+no-hints", Status.QUEUED, "needs review", group=2),
    # started on the backend directly, never through the gateway: no job to give it to
    Planned("bob", "video", "a timelapse of a blooming rose", "own-uuid", None, "needs review",
            direct_to_backend=True),
)


def plan(jobs: int) -> list[Planned]:
    """The base plan, then honest extra jobs to reach `jobs` (never fewer than the base)."""
    planned = list(BASE_PLAN)
    extra = 0
    while len(planned) < jobs:
        user = USERS[extra % len(USERS)]
        kind = "video" if extra % 4 == 3 else "image"
        planned.append(
            Planned(user, kind, f"study #{extra + 1} of light on water", "honest", Status.COMPLETED,
                    "direct")
        )
        extra += 1
    return planned


@dataclasses.dataclass(slots=True)
class Tracked:
    planned: Planned
    job_id: str | None = None
    backend_id: str | None = None
    status: str = "-"
    progress: int = 0
