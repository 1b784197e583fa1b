// End-to-end encryption with matrix-js-sdk's Rust crypto (the same crypto stack as
// Element Web), against Salon. The server only stores and routes keys and ciphertext;
// every encryption, decryption and signature here is done by the SDK.
//
//   SALON_BIN=$HOME/.cache/salon/target/debug/salon node --test tests/interop-js/
//
// alice and bob run real MatrixClients with initRustCrypto (in memory, no IndexedDB).

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import { LoggerLevel, Tracing } from "@matrix-org/matrix-sdk-crypto-wasm";
import { ClientEvent, EventType, MatrixEventEvent, MsgType, RoomEvent, RoomMemberEvent } from "matrix-js-sdk";

import {
    PASSWORD,
    WAIT_MS,
    loginNewDevice,
    registerUser,
    startServer,
    startSyncing,
    stopAllClients,
    unrecognizedEndpoints,
    waitUntil,
    withServerLog,
} from "./harness.mjs";

const TEST_TIMEOUT_MS = 120_000;
const opts = { timeout: TEST_TIMEOUT_MS };

let server = null;
let alice = null;
let bob = null;
let roomId = null;
let secretEventId = null;

const logged = (fn) => withServerLog(() => server, fn);

async function cryptoClient(client) {
    await client.initRustCrypto({ useIndexedDB: false });
    // initRustCrypto turns the crypto library's own tracing on at DEBUG; keep it to
    // warnings unless the SDK's log was asked for.
    if (!process.env.SALON_INTEROP_JS_SDK_LOG) new Tracing(LoggerLevel.Warn).turnOn();
    await startSyncing(client);
    return client;
}

/** Poll `check` (async) every 200 ms until it returns a truthy value. */
async function eventually(check, what, ms = WAIT_MS) {
    const deadline = Date.now() + ms;
    let last;
    for (;;) {
        last = await check();
        if (last) return last;
        if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
        await sleep(200);
    }
}

function decryptedBody(client, room, eventId) {
    const ev = client.getRoom(room)?.findEventById(eventId);
    if (!ev || ev.isDecryptionFailure() || ev.getType() !== EventType.RoomMessage) return null;
    return ev.getContent().body ?? null;
}

const passwordAuth = (userId) => async (makeRequest) => {
    await makeRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: userId },
        password: PASSWORD,
    });
};

before(async () => {
    server = await startServer();
    try {
        alice = await cryptoClient(await registerUser(server, "alice"));
        bob = await cryptoClient(await registerUser(server, "bob"));
    } catch (e) {
        stopAllClients();
        await server.stop();
        throw e;
    }
});

after(async () => {
    stopAllClients();
    if (server) await server.stop();
});

test(
    "bob decrypts alice's message in an encrypted room; the server holds only ciphertext",
    opts,
    logged(async () => {
        const created = await alice.createRoom({
            name: "secret plans",
            invite: [bob.getUserId()],
            initial_state: [
                { type: "m.room.encryption", state_key: "", content: { algorithm: "m.megolm.v1.aes-sha2" } },
            ],
        });
        roomId = created.room_id;
        await waitUntil(bob, [RoomEvent.MyMembership, ClientEvent.Room], () => bob.getRoom(roomId)?.getMyMembership() === "invite", "bob's invite", {
            describe: () => JSON.stringify(bob.getRooms().map((r) => [r.roomId, r.getMyMembership()])) + " wanted " + roomId,
        });
        await bob.joinRoom(roomId);
        await waitUntil(
            alice,
            [RoomMemberEvent.Membership],
            () => alice.getRoom(roomId)?.getMember(bob.getUserId())?.membership === "join",
            "alice seeing bob join",
        );
        assert.equal(await alice.getCrypto().isEncryptionEnabledInRoom(roomId), true);

        const sent = await alice.sendMessage(roomId, { msgtype: MsgType.Text, body: "the eagle lands at noon" });
        secretEventId = sent.event_id;

        const body = await waitUntil(
            bob,
            [RoomEvent.Timeline, MatrixEventEvent.Decrypted],
            () => decryptedBody(bob, roomId, secretEventId),
            "bob decrypting alice's message",
            { describe: () => JSON.stringify(bob.getRoom(roomId)?.findEventById(secretEventId)?.getEffectiveEvent()) },
        );
        assert.equal(body, "the eagle lands at noon");

        // What the server stored and serves is an m.room.encrypted event without the text.
        const res = await fetch(`${server.baseUrl}/_matrix/client/v3/rooms/${encodeURIComponent(roomId)}/event/${encodeURIComponent(secretEventId)}`, {
            headers: { Authorization: `Bearer ${bob.getAccessToken()}` },
        });
        const raw = await res.json();
        assert.equal(raw.type, "m.room.encrypted");
        assert.equal(raw.content.algorithm, "m.megolm.v1.aes-sha2");
        assert.ok(!JSON.stringify(raw).includes("eagle"), "plaintext reached the server");
    }),
);

test(
    "a to-device message arrives exactly once",
    opts,
    logged(async () => {
        const received = [];
        const onToDevice = (ev) => {
            if (ev.getType() === "org.salon.interop.ping") received.push(ev.getContent().n);
        };
        bob.on(ClientEvent.ToDeviceEvent, onToDevice);
        try {
            await alice.sendToDevice(
                "org.salon.interop.ping",
                new Map([[bob.getUserId(), new Map([[bob.getDeviceId(), { n: 7 }]])]]),
            );
            await eventually(() => received.length > 0, "bob's to-device message");
            // Several more syncs happen meanwhile (alice sends a message to make sure).
            await alice.sendMessage(roomId, { msgtype: MsgType.Text, body: "flush" });
            await sleep(1500);
            assert.deepEqual(received, [7]);
        } finally {
            bob.removeListener(ClientEvent.ToDeviceEvent, onToDevice);
        }
    }),
);

