// Test harness for the matrix-js-sdk interoperability suite.
//
// Starts a real Salon server from $SALON_BIN (configured only through
// environment variables, on a free loopback port, with a temporary data
// directory), registers users through the SDK and hands out MatrixClients
// that run the SDK's own sync loop.
//
// Every HTTP request the SDK makes goes through `recordingFetch`, which keeps
// a log of the requests and notes each endpoint the server does not know
// (404 or 405 with errcode M_UNRECOGNIZED): see `unrecognizedEndpoints()`.
//
// The clients are used as the SDK makes them: in particular each one fetches
// the server's push rules (GET /_matrix/client/v3/pushrules/) before its first
// /sync and cannot reach PREPARED without them.
//
// Environment:
//   SALON_BIN                  path of the salon binary (required)
//   SALON_INTEROP_LOG          keep the server log at this path (default: in
//                              the temporary directory, which is removed)
//   SALON_INTEROP_JS_SDK_LOG   matrix-js-sdk log level (default: "silent";
//                              e.g. "warn", "debug")

import { spawn } from "node:child_process";
import { once } from "node:events";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";
import { setTimeout as sleep } from "node:timers/promises";

import { ClientEvent, createClient, SyncState } from "matrix-js-sdk";
import { logger as sdkLogger } from "matrix-js-sdk/lib/logger.js";

export const SERVER_NAME = "localhost";
export const WAIT_MS = 15_000;
const STARTUP_TIMEOUT_MS = 30_000;
const STOP_TIMEOUT_MS = 10_000;
const LOG_TAIL_LINES = 80;
export const PASSWORD = "interop-js-password-1";

// The SDK logs through loglevel to the console, and each of its child loggers
// (made per object, e.g. "[MatrixRTCSessionManager]") starts at DEBUG. Filter
// in the root's method factory, which every child logger copies.
const LOG_LEVELS = { trace: 0, debug: 1, info: 2, log: 2, warn: 3, error: 4, silent: 5 };
const sdkLogThreshold = LOG_LEVELS[(process.env.SALON_INTEROP_JS_SDK_LOG || "silent").toLowerCase()] ?? LOG_LEVELS.silent;
{
    const sdkMethodFactory = sdkLogger.methodFactory;
    sdkLogger.methodFactory = function (methodName, level, loggerName) {
        const write = sdkMethodFactory.call(this, methodName, level, loggerName);
        return (LOG_LEVELS[methodName] ?? LOG_LEVELS.info) >= sdkLogThreshold ? write : () => {};
    };
    sdkLogger.setLevel("trace", false);
    sdkLogger.rebuild();
}

// matrix-js-sdk arms a timer for the local timeout of every request and never
// clears it (http-api/utils.js timeoutSignal); for /sync that is the long-poll
// timeout plus 80 s. Those timers would keep this process alive for up to two
// minutes after the last test. Unreference long timers so that they still fire
// while the process runs but do not hold it open; nothing else changes.
const realSetTimeout = globalThis.setTimeout;
globalThis.setTimeout = function setTimeoutUnrefLong(fn, ms, ...args) {
    const timer = realSetTimeout(fn, ms, ...args);
    if (typeof ms === "number" && ms >= 60_000) timer?.unref?.();
    return timer;
};

// ---------------------------------------------------------------------------
// Server process

function salonBin() {
    const bin = process.env.SALON_BIN;
    if (!bin) {
        throw new Error(
            "SALON_BIN is not set: point it at the salon server binary, " +
                "e.g. SALON_BIN=$HOME/.cache/salon/target/debug/salon",
        );
    }
    let st;
    try {
        st = fs.statSync(bin);
    } catch {
        throw new Error(`SALON_BIN=${bin} does not exist (build the server first)`);
    }
    if (!st.isFile()) throw new Error(`SALON_BIN=${bin} is not a file`);
    try {
        fs.accessSync(bin, fs.constants.X_OK);
    } catch {
        throw new Error(`SALON_BIN=${bin} is not executable`);
    }
    return path.resolve(bin);
}

async function freeLoopbackPort() {
    const srv = net.createServer();
    srv.listen(0, "127.0.0.1");
    await once(srv, "listening");
    const { port } = srv.address();
    await new Promise((resolve) => srv.close(resolve));
    return port;
}

