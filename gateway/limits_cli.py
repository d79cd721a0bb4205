"""`sorami-gateway limits set|show|reset --user ID`: one user's limits on creating jobs,
stored in PostgreSQL and in force from the next request on every replica."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
from typing import Any

from gateway.errors import GatewayError
from gateway.jobs.kinds import Kind
from gateway.jobs.limits import Override
from gateway.settings import Settings
from gateway.store import Database
from gateway.store import limits as store_limits
from gateway.store.migrations import is_current

# the flag of each override field, and the setting whose default it replaces
_FIELDS = {
    "active_images": ("--active-images", "USER_MAX_ACTIVE_IMAGE_JOBS"),
    "active_videos": ("--active-videos", "USER_MAX_ACTIVE_VIDEO_JOBS"),
    "images_per_hour": ("--images-per-hour", "USER_MAX_IMAGE_JOBS_PER_HOUR"),
    "videos_per_hour": ("--videos-per-hour", "USER_MAX_VIDEO_JOBS_PER_HOUR"),
}


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a whole number, 0 or more (0: off), not {text!r}")
    return value


def add_parser(commands: Any) -> None:
    limits = commands.add_parser("limits", help="one user's limits on creating jobs")
    verbs = limits.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, what in (("set", "override some of the user's limits (the others stay)"),
                       ("show", "the user's limits in force and where each comes from"),
                       ("reset", "remove the user's override: the defaults apply again")):
        sub = verbs.add_parser(verb, help=what)
        sub.add_argument("--user", required=True, help="the user id (the token's sub)")
        if verb == "show":
            continue
        sub.add_argument("--by", default=None,
                         help="who makes the change, recorded (default: the login name)")
        if verb == "set":
            for field, (flag, setting) in _FIELDS.items():
                sub.add_argument(flag, dest=field, type=_count, metavar="N",
                                 help=f"instead of {setting} (0: off)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_run(settings, args))


async def _run(settings: Settings, args: argparse.Namespace) -> int:
    assert settings.database_url is not None  # embedded.resolved gave one
    db = await Database.open(settings.database_url.reveal(), min_size=1, max_size=1)
    try:
        async with db.connection() as conn:
            if not await is_current(conn):
                raise GatewayError(
                    "the database schema is not current: run `sorami-gateway migrate`")
            if args.verb == "set":
                changes = Override(**{f: getattr(args, f) for f in _FIELDS})
                if changes == Override():
                    raise GatewayError("limits set: give at least one of "
                                       + ", ".join(flag for flag, _ in _FIELDS.values()))
                await store_limits.set_override(conn, args.user, changes, _who(args))
            elif args.verb == "reset" and not await store_limits.reset_override(
                conn, args.user, _who(args)
            ):
                print(f"user {args.user} had no override")
            stored = await store_limits.get_override(conn, args.user)
    finally:
        await db.close()
    _print(settings, args.user, stored)
    return 0


def _who(args: argparse.Namespace) -> str:
    by: str | None = args.by
    return by or getpass.getuser()


def _print(settings: Settings, user_id: str, stored: store_limits.StoredOverride | None) -> None:
    defaults = {
        "active_images": settings.user_limits(Kind.IMAGE).active,
        "active_videos": settings.user_limits(Kind.VIDEO).active,
        "images_per_hour": settings.user_limits(Kind.IMAGE).per_hour,
        "videos_per_hour": settings.user_limits(Kind.VIDEO).per_hour,
    }
    override = dataclasses.asdict(stored.override) if stored else {}
    print(f"user {user_id}")
    for field, (_, setting) in _FIELDS.items():
        value = override.get(field)
        shown, source = (defaults[field], f"default {setting}") if value is None \
            else (value, "override")
        print(f"  {field:<16} {shown if shown else 'off':>6}  ({source})")
    if stored is not None:
        print(f"  set by {stored.set_by} at {stored.set_at.isoformat(timespec='seconds')}")
