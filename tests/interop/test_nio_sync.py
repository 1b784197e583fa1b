"""/sync interop: matrix-nio's own sync machinery against a real Salon server.

Every client does an initial ``sync(full_state=True)``; afterwards a background
``SyncLoop`` keeps calling ``AsyncClient.sync(timeout=...)``, which tracks
``next_batch`` itself and applies each response to nio's state (``rooms``,
``invited_rooms``, ``MatrixRoom`` attributes) and runs the registered callbacks.
The assertions read nio's objects, not raw JSON. Each test registers its own
users with unique names and uses its own room.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

import pytest
from nio import (
    JoinResponse,
    LoginResponse,
    ReceiptEvent,
    RoomCreateResponse,
    RoomInviteResponse,
    RoomKickResponse,
    RoomMemberEvent,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomReadMarkersResponse,
    RoomSendResponse,
    RoomTypingResponse,
    SyncError,
    SyncResponse,
    TypingNoticeEvent,
    UpdateReceiptMarkerResponse,
)

from helpers import REQUEST_TIMEOUT, describe, expect_error, expect_ok

# Long-poll timeout of the background loops (ms): short enough that a loop is
# never stuck long in one request, long enough to exercise the long-poll path.
LOOP_POLL_MS = 5_000
# Bound on one background sync call (nio itself gives up at poll + 15 s).
LOOP_CALL_TIMEOUT = LOOP_POLL_MS / 1000 + REQUEST_TIMEOUT + 5
# How long a test waits for something to show up through sync.
WAIT_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0

# The long-poll wake-up test.
LONG_POLL_MS = 20_000
BLOCKED_CHECK_S = 1.0
MAX_WAKE_LATENCY_S = 2.0


# --------------------------------------------------------------------------
# sync machinery
# --------------------------------------------------------------------------


class SyncLoop:
    """``AsyncClient.sync(timeout=...)`` over and over in a background task.

    nio passes ``since=client.next_batch`` itself and applies every response
    (client state and callbacks) before ``sync()`` returns; the loop then keeps
    the raw ``SyncResponse`` (needed for ``rooms.leave``, which nio does not
    apply to its state) and wakes anyone waiting in ``wait_until``.
    Any error response ends the loop, and waiters see that failure at once.
    """

    def __init__(self, client, name: str, poll_ms: int = LOOP_POLL_MS) -> None:
        self.client = client
        self.name = name
        self.poll_ms = poll_ms
        self.responses: list[SyncResponse] = []
        self._cond = asyncio.Condition()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        assert self.client.next_batch, f"{self.name}: do the initial sync before starting the loop"
        self._task = asyncio.create_task(self._run(), name=f"sync-loop-{self.name}")

    async def _run(self) -> None:
        try:
            while True:
                resp = await asyncio.wait_for(
                    self.client.sync(timeout=self.poll_ms), LOOP_CALL_TIMEOUT
                )
                assert isinstance(resp, SyncResponse), (
                    f"{self.name}: background sync failed: {describe(resp)}"
                )
                assert resp.next_batch, f"{self.name}: sync response without next_batch"
                async with self._cond:
                    self.responses.append(resp)
                    self._cond.notify_all()
        finally:
            # Wake the waiters whether the loop was cancelled or failed.
            async with self._cond:
                self._cond.notify_all()

    def _dead(self) -> bool:
        return self._task is None or self._task.done()

    def _raise_if_dead(self, what: str) -> None:
        assert self._task is not None, f"{self.name}: loop never started"
        if not self._task.done():
            return
        if self._task.cancelled():
            pytest.fail(f"{self.name}: sync loop was cancelled while waiting for {what}")
        exc = self._task.exception()
        if exc is not None:
            raise AssertionError(
                f"{self.name}: sync loop died while waiting for {what}: {exc!r}"
            ) from exc
        pytest.fail(f"{self.name}: sync loop ended while waiting for {what}")

    async def wait_until(
        self, predicate: Callable[[], bool], what: str, timeout: float = WAIT_TIMEOUT
    ) -> None:
        """Return once ``predicate()`` holds (checked now and after every sync)."""

        async def wait() -> None:
            async with self._cond:
                await self._cond.wait_for(lambda: predicate() or self._dead())

        try:
            await asyncio.wait_for(wait(), timeout)
            timed_out = False
        except TimeoutError:
            timed_out = True
        if timed_out:
            pytest.fail(
                f"{self.name}: {len(self.responses)} syncs so far, none within "
                f"{timeout:.0f}s showed {what}"
            )
        if not predicate():
            self._raise_if_dead(what)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_TIMEOUT)
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a failure was already reported to the waiters


@pytest.fixture
async def sync_loop(client_factory):
    """``sync_loop(user)`` -> a started SyncLoop; all are stopped afterwards.

    Depends on client_factory so that the loops stop before the clients close.
    """
    loops: list[SyncLoop] = []

    def start(user, name: str | None = None) -> SyncLoop:
        loop = SyncLoop(user.client, name or user.localpart)
        loop.start()
        loops.append(loop)
        return loop

    yield start
    for loop in loops:
        await loop.stop()


async def initial_sync(user) -> SyncResponse:
    resp = await expect_ok(user.client.sync(timeout=0, full_state=True), SyncResponse)
    assert resp.next_batch, "initial sync without next_batch"
    assert user.client.next_batch == resp.next_batch, "nio did not adopt next_batch"
    return resp


class MessageLog:
    """RoomMessageText events delivered by nio's sync callbacks, per room."""

    def __init__(self, client) -> None:
        self.by_room: dict[str, list[RoomMessageText]] = {}
        self.client = client
        client.add_event_callback(self._on_message, RoomMessageText)

    def _on_message(self, room, event: RoomMessageText) -> None:
        assert room is self.client.rooms.get(room.room_id), "callback room is not nio's MatrixRoom"
        self.by_room.setdefault(room.room_id, []).append(event)

    def in_room(self, room_id: str) -> list[RoomMessageText]:
        return self.by_room.get(room_id, [])

    def has(self, room_id: str, event_id: str) -> bool:
        return any(e.event_id == event_id for e in self.in_room(room_id))


