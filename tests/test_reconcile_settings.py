"""The reconciler's settings: per-kind job timeouts and the dedupe retention."""

from __future__ import annotations

import pytest

from gateway.settings import Settings, SettingsError
from reconcile.runner import RunOptions


def test_defaults_are_15_minutes_for_images_60_for_videos_and_7_days_of_dedupe() -> None:
    s = Settings.from_env({})
    assert (s.job_timeout_image_seconds, s.job_timeout_video_seconds) == (900, 3600)
    assert s.dedupe_retention_seconds == 7 * 86400


def test_the_variables_are_read_and_reach_the_run_options() -> None:
    s = Settings.from_env({
        "JOB_TIMEOUT_IMAGE_SECONDS": "600",
        "JOB_TIMEOUT_VIDEO_SECONDS": "5400",
        "DEDUPE_RETENTION_SECONDS": "86400",
    })
    options = RunOptions.from_settings(s, dry_run=True)
    assert (options.image_timeout_seconds, options.video_timeout_seconds) == (600, 5400)
    assert options.retention_seconds == 86400
    assert options.dry_run


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("JOB_TIMEOUT_IMAGE_SECONDS", "soon"),
        ("JOB_TIMEOUT_IMAGE_SECONDS", "30"),
        ("JOB_TIMEOUT_VIDEO_SECONDS", "0"),
        ("DEDUPE_RETENTION_SECONDS", "60"),
        ("DEDUPE_RETENTION_SECONDS", "1.5"),
    ],
)
def test_a_malformed_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({variable: value})
    assert raised.value.variable == variable


def test_dedupe_records_must_outlive_the_signature_tolerance() -> None:
    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"WEBHOOK_TOLERANCE_SECONDS": "7200",
                           "DEDUPE_RETENTION_SECONDS": "3600"})
    assert raised.value.variable == "DEDUPE_RETENTION_SECONDS"
