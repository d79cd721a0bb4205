"""Benchmarks of the gateway, each beside this machine's limit measured in the same run."""

# the application first: gateway.store imported on its own meets a cycle through gateway.keys
import gateway.app  # noqa: F401