class EphemeralLog:
    """Ephemeral events (typing, receipts) delivered by nio's sync callbacks."""

    def __init__(self, client) -> None:
        self.events: list[tuple[str, object]] = []
        client.add_ephemeral_callback(self._on_ephemeral, (TypingNoticeEvent, ReceiptEvent))

    def _on_ephemeral(self, room, event) -> None:
        self.events.append((room.room_id, event))

    def typing(self, room_id: str) -> list[TypingNoticeEvent]:
        return [e for r, e in self.events if r == room_id and isinstance(e, TypingNoticeEvent)]

    def receipts(self, room_id: str) -> list:
        """Every nio Receipt of every ReceiptEvent in the room, in arrival order."""
        return [
            receipt
            for r, e in self.events
            if r == room_id and isinstance(e, ReceiptEvent)
            for receipt in e.receipts
        ]


def tag() -> str:
    return uuid.uuid4().hex[:8]


async def create_room(user, name: str) -> str:
    resp = await expect_ok(
        user.client.room_create(name=name, topic="sync interop", preset=RoomPreset.private_chat),
        RoomCreateResponse,
    )
    return resp.room_id


async def send_text(client, room_id: str, body: str) -> str:
    resp = await expect_ok(
        client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body}),
        RoomSendResponse,
    )
    return resp.event_id


async def send_texts(client, room_id: str, count: int) -> list[tuple[str, str]]:
    """``count`` distinct messages, oldest first: [(event_id, body)]."""
    t = tag()
    return [
        (await send_text(client, room_id, f"sync message {i} [{t}]"), f"sync message {i} [{t}]")
        for i in range(count)
    ]