async function versionsOk(baseUrl) {
    try {
        const res = await fetch(`${baseUrl}/_matrix/client/versions`, {
            signal: AbortSignal.timeout(2000),
        });
        await res.arrayBuffer();
        return res.status === 200;
    } catch {
        return false;
    }
}

function readTail(file, lines) {
    try {
        const text = fs.readFileSync(file, "utf8");
        return text.split("\n").slice(-lines - 1).join("\n");
    } catch (e) {
        return `<cannot read ${file}: ${e.message}>`;
    }
}

/**
 * Start `$SALON_BIN serve` on a free loopback port and wait until
 * GET /_matrix/client/versions answers 200. Returns an object with
 * `baseUrl`, `logPath`, `logTail()` and `stop()`.
 */
export async function startServer() {
    const bin = salonBin();
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "salon-interop-js-"));
    const dataDir = path.join(tmp, "data");
    fs.mkdirSync(dataDir);
    const logPath = process.env.SALON_INTEROP_LOG || path.join(tmp, "server.log");
    fs.mkdirSync(path.dirname(logPath), { recursive: true });
    const port = await freeLoopbackPort();
    const baseUrl = `http://127.0.0.1:${port}`;

    const logFd = fs.openSync(logPath, "w");
    const child = spawn(bin, ["serve"], {
        cwd: tmp,
        stdio: ["ignore", logFd, logFd],
        env: {
            ...process.env,
            SALON_SERVER_NAME: SERVER_NAME,
            SALON_LISTEN: `127.0.0.1:${port}`,
            SALON_DATA_DIR: dataDir,
            SALON_REGISTRATION__MODE: "open",
            SALON_RATE_LIMITS__ENABLED: "false",
        },
    });
    fs.closeSync(logFd);
    let exit = null;
    const exited = new Promise((resolve) => {
        child.once("exit", (code, signal) => {
            exit = { code, signal };
            resolve(exit);
        });
        child.once("error", (err) => {
            exit = { error: err };
            resolve(exit);
        });
    });
    // Never leave a server behind if this process dies abruptly.
    const killOnExit = () => {
        if (exit === null) child.kill("SIGKILL");
    };
    process.once("exit", killOnExit);

    const server = {
        baseUrl,
        logPath,
        logTail: (lines = LOG_TAIL_LINES) => readTail(logPath, lines),
        async stop() {
            if (exit === null) {
                child.kill("SIGTERM");
                const cancel = new AbortController();
                const t = await Promise.race([
                    exited,
                    sleep(STOP_TIMEOUT_MS, "timeout", { signal: cancel.signal }).catch(() => null),
                ]);
                cancel.abort();
                if (t === "timeout") {
                    child.kill("SIGKILL");
                    await exited;
                }
            }
            process.removeListener("exit", killOnExit);
            fs.rmSync(tmp, { recursive: true, force: true });
        },
    };

    const deadline = Date.now() + STARTUP_TIMEOUT_MS;
    let problem = null;
    for (;;) {
        if (exit !== null) {
            problem = exit.error
                ? `could not start ${bin}: ${exit.error.message}`
                : `salon exited during startup (code ${exit.code}, signal ${exit.signal})`;
            break;
        }
        if (await versionsOk(baseUrl)) break;
        if (Date.now() > deadline) {
            problem = `GET ${baseUrl}/_matrix/client/versions did not answer 200 within ${STARTUP_TIMEOUT_MS / 1000}s`;
            break;
        }
        await sleep(100);
    }
    if (problem !== null) {
        const tail = server.logTail();
        await server.stop();
        throw new Error(`${problem}\n--- last lines of the server log ---\n${tail}`);
    }
    return server;
}

// ---------------------------------------------------------------------------
// HTTP recording

const T0 = Date.now();
const requestLog = []; // { who, method, path, status, errcode, ms, started }
const inFlight = new Set(); // requests without a response yet
const unrecognized = new Map(); // "METHOD /path" -> { method, path, status, errcode, count }

