"""When a legacy row is the old webhook's damage, and how its files and status are read."""

from __future__ import annotations

import pytest

from gateway.jobs.kinds import Kind
from gateway.jobs.legacy import Evidence, file_record, misattributed, status_of
from gateway.jobs.state import Status

UUID = "c76c36ee-838d-4ecb-94ed-37018032c9fd"
CUID = "cmh3h35780001gg0lwosk26du"


def evidence(**clues: bool) -> Evidence:
    base = {"on_first_user": True, "backend_direct_notification": False,
            "prompt_is_description": False, "prompt_is_placeholder": False}
    return Evidence(**{**base, **clues})


@pytest.mark.parametrize("clue", ["backend_direct_notification", "prompt_is_description",
                                  "prompt_is_placeholder"])
def test_a_backend_id_on_the_first_user_with_a_webhook_clue_is_misattributed(clue: str) -> None:
    assert misattributed(UUID, evidence(**{clue: True}))


def test_one_clue_alone_is_not_enough() -> None:
    # a backend id on the first user whose prompt and notifications say nothing of the webhook
    assert not misattributed(UUID, evidence())
    # the webhook's clues on another user's row, or on an app id
    assert not misattributed(UUID, evidence(on_first_user=False,
                                            backend_direct_notification=True))
    assert not misattributed(CUID, evidence(backend_direct_notification=True,
                                            prompt_is_description=True))


def test_processing_reads_as_queued_and_unknown_statuses_are_refused() -> None:
    assert status_of("PROCESSING") is Status.QUEUED
    assert status_of("COMPLETED") is Status.COMPLETED
    assert status_of("QUEUED") is None
    assert status_of("ARCHIVED") is None


def test_a_files_size_comes_from_its_row_else_from_its_aspect_ratio() -> None:
    row = {"width": None, "height": None, "aspectRatio": "1024x768", "metadata": None,
           "fileUrl": "u", "s3Key": "k", "filename": "f", "format": "PNG", "fileSize": 1}
    made = file_record(Kind.IMAGE, row)
    assert not isinstance(made, str)
    assert (made.width, made.height) == (1024, 768)
    assert isinstance(file_record(Kind.IMAGE, {**row, "aspectRatio": "16:9"}), str)
    kept = file_record(Kind.IMAGE, {**row, "width": 10, "height": 20, "aspectRatio": None})
    assert not isinstance(kept, str)
    assert (kept.width, kept.height) == (10, 20)
