"""The two kinds of job and what differs between them."""

from __future__ import annotations

import enum


class Kind(enum.StrEnum):
    IMAGE = "image"
    VIDEO = "video"

    @property
    def plural(self) -> str:
        """The path segment: /api/images, /api/videos."""
        return f"{self.value}s"

    @property
    def label(self) -> str:
        """The notification prefix: IMAGE_COMPLETED, VIDEO_FAILED."""
        return self.value.upper()

    @classmethod
    def from_plural(cls, segment: str) -> Kind:
        return cls(segment.removesuffix("s"))
