"""A worker's message loop: each message from the engine is started on this thread and answered, in order, by a
sender thread that waits for its work, so the worker reads and dispatches the next step while the device still runs
the current one."""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable

from runner.workers.messages import Message, Stop
from runner.workers.timeline import Timeline

Reply = Callable[[], Any]  # waits for what a message started and returns the reply's value


class WorkerLost(BaseException):
    """Raised out of serve() (which turns an Exception into an error reply and serves on): this worker's device
    state cannot be recovered, so the process ends and the engine replaces it."""


@dataclasses.dataclass(frozen=True)
class Event:
    """What a worker sends unasked (the decode loop's events), as ("event", value), in order with the replies."""
    value: Any


def serve(conn: Any, start: Callable[[Message], Reply | None], timeline: Timeline | None = None,
          outbox: "queue.Queue | None" = None) -> None:
    """Replies to each message, in order, with ("ok", value) or ("error", why) until Stop or until the engine
    goes away; a message whose `start` returns None gets no reply. `outbox`: the queue the reply thread sends
    from, where the worker also puts its `Event`s.

    `start` begins a message's work and returns how to wait for it; a sender thread waits and replies, so this
    thread reads and dispatches the next step while the device still runs the current one (the engine sends
    the next decode step before the current one's reply: the device never waits for that round trip).
    `timeline` records when each message was read, dispatched, ready and answered (see runner.workers.timeline)."""
    timeline = timeline if timeline is not None else Timeline("", directory="")
    replies: queue.Queue[tuple[Reply | Event, dict[str, Any] | None] | None] = outbox or queue.Queue()
    sender = threading.Thread(target=_send_replies, args=(conn, replies), name="worker-replies", daemon=True)
    sender.start()
    try:
        while True:
            try:
                message = conn.recv()
            except EOFError:
                return  # the engine went away
            if isinstance(message, Stop):
                return
            record = timeline.read(message)
            try:
                reply = start(message)
            except Exception as e:  # noqa: BLE001 - a failed step fails its requests, the worker keeps serving
                reply = _raise(e)
            if reply is None:
                continue
            timeline.stamp(record, "dispatched")
            replies.put((reply, record))
    finally:
        replies.put(None)
        sender.join()


def _send_replies(conn: Any, replies: "queue.Queue[tuple[Reply | Event, dict[str, Any] | None] | None]") -> None:
    while (item := replies.get()) is not None:
        reply, record = item
        if isinstance(reply, Event):
            try:
                conn.send(("event", reply.value))
            except OSError:
                return
            continue
        try:
            value = ("ok", reply())
        except Exception as e:  # noqa: BLE001
            value = ("error", f"{type(e).__name__}: {e}")
        Timeline.stamp(record, "ready")
        try:
            conn.send(value)
        except OSError:
            return  # the engine went away
        Timeline.stamp(record, "sent")


def _raise(error: Exception) -> Reply:
    def reply() -> Any:
        raise error
    return reply
