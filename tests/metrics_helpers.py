"""Reading a /metrics scrape the way Prometheus does: prometheus_client's own parser."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

Labels = dict[str, str]

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool is not installed (Debian package 'prometheus'; .ci/run installs it)",
)


class Scrape:
    """One parsed exposition: families by name and every sample's value."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample: str, **labels: str) -> float | None:
        """The value of the one sample with exactly these labels, None when absent."""
        for family in self.families.values():
            for s in family.samples:
                if s.name == sample and s.labels == labels:
                    return float(s.value)
        return None

    def get(self, sample: str, **labels: str) -> float:
        """Like value(), treating an absent sample as 0 (a labelled child not yet created)."""
        found = self.value(sample, **labels)
        return 0.0 if found is None else found

    def label_values(self, sample: str, label: str) -> set[str]:
        return {
            s.labels[label]
            for family in self.families.values()
            for s in family.samples
            if s.name == sample and label in s.labels
        }

    def sample_names(self) -> set[str]:
        """Every series name a PromQL expression may use, whether or not it has samples yet."""
        names: set[str] = set()
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum"),
            "gauge": ("",),
        }
        for family in self.families.values():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
            names.update(s.name for s in family.samples)
        return names


def promtool_check_metrics(text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
