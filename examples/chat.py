"""The demo "chat" WebSocket service behind the gateway (DESIGN §7, §3 ``services.chat``).

``GET /rooms/<room>`` upgrades to a WebSocket in that room. The user is whoever the
gateway says in ``X-User-Id`` (the verified token's ``sub``), else ``anonymous-<n>``.
A client sends text: a chat line, or JSON ``{"text": "..."}``. It receives JSON events:

- ``{"type": "welcome", "room", "user", "members"}`` once, to itself;
- ``{"type": "join" | "leave", "id", "room", "user", "members", "ts"}`` to the room;
- ``{"type": "message", "id", "room", "user", "text", "ts"}`` to the room, sender included;
- ``{"type": "error", "detail"}`` to itself, for a message it sent that was refused.

``id`` increases by one for every event of the process, so the order of a room is the
order of its ids; ``ts`` is UTC ISO 8601. The server pings a silent client every
``heartbeat`` seconds (no pong within half of that drops it) and closes a client that has
sent nothing for ``idle_timeout`` seconds with 1001 ``idle timeout``. Each client has a
send queue of ``send_queue`` events, written by its own task; a client that falls that far
behind is cut off (no close frame: it would wait behind all the client has not read), so a
slow reader never delays the rest of the room. ``GET /stats`` gives members per room;
``GET /`` is a page that joins a room through the gateway with a token.

Run it with ``python -m examples.chat --port 9003``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["CHAT", "PAGE", "USER_HEADER", "Chat", "ChatSettings", "Member", "create_app", "main"]

logger = logging.getLogger(__name__)

USER_HEADER = "X-User-Id"
_ROOM = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_USER = re.compile(r"^[^\x00-\x1f\x7f]{1,64}$")
_CLOSE_TIMEOUT = 2.0  # seconds a close handshake may take on shutdown before the connection is cut


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatSettings:
    heartbeat: float = 30.0  # seconds of silence before the server pings a client; pong due within half
    idle_timeout: float = 300.0  # seconds without a message from a client before it is closed with 1001
    send_queue: int = 256  # events waiting for one client; one more and the client is cut off
    max_text: int = 4096  # characters in one chat message; longer ones are refused with an error event


@dataclass(slots=True, eq=False)
class Member:
    """One connected client: its socket, its send queue and the task that drains it."""

    user: str
    room: str
    ws: web.WebSocketResponse[bool]
    transport: asyncio.Transport | None
    queue: asyncio.Queue[bytes]
    writer: asyncio.Task[None] | None = None
    cut: bool = False

    def offer(self, payload: bytes) -> None:
        """Queue one event without waiting; a client this far behind is cut off."""
        if self.cut:
            return
        try:
            self.queue.put_nowait(payload)
        except asyncio.QueueFull:
            self.cut = True
            logger.warning("cutting off %s in %s: %d events behind", self.user, self.room, self.queue.qsize())
            if self.transport is not None:
                self.transport.abort()

    async def write(self) -> None:
        with contextlib.suppress(ConnectionError):
            while True:
                await self.ws.send_frame(await self.queue.get(), WSMsgType.TEXT)


@dataclass(slots=True)
class Chat:
    """The rooms of one process; ``id`` is shared by every event of every room."""

    settings: ChatSettings
    clock: Callable[[], float] = time.time
    rooms: dict[str, set[Member]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    anonymous: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    events: int = 0  # events sent to clients, fan-out counted

    def join(self, member: Member) -> None:
        self.rooms.setdefault(member.room, set()).add(member)
        self.announce("join", member)

    def leave(self, member: Member) -> None:
        members = self.rooms.get(member.room)
        if members is None or member not in members:
            return
        members.discard(member)
        if members:
            self.announce("leave", member)
        else:
            del self.rooms[member.room]

    def announce(self, kind: str, member: Member) -> None:
        members = len(self.rooms.get(member.room, ()))
        self.broadcast(member.room, {"type": kind, "user": member.user, "members": members})

    def say(self, member: Member, text: str) -> None:
        self.broadcast(member.room, {"type": "message", "user": member.user, "text": text})

    def broadcast(self, room: str, event: dict[str, Any]) -> None:
        """Encode once, queue for everyone in the room; never waits on any client."""
        stamp = datetime.fromtimestamp(self.clock(), UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        event = {"type": event.pop("type"), "id": next(self.ids), "room": room, **event, "ts": stamp}
        payload = json.dumps(event, separators=(",", ":")).encode()
        members = self.rooms.get(room, ())
        self.events += len(members)
        for member in tuple(members):
            member.offer(payload)

    def stats(self) -> dict[str, Any]:
        rooms = {name: len(members) for name, members in sorted(self.rooms.items())}
        return {"rooms": rooms, "connections": sum(rooms.values()), "events_sent": self.events}


CHAT = web.AppKey("chat", Chat)


def create_app(settings: ChatSettings | None = None, *, clock: Callable[[], float] = time.time) -> web.Application:
    app = web.Application()
    app[CHAT] = Chat(settings or ChatSettings(), clock)
    app.on_shutdown.append(_close_everyone)
    app.router.add_get("/", page)
    app.router.add_get("/stats", stats)
    app.router.add_get("/health", health)
    app.router.add_get("/rooms/{room}", room)
    return app


async def page(request: web.Request) -> web.Response:
    return web.Response(text=PAGE, content_type="text/html")


async def stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[CHAT].stats())


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def room(request: web.Request) -> web.StreamResponse:
    """One client in one room, from the upgrade until either side closes."""
    name = request.match_info["room"]
    if not _ROOM.match(name):
        raise web.HTTPNotFound(text="a room name is 1-64 of A-Z a-z 0-9 _ . -\n")
    chat = request.app[CHAT]
    settings = chat.settings
    ws = web.WebSocketResponse(heartbeat=settings.heartbeat, max_msg_size=4 * settings.max_text + 64)
    if not ws.can_prepare(request).ok:
        raise web.HTTPBadRequest(text="connect with a WebSocket client\n")
    await ws.prepare(request)
    member = Member(_user(request, chat), name, ws, request.transport, asyncio.Queue(settings.send_queue))
    member.writer = asyncio.get_running_loop().create_task(member.write())
    member.offer(json.dumps({"type": "welcome", "room": name, "user": member.user,
                             "members": len(chat.rooms.get(name, ())) + 1}).encode())  # fmt: skip
    chat.join(member)
    try:
        await _converse(chat, member)
    finally:
        chat.leave(member)
        member.writer.cancel()
        await asyncio.gather(member.writer, return_exceptions=True)
        if not ws.closed:
            await ws.close()
    return ws


async def _converse(chat: Chat, member: Member) -> None:
    ws, idle = member.ws, chat.settings.idle_timeout
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(idle) as deadline:
            async for message in ws:
                deadline.reschedule(loop.time() + idle)
                if message.type is WSMsgType.TEXT:
                    text = _text(message.data)
                    if not text:
                        member.offer(_error('send a chat line, or JSON {"text": "..."}'))
                    elif len(text) > chat.settings.max_text:
                        member.offer(_error(f"a message is at most {chat.settings.max_text} characters"))
                    else:
                        chat.say(member, text)
                elif message.type is WSMsgType.BINARY:
                    await ws.close(code=WSCloseCode.UNSUPPORTED_DATA, message=b"text only")
    except TimeoutError:
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"idle timeout")


def _text(data: str) -> str:
    if data.startswith("{"):
        with contextlib.suppress(ValueError):
            parsed = json.loads(data)
            if isinstance(parsed, dict) and isinstance(parsed.get("text"), str):
                return str(parsed["text"]).strip()
    return data.strip()


def _error(detail: str) -> bytes:
    return json.dumps({"type": "error", "detail": detail}).encode()


def _user(request: web.Request, chat: Chat) -> str:
    """``X-User-Id`` as the gateway forwarded it (from a verified token), else anonymous-<n>."""
    user = request.headers.get(USER_HEADER, "").strip()
    return user if _USER.match(user) else f"anonymous-{next(chat.anonymous)}"


async def _close_everyone(app: web.Application) -> None:
    members = [member for members in app[CHAT].rooms.values() for member in members]
    if members:
        await asyncio.gather(*(_close(member) for member in members))


async def _close(member: Member) -> None:
    try:
        async with asyncio.timeout(_CLOSE_TIMEOUT):
            await member.ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")
    except (TimeoutError, ConnectionError):
        if member.transport is not None:
            member.transport.abort()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.chat", description="The demo chat WebSocket service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9003)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, loop=_new_loop())


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop when it is installed, as the gateway does."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>chat</title>
<style>
  body { font: 15px system-ui, sans-serif; max-width: 48rem; margin: 2rem auto; padding: 0 1rem; }
  fieldset { display: grid; grid-template-columns: 7rem 1fr; gap: .4rem; border: 1px solid #ccc; }
  #log { border: 1px solid #ccc; height: 22rem; overflow-y: auto; padding: .5rem; margin: .8rem 0; }
  #log p { margin: .15rem 0; } .notice { color: #777; } .error { color: #b00; } .user { font-weight: 600; }
  form.say { display: flex; gap: .4rem; } form.say input { flex: 1; }
</style>
</head>
<body>
<h1>chat <small id="status" class="notice">disconnected</small></h1>
<form id="join"><fieldset>
  <label for="gateway">gateway</label><input id="gateway" required>
  <label for="room">room</label><input id="room" value="lobby" pattern="[A-Za-z0-9_.\\-]{1,64}" required>
  <label for="token">token</label><input id="token" placeholder="gateway token --sub alice">
  <span></span><button>join</button>
</fieldset></form>
<div id="log"></div>
<form class="say" id="say"><input id="text" autocomplete="off" placeholder="say something"><button>send</button></form>
<script>
const $ = (id) => document.getElementById(id);
const viaGateway = location.pathname.startsWith("/api/chat");
$("gateway").value = (viaGateway ? location.origin : "http://127.0.0.1:8080").replace(/^http/, "ws");
let socket = null;

function line(text, cls, user) {
  const p = document.createElement("p");
  if (cls) p.className = cls;
  if (user) {
    const b = document.createElement("span");
    b.className = "user";
    b.textContent = user + ": ";
    p.append(b);
  }
  p.append(text);
  $("log").append(p);
  $("log").scrollTop = $("log").scrollHeight;
}

$("join").onsubmit = (event) => {
  event.preventDefault();
  if (socket) socket.close(1000, "switching rooms");
  const base = $("gateway").value.replace(/\\/$/, "");
  const url = new URL(base + "/api/chat/rooms/" + encodeURIComponent($("room").value));
  if ($("token").value.trim()) url.searchParams.set("access_token", $("token").value.trim());
  const ws = socket = new WebSocket(url);
  $("status").textContent = "connecting";
  ws.onopen = () => { $("status").textContent = "in " + $("room").value; };
  ws.onmessage = (m) => {
    const e = JSON.parse(m.data);
    if (e.type === "message") line(e.text, "", e.user);
    else if (e.type === "welcome") line(`you are ${e.user} in ${e.room}`, "notice");
    else if (e.type === "join" || e.type === "leave") line(`${e.user} ${e.type}s (${e.members} here)`, "notice");
    else if (e.type === "error") line(e.detail, "error");
  };
  ws.onclose = (e) => {
    if (socket === ws) { socket = null; $("status").textContent = "disconnected"; }
    line(`closed ${e.code}${e.reason ? ": " + e.reason : ""}` + (e.code === 1006 ? " (refused? check the token)" : ""),
         "notice");
  };
};

$("say").onsubmit = (event) => {
  event.preventDefault();
  if (socket && socket.readyState === WebSocket.OPEN && $("text").value.trim()) {
    socket.send(JSON.stringify({text: $("text").value}));
    $("text").value = "";
  }
};
</script>
</body>
</html>
"""


if __name__ == "__main__":
    main()
