// matrix-js-sdk drives Salon: real MatrixClients with their real /sync loops.
//
//   SALON_BIN=$HOME/.cache/salon/target/debug/salon node --test tests/interop-js/
//
// (scripts/interop-js-env.sh installs node_modules first.)
//
// One server is started for the whole file; alice and bob each have a
// MatrixClient whose sync loop runs for the whole file. Every assertion looks
// at the SDK's own objects (Room, RoomMember, MatrixEvent, receipts), which
// the SDK built from what the server sent. Every wait has a timeout; a
// failure carries the SDK's last requests (and those still unanswered) and
// the tail of the server log.
//
// The last two tests are bookkeeping: GET /pushrules/ (which the SDK fetches
// before its first /sync) answers with the server-default rules, which the
// SDK's clients then hold, and no endpoint the SDK called was answered with
// 404/405 M_UNRECOGNIZED.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import {
    ClientEvent,
    EventType,
    KnownMembership,
    MsgType,
    ReceiptType,
    RoomEvent,
    RoomMemberEvent,
    RoomStateEvent,
} from "matrix-js-sdk";

import {
    failedRequests,
    loginNewDevice,
    registerUser,
    startServer,
    startSyncing,
    stopAllClients,
    stopClient,
    unrecognizedEndpoints,
    waitUntil,
    withServerLog,
} from "./harness.mjs";

const TEST_TIMEOUT_MS = 90_000;

let server = null;
let alice = null;
let bob = null;

const logged = (fn) => withServerLog(() => server, fn);
const opts = { timeout: TEST_TIMEOUT_MS };

before(async () => {
    server = await startServer();
    try {
        alice = await registerUser(server, "alice");
        bob = await registerUser(server, "bob");
        await Promise.all([startSyncing(alice, { initialSyncLimit: 10 }), startSyncing(bob, { initialSyncLimit: 10 })]);
    } catch (err) {
        err.message = `${err.message}\n--- last lines of the server log ---\n${server.logTail()}`;
        throw err;
    }
});

after(async () => {
    stopAllClients();
    if (server) await server.stop();
});

// ---------------------------------------------------------------------------
// helpers

const ALICE = "@alice:localhost";
const BOB = "@bob:localhost";

function messageEvents(room) {
    return room
        .getLiveTimeline()
        .getEvents()
        .filter((e) => e.getType() === EventType.RoomMessage);
}

function describeTimeline(room) {
    if (!room) return "<no room>";
    return room
        .getLiveTimeline()
        .getEvents()
        .map((e) => `${e.getType()}${e.isState() ? `[${e.getStateKey()}]` : ""} ${e.getSender()} ${e.getId()} ${JSON.stringify(e.getContent()).slice(0, 60)}`)
        .join("\n  ");
}

/** Wait until `client` has `roomId` with membership `membership`. */
function waitForMyMembership(client, roomId, membership) {
    return waitUntil(
        client,
        [ClientEvent.Room, RoomEvent.MyMembership, RoomStateEvent.Events],
        () => {
            const room = client.getRoom(roomId);
            return room && room.getMyMembership() === membership ? room : null;
        },
        `${client.getUserId()} to see membership "${membership}" in ${roomId}`,
        { describe: () => `membership=${client.getRoom(roomId)?.getMyMembership()}` },
    );
}

/** Wait until `client` sees `userId` with `membership` in `roomId`. */
function waitForMember(client, roomId, userId, membership) {
    return waitUntil(
        client,
        [ClientEvent.Room, RoomMemberEvent.Membership, RoomStateEvent.Events],
        () => {
            const member = client.getRoom(roomId)?.getMember(userId);
            return member && member.membership === membership ? member : null;
        },
        `${client.getUserId()} to see ${userId} with membership "${membership}" in ${roomId}`,
        { describe: () => `member=${client.getRoom(roomId)?.getMember(userId)?.membership}` },
    );
}

/** alice creates a room (createRoom options `createOpts`), invites bob, bob joins; both sides see it. */
async function roomWithBob(createOpts = {}) {
    const { room_id: roomId } = await alice.createRoom({ preset: "private_chat", ...createOpts });
    await alice.invite(roomId, BOB);
    await waitForMyMembership(bob, roomId, KnownMembership.Invite);
    await bob.joinRoom(roomId);
    await waitForMyMembership(bob, roomId, KnownMembership.Join);
    await waitForMember(alice, roomId, BOB, KnownMembership.Join);
    return roomId;
}

/** Wait until `client` has the event `eventId` in the live timeline of `roomId`. */
function waitForEvent(client, roomId, eventId) {
    return waitUntil(
        client,
        [RoomEvent.Timeline],
        () => client.getRoom(roomId)?.getLiveTimeline().getEvents().find((e) => e.getId() === eventId),
        `${client.getUserId()} to receive ${eventId} in ${roomId}`,
        { describe: () => describeTimeline(client.getRoom(roomId)) },
    );
}

