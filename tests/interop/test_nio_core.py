"""Core client-server interop: a real Salon server driven by matrix-nio.

These tests read room state and history through the state, members and /messages
APIs without syncing; test_nio_sync.py covers nio's sync loop.
Each test registers its own users with unique names.
"""

from __future__ import annotations

import uuid

import pytest
from nio import (
    JoinedMembersResponse,
    JoinResponse,
    LoginResponse,
    LogoutResponse,
    ProfileGetDisplayNameResponse,
    ProfileSetDisplayNameResponse,
    RedactedEvent,
    RoomCreateResponse,
    RoomForgetResponse,
    RoomGetEventResponse,
    RoomGetStateEventResponse,
    RoomGetStateResponse,
    RoomInviteResponse,
    RoomLeaveResponse,
    RoomMessagesResponse,
    RoomMessageText,
    RoomPreset,
    RoomPutStateResponse,
    RoomRedactResponse,
    RoomResolveAliasResponse,
    RoomSendResponse,
    WhoamiResponse,
)

from helpers import (
    expect_error,
    expect_ok,
    raw_get_ok,
    raw_request,
    room_path,
    unique_localpart,
)

MESSAGE_COUNT = 30
PAGE_SIZE = 10
MAX_PAGES = 50  # hard bound on any pagination loop


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


async def create_private_room(user, *, name: str, topic: str, alias: str | None = None) -> str:
    resp = await expect_ok(
        user.client.room_create(
            name=name, topic=topic, alias=alias, preset=RoomPreset.private_chat
        ),
        RoomCreateResponse,
    )
    assert resp.room_id.startswith("!"), resp.room_id
    return resp.room_id


async def invite_and_join(inviter, invitee, room_id: str) -> None:
    await expect_ok(inviter.client.room_invite(room_id, invitee.user_id), RoomInviteResponse)
    joined = await expect_ok(invitee.client.join(room_id), JoinResponse)
    assert joined.room_id == room_id


async def joined_member_names(client, room_id: str) -> dict[str, str | None]:
    resp = await expect_ok(client.joined_members(room_id), JoinedMembersResponse)
    assert resp.room_id == room_id
    names = {m.user_id: m.display_name for m in resp.members}
    assert len(names) == len(resp.members), f"duplicate members: {resp.members}"
    return names


async def state_content(client, room_id: str, event_type: str, state_key: str = "") -> dict:
    resp = await expect_ok(
        client.room_get_state_event(room_id, event_type, state_key), RoomGetStateEventResponse
    )
    assert "errcode" not in resp.content, resp.content
    return resp.content


async def membership_of(client, room_id: str, user_id: str) -> str:
    content = await state_content(client, room_id, "m.room.member", user_id)
    return content["membership"]


async def send_text(client, room_id: str, body: str) -> str:
    resp = await expect_ok(
        client.room_send(room_id, "m.room.message", {"msgtype": "m.text", "body": body}),
        RoomSendResponse,
    )
    assert resp.event_id.startswith("$"), resp.event_id
    return resp.event_id


async def send_numbered_messages(client, room_id: str, count: int) -> list[tuple[str, str]]:
    """Send ``count`` distinct text messages; returns [(event_id, body)] oldest first."""
    tag = uuid.uuid4().hex[:8]
    sent = []
    for i in range(count):
        body = f"interop message {i:02d} [{tag}]"
        sent.append((await send_text(client, room_id, body), body))
    assert len({event_id for event_id, _ in sent}) == count, "room_send reused an event id"
    return sent


async def paginate_backwards_raw(client, room_id: str) -> list[dict]:
    """All events via raw GET /messages?dir=b, following ``end`` until exhausted."""
    events: list[dict] = []
    params = {"dir": "b", "limit": str(PAGE_SIZE)}
    for _ in range(MAX_PAGES):
        page = await raw_get_ok(client, room_path(room_id, "messages"), params)
        chunk = page.get("chunk", [])
        assert isinstance(chunk, list), page
        assert len(chunk) <= PAGE_SIZE, f"limit={PAGE_SIZE} ignored: {len(chunk)} events"
        assert "start" in page, f"/messages response without start: {page}"
        events.extend(chunk)
        if not chunk or "end" not in page:
            return events
        assert page["end"] != params.get("from"), "pagination token did not advance"
        params["from"] = page["end"]
    pytest.fail(f"/messages did not finish within {MAX_PAGES} pages")