test(
    "a new login of bob shows up in alice's device list",
    opts,
    logged(async () => {
        const bob2 = await cryptoClient(await loginNewDevice(server, bob.getUserId(), "bob-phone"));
        const devices = await eventually(async () => {
            const map = await alice.getCrypto().getUserDeviceInfo([bob.getUserId()]);
            const mine = map.get(bob.getUserId());
            return mine?.has(bob2.getDeviceId()) ? mine : null;
        }, "alice learning of bob's new device through device_lists.changed");
        assert.ok(devices.get(bob2.getDeviceId()).getIdentityKey(), "the new device has an identity key");

        // And the new device can read what alice sends from now on.
        await waitUntil(bob2, [RoomEvent.MyMembership], () => bob2.getRoom(roomId)?.getMyMembership() === "join", "bob2 sees the room");
        const sent = await alice.sendMessage(roomId, { msgtype: MsgType.Text, body: "hello, new phone" });
        const body = await waitUntil(
            bob2,
            [RoomEvent.Timeline, MatrixEventEvent.Decrypted],
            () => decryptedBody(bob2, roomId, sent.event_id),
            "bob2 decrypting",
        );
        assert.equal(body, "hello, new phone");
    }),
);

test(
    "cross-signing: alice bootstraps her keys; bob queries them; her device is cross-signed",
    opts,
    logged(async () => {
        const crypto = alice.getCrypto();
        await crypto.bootstrapCrossSigning({ authUploadDeviceSigningKeys: passwordAuth(alice.getUserId()) });
        assert.equal(await crypto.isCrossSigningReady(), true);
        const masterId = await crypto.getCrossSigningKeyId();
        assert.ok(masterId);

        const keys = await bob.downloadKeysForUsers([alice.getUserId()]);
        const master = keys.master_keys?.[alice.getUserId()];
        assert.ok(master, "bob sees alice's master key");
        assert.equal(Object.values(master.keys)[0], masterId);
        const ssk = keys.self_signing_keys?.[alice.getUserId()];
        assert.ok(ssk, "bob sees alice's self-signing key");
        const sskId = Object.keys(ssk.keys)[0];
        const device = keys.device_keys[alice.getUserId()][alice.getDeviceId()];
        assert.ok(device.signatures[alice.getUserId()][sskId], "alice's device is signed by her self-signing key");
        assert.equal(keys.user_signing_keys?.[alice.getUserId()], undefined, "only alice sees her user-signing key");

        // Bob's crypto trusts the signature chain: alice's device is cross-signed.
        const status = await eventually(async () => {
            const s = await bob.getCrypto().getDeviceVerificationStatus(alice.getUserId(), alice.getDeviceId());
            return s?.signedByOwner ? s : null;
        }, "bob seeing alice's device signed by her identity");
        assert.equal(status.signedByOwner, true);
    }),
);

test(
    "key backup: alice backs up her room keys; a new device restores them and decrypts history",
    opts,
    logged(async () => {
        const crypto = alice.getCrypto();
        await crypto.resetKeyBackup();
        const version = await eventually(() => crypto.getActiveSessionBackupVersion(), "backup to become active");

        // A message after the backup exists; its session key goes to the backup.
        const sent = await alice.sendMessage(roomId, { msgtype: MsgType.Text, body: "remember this" });
        const info = await eventually(async () => {
            const res = await fetch(`${server.baseUrl}/_matrix/client/v3/room_keys/version/${version}`, {
                headers: { Authorization: `Bearer ${alice.getAccessToken()}` },
            });
            const body = await res.json();
            return body.count >= 1 ? body : null;
        }, "alice's keys reaching the backup", 30_000);
        assert.equal(info.version, version);

        const alice2 = await cryptoClient(await loginNewDevice(server, alice.getUserId(), "alice-laptop"));
        const key = await crypto.getSessionBackupPrivateKey();
        assert.ok(key, "alice holds the backup decryption key");
        await alice2.getCrypto().storeSessionBackupPrivateKey(key, version);
        await eventually(() => alice2.getCrypto().getActiveSessionBackupVersion(), "alice2 trusting the backup", 30_000).catch(() => null);
        const result = await alice2.getCrypto().restoreKeyBackup();
        assert.ok(result.imported >= 1, `imported ${result.imported} of ${result.total} keys`);

        await waitUntil(alice2, [RoomEvent.MyMembership], () => alice2.getRoom(roomId)?.getMyMembership() === "join", "alice2 sees the room");
        const room = alice2.getRoom(roomId);
        const body = await eventually(async () => {
            const ev = room.findEventById(sent.event_id);
            if (!ev) {
                await alice2.scrollback(room, 20);
                return null;
            }
            if (ev.isDecryptionFailure()) await ev.attemptDecryption(alice2.getCrypto(), { isRetry: true });
            return decryptedBody(alice2, roomId, sent.event_id);
        }, "alice2 decrypting with the restored key");
        assert.equal(body, "remember this");
    }),
);

test("no endpoint the SDK's crypto called was unrecognised", () => {
    const wanted = unrecognizedEndpoints().filter((e) => /keys|sendToDevice|room_keys/.test(e.path));
    assert.deepEqual(wanted, []);
});
