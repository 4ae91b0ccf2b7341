"""Requests the node sends on an association it accepted, answered while its reactor keeps serving the peer.

pynetdicom's ``send_*()`` pause the association's reactor and take the next message of the DIMSE queue as
their reply.  On an association the node accepted, the peer may send a request at any moment: a Storage
Commitment requestor sends its next N-ACTION as soon as the previous one is answered, while the node's
N-EVENT-REPORT for the first is on its way.  The paused reactor leaves that N-ACTION in the queue, the
waiting ``send_n_event_report`` takes it as its reply, finds it invalid and aborts the association
(pynetdicom 3.0.4): the second request is never answered.

So the DIMSE queue of dcbnode's associations (:class:`~.provider.NodeDIMSE`) is a :class:`ReplyRouter`:
a reply that a thread awaits (its class and Message ID Being Responded To registered with
:meth:`ReplyRouter.expect`) goes to that thread; every other message (the peer's requests, replies to
pynetdicom's own ``send_*()``) is queued for the reactor as before.  :func:`send_request` sends a request
and waits for its reply that way, without pausing the reactor: the peer's requests are served meanwhile.
"""

from __future__ import annotations

import itertools
import logging
import queue
import time
from typing import Any

__all__ = ["ReplyRouter", "send_request"]

log = logging.getLogger("dcbnode.wire")

#: How often a thread waiting for a reply checks that the association is still established (a release
#: answered by the reactor puts nothing in the queue to wake it).
_CHECK_SECONDS = 0.2
#: Replies that came too late are dropped, up to this many remembered request ids.
_LATE_LIMIT = 64


class ReplyRouter(queue.Queue):  # type: ignore[type-arg]
    """pynetdicom's DIMSE message queue, handing awaited replies to the threads that wait for them.

    ``queue.Queue`` calls ``_put`` under its mutex, so the routing is atomic with every ``put``.
    """

    def _init(self, maxsize: int) -> None:
        super()._init(maxsize)
        self._awaited: dict[tuple[type, int], queue.SimpleQueue[Any]] = {}
        self._late: dict[tuple[type, int], None] = {}
        self._ids = itertools.count(1)

    def next_message_id(self) -> int:
        """A Message ID for a request of the node's (1 to 65535, then again from 1)."""
        return (next(self._ids) - 1) % 0xFFFF + 1

    def expect(self, request: Any) -> queue.SimpleQueue[Any]:
        """Where the reply to ``request`` (a DIMSE primitive with its MessageID set) will be put; ``None``
        is put there if the connection ends first."""
        key = (type(request), int(request.MessageID))
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        with self.mutex:
            self._awaited[key] = box
        return box

    def forget(self, request: Any) -> None:
        """Stop waiting for the reply to ``request``; if it comes later it is dropped (and logged)."""
        key = (type(request), int(request.MessageID))
        with self.mutex:
            if self._awaited.pop(key, None) is not None:
                self._late[key] = None
                while len(self._late) > _LATE_LIMIT:
                    del self._late[next(iter(self._late))]

    def _put(self, item: Any) -> None:
        _, primitive = item
        if primitive is None:  # pynetdicom's "the connection ended": for every waiting thread too
            for box in self._awaited.values():
                box.put(None)
        elif getattr(primitive, "MessageIDBeingRespondedTo", None) is not None:
            key = (type(primitive), int(primitive.MessageIDBeingRespondedTo))
            box = self._awaited.pop(key, None)
            if box is not None:
                box.put(primitive)
                return
            if key in self._late:
                del self._late[key]
                log.warning("a %s reply to message %d came after its wait ended; ignored",
                            type(primitive).__name__.replace("_", "-"), key[1])
                return
        super()._put(item)


def send_request(assoc: Any, request: Any, context_id: int, timeout: float | None) -> Any:
    """Send ``request`` (a DIMSE request primitive) on ``assoc``, one of dcbnode's associations, and return
    its reply primitive; ``None`` if none came within ``timeout`` seconds (``None``: no limit) or the
    association ended first.  The reactor is not paused: the peer's requests are served meanwhile."""
    router: ReplyRouter = assoc.dimse.msg_queue
    request.MessageID = router.next_message_id()
    box = router.expect(request)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        assoc.dimse.send_msg(request, context_id)
        while True:
            wait = _CHECK_SECONDS if deadline is None else min(_CHECK_SECONDS, deadline - time.monotonic())
            try:
                return box.get(timeout=max(wait, 0.0))
            except queue.Empty:
                if not assoc.is_established or (deadline is not None and time.monotonic() >= deadline):
                    return None
    finally:
        router.forget(request)