/** Replace ids in a path by placeholders so that the same endpoint groups together. */
function templatePath(p) {
    return p
        .split("/")
        .map((seg) => {
            const s = decodeURIComponent(seg);
            if (/^[!@#$]/.test(s)) return `{${{ "!": "roomId", "@": "userId", "#": "alias", $: "eventId" }[s[0]]}}`;
            if (/^m\d+\.\d+$/.test(s) || /^\d{10,}$/.test(s) || /^[A-Za-z0-9_-]{20,}$/.test(s) && !s.startsWith("m.")) return "{id}";
            return s;
        })
        .join("/");
}

/** A fetch() for the SDK that records every request and every unknown endpoint. */
function recordingFetch(who) {
    return async (resource, init = {}) => {
        const url = new URL(typeof resource === "string" ? resource : resource.url ?? String(resource));
        const method = (init.method || resource.method || "GET").toUpperCase();
        const started = Date.now();
        const flight = { who, method, path: url.pathname, query: url.search, started };
        inFlight.add(flight);
        let res;
        try {
            res = await fetch(resource, init);
        } catch (e) {
            requestLog.push({ who, method, path: url.pathname, status: `error: ${e.name}`, ms: Date.now() - started, started });
            throw e;
        } finally {
            inFlight.delete(flight);
        }
        const entry = { who, method, path: url.pathname, status: res.status, ms: Date.now() - started, started };
        requestLog.push(entry);
        if (res.status >= 400) {
            try {
                const body = await res.clone().json();
                entry.errcode = body?.errcode;
            } catch {
                // not JSON
            }
            if ((res.status === 404 || res.status === 405) && entry.errcode === "M_UNRECOGNIZED") {
                const key = `${method} ${templatePath(url.pathname)}`;
                const seen = unrecognized.get(key);
                if (seen) seen.count += 1;
                else unrecognized.set(key, { method, path: templatePath(url.pathname), status: res.status, errcode: entry.errcode, count: 1 });
            }
        }
        return res;
    };
}

/** Endpoints the server answered with 404/405 M_UNRECOGNIZED so far. */
export function unrecognizedEndpoints() {
    return [...unrecognized.values()];
}

/**
 * Every request that got an HTTP error status (or no response, except the
 * aborts of stopClient), as "who METHOD status errcode path".
 */
export function failedRequests() {
    return requestLog
        .filter((r) => (typeof r.status !== "number" && r.status !== "error: AbortError") || r.status >= 400)
        .map((r) => `${r.who} ${r.method} ${r.status} ${r.errcode ?? ""} ${r.path}`);
}

/**
 * The last `n` requests made by the SDK clients, one per line (start time in
 * ms since the harness was loaded), then those still waiting for a response.
 */
export function requestLogTail(n = 40) {
    const done = requestLog
        .slice(-n)
        .map((r) => `+${String(r.started - T0).padStart(6)} ${r.who.padEnd(10)} ${r.method.padEnd(6)} ${String(r.status).padEnd(4)} ${r.errcode ?? ""} ${r.path} (${r.ms} ms)`);
    const now = Date.now();
    const pending = [...inFlight].map(
        (r) => `+${String(r.started - T0).padStart(6)} ${r.who.padEnd(10)} ${r.method.padEnd(6)} ...  ${r.path}${r.query} (no response after ${now - r.started} ms)`,
    );
    return done.join("\n") + (pending.length ? `\n--- requests still waiting for a response ---\n${pending.join("\n")}` : "");
}

// ---------------------------------------------------------------------------
// Clients

const clients = new Set();

/**
 * A MatrixClient for an existing session (userId, accessToken, deviceId).
 * Its HTTP goes through `recordingFetch`.
 */
export function newClient(server, { userId, accessToken, deviceId }, label = userId) {
    const client = createClient({
        baseUrl: server.baseUrl,
        userId,
        accessToken,
        deviceId,
        fetchFn: recordingFetch(label),
        timelineSupport: true,
    });
    clients.add(client);
    return client;
}

/**
 * Register `localpart` through the SDK (m.login.dummy) and return a MatrixClient
 * logged in as that user (not yet syncing).
 */
export async function registerUser(server, localpart) {
    const anon = createClient({ baseUrl: server.baseUrl, fetchFn: recordingFetch("register") });
    const res = await anon.registerRequest({
        username: localpart,
        password: PASSWORD,
        auth: { type: "m.login.dummy" },
        initial_device_display_name: `interop-js ${localpart}`,
    });
    if (!res.access_token) throw new Error(`registration of ${localpart} returned no access_token: ${JSON.stringify(res)}`);
    return newClient(server, { userId: res.user_id, accessToken: res.access_token, deviceId: res.device_id }, localpart);
}

/** Log in a new device of an existing user with its password; returns a (not syncing) client. */
export async function loginNewDevice(server, userId, label) {
    const anon = createClient({ baseUrl: server.baseUrl, fetchFn: recordingFetch(label) });
    const res = await anon.loginRequest({
        type: "m.login.password",
        identifier: { type: "m.id.user", user: userId },
        password: PASSWORD,
        initial_device_display_name: label,
    });
    return newClient(server, { userId: res.user_id, accessToken: res.access_token, deviceId: res.device_id }, label);
}

/**
 * Start the SDK's sync loop and wait for the "sync" event with state PREPARED.
 * Fails (with the SDK's error) if the loop reports ERROR first, or after `ms`.
 */
export async function startSyncing(client, opts = {}, ms = WAIT_MS) {
    const prepared = new Promise((resolve, reject) => {
        const onSync = (state, _prev, data) => {
            if (state === SyncState.Prepared) {
                client.removeListener(ClientEvent.Sync, onSync);
                resolve();
            } else if (state === SyncState.Error) {
                client.removeListener(ClientEvent.Sync, onSync);
                const err = data?.error;
                reject(new Error(`sync loop of ${client.getUserId()} went to ERROR before PREPARED: ${err?.stack ?? err}`));
            }
        };
        client.on(ClientEvent.Sync, onSync);
    });
    await client.startClient({ initialSyncLimit: 10, ...opts });
    await withTimeout(prepared, ms, `sync of ${client.getUserId()} reaching PREPARED`);
}

/** Stop every client made by this harness. */
export function stopAllClients() {
    for (const c of clients) {
        try {
            c.stopClient();
        } catch {
            // already stopped
        }
    }
    clients.clear();
}

export function stopClient(client) {
    client.stopClient();
    clients.delete(client);
}

// ---------------------------------------------------------------------------
// Waiting

export async function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    });
    try {
        return await Promise.race([promise, timeout]);
    } finally {
        clearTimeout(timer);
    }
}

