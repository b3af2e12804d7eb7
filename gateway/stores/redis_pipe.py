"""The connection that carries a :class:`~gateway.stores.redis.RedisStore`'s batches (one Redis).

Each batch is written as soon as it is handed over, without waiting for the replies to the
batches before it; one reader task per connection takes the replies off the socket in order
and gives each batch its own, through the callback it came with. A batch then costs a write
and a callback: no task, no pool checkout, no timeout context of its own. Those, taken for
every batch from redis-py's pool, were most of what a Redis command cost the gateway
(measured: about 40k instructions for one more awaited GET in a cache miss).

What is still redis-py's: connecting, AUTH, TLS, SELECT (the connection comes from the
client's pool and is kept out of it), and reading replies with hiredis's parser. With any
other parser the reader goes through ``connection.read_response()``.

Failures, each ending with the callback called once:

- **Timeout.** A timer follows the oldest unanswered batch. When a batch has had no complete
  answer within the timeout, the connection is dropped and every batch on it fails: their
  replies would arrive on a socket nobody reads any more. No late reply can reach a later call.
- **The connection breaks** (Redis restarted, ``CLIENT KILL``, an idle timeout). The reader
  sees it at once, even when no batch is under way. A batch that had no reply yet is sent
  once more on a new connection, as redis-py's own pipeline does; one that had some
  replies fails (part of it ran).
- **Connecting fails** (Redis down, refused, too slow). The batches waiting for the connection
  fail; the next batch tries to connect again.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import hiredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError

from middleware.base import StoreUnavailable

__all__ = ("Command", "Done", "Pipe")

logger = logging.getLogger(__name__)

Command = tuple[str | bytes | int | float, ...] | bytes  # one raw command: name and arguments, or already RESP
Done = Callable[[list[Any] | StoreUnavailable], None]  # a batch's replies (errors as values), or why it failed
Connect = Callable[[], Awaitable[AbstractConnection]]  # a connected connection, or StoreUnavailable
Release = Callable[[AbstractConnection], Awaitable[None]]  # give it back, broken or closed


@dataclass(slots=True)
class _Batch:
    commands: list[Command]
    done: Done
    deadline: float  # loop time by which every reply must have come
    replies: list[Any] = field(default_factory=list)
    resent: bool = False


class Pipe:
    """Batches of raw commands written back to back on one connection, replies read in order.

    ``connect`` gives a connected redis-py connection (its failures are StoreUnavailable);
    ``release`` takes one back when it is dropped. ``timeout`` bounds each batch, from
    :meth:`send` to its last reply, connecting included.
    """

    def __init__(self, connect: Connect, release: Release, *, timeout: float) -> None:
        self._connect = connect
        self._release = release
        self._timeout = timeout
        self._connection: AbstractConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._waiting: list[_Batch] = []  # handed over while there was no connection
        self._sent: collections.deque[_Batch] = collections.deque()  # written, in order, awaiting replies
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # connections being closed
        self._closed = False

    def send(self, commands: list[Command], done: Done) -> None:
        """Send ``commands`` (in order, pipelined); ``done`` gets one reply per command, an error
        reply as a :class:`ResponseError` value, or the StoreUnavailable that stopped them."""
        loop = asyncio.get_running_loop()
        batch = _Batch(commands, done, loop.time() + self._timeout)
        if self._closed:
            done(StoreUnavailable("redis pipeline: the store is closed"))
        elif self._connection is not None:
            self._write(self._connection, [batch])
        else:
            self._await_connection(batch)

    async def aclose(self) -> None:
        """Fail what is under way and give the connection back."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        self._drop(StoreUnavailable("redis pipeline: the store is closed"), resend=False)
        if self._tasks:
            await asyncio.wait(self._tasks)

    # -- writing -----------------------------------------------------------------------------

    def _write(self, connection: AbstractConnection, batches: list[_Batch]) -> None:
        writer = connection._writer
        if writer is None or writer.is_closing():  # broken, and the reader has not run yet to see it
            self._drop(StoreUnavailable("redis pipeline: connection closed"), resend=True)
            for batch in batches:
                self._await_connection(batch)
            return
        packed = [c if isinstance(c, bytes) else hiredis.pack_command(c) for batch in batches for c in batch.commands]  # type: ignore[arg-type]
        writer.write(b"".join(packed))
        self._sent.extend(batches)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_at(self._sent[0].deadline, self._check_deadline)

    def _check_deadline(self) -> None:
        self._timer = None
        if not self._sent:
            return
        head = self._sent[0].deadline
        loop = asyncio.get_running_loop()
        if loop.time() < head:  # the batch this timer was for has its answer: follow the next one
            self._timer = loop.call_at(head, self._check_deadline)
            return
        self._drop(StoreUnavailable(f"redis pipeline: no answer within {self._timeout * 1000:g}ms"), resend=False)

    # -- connecting --------------------------------------------------------------------------

    def _await_connection(self, batch: _Batch) -> None:
        self._waiting.append(batch)
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())

    async def _open(self) -> None:
        try:
            connection = await self._connect()
        except StoreUnavailable as exc:
            waiting, self._waiting = self._waiting, []
            for batch in waiting:
                batch.done(exc)
            return
        except asyncio.CancelledError:  # closed meanwhile
            waiting, self._waiting = self._waiting, []
            for batch in waiting:
                batch.done(StoreUnavailable("redis pipeline: the store is closed"))
            raise
        finally:
            self._connecting = None
        self._connection = connection
        self._reader = asyncio.get_running_loop().create_task(self._read(connection))
        waiting, self._waiting = self._waiting, []
        if waiting:
            self._write(connection, waiting)

    # -- reading -----------------------------------------------------------------------------

    async def _read(self, connection: AbstractConnection) -> None:
        parser = connection._parser
        try:
            if isinstance(parser, _AsyncHiredisParser):  # redis-py's default with hiredis installed
                reader = cast("hiredis.Reader", parser._reader)
                while True:
                    reply = reader.gets()
                    while reply is NOT_ENOUGH_DATA:
                        await parser.read_from_socket()  # type: ignore[no-untyped-call]
                        reply = reader.gets()
                    if isinstance(reply, RedisConnectionError):  # e.g. LOADING: a Redis that is starting
                        raise reply
                    self._deliver(reply)
            else:
                while True:
                    try:
                        reply = await connection.read_response()
                    except ResponseError as exc:
                        reply = exc
                    self._deliver(reply)
        except (RedisError, OSError, EOFError) as exc:
            if connection is self._connection:
                self._drop(StoreUnavailable(f"redis pipeline: {type(exc).__name__}: {exc}"), resend=True)

    def _deliver(self, reply: Any) -> None:
        if not self._sent:  # a reply nobody asked for: the connection cannot be trusted
            raise RedisConnectionError("a reply came that no command was waiting for")
        batch = self._sent[0]
        batch.replies.append(reply)
        if len(batch.replies) == len(batch.commands):
            self._sent.popleft()
            batch.done(batch.replies)

    # -- dropping a connection ---------------------------------------------------------------

    def _drop(self, why: StoreUnavailable, *, resend: bool) -> None:
        """Stop using the connection; its unanswered batches fail, or (``resend``, a broken
        connection) go once more on a new one when none of their commands was answered."""
        connection, self._connection = self._connection, None
        reader, self._reader = self._reader, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sent, self._sent = self._sent, collections.deque()
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if connection is not None:
            task = asyncio.get_running_loop().create_task(self._close(connection, reader))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if not resend or self._closed:
            for batch in sent:
                batch.done(why)
            return
        logger.debug("%s: sending the unanswered commands again on a new connection", why)
        for batch in sent:
            if batch.replies or batch.resent:
                batch.done(why)
            else:
                batch.resent = True
                self._await_connection(batch)

    async def _close(self, connection: AbstractConnection, reader: asyncio.Task[None] | None) -> None:
        if reader is not None and reader is not asyncio.current_task():
            await asyncio.wait({reader})
        try:
            await connection.disconnect(nowait=True)
        except (RedisError, OSError) as exc:
            logger.debug("redis pipeline: closing a connection: %s", exc)
        await self._release(connection)