// ---------------------------------------------------------------------------
// (1) invite, join and messages through the sync loops

test("invite seen through sync, join, and messages arrive in order with bodies and senders", opts, logged(async () => {
    // Record what bob's sync loop tells about the new room.
    const membershipEvents = [];
    const onMembership = (event, member) => membershipEvents.push({ userId: member.userId, membership: member.membership, sender: event?.getSender() });
    bob.on(RoomMemberEvent.Membership, onMembership);

    const { room_id: roomId } = await alice.createRoom({ preset: "private_chat", name: "Interop chat" });
    assert.match(roomId, /^!/, "room id starts with !");

    // alice's own sync loop shows her room, joined, with her as the creator.
    const aliceRoom = await waitForMyMembership(alice, roomId, KnownMembership.Join);
    const create = aliceRoom.currentState.getStateEvents(EventType.RoomCreate, "");
    assert.ok(create, "alice's Room has an m.room.create state event");
    assert.equal(create.getSender(), ALICE);

    await alice.invite(roomId, BOB);

    // bob sees the invite through his own sync loop.
    const invited = await waitForMyMembership(bob, roomId, KnownMembership.Invite);
    assert.ok(bob.getRooms().some((r) => r.roomId === roomId), "invited room is in bob.getRooms()");
    const bobAsInvitee = invited.getMember(BOB);
    assert.ok(bobAsInvitee, "bob is a RoomMember of the invited room");
    assert.equal(bobAsInvitee.membership, KnownMembership.Invite);
    assert.equal(bobAsInvitee.events.member?.getSender(), ALICE, "the invite's m.room.member event was sent by alice");
    await waitUntil(
        bob,
        [RoomMemberEvent.Membership],
        () => membershipEvents.some((m) => m.userId === BOB && m.membership === KnownMembership.Invite),
        "RoomMember.membership event for bob's invite",
        { describe: () => JSON.stringify(membershipEvents) },
    );
    assert.ok(
        membershipEvents.some((m) => m.userId === BOB && m.membership === KnownMembership.Invite && m.sender === ALICE),
        `a "RoomMember.membership" event reports bob invited by alice: ${JSON.stringify(membershipEvents)}`,
    );

    await bob.joinRoom(roomId);
    const bobRoom = await waitForMyMembership(bob, roomId, KnownMembership.Join);
    const aliceSeesBob = await waitForMember(alice, roomId, BOB, KnownMembership.Join);
    assert.equal(aliceSeesBob.events.member?.getSender(), BOB, "bob's join was sent by bob");
    // After joining bob has the room's full state: alice as a joined member, the creation event.
    await waitForMember(bob, roomId, ALICE, KnownMembership.Join);
    assert.equal(bobRoom.currentState.getStateEvents(EventType.RoomCreate, "")?.getSender(), ALICE);
    assert.equal(bobRoom.getJoinedMemberCount(), 2);
    bob.removeListener(RoomMemberEvent.Membership, onMembership);

    // bob listens to his live timeline for alice's messages.
    const received = [];
    const onTimeline = (event, room, toStartOfTimeline, removed, data) => {
        if (room?.roomId !== roomId || toStartOfTimeline || removed || !data?.liveEvent) return;
        if (event.getType() !== EventType.RoomMessage) return;
        received.push(event);
    };
    bob.on(RoomEvent.Timeline, onTimeline);

    const sent = [];
    const bodies = [
        "first message from alice",
        "second: unicode ✓ ünïcødé 🎉 and \"quotes\"",
        "third, sent with sendMessage as m.notice",
        "fourth, an HTML message",
        "fifth and last",
    ];
    sent.push({ body: bodies[0], msgtype: MsgType.Text, ...(await alice.sendTextMessage(roomId, bodies[0])) });
    sent.push({ body: bodies[1], msgtype: MsgType.Text, ...(await alice.sendMessage(roomId, { msgtype: MsgType.Text, body: bodies[1] })) });
    sent.push({ body: bodies[2], msgtype: MsgType.Notice, ...(await alice.sendMessage(roomId, { msgtype: MsgType.Notice, body: bodies[2] })) });
    sent.push({ body: bodies[3], msgtype: MsgType.Text, html: "<b>fourth</b>, an HTML message", ...(await alice.sendHtmlMessage(roomId, bodies[3], "<b>fourth</b>, an HTML message")) });
    sent.push({ body: bodies[4], msgtype: MsgType.Text, ...(await alice.sendTextMessage(roomId, bodies[4])) });
    for (const s of sent) assert.match(s.event_id, /^\$/, "send returned an event id");
    assert.equal(new Set(sent.map((s) => s.event_id)).size, sent.length, "each send returned a distinct event id");

    await waitUntil(
        bob,
        [RoomEvent.Timeline],
        () => received.length >= sent.length,
        `bob to receive ${sent.length} messages`,
        { describe: () => `received ${received.length}: ${received.map((e) => e.getContent().body).join(" | ")}\ntimeline:\n  ${describeTimeline(bob.getRoom(roomId))}` },
    );
    bob.removeListener(RoomEvent.Timeline, onTimeline);

    assert.deepEqual(received.map((e) => e.getId()), sent.map((s) => s.event_id), "bob received alice's messages once each, in the order sent");
    for (const [i, e] of received.entries()) {
        assert.equal(e.getSender(), ALICE, `message ${i} sender`);
        assert.equal(e.getRoomId(), roomId, `message ${i} room`);
        assert.equal(e.getContent().body, sent[i].body, `message ${i} body`);
        assert.equal(e.getContent().msgtype, sent[i].msgtype, `message ${i} msgtype`);
        assert.equal(typeof e.getTs(), "number");
        if (i > 0) assert.ok(e.getTs() >= received[i - 1].getTs(), "origin_server_ts does not go backwards");
    }
    assert.equal(received[3].getContent().format, "org.matrix.custom.html");
    assert.equal(received[3].getContent().formatted_body, sent[3].html);

    // The same messages, in the same order, at the end of bob's live timeline.
    const tail = messageEvents(bob.getRoom(roomId)).slice(-sent.length);
    assert.deepEqual(tail.map((e) => e.getId()), sent.map((s) => s.event_id));
    // alice's own sync loop returns her messages too: the local echoes become
    // the remote events (status null), in the same order.
    await waitUntil(
        alice,
        [RoomEvent.Timeline, RoomEvent.LocalEchoUpdated],
        () => {
            const events = messageEvents(alice.getRoom(roomId)).slice(-sent.length);
            return events.length === sent.length && events.every((e) => e.status === null);
        },
        "alice's sync to return her own messages",
        { describe: () => describeTimeline(alice.getRoom(roomId)) },
    );
    const aliceTail = messageEvents(alice.getRoom(roomId)).slice(-sent.length);
    assert.deepEqual(aliceTail.map((e) => e.getId()), sent.map((s) => s.event_id));
}));

