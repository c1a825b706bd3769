"""Fixtures of the compare tests."""

from __future__ import annotations

import pytest
from compare_helpers import registry_with_test_policy


@pytest.fixture(scope="session")
def test_registry():
    return registry_with_test_policy()
