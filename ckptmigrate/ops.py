"""The operations a migration script calls on the checkpoint it receives."""

from __future__ import annotations


class Operations:
    def __init__(self) -> None:
        pass