// ---------------------------------------------------------------------------
// (2) typing notifications

test("typing: bob's client sees alice start and stop typing", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Typing room" });
    const typingEvents = [];
    const onTyping = (_event, member) => {
        if (member.roomId === roomId) typingEvents.push({ userId: member.userId, typing: member.typing });
    };
    bob.on(RoomMemberEvent.Typing, onTyping);
    try {
        assert.equal(bob.getRoom(roomId).getMember(ALICE)?.typing, false, "alice is not typing at first");

        await alice.sendTyping(roomId, true, 5000);
        const typingMember = await waitUntil(
            bob,
            [RoomMemberEvent.Typing],
            () => {
                const m = bob.getRoom(roomId)?.getMember(ALICE);
                return m?.typing === true ? m : null;
            },
            "bob to see alice typing",
            { describe: () => JSON.stringify(typingEvents) },
        );
        assert.equal(typingMember.userId, ALICE);
        assert.ok(typingEvents.some((e) => e.userId === ALICE && e.typing === true), `"RoomMember.typing" fired for alice: ${JSON.stringify(typingEvents)}`);
        assert.equal(bob.getRoom(roomId).getMember(BOB)?.typing, false, "bob is not typing");

        await alice.sendTyping(roomId, false);
        await waitUntil(
            bob,
            [RoomMemberEvent.Typing],
            () => bob.getRoom(roomId)?.getMember(ALICE)?.typing === false,
            "bob to see alice stop typing",
            { describe: () => JSON.stringify(typingEvents) },
        );
        assert.deepEqual(
            typingEvents.filter((e) => e.userId === ALICE).map((e) => e.typing),
            [true, false],
            "alice started typing once, then stopped",
        );
        assert.ok(!typingEvents.some((e) => e.userId === BOB), "nobody reported bob typing");
    } finally {
        bob.removeListener(RoomMemberEvent.Typing, onTyping);
    }
}));

// ---------------------------------------------------------------------------
// (3) read receipts