async def paginate_backwards_nio(client, room_id: str) -> list:
    """All events via nio's room_messages, starting from the end of the room.

    matrix-nio >= 0.25 omits ``from`` when ``start`` is falsy, which the spec
    (v1.3+) defines as "from the end of the timeline", so no sync token is needed.
    """
    events = []
    start = None
    for _ in range(MAX_PAGES):
        resp = await expect_ok(
            client.room_messages(room_id, start=start, limit=PAGE_SIZE), RoomMessagesResponse
        )
        events.extend(resp.chunk)
        if not resp.chunk or not resp.end:
            return events
        start = resp.end
    pytest.fail(f"room_messages did not finish within {MAX_PAGES} pages")


def text_messages(raw_events: list[dict], sender: str) -> list[tuple[str, str]]:
    return [
        (e["event_id"], e["content"]["body"])
        for e in raw_events
        if e.get("type") == "m.room.message" and e.get("sender") == sender
    ]


# --------------------------------------------------------------------------
# accounts
# --------------------------------------------------------------------------


async def test_register_returns_credentials(register_user, server_name):
    alice = await register_user("alice")
    bob = await register_user("bob")

    for user in (alice, bob):
        reg = user.registration
        assert reg.user_id == f"@{user.localpart}:{server_name}"
        assert reg.access_token, "register returned no access token"
        assert reg.device_id, "register returned no device id"
        # nio adopts the new credentials; whoami proves the token is live.
        who = await expect_ok(user.client.whoami(), WhoamiResponse)
        assert who.user_id == reg.user_id
        assert who.device_id == reg.device_id

    assert alice.registration.access_token != bob.registration.access_token


async def test_register_taken_username_is_rejected(register_user, client_factory):
    alice = await register_user("alice")
    again = client_factory(alice.localpart)
    await expect_error(again.register(alice.localpart, "another-password"), "M_USER_IN_USE", 400)


@pytest.mark.parametrize("identifier", ["localpart", "user_id"])
async def test_password_login_creates_new_device(register_user, client_factory, identifier):
    alice = await register_user("alice")
    login_as = alice.localpart if identifier == "localpart" else alice.user_id

    client = client_factory(login_as)
    login = await expect_ok(client.login(alice.password, device_name="interop-login"), LoginResponse)
    assert login.user_id == alice.user_id
    assert login.device_id and login.device_id != alice.registration.device_id
    assert login.access_token and login.access_token != alice.registration.access_token

    who = await expect_ok(client.whoami(), WhoamiResponse)
    assert (who.user_id, who.device_id) == (alice.user_id, login.device_id)

    # The registration session stays valid next to the new one.
    who_old = await expect_ok(alice.client.whoami(), WhoamiResponse)
    assert (who_old.user_id, who_old.device_id) == (alice.user_id, alice.registration.device_id)


async def test_wrong_password_is_forbidden(register_user, client_factory):
    alice = await register_user("alice")
    client = client_factory(alice.localpart)
    await expect_error(client.login("definitely-" + alice.password), "M_FORBIDDEN", 403)
    assert not client.access_token


async def test_logout_invalidates_only_that_token(register_user, client_factory):
    alice = await register_user("alice")
    client = client_factory(alice.user_id)
    login = await expect_ok(client.login(alice.password), LoginResponse)

    await expect_ok(client.logout(), LogoutResponse)
    assert client.access_token == "", "nio should forget the token after logout"

    # nio clears the token locally, so put the old one back to ask the server.
    client.access_token = login.access_token
    await expect_error(client.whoami(), "M_UNKNOWN_TOKEN", 401)

    # The registration device was not logged out.
    who = await expect_ok(alice.client.whoami(), WhoamiResponse)
    assert who.device_id == alice.registration.device_id


async def test_displayname_roundtrip(register_user):
    alice = await register_user("alice")
    bob = await register_user("bob")
    name = f"Alice {uuid.uuid4().hex[:6]}"

    await expect_ok(alice.client.set_displayname(name), ProfileSetDisplayNameResponse)

    own = await expect_ok(alice.client.get_displayname(), ProfileGetDisplayNameResponse)
    assert own.displayname == name
    seen_by_bob = await expect_ok(
        bob.client.get_displayname(alice.user_id), ProfileGetDisplayNameResponse
    )
    assert seen_by_bob.displayname == name

    renamed = name + " (renamed)"
    await expect_ok(alice.client.set_displayname(renamed), ProfileSetDisplayNameResponse)
    again = await expect_ok(alice.client.get_displayname(), ProfileGetDisplayNameResponse)
    assert again.displayname == renamed


# --------------------------------------------------------------------------
# rooms: create, invite, join, state
# --------------------------------------------------------------------------