async def joined_pair(register_user, sync_loop, *, alice_loop: bool = False):
    """alice and bob, both initially synced, in a fresh room of alice's.

    bob's background loop runs (it sees the invite before joining and the room
    after); alice's only when asked. Returns (alice, bob, room_id, loops).
    """
    alice = await register_user("alice", displayname="Alice Sync")
    bob = await register_user("bob", displayname="Bob Sync")
    for user in (alice, bob):
        await initial_sync(user)
    loops = {"bob": sync_loop(bob)}
    if alice_loop:
        loops["alice"] = sync_loop(alice)

    room_id = await create_room(alice, f"Sync room {tag()}")
    await expect_ok(alice.client.room_invite(room_id, bob.user_id), RoomInviteResponse)
    await loops["bob"].wait_until(
        lambda: room_id in bob.client.invited_rooms, f"the invite to {room_id}"
    )
    await expect_ok(bob.client.join(room_id), JoinResponse)
    await loops["bob"].wait_until(
        lambda: room_id in bob.client.rooms and bob.user_id in bob.client.rooms[room_id].users,
        f"{room_id} joined, with bob a member",
    )
    if alice_loop:
        await loops["alice"].wait_until(
            lambda: room_id in alice.client.rooms
            and bob.user_id in alice.client.rooms[room_id].users,
            f"bob joined to {room_id}",
        )
    return alice, bob, room_id, loops


# --------------------------------------------------------------------------
# 1. invite, join, messages
# --------------------------------------------------------------------------


async def test_invite_join_and_messages_arrive_through_sync(register_user, sync_loop):
    alice = await register_user("alice", displayname="Alice Sync")
    bob = await register_user("bob", displayname="Bob Sync")
    for user in (alice, bob):
        first = await initial_sync(user)
        assert not first.rooms.join and not first.rooms.invite, "a fresh user is in no room"
    bob_messages = MessageLog(bob.client)
    bob_sync = sync_loop(bob)

    name = f"Sync room {tag()}"
    room_id = await create_room(alice, name)
    await expect_ok(alice.client.room_invite(room_id, bob.user_id), RoomInviteResponse)

    await bob_sync.wait_until(lambda: room_id in bob.client.invited_rooms, f"the invite to {room_id}")
    invited = bob.client.invited_rooms[room_id]
    assert room_id not in bob.client.rooms
    assert invited.inviter == alice.user_id, f"inviter from invite_state: {invited.inviter!r}"
    # The stripped state SHOULD carry m.room.name (spec: "Stripped state").
    assert invited.name == name, f"room name from invite_state: {invited.name!r}"

    joined = await expect_ok(bob.client.join(room_id), JoinResponse)
    assert joined.room_id == room_id
    await bob_sync.wait_until(
        lambda: room_id in bob.client.rooms and bob.user_id in bob.client.rooms[room_id].users,
        f"{room_id} in rooms.join with bob as a member",
    )
    assert room_id not in bob.client.invited_rooms, "nio moves the room out of invited_rooms on join"

    sent = await send_texts(alice.client, room_id, 5)
    last_id = sent[-1][0]
    await bob_sync.wait_until(
        lambda: bob_messages.has(room_id, last_id), f"alice's 5th message {last_id}"
    )
    got = [(e.event_id, e.sender, e.body) for e in bob_messages.in_room(room_id)]
    assert got == [(eid, alice.user_id, body) for eid, body in sent], got

    room = bob.client.rooms[room_id]
    assert room.name == name
    assert room.display_name == name
    assert room.topic == "sync interop"
    assert set(room.users) == {alice.user_id, bob.user_id}, set(room.users)
    assert room.user_name(alice.user_id) == "Alice Sync"
    assert room.user_name(bob.user_id) == "Bob Sync"
    assert room.member_count == 2 and room.joined_count == 2 and room.invited_count == 0
    assert room.join_rule == "invite"
    # Room version 12: the creator's power comes from m.room.create, not power_levels.
    assert room.room_version == "12"
    if room.summary is not None and room.summary.joined_member_count is not None:
        assert room.summary.joined_member_count == 2, room.summary