test("receipts: alice's client sees bob's read receipt on her last message", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Receipt room" });
    const { event_id: first } = await alice.sendTextMessage(roomId, "receipts: earlier message");
    const { event_id: last } = await alice.sendTextMessage(roomId, "receipts: please read me");
    const lastAtBob = await waitForEvent(bob, roomId, last);
    await waitForEvent(alice, roomId, last);

    const receiptEvents = [];
    const onReceipt = (event, room) => {
        if (room.roomId === roomId) receiptEvents.push(event.getContent());
    };
    alice.on(RoomEvent.Receipt, onReceipt);
    try {
        await bob.sendReadReceipt(lastAtBob);

        const aliceRoom = alice.getRoom(roomId);
        const receipt = await waitUntil(
            alice,
            [RoomEvent.Receipt],
            () => {
                const r = aliceRoom.getReadReceiptForUserId(BOB, true, ReceiptType.Read);
                return r?.eventId === last ? r : null;
            },
            "alice to see bob's m.read receipt on her last message",
            { describe: () => JSON.stringify(receiptEvents) },
        );
        assert.equal(typeof receipt.data.ts, "number", "the receipt carries a timestamp");
        assert.ok(receipt.data.ts > 0);
        const lastAtAlice = aliceRoom.findEventById(last);
        assert.ok(aliceRoom.getUsersReadUpTo(lastAtAlice).includes(BOB), "getUsersReadUpTo(last) includes bob");
        assert.ok(aliceRoom.hasUserReadEvent(BOB, first), "bob has read the earlier message too");
        assert.equal(aliceRoom.getEventReadUpTo(BOB, true), last);
        // The raw m.receipt EDU that came through alice's sync.
        assert.ok(
            receiptEvents.some((c) => c?.[last]?.[ReceiptType.Read]?.[BOB]),
            `an m.receipt event names bob on ${last}: ${JSON.stringify(receiptEvents)}`,
        );
    } finally {
        alice.removeListener(RoomEvent.Receipt, onReceipt);
    }
}));

test("receipts: a private read receipt and the fully-read marker stay with bob", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Private receipt room" });
    const { event_id: one } = await alice.sendTextMessage(roomId, "private receipts: one");
    const { event_id: two } = await alice.sendTextMessage(roomId, "private receipts: two");
    const oneAtBob = await waitForEvent(bob, roomId, one);
    const twoAtBob = await waitForEvent(bob, roomId, two);
    await waitForEvent(alice, roomId, two);

    const aliceReceipts = [];
    const onReceipt = (event, room) => {
        if (room.roomId === roomId) aliceReceipts.push(event.getContent());
    };
    alice.on(RoomEvent.Receipt, onReceipt);
    try {
        // Private receipt on "one", then read markers: fully read "one", public receipt on "two".
        await bob.sendReadReceipt(oneAtBob, ReceiptType.ReadPrivate);
        await bob.setRoomReadMarkers(roomId, one, twoAtBob);

        // bob's own sync returns his private receipt (only to him) and his m.fully_read marker.
        const bobRoom = bob.getRoom(roomId);
        await waitUntil(
            bob,
            [RoomEvent.Receipt, RoomEvent.AccountData],
            () =>
                bobRoom.getReadReceiptForUserId(BOB, true, ReceiptType.ReadPrivate)?.eventId === one &&
                bobRoom.getAccountData(ReceiptType.FullyRead)?.getContent().event_id === one,
            "bob's sync to return his m.read.private receipt and m.fully_read marker",
            {
                describe: () =>
                    `private=${JSON.stringify(bobRoom.getReadReceiptForUserId(BOB, true, ReceiptType.ReadPrivate))} ` +
                    `fully_read=${JSON.stringify(bobRoom.getAccountData(ReceiptType.FullyRead)?.getContent())}`,
            },
        );

        // alice sees the public receipt on "two"...
        await waitUntil(
            alice,
            [RoomEvent.Receipt],
            () => alice.getRoom(roomId).getReadReceiptForUserId(BOB, true, ReceiptType.Read)?.eventId === two,
            "alice to see bob's public receipt on the second message",
            { describe: () => JSON.stringify(aliceReceipts) },
        );
        // ... and never the private one, nor bob's read marker.
        assert.equal(alice.getRoom(roomId).getReadReceiptForUserId(BOB, true, ReceiptType.ReadPrivate), null, "alice has no private receipt of bob");
        assert.ok(
            !aliceReceipts.some((c) => Object.values(c ?? {}).some((byType) => ReceiptType.ReadPrivate in byType)),
            `no m.read.private receipt reached alice: ${JSON.stringify(aliceReceipts)}`,
        );
        assert.equal(alice.getRoom(roomId).getAccountData(ReceiptType.FullyRead), undefined, "bob's m.fully_read is not in alice's room account data");
    } finally {
        alice.removeListener(RoomEvent.Receipt, onReceipt);
    }
}));

// ---------------------------------------------------------------------------
// (4) history: a fresh client scrolls back

