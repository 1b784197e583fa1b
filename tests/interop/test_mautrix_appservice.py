"""mautrix-python, the appservice framework most bridges are built on, against Salon.

The session server loads a registration (``conftest.py``) whose URL is a port that
this test serves with mautrix's own ``AppService``: Salon authenticates it by its
as_token, lets it register and act as a ghost of its namespace, refuses the namespace
to everyone else, pushes it transactions for users' messages, and answers its ping.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from mautrix.appservice import AppService
from mautrix.errors import MatrixRequestError
from mautrix.types import EventType, MessageEvent, RoomID, UserID
from nio import RegisterResponse, RoomCreateResponse, RoomMessagesResponse

from helpers import bounded, expect_ok, unique_localpart

pytestmark = pytest.mark.asyncio(loop_scope="function")


@pytest.fixture
async def appservice(salon_server):
    reg = salon_server.appservice
    received: list[MessageEvent] = []
    appserv = AppService(
        server=salon_server.base_url,
        domain=salon_server.server_name,
        as_token=reg.as_token,
        hs_token=reg.hs_token,
        bot_localpart=reg.sender_localpart,
        id=reg.id,
        log=logging.getLogger("mautrix-interop"),
    )

    @appserv.matrix_event_handler
    async def on_event(evt) -> None:
        if evt.type == EventType.ROOM_MESSAGE:
            received.append(evt)

    await appserv.start(host="127.0.0.1", port=reg.port)
    try:
        yield appserv, received
    finally:
        await appserv.stop()


async def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_mautrix_ghost_registers_sends_and_receives_transactions(
    appservice, salon_server, register_user
):
    appserv, received = appservice
    reg = salon_server.appservice
    alice = await register_user("alice")
    created = await expect_ok(
        alice.client.room_create(name="bridged", preset=None), RoomCreateResponse
    )
    room_id = RoomID(created.room_id)
    # Public for the ghost to join.
    await expect_ok(
        alice.client.room_put_state(room_id, "m.room.join_rules", {"join_rule": "public"}),
        object,
    )

    # mautrix registers its ghost (m.login.application_service) and acts as it.
    ghost_id = UserID(f"@{reg.user_prefix}{unique_localpart('ghost')}:{salon_server.server_name}")
    ghost = appserv.intent.user(ghost_id)
    await bounded(ghost.ensure_registered())
    await bounded(ghost.set_displayname("Ghost of Bob"))
    await bounded(ghost.ensure_joined(room_id))
    ghost_event = await bounded(ghost.send_text(room_id, "hello from the ghost"))

    # Alice sees the ghost's message, sent as the ghost.
    messages = await expect_ok(alice.client.room_messages(room_id, start="", limit=20), RoomMessagesResponse)
    by_ghost = [e for e in messages.chunk if getattr(e, "sender", None) == ghost_id]
    assert [e.body for e in by_ghost if hasattr(e, "body")] == ["hello from the ghost"]
    assert any(e.event_id == ghost_event for e in by_ghost)

    # Alice writes: the message reaches the appservice in a transaction.
    await expect_ok(
        alice.client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": "hi ghost"}),
        object,
    )
    evt = await wait_for(
        lambda: next((e for e in received if e.sender == alice.user_id), None),
        "alice's message in a transaction",
    )
    assert evt.room_id == room_id
    assert evt.content.body == "hi ghost"

    # Salon answers the appservice's ping (which Salon relays to it and times).
    # mautrix reports -1 when the homeserver's answer has no duration.
    took = await bounded(appserv.ping_self())
    assert took >= 1


async def test_the_namespace_is_exclusive_and_masquerading_is_checked(
    appservice, salon_server, client_factory
):
    appserv, _ = appservice
    reg = salon_server.appservice
    # A normal user cannot register inside the appservice's exclusive namespace.
    squatter = client_factory()
    resp = await bounded(squatter.register(f"{reg.user_prefix}squatter", "pw-squatter-1"))
    assert not isinstance(resp, RegisterResponse)
    assert resp.status_code == "M_EXCLUSIVE"

    # The appservice cannot act as a user outside its namespace.
    outsider = appserv.intent.user(UserID(f"@not_mine:{salon_server.server_name}"))
    with pytest.raises(MatrixRequestError) as err:
        await bounded(outsider.set_displayname("nope"))
    assert err.value.errcode in ("M_EXCLUSIVE", "M_FORBIDDEN")