# --------------------------------------------------------------------------
# 2. typing
# --------------------------------------------------------------------------


async def test_typing_notifications_through_sync(register_user, sync_loop):
    alice, bob, room_id, loops = await joined_pair(register_user, sync_loop)
    bob_ephemeral = EphemeralLog(bob.client)
    room = bob.client.rooms[room_id]
    assert room.typing_users == []

    await expect_ok(alice.client.room_typing(room_id, True, timeout=5000), RoomTypingResponse)
    await loops["bob"].wait_until(
        lambda: alice.user_id in room.typing_users, "alice in room.typing_users"
    )
    assert room.typing_users == [alice.user_id]
    assert any(alice.user_id in e.users for e in bob_ephemeral.typing(room_id))

    await expect_ok(alice.client.room_typing(room_id, False), RoomTypingResponse)
    await loops["bob"].wait_until(lambda: room.typing_users == [], "typing_users cleared")
    assert bob_ephemeral.typing(room_id)[-1].users == []


# --------------------------------------------------------------------------
# 3. receipts, read markers, unread counts
# --------------------------------------------------------------------------


async def test_read_markers_receipt_and_unread_counts(register_user, sync_loop):
    alice, bob, room_id, loops = await joined_pair(register_user, sync_loop, alice_loop=True)
    bob_messages = MessageLog(bob.client)
    alice_ephemeral = EphemeralLog(alice.client)
    bob_room = bob.client.rooms[room_id]
    alice_room = alice.client.rooms[room_id]

    sent = await send_texts(alice.client, room_id, 3)
    last_id = sent[-1][0]
    await loops["bob"].wait_until(lambda: bob_messages.has(room_id, last_id), "alice's 3 messages")
    assert [e.event_id for e in bob_messages.in_room(room_id)] == [eid for eid, _ in sent]
    assert bob_room.unread_notifications == 3, (
        f"unread_notifications={bob_room.unread_notifications} after 3 unread messages"
    )
    assert bob_room.unread_highlights == 0

    await expect_ok(
        bob.client.room_read_markers(room_id, fully_read_event=last_id, read_event=last_id),
        RoomReadMarkersResponse,
    )

    # alice sees bob's public read receipt.
    await loops["alice"].wait_until(
        lambda: any(
            r.user_id == bob.user_id and r.event_id == last_id
            for r in alice_ephemeral.receipts(room_id)
        ),
        f"bob's m.read receipt on {last_id}",
    )
    receipt = next(
        r for r in alice_ephemeral.receipts(room_id)
        if r.user_id == bob.user_id and r.event_id == last_id
    )
    assert receipt.receipt_type == "m.read"
    assert receipt.thread_id is None, "room_read_markers sets an unthreaded receipt"
    assert isinstance(receipt.timestamp, int) and receipt.timestamp > 0
    assert alice_room.read_receipts[bob.user_id].event_id == last_id

    # bob's own sync: counts cleared and the m.fully_read marker in room account data.
    await loops["bob"].wait_until(
        lambda: bob_room.unread_notifications == 0, "unread_notifications back to 0"
    )
    await loops["bob"].wait_until(
        lambda: bob_room.fully_read_marker == last_id, f"m.fully_read at {last_id}"
    )
    assert bob_room.read_receipts[bob.user_id].event_id == last_id


