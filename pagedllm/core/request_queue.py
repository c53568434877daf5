"""RequestQueue: the scheduling policy, as the waiting queue's order and the preemption victim choice.

The scheduler picks one queue class at construction (``make_request_queue``) and never
compares policy names afterwards. Both queues hold waiting requests in the order they
are admitted; ``pick_victim`` chooses which running request to preempt when the KV cache
runs out of blocks.

    FCFSRequestQueue      order of arrival; preempted and forked requests go to the front;
                          victim: the newest running request (the last one admitted)
    PriorityRequestQueue  sorted by (priority, arrival_time), lower first, stable among
                          equals (front or back does not matter); victim: the running
                          request with the highest (priority, arrival_time)
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator

from pagedllm.core.request import Request


class RequestQueue(ABC):
    """Waiting requests in the order the policy admits them, kept in ``self._queue`` (a sequence in
    admission order) by each implementation."""

    _queue: deque[Request] | list[Request]

    @abstractmethod
    def add(self, request: Request) -> None:
        """Queue a new request."""

    @abstractmethod
    def prepend(self, request: Request) -> None:
        """Queue a request that should run before newly arrived ones (preempted, forked)."""

    @abstractmethod
    def peek(self) -> Request:
        """The request to admit next (IndexError when empty)."""

    @abstractmethod
    def pop(self) -> Request:
        """Remove and return the request to admit next."""

    def remove(self, request: Request) -> None:
        """Remove a queued request (ValueError if it is not queued)."""
        self._queue.remove(request)

    def __iter__(self) -> Iterator[Request]:
        """Queued requests in admission order."""
        return iter(self._queue)

    def __len__(self) -> int:
        """Number of queued requests (also the queue's truth value)."""
        return len(self._queue)

    @staticmethod
    @abstractmethod
    def pick_victim(running: list[Request]) -> Request:
        """The running request to preempt when blocks run out (`running` is in admission order)."""


class FCFSRequestQueue(RequestQueue):
    """First come, first served; preempted and forked requests go back to the front."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def prepend(self, request: Request) -> None:
        self._queue.appendleft(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.popleft()

    @staticmethod
    def pick_victim(running: list[Request]) -> Request:
        return running[-1]


def _priority_key(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class PriorityRequestQueue(RequestQueue):
    """Sorted by (priority, arrival_time), lower values first; equal keys keep insertion order.

    A plain list kept sorted with bisect: insertion is O(log n) comparisons plus a memmove,
    and the head is list[0] (popping it is a memmove too, cheap at any realistic queue length)."""

    def __init__(self) -> None:
        self._queue: list[Request] = []

    def add(self, request: Request) -> None:
        # insort_right: after every request with an equal key, so equal keys stay first in, first out.
        bisect.insort_right(self._queue, request, key=_priority_key)

    def prepend(self, request: Request) -> None:
        # The key alone decides the position: a preempted request is not favoured over its peers.
        self.add(request)

    def peek(self) -> Request:
        return self._queue[0]

    def pop(self) -> Request:
        return self._queue.pop(0)

    @staticmethod
    def pick_victim(running: list[Request]) -> Request:
        return max(running, key=_priority_key)


_POLICIES: dict[str, type[RequestQueue]] = {
    "fcfs": FCFSRequestQueue,
    "priority": PriorityRequestQueue,
}


def make_request_queue(policy: str) -> RequestQueue:
    """The waiting queue for a scheduling policy name ("fcfs" or "priority")."""
    if policy not in _POLICIES:
        raise ValueError(f"policy must be one of {sorted(_POLICIES)}, got {policy!r}")
    return _POLICIES[policy]()