test("history: a fresh client with a small initial sync scrolls back through every message exactly once", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "History room" });
    const N = 12;
    const sentIds = [];
    for (let i = 0; i < N; i++) {
        const { event_id } = await alice.sendTextMessage(roomId, `history ${String(i).padStart(2, "0")}`);
        sentIds.push(event_id);
    }
    await waitForEvent(bob, roomId, sentIds[N - 1]);

    // A new device of bob, whose first sync only returns the last 3 events of each room.
    const fresh = await loginNewDevice(server, BOB, "bob-fresh");
    // Record what each /messages page returned, as parsed by the SDK itself
    // (the SDK drops duplicates silently when it builds the timeline).
    const pages = [];
    const realCreateMessagesRequest = fresh.createMessagesRequest.bind(fresh);
    fresh.createMessagesRequest = async (rid, from, limit, dir, ...rest) => {
        const res = await realCreateMessagesRequest(rid, from, limit, dir, ...rest);
        if (rid === roomId) pages.push({ from, limit, dir, ids: res.chunk.map((e) => e.event_id), end: res.end });
        return res;
    };
    try {
        await startSyncing(fresh, { initialSyncLimit: 3 });
        const room = fresh.getRoom(roomId);
        assert.ok(room, "the fresh client knows the room after its initial sync");
        assert.equal(room.getMyMembership(), KnownMembership.Join);
        const initial = room.getLiveTimeline().getEvents().map((e) => e.getId());
        assert.deepEqual(initial, sentIds.slice(-3), `the initial sync timeline holds exactly the last 3 messages:\n  ${describeTimeline(room)}`);
        assert.ok(room.oldState.paginationToken, "the initial sync gave a prev_batch token (timeline is limited)");

        const scrolledBack = [];
        const onTimeline = (event, r, toStartOfTimeline) => {
            if (r?.roomId === roomId && toStartOfTimeline) scrolledBack.push(event.getId());
        };
        fresh.on(RoomEvent.Timeline, onTimeline);
        let calls = 0;
        while (room.oldState.paginationToken !== null && calls < 40) {
            await fresh.scrollback(room, 4);
            calls += 1;
        }
        fresh.removeListener(RoomEvent.Timeline, onTimeline);
        assert.equal(room.oldState.paginationToken, null, `scrollback reached the start of the room within ${calls} calls`);

        const all = room.getLiveTimeline().getEvents();
        assert.equal(all[0].getType(), EventType.RoomCreate, `the timeline starts with m.room.create:\n  ${describeTimeline(room)}`);
        assert.deepEqual(
            all.filter((e) => e.getType() === EventType.RoomMessage).map((e) => e.getId()),
            sentIds,
            "every message is in the timeline once, in the order sent",
        );
        assert.deepEqual(
            all.filter((e) => e.getType() === EventType.RoomMessage).map((e) => e.getContent().body),
            sentIds.map((_, i) => `history ${String(i).padStart(2, "0")}`),
        );
        const allIds = all.map((e) => e.getId());
        assert.equal(new Set(allIds).size, allIds.length, "no event twice in the timeline");

        // What the server sent: pages going backwards, each event exactly once
        // across the initial sync and all /messages pages, newest first.
        assert.ok(pages.length >= 3, `several /messages pages were needed (got ${pages.length})`);
        for (const p of pages) {
            assert.equal(p.dir, "b");
            assert.ok(p.ids.length <= p.limit, `a page holds at most limit=${p.limit} events (got ${p.ids.length})`);
        }
        const served = [...initial, ...pages.flatMap((p) => p.ids)];
        const dupes = served.filter((id, i) => served.indexOf(id) !== i);
        assert.deepEqual(dupes, [], `no event served twice by /sync + /messages; pages: ${JSON.stringify(pages)}`);
        const olderMessages = pages.flatMap((p) => p.ids).filter((id) => sentIds.includes(id));
        assert.deepEqual(olderMessages, sentIds.slice(0, N - 3).reverse(), "older messages come newest first, each once");
        assert.deepEqual(scrolledBack, pages.flatMap((p) => p.ids), "the SDK added every paged event to the start of the timeline");
        assert.deepEqual([...allIds].reverse(), [...initial].reverse().concat(pages.flatMap((p) => p.ids)));
    } finally {
        stopClient(fresh);
    }
}));

// ---------------------------------------------------------------------------
// (5) room state: name and topic

