"""Which offsets of a partition may be committed: those below the first without a final outcome.

Records are taken in offset order and finish in any order; the commit position is the lowest
offset still pending (or one past the last taken, when every record has finished), so a crash
after a commit never loses an event, and one before it only redelivers (which dedup absorbs).
"""

from __future__ import annotations

import time
from collections import deque


class PartitionProgress:
    """One assigned partition's taken offsets (ascending) and which of them are final.

    Each take of an offset has a token (unique to the transport): an outcome counts only for
    the take it belongs to, not for one the partition was sought back past since.
    """

    def __init__(self) -> None:
        self.taken: deque[int] = deque()
        self.tokens: dict[int, int] = {}  # taken offset -> its current take
        self.done: set[int] = set()
        self.next: int | None = None  # one past the last offset that left ``taken`` final
        self.committed: int | None = None  # the last position committed
        self.moved = time.monotonic()  # when it last committed, or had nothing to finish

    @property
    def pending(self) -> int:
        return len(self.taken) - len(self.done)

    def take(self, offset: int, token: int = 0) -> None:
        self.taken.append(offset)
        self.tokens[offset] = token

    def current(self, offset: int, token: int) -> bool:
        """Whether ``offset`` is taken, by the take of ``token`` (not sought back past)."""
        return self.tokens.get(offset) == token

    def finish(self, offset: int) -> None:
        self.done.add(offset)

    def position(self) -> int | None:
        """The offset to commit: every record before it is final (None: nothing taken yet)."""
        while self.taken and self.taken[0] in self.done:
            self.done.discard(self.taken[0])
            del self.tokens[self.taken[0]]
            self.next = self.taken.popleft() + 1
        return self.taken[0] if self.taken else self.next

    def rewind(self, offset: int) -> None:
        """Forget ``offset`` and every later record: they will be fetched (and taken) again."""
        while self.taken and self.taken[-1] >= offset:
            last = self.taken.pop()
            self.done.discard(last)
            del self.tokens[last]

    def to_commit(self) -> int | None:
        """The position if it moved past the last commit, else None."""
        position = self.position()
        if position is None or (self.committed is not None and position <= self.committed):
            return None
        return position