async def test_private_room_invite_and_join(register_user, server_name):
    alice = await register_user("alice", displayname="Alice Interop")
    bob = await register_user("bob", displayname="Bob Interop")
    carol = await register_user("carol")

    room_id = await create_private_room(alice, name="Interop room", topic="nio meets salon")
    # Room version 12 (the default) derives the room id from the create event's hash,
    # without a server name.
    assert room_id.startswith("!") and len(room_id) > 40, room_id
    assert await joined_member_names(alice.client, room_id) == {alice.user_id: "Alice Interop"}

    await expect_ok(alice.client.room_invite(room_id, bob.user_id), RoomInviteResponse)
    # No sync: the invite is visible as bob's m.room.member state.
    assert await membership_of(alice.client, room_id, bob.user_id) == "invite"

    # private_chat means invite-only: an uninvited user cannot join.
    await expect_error(carol.client.join(room_id), "M_FORBIDDEN", 403)

    joined = await expect_ok(bob.client.join(room_id), JoinResponse)
    assert joined.room_id == room_id
    assert await membership_of(alice.client, room_id, bob.user_id) == "join"

    expected = {alice.user_id: "Alice Interop", bob.user_id: "Bob Interop"}
    assert await joined_member_names(alice.client, room_id) == expected
    assert await joined_member_names(bob.client, room_id) == expected


async def test_room_state_has_name_and_topic(register_user):
    alice = await register_user("alice")
    name = f"Room {uuid.uuid4().hex[:6]}"
    topic = f"Topic {uuid.uuid4().hex[:6]}"
    room_id = await create_private_room(alice, name=name, topic=topic)

    assert (await state_content(alice.client, room_id, "m.room.name"))["name"] == name
    assert (await state_content(alice.client, room_id, "m.room.topic"))["topic"] == topic

    state = await expect_ok(alice.client.room_get_state(room_id), RoomGetStateResponse)
    by_key = {(e["type"], e["state_key"]): e for e in state.events}
    assert by_key[("m.room.name", "")]["content"]["name"] == name
    assert by_key[("m.room.topic", "")]["content"]["topic"] == topic
    assert by_key[("m.room.join_rules", "")]["content"]["join_rule"] == "invite"
    assert by_key[("m.room.member", alice.user_id)]["content"]["membership"] == "join"
    assert ("m.room.create", "") in by_key and ("m.room.power_levels", "") in by_key
    for event in state.events:
        assert event.get("room_id") == room_id, event
        assert event["event_id"].startswith("$"), event


async def test_custom_state_event_roundtrip(register_user):
    alice = await register_user("alice")
    room_id = await create_private_room(alice, name="state", topic="custom state")
    event_type = "org.salon.interop.state"
    first = {"colour": "teal", "n": 1, "nested": {"list": [1, 2, 3], "flag": True}}
    keyed = {"colour": "orange", "n": 2}

    put = await expect_ok(alice.client.room_put_state(room_id, event_type, first), RoomPutStateResponse)
    assert put.event_id.startswith("$")
    await expect_ok(
        alice.client.room_put_state(room_id, event_type, keyed, state_key="k1"),
        RoomPutStateResponse,
    )

    assert await state_content(alice.client, room_id, event_type) == first
    assert await state_content(alice.client, room_id, event_type, "k1") == keyed

    # Replacing the state replaces what is read back.
    second = {"colour": "plum", "n": 3}
    await expect_ok(alice.client.room_put_state(room_id, event_type, second), RoomPutStateResponse)
    assert await state_content(alice.client, room_id, event_type) == second
    assert await state_content(alice.client, room_id, event_type, "k1") == keyed

    await expect_error(
        alice.client.room_get_state_event(room_id, event_type, "never-set"), "M_NOT_FOUND", 404
    )


# --------------------------------------------------------------------------
# messages and history
# --------------------------------------------------------------------------


async def test_messages_paginate_backwards_raw(register_user):
    alice = await register_user("alice")
    bob = await register_user("bob")
    room_id = await create_private_room(alice, name="history", topic="pagination")
    await invite_and_join(alice, bob, room_id)
    sent = await send_numbered_messages(alice.client, room_id, MESSAGE_COUNT)

    for reader in (alice, bob):
        events = await paginate_backwards_raw(reader.client, room_id)
        event_ids = [e["event_id"] for e in events]
        assert len(event_ids) == len(set(event_ids)), "an event came back twice"
        # Every message exactly once, newest first.
        assert text_messages(events, alice.user_id) == list(reversed(sent))
        # Backwards pagination reaches the start of the room.
        assert events[-1]["type"] == "m.room.create", events[-1]