test("room state: name and topic set by alice appear on bob's Room", opts, logged(async () => {
    const { room_id: roomId } = await alice.createRoom({ preset: "private_chat", name: "Salon lounge", topic: "Initial topic" });
    await alice.invite(roomId, BOB);
    const invited = await waitForMyMembership(bob, roomId, KnownMembership.Invite);
    // The invite's stripped state lets bob's client name the room before joining.
    assert.equal(invited.name, "Salon lounge", "bob's invited Room is named from the invite's stripped state (m.room.name)");

    await bob.joinRoom(roomId);
    const room = await waitForMyMembership(bob, roomId, KnownMembership.Join);
    await waitUntil(bob, [RoomStateEvent.Events, RoomEvent.Name], () => room.currentState.getStateEvents(EventType.RoomTopic, ""), "bob to have the room's topic");
    assert.equal(room.name, "Salon lounge");
    assert.equal(room.currentState.getStateEvents(EventType.RoomName, "").getContent().name, "Salon lounge");
    assert.equal(room.currentState.getStateEvents(EventType.RoomTopic, "").getContent().topic, "Initial topic");

    const nameChanges = [];
    const onName = (r) => {
        if (r.roomId === roomId) nameChanges.push(r.name);
    };
    bob.on(RoomEvent.Name, onName);
    try {
        const { event_id: nameId } = await alice.setRoomName(roomId, "Salon lounge ✓ renamed");
        const { event_id: topicId } = await alice.setRoomTopic(roomId, "New topic: interop with matrix-js-sdk");

        await waitUntil(
            bob,
            [RoomStateEvent.Events, RoomEvent.Name],
            () =>
                room.name === "Salon lounge ✓ renamed" &&
                room.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic === "New topic: interop with matrix-js-sdk",
            "bob to see the new name and topic",
            { describe: () => `name=${room.name} topic=${room.currentState.getStateEvents(EventType.RoomTopic, "")?.getContent().topic}` },
        );
        const nameEv = room.currentState.getStateEvents(EventType.RoomName, "");
        const topicEv = room.currentState.getStateEvents(EventType.RoomTopic, "");
        assert.equal(nameEv.getId(), nameId);
        assert.equal(nameEv.getSender(), ALICE);
        assert.equal(nameEv.getStateKey(), "");
        assert.equal(topicEv.getId(), topicId);
        assert.equal(topicEv.getSender(), ALICE);
        assert.equal(topicEv.getStateKey(), "");
        // The previous values travel with the state events (unsigned.prev_content).
        assert.equal(nameEv.getPrevContent().name, "Salon lounge", "m.room.name carries prev_content");
        assert.equal(topicEv.getPrevContent().topic, "Initial topic", "m.room.topic carries prev_content");
        assert.ok(nameChanges.includes("Salon lounge ✓ renamed"), `"Room.name" fired with the new name: ${JSON.stringify(nameChanges)}`);
        // Both changes are also in bob's live timeline, in order.
        const stateIds = room.getLiveTimeline().getEvents().filter((e) => e.isState()).map((e) => e.getId());
        assert.ok(stateIds.indexOf(nameId) >= 0 && stateIds.indexOf(nameId) < stateIds.indexOf(topicId), "name then topic change in bob's timeline");
    } finally {
        bob.removeListener(RoomEvent.Name, onName);
    }
}));

// ---------------------------------------------------------------------------
// More of what a real client's sync loop relies on

test("typing: the server ends a typing notification when its timeout runs out", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Typing timeout room" });
    await alice.sendTyping(roomId, true, 1000);
    await waitUntil(bob, [RoomMemberEvent.Typing], () => bob.getRoom(roomId)?.getMember(ALICE)?.typing === true, "bob to see alice typing");
    const started = Date.now();
    // No "stop typing" from alice: the server must drop her after ~1 s by itself.
    await waitUntil(bob, [RoomMemberEvent.Typing], () => bob.getRoom(roomId)?.getMember(ALICE)?.typing === false, "alice's typing to time out (sent with timeout 1000 ms)", { ms: 10_000 });
    assert.ok(Date.now() - started >= 500, `typing ended after ${Date.now() - started} ms, not long before the 1000 ms timeout`);
}));

test("sync wake-up: bob's sync loop gets each message at once while alice also types in another room", opts, logged(async () => {
    // alice's message (a timeline write) and her typing notification (an
    // ephemeral update) take stream positions in that order but the typing
    // is announced first. A /sync long-poll of bob's that starts in between
    // must still wake up when the message commits, not at its 30 s timeout.
    const talkRoom = await roomWithBob({ name: "Wake-up talk room" });
    const typingRoom = await roomWithBob({ name: "Wake-up typing room" });
    const ROUNDS = 60;
    const PROMPT_MS = 5_000;
    for (let i = 0; i < ROUNDS; i++) {
        const started = Date.now();
        const body = `wake-up ${i}`;
        const arrived = waitUntil(
            bob,
            [RoomEvent.Timeline],
            () => bob.getRoom(talkRoom)?.getLiveTimeline().getEvents().some((e) => e.getContent().body === body),
            `bob's sync loop to deliver "${body}" (round ${i + 1} of ${ROUNDS}) within ${PROMPT_MS} ms; ` +
                "it was sent while alice's typing notification in another room was announced, and a long-poll " +
                "that started in between was not woken when the message committed (it waits for its timeout, 30 s for matrix-js-sdk)",
            { ms: PROMPT_MS },
        );
        const send = alice.sendTextMessage(talkRoom, body);
        await alice.sendTyping(typingRoom, i % 2 === 0, 30_000);
        await send;
        await arrived;
        assert.ok(Date.now() - started < PROMPT_MS);
    }
    await alice.sendTyping(typingRoom, false);
}));