async def test_threaded_main_receipt_via_update_receipt_marker(register_user, sync_loop):
    """nio's update_receipt_marker sends ``thread_id: "main"`` (a threaded receipt)."""
    alice, bob, room_id, loops = await joined_pair(register_user, sync_loop, alice_loop=True)
    bob_messages = MessageLog(bob.client)
    alice_ephemeral = EphemeralLog(alice.client)
    bob_room = bob.client.rooms[room_id]

    sent = await send_texts(alice.client, room_id, 3)
    await loops["bob"].wait_until(lambda: bob_messages.has(room_id, sent[-1][0]), "alice's 3 messages")
    assert bob_room.unread_notifications == 3

    second = sent[1][0]
    await expect_ok(bob.client.update_receipt_marker(room_id, second), UpdateReceiptMarkerResponse)
    await loops["alice"].wait_until(
        lambda: any(
            r.user_id == bob.user_id and r.event_id == second
            for r in alice_ephemeral.receipts(room_id)
        ),
        f"bob's receipt on {second}",
    )
    receipt = next(
        r for r in alice_ephemeral.receipts(room_id)
        if r.user_id == bob.user_id and r.event_id == second
    )
    assert (receipt.receipt_type, receipt.thread_id) == ("m.read", "main"), receipt
    # A "main" receipt covers the main timeline, which holds all three messages.
    await loops["bob"].wait_until(
        lambda: bob_room.unread_notifications == 1,
        "unread_notifications == 1 after a receipt on the 2nd of 3 messages",
    )


# --------------------------------------------------------------------------
# 4. long-poll wake-up
# --------------------------------------------------------------------------


async def test_long_poll_wakes_up_on_new_event(register_user, sync_loop):
    alice, bob, room_id, loops = await joined_pair(register_user, sync_loop)
    await loops["bob"].stop()
    # Catch up so that nothing is pending for bob.
    await expect_ok(bob.client.sync(timeout=0), SyncResponse)

    woke_at: list[float] = []
    poll = asyncio.create_task(bob.client.sync(timeout=LONG_POLL_MS))
    poll.add_done_callback(lambda _: woke_at.append(time.monotonic()))
    try:
        await asyncio.sleep(BLOCKED_CHECK_S)
        assert not poll.done(), (
            f"sync(timeout={LONG_POLL_MS}) with nothing new returned within "
            f"{BLOCKED_CHECK_S}s: {poll.result()!r}"
        )

        body = f"wake up [{tag()}]"
        t0 = time.monotonic()
        event_id = await send_text(alice.client, room_id, body)
        t_sent = time.monotonic()
        resp = await asyncio.wait_for(asyncio.shield(poll), LONG_POLL_MS / 1000 + 10)
    finally:
        if not poll.done():
            poll.cancel()
            await asyncio.wait({poll}, timeout=STOP_TIMEOUT)

    assert isinstance(resp, SyncResponse), describe(resp)
    latency = woke_at[0] - t0
    print(
        f"long-poll wake-up: sync returned {latency * 1000:.1f} ms after alice's send "
        f"started (the send itself took {(t_sent - t0) * 1000:.1f} ms)"
    )
    assert room_id in resp.rooms.join, f"woken sync lacks the room: {resp}"
    events = [e for e in resp.rooms.join[room_id].timeline.events if isinstance(e, RoomMessageText)]
    assert [(e.event_id, e.sender, e.body) for e in events] == [(event_id, alice.user_id, body)]
    assert latency < MAX_WAKE_LATENCY_S, f"long-poll took {latency:.2f}s to wake up"


# --------------------------------------------------------------------------
# 5. kicked: the room moves to rooms.leave
# --------------------------------------------------------------------------


