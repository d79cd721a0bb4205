"""A simulated generator backend, for the demo and for integration tests."""

from __future__ import annotations

from gateway.simulator.backend import (
    MODES,
    ModeError,
    SentWebhook,
    SimulatedBackend,
    SimulatorConfig,
    parse_mix,
    parse_mode,
)

__all__ = [
    "MODES",
    "ModeError",
    "SentWebhook",
    "SimulatedBackend",
    "SimulatorConfig",
    "parse_mix",
    "parse_mode",
]