test("redaction: bob's client sees alice's message redacted", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Redaction room" });
    const { event_id: eventId } = await alice.sendTextMessage(roomId, "this message will be redacted");
    const atBob = await waitForEvent(bob, roomId, eventId);
    assert.equal(atBob.getContent().body, "this message will be redacted");

    const redactions = [];
    const onRedaction = (ev, room) => {
        if (room.roomId === roomId) redactions.push(ev);
    };
    bob.on(RoomEvent.Redaction, onRedaction);
    try {
        const { event_id: redactionId } = await alice.redactEvent(roomId, eventId, undefined, { reason: "interop test" });
        await waitUntil(bob, [RoomEvent.Redaction, RoomEvent.Timeline], () => atBob.isRedacted(), "bob's copy of the message to be redacted", {
            describe: () => describeTimeline(bob.getRoom(roomId)),
        });
        assert.deepEqual(atBob.getContent(), {}, "the redacted message has no content left");
        assert.equal(atBob.getType(), EventType.RoomMessage);
        const redaction = redactions.find((r) => r.getId() === redactionId);
        assert.ok(redaction, `"Room.redaction" fired for ${redactionId}`);
        assert.equal(redaction.getSender(), ALICE);
        assert.equal(redaction.getAssociatedId(), eventId, "the redaction points at the message");
        assert.equal(redaction.getContent().reason, "interop test");
    } finally {
        bob.removeListener(RoomEvent.Redaction, onRedaction);
    }
}));

test("presence: bob's client sees alice's presence and status message", opts, logged(async () => {
    await roomWithBob({ name: "Presence room" }); // presence is shared between users who share a room
    await alice.setPresence({ presence: "online", status_msg: "running interop tests" });
    const user = await waitUntil(
        bob,
        ["User.presence", ClientEvent.Event],
        () => {
            const u = bob.getUser(ALICE);
            return u?.presence === "online" && u.presenceStatusMsg === "running interop tests" ? u : null;
        },
        "bob to see alice online with her status message",
        { describe: () => JSON.stringify({ presence: bob.getUser(ALICE)?.presence, msg: bob.getUser(ALICE)?.presenceStatusMsg }) },
    );
    assert.equal(user.userId, ALICE);
    await alice.setPresence({ presence: "unavailable", status_msg: "away from keyboard" });
    await waitUntil(
        bob,
        ["User.presence", ClientEvent.Event],
        () => bob.getUser(ALICE)?.presence === "unavailable" && bob.getUser(ALICE)?.presenceStatusMsg === "away from keyboard",
        "bob to see alice unavailable",
        { describe: () => JSON.stringify({ presence: bob.getUser(ALICE)?.presence, msg: bob.getUser(ALICE)?.presenceStatusMsg }) },
    );
}));

test("account data: global and per-room account data and tags come back through alice's own sync", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Account data room" });
    await alice.setAccountData("org.salon.interop.global", { answer: 42, nested: { ok: true } });
    await alice.setRoomAccountData(roomId, "org.salon.interop.room", { colour: "teal" });
    await alice.setRoomTag(roomId, "m.favourite", { order: 0.25 });
    await waitUntil(
        alice,
        [ClientEvent.AccountData, RoomEvent.AccountData, RoomEvent.Tags],
        () => {
            const room = alice.getRoom(roomId);
            return (
                alice.getAccountData("org.salon.interop.global")?.getContent().answer === 42 &&
                room?.getAccountData("org.salon.interop.room")?.getContent().colour === "teal" &&
                room?.tags?.["m.favourite"]?.order === 0.25
            );
        },
        "alice's sync to return her account data and tag",
        { describe: () => JSON.stringify({ global: alice.getAccountData("org.salon.interop.global")?.getContent(), tags: alice.getRoom(roomId)?.tags }) },
    );
    assert.deepEqual(alice.getAccountData("org.salon.interop.global").getContent(), { answer: 42, nested: { ok: true } });
    // None of it leaks to bob.
    assert.equal(bob.getAccountData("org.salon.interop.global"), undefined, "alice's global account data is not in bob's sync");
    assert.equal(bob.getRoom(roomId).getAccountData("org.salon.interop.room"), undefined, "alice's room account data is not in bob's sync");
    assert.deepEqual(bob.getRoom(roomId).tags, {}, "alice's tags are not bob's");
}));

