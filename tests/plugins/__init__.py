"""Test-only plugins loaded by node subprocesses through the ``plugins`` config key."""