async def test_kick_moves_room_to_leave(register_user, sync_loop):
    alice, bob, room_id, loops = await joined_pair(register_user, sync_loop)
    bob_sync = loops["bob"]
    mark = len(bob_sync.responses)
    reason = f"interop kick {tag()}"

    await expect_ok(alice.client.room_kick(room_id, bob.user_id, reason=reason), RoomKickResponse)

    def leave_responses() -> list[SyncResponse]:
        return [r for r in bob_sync.responses[mark:] if room_id in r.rooms.leave]

    await bob_sync.wait_until(lambda: bool(leave_responses()), f"{room_id} in rooms.leave")
    await bob_sync.stop()

    resp = leave_responses()[0]
    assert room_id not in resp.rooms.join, "room in both join and leave"
    timeline = resp.rooms.leave[room_id].timeline
    assert timeline.events, "leave section with an empty timeline"
    last = timeline.events[-1]
    assert isinstance(last, RoomMemberEvent), f"last leave timeline event: {last!r}"
    assert last.state_key == bob.user_id
    assert last.membership == "leave"
    assert last.sender == alice.user_id
    assert last.content.get("reason") == reason
    assert len(leave_responses()) == 1, "the leave was delivered more than once"

    # After the kick bob gets nothing more from the room, and the leave is not repeated.
    await send_text(alice.client, room_id, "after the kick")
    after = await expect_ok(bob.client.sync(timeout=0), SyncResponse)
    assert room_id not in after.rooms.join, f"kicked user still syncs the room: {after}"
    assert room_id not in after.rooms.leave, "the leave was repeated in a later sync"


# --------------------------------------------------------------------------
# 6. filtered initial sync: limited timeline, prev_batch, lazy-loaded members
# --------------------------------------------------------------------------


async def test_filtered_initial_sync_of_existing_room(register_user, client_factory):
    alice = await register_user("alice", displayname="Alice Sync")
    bob = await register_user("bob", displayname="Bob Sync")
    carol = await register_user("carol", displayname="Carol Sync")
    name = f"Busy room {tag()}"
    room_id = await create_room(alice, name)
    for user in (bob, carol):
        await expect_ok(alice.client.room_invite(room_id, user.user_id), RoomInviteResponse)
        await expect_ok(user.client.join(room_id), JoinResponse)
    sent = await send_texts(alice.client, room_id, 6)

    # A fresh device of bob's: its first sync is an initial one.
    device = client_factory(bob.user_id)
    await expect_ok(device.login(bob.password, device_name="interop-sync"), LoginResponse)
    sync_filter = {"room": {"timeline": {"limit": 3}, "state": {"lazy_load_members": True}}}
    resp = await expect_ok(device.sync(timeout=0, sync_filter=sync_filter), SyncResponse)

    assert room_id in resp.rooms.join, f"initial sync lacks the joined room: {resp}"
    timeline = resp.rooms.join[room_id].timeline
    texts = [(e.event_id, e.body) for e in timeline.events if isinstance(e, RoomMessageText)]
    assert len(timeline.events) == 3, [type(e).__name__ for e in timeline.events]
    assert texts == sent[-3:], texts
    assert timeline.limited is True, "6 messages behind a limit of 3 must be limited"
    assert timeline.prev_batch, "limited timeline without prev_batch"

    room = device.rooms[room_id]
    assert room.display_name == name
    assert alice.user_id in room.users, "lazy loading must include the timeline senders"
    assert carol.user_id not in room.users, "lazy loading sent a silent member's event"
    assert room.summary is not None and room.summary.joined_member_count == 3, room.summary

    # prev_batch continues exactly where the timeline starts.
    page = await expect_ok(device.room_messages(room_id, start=timeline.prev_batch, limit=3), RoomMessagesResponse)
    older = [(e.event_id, e.body) for e in page.chunk if isinstance(e, RoomMessageText)]
    assert older == list(reversed(sent[:3])), older


# --------------------------------------------------------------------------
# 7. bad since token
# --------------------------------------------------------------------------


async def test_garbage_since_token_is_rejected(register_user):
    bob = await register_user("bob")
    resp = await expect_error(bob.client.sync(timeout=0, since="garbage"), "M_INVALID_PARAM", 400)
    assert isinstance(resp, SyncError), f"nio surfaced {type(resp).__name__}"
    assert not bob.client.next_batch, "an error must not move nio's sync position"