test("leave: bob leaves and both clients see it through sync", opts, logged(async () => {
    const roomId = await roomWithBob({ name: "Leaving room" });
    await bob.leave(roomId);
    await waitForMyMembership(bob, roomId, KnownMembership.Leave);
    const member = await waitForMember(alice, roomId, BOB, KnownMembership.Leave);
    assert.equal(member.events.member.getSender(), BOB);
    // The room summary of the same sync response brings the count down to 1
    // (the SDK applies the summary after the timeline, so wait for it).
    await waitUntil(alice, [RoomEvent.Summary, ClientEvent.Sync], () => alice.getRoom(roomId).getJoinedMemberCount() === 1, "alice's joined member count to drop to 1", {
        describe: () => String(alice.getRoom(roomId).getJoinedMemberCount()),
    });
    // bob no longer receives the room's messages.
    const { event_id: afterLeave } = await alice.sendTextMessage(roomId, "bob has gone");
    await waitForEvent(alice, roomId, afterLeave);
    const { event_id: marker } = await alice.sendTextMessage(await roomWithBob({ name: "Marker room" }), "marker");
    await waitUntil(bob, [RoomEvent.Timeline], () => bob.getRooms().some((r) => r.findEventById(marker)), "bob's sync to move past the left room's new message");
    assert.equal(bob.getRoom(roomId)?.findEventById(afterLeave), undefined, "bob did not receive a message sent after he left");
}));

test("lazy-loaded members: summary counts, then /members fills in the member list", opts, logged(async () => {
    const carol = await registerUser(server, "carol");
    const CAROL = carol.getUserId();
    const roomId = await roomWithBob(); // no name: clients name it from the heroes
    await alice.invite(roomId, CAROL);
    await carol.joinRoom(roomId);
    await waitForMember(alice, roomId, CAROL, KnownMembership.Join);
    stopClient(carol);
    const { event_id: last } = await alice.sendTextMessage(roomId, "lazy loading: last message");
    await waitForEvent(alice, roomId, last);

    const fresh = await loginNewDevice(server, ALICE, "alice-lazy");
    try {
        await startSyncing(fresh, { initialSyncLimit: 1, lazyLoadMembers: true });
        const room = fresh.getRoom(roomId);
        assert.ok(room, "the lazy-loading client knows the room");
        assert.deepEqual(room.getLiveTimeline().getEvents().map((e) => e.getId()), [last], "limit 1: only the last message");
        // With lazy loading the counts come from the sync summary.
        assert.equal(room.getJoinedMemberCount(), 3, "summary m.joined_member_count");
        assert.equal(room.getInvitedMemberCount(), 0, "summary m.invited_member_count");
        assert.deepEqual(
            (room.heroes ?? []).map((h) => h.userId).sort(),
            [BOB, CAROL].sort(),
            "summary m.heroes names the two other members",
        );
        assert.ok(room.getMember(ALICE), "the sender of the timeline event is a known member");

        await room.loadMembersIfNeeded();
        assert.ok(room.membersLoaded());
        assert.deepEqual(
            room.getJoinedMembers().map((m) => m.userId).sort(),
            [ALICE, BOB, CAROL].sort(),
            "after /members every joined member is known",
        );
    } finally {
        stopClient(fresh);
    }
}));

// ---------------------------------------------------------------------------
// Bookkeeping: push rules, and what the SDK asked for that the server lacks

test("GET /_matrix/client/v3/pushrules/ answers with the server-default rules, which the SDK's clients hold", opts, logged(async () => {
    const res = await fetch(`${server.baseUrl}/_matrix/client/v3/pushrules/`, {
        headers: { Authorization: `Bearer ${alice.getAccessToken()}` },
    });
    const body = await res.json().catch(() => null);
    assert.equal(res.status, 200, `GET /pushrules/ -> ${res.status} ${JSON.stringify(body)}`);
    assert.equal(typeof body?.global, "object", `the response has a global rule set: ${JSON.stringify(body)}`);
    const ids = (kind) => (body.global[kind] ?? []).map((r) => r.rule_id);
    assert.ok(ids("override").includes(".m.rule.master"), `global.override has .m.rule.master: ${JSON.stringify(ids("override"))}`);
    assert.ok(ids("underride").includes(".m.rule.message"), `global.underride has .m.rule.message: ${JSON.stringify(ids("underride"))}`);

    // alice's and bob's sync loops are PREPARED (see before()): the SDK
    // fetched the rules from the server and parsed them.
    for (const client of [alice, bob]) {
        const override = (client.pushRules?.global?.override ?? []).map((r) => r.rule_id);
        assert.ok(override.includes(".m.rule.master"), `${client.getUserId()}'s client.pushRules has .m.rule.master: ${JSON.stringify(override)}`);
    }
}));

test("every endpoint matrix-js-sdk called is implemented", opts, async (t) => {
    // For information: every other request that failed (the tests above
    // decide whether that was right).
    for (const line of failedRequests()) t.diagnostic(`failed request: ${line}`);
    const missing = unrecognizedEndpoints();
    for (const m of missing) t.diagnostic(`unrecognized: ${m.method} ${m.path} -> ${m.status} ${m.errcode} (${m.count}x)`);
    assert.deepEqual(missing.map((m) => `${m.method} ${m.path}`), [], "endpoints answered 404/405 M_UNRECOGNIZED");
});
