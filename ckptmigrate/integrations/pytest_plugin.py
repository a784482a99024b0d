"""The pytest plugin (entry point ``pytest11``): a ``ckptmigrate_chain`` fixture that proves the
project's configured chain with its recorded fixtures, as ``ckptmigrate test`` does.

    def test_old_checkpoints_keep_working(ckptmigrate_chain):
        ckptmigrate_chain()          # or ckptmigrate_chain(migrations="pkg.migrations")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def ckptmigrate_chain() -> Callable[..., Any]:
    """:func:`ckptmigrate.testing.check_chain`, imported only when a test asks for it."""
    from ckptmigrate.testing import check_chain

    return check_chain