/**
 * Wait until `check()` returns a truthy value, re-evaluating it whenever one of
 * `events` is emitted by `client` (and once right away). Resolves with that value.
 * `describe()` (optional) is added to the timeout message to show the last state.
 */
export function waitUntil(client, events, check, what, { ms = WAIT_MS, describe } = {}) {
    return new Promise((resolve, reject) => {
        let done = false;
        const finish = (fn, v) => {
            if (done) return;
            done = true;
            clearTimeout(timer);
            for (const ev of events) client.removeListener(ev, evaluate);
            fn(v);
        };
        const evaluate = () => {
            try {
                const v = check();
                if (v) finish(resolve, v);
            } catch (e) {
                finish(reject, e);
            }
        };
        const timer = setTimeout(() => {
            let extra = "";
            if (describe) {
                try {
                    extra = `\nlast state: ${describe()}`;
                } catch (e) {
                    extra = `\n(describe failed: ${e.message})`;
                }
            }
            finish(reject, new Error(`timed out after ${ms} ms waiting for ${what}${extra}`));
        }, ms);
        for (const ev of events) client.on(ev, evaluate);
        evaluate();
    });
}

// ---------------------------------------------------------------------------
// node:test helper

/**
 * Wrap a test body so that a failure carries the tail of the server log and
 * of the SDK's request log.
 */
export function withServerLog(getServer, fn) {
    return async (t) => {
        try {
            await fn(t);
        } catch (err) {
            const server = getServer();
            const extra =
                `\n--- last SDK requests ---\n${requestLogTail()}` +
                (server ? `\n--- last lines of the server log (${server.logPath}) ---\n${server.logTail()}` : "");
            if (err && typeof err === "object") {
                try {
                    err.message = `${err.message}${extra}`;
                } catch {
                    // read-only message
                }
                throw err;
            }
            throw new Error(`${String(err)}${extra}`);
        }
    };
}