async def test_messages_paginate_backwards_with_nio(register_user):
    alice = await register_user("alice")
    room_id = await create_private_room(alice, name="history", topic="nio pagination")
    sent = await send_numbered_messages(alice.client, room_id, MESSAGE_COUNT)

    events = await paginate_backwards_nio(alice.client, room_id)
    event_ids = [e.event_id for e in events]
    assert len(event_ids) == len(set(event_ids)), "an event came back twice"
    texts = [(e.event_id, e.body) for e in events if isinstance(e, RoomMessageText)]
    assert texts == list(reversed(sent))
    assert all(e.sender == alice.user_id for e in events if isinstance(e, RoomMessageText))


# --------------------------------------------------------------------------
# leave, forget
# --------------------------------------------------------------------------


async def test_leave_then_forget(register_user):
    alice = await register_user("alice", displayname="Alice")
    bob = await register_user("bob", displayname="Bob")
    room_id = await create_private_room(alice, name="leaving", topic="bye")
    await invite_and_join(alice, bob, room_id)
    assert set(await joined_member_names(alice.client, room_id)) == {alice.user_id, bob.user_id}

    await expect_ok(bob.client.room_leave(room_id), RoomLeaveResponse)
    assert await joined_member_names(alice.client, room_id) == {alice.user_id: "Alice"}
    assert await membership_of(alice.client, room_id, bob.user_id) == "leave"

    forgot = await expect_ok(bob.client.room_forget(room_id), RoomForgetResponse)
    assert forgot.room_id == room_id
    # A former member no longer sees the member list.
    await expect_error(bob.client.joined_members(room_id))
    # Alice is unaffected.
    assert await joined_member_names(alice.client, room_id) == {alice.user_id: "Alice"}


# --------------------------------------------------------------------------
# aliases
# --------------------------------------------------------------------------


async def test_room_alias_resolves_to_room(register_user, server_name):
    alice = await register_user("alice")
    bob = await register_user("bob")
    alias_localpart = unique_localpart("interop")
    alias = f"#{alias_localpart}:{server_name}"

    room_id = await create_private_room(alice, name="aliased", topic="alias", alias=alias_localpart)

    for client in (alice.client, bob.client):
        resolved = await expect_ok(client.room_resolve_alias(alias), RoomResolveAliasResponse)
        assert resolved.room_id == room_id
        assert server_name in resolved.servers

    canonical = await state_content(alice.client, room_id, "m.room.canonical_alias")
    assert canonical["alias"] == alias

    # The alias is taken now.
    await expect_error(
        alice.client.room_create(alias=alias_localpart, preset=RoomPreset.private_chat),
        "M_ROOM_IN_USE",
        400,
    )
    await expect_error(
        alice.client.room_resolve_alias(f"#{unique_localpart('missing')}:{server_name}"),
        "M_NOT_FOUND",
        404,
    )


# --------------------------------------------------------------------------
# redaction
# --------------------------------------------------------------------------


async def test_redaction_strips_content(register_user):
    alice = await register_user("alice")
    room_id = await create_private_room(alice, name="redact", topic="redaction")
    kept_id = await send_text(alice.client, room_id, "this one stays")
    doomed_id = await send_text(alice.client, room_id, "this one goes")

    redaction = await expect_ok(
        alice.client.room_redact(room_id, doomed_id, reason="interop test"), RoomRedactResponse
    )
    assert redaction.event_id.startswith("$") and redaction.event_id != doomed_id

    doomed = await raw_get_ok(alice.client, room_path(room_id, "event", doomed_id))
    assert doomed["event_id"] == doomed_id
    assert doomed["type"] == "m.room.message"
    assert doomed["sender"] == alice.user_id
    assert doomed["content"] == {}, f"redacted event still has content: {doomed['content']}"

    kept = await raw_get_ok(alice.client, room_path(room_id, "event", kept_id))
    assert kept["content"] == {"msgtype": "m.text", "body": "this one stays"}

    # nio recognises redactions by unsigned.redacted_because.
    parsed = await expect_ok(alice.client.room_get_event(room_id, doomed_id), RoomGetEventResponse)
    assert isinstance(parsed.event, RedactedEvent), f"nio parsed {parsed.event!r}"
    assert parsed.event.redacter == alice.user_id
    assert parsed.event.reason == "interop test"


async def test_unknown_event_is_not_found(register_user):
    alice = await register_user("alice")
    room_id = await create_private_room(alice, name="missing", topic="404")
    missing = f"${uuid.uuid4().hex}"
    status, body = await raw_request(alice.client, "GET", room_path(room_id, "event", missing))
    assert status == 404, (status, body)
    assert body["errcode"] == "M_NOT_FOUND"
