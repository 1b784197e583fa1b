//! The measured scenarios. Each registers its own users and asserts that the server's
//! answers are complete (a fast wrong answer is not a result).

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail, ensure};
use futures::future::join_all;
use serde_json::json;

use crate::{
    client::{Client, Registration, enc, http_client, parse, register, sync_path, wait_ready},
    rawhttp,
    report::{Better, Report, percentile},
};

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Base URL of the homeserver, e.g. http://127.0.0.1:8008.
    #[arg(long)]
    url: String,
    /// Name of the server in the report.
    #[arg(long)]
    label: String,
    /// Shell command that runs the server in the foreground; the benchmark starts it
    /// itself to time startup and read its memory.
    #[arg(long)]
    launch: Option<String>,
    /// Pid of an already running server, for the memory figures.
    #[arg(long)]
    pid: Option<u32>,
    /// Use Synapse-compatible shared-secret registration.
    #[arg(long)]
    shared_secret: Option<String>,
    /// Use a registration token.
    #[arg(long)]
    registration_token: Option<String>,
    /// Small sizes, one repetition: checks that everything works, measures little.
    #[arg(long)]
    quick: bool,
    /// Repetitions of each timed scenario.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Concurrent long-polls in the scale scenario.
    #[arg(long, default_value_t = 1000)]
    longpolls: usize,
    /// Also compare `/messages` in a room of this many events with one of 1,000.
    #[arg(long)]
    big_room: Option<usize>,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only these scenarios (startup and memory are always measured); the sync
    /// scenarios set up their reader first, whichever of them is asked for.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Scenario>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    Send,
    Create,
    InitialSync,
    IncrementalSync,
    Longpolls,
}

struct Server {
    child: Option<Child>,
    pid: Option<u32>,
}

impl Server {
    fn rss_mib(&self) -> Option<(f64, f64)> {
        let pid = self.pid?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
                .map(|kb| kb / 1024.0)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// The CPU time the server has used so far, in clock ticks (from `/proc`).
    fn cpu_ticks(&self) -> Option<u64> {
        let pid = self.pid?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the command name, which is in parentheses and may hold
        // spaces; utime and stime are the 14th and 15th of the line.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
        Some(field(14)? + field(15)?)
    }

    /// The CPU time the server's threads have used so far, in nanoseconds (each
    /// thread's `schedstat`): precise enough for a burst of a few milliseconds.
    fn cpu_ns(&self) -> Option<u64> {
        cpu_ns_of(&format!("/proc/{}", self.pid?))
    }

    /// Waits, at most `limit`, until the server has used almost no CPU for 50 ms: it
    /// has finished what a burst asked of it. A server whose process is not known gets
    /// `limit`.
    async fn wait_quiet(&self, limit: Duration) {
        let Some(mut last) = self.cpu_ns() else {
            tokio::time::sleep(limit).await;
            return;
        };
        let start = Instant::now();
        let mut quiet_for = 0;
        while start.elapsed() < limit && quiet_for < 5 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let Some(now) = self.cpu_ns() else { return };
            // A twentieth of a core at most.
            if now.saturating_sub(last) <= 500_000 {
                quiet_for += 1;
            } else {
                quiet_for = 0;
            }
            last = now;
        }
    }

    /// Waits, at most `limit`, until the server has been all but idle for half a
    /// second: work left over from a load (RocksDB flushing what it wrote, a cache
    /// being filled, a garbage collection) is not counted against what is timed next.
    /// A server whose process is not known gets one second.
    async fn settle(&self, limit: Duration) {
        let Some(mut last) = self.cpu_ticks() else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            return;
        };
        let start = Instant::now();
        while start.elapsed() < limit {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(now) = self.cpu_ticks() else { return };
            // One clock tick (10 ms) in half a second at most: 2 % of a core.
            if now.saturating_sub(last) <= 1 {
                return;
            }
            last = now;
        }
    }
}

/// The CPU time, in nanoseconds, of every thread of the process at `proc_dir`.
fn cpu_ns_of(proc_dir: &str) -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("{proc_dir}/task")).ok()? {
        // A thread may end between the listing and the read: it no longer counts.
        let Ok(stat) = std::fs::read_to_string(task.ok()?.path().join("schedstat")) else {
            continue;
        };
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop(&mut child);
        }
    }
}

fn stop(child: &mut Child) {
    // SIGTERM for a clean shutdown; SIGKILL if it does not come.
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn launch(cmd: &str) -> anyhow::Result<Child> {
    // `exec`, so that the child is the server itself and its memory is what we read.
    let line = if cmd.trim_start().starts_with("exec ") {
        cmd.to_owned()
    } else {
        format!("exec {cmd}")
    };
    Command::new("sh")
        .arg("-c")
        .arg(line)
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot run {cmd}"))
}

/// How long the server is left alone before its memory after a load is read.
const SETTLE: Duration = Duration::from_secs(2);

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut report = Report {
        label: args.label.clone(),
        url: args.url.clone(),
        ..Default::default()
    };
    let repeat = if args.quick { 1 } else { args.repeat.max(1) };
    println!("== {} at {}", args.label, args.url);

    // Startup: process start until /versions answers.
    let mut server = Server {
        child: None,
        pid: args.pid,
    };
    if let Some(cmd) = &args.launch {
        let mut samples = Vec::new();
        for i in 0..repeat {
            let start = Instant::now();
            let mut child = launch(cmd)?;
            wait_ready(&args.url, Duration::from_secs(180)).await?;
            samples.push(ms(start.elapsed()));
            if i + 1 < repeat {
                stop(&mut child);
            } else {
                server.pid = Some(child.id());
                server.child = Some(child);
            }
        }
        report.add(
            "startup",
            "startup to /versions",
            "ms",
            Better::Lower,
            &samples,
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    } else {
        wait_ready(&args.url, Duration::from_secs(30)).await?;
    }
    if let Some((rss, _)) = server.rss_mib() {
        report.add(
            "rss_idle",
            "RSS idle after start",
            "MiB",
            Better::Lower,
            &[rss],
        );
    }

    let http = http_client();
    let reg = match (&args.shared_secret, &args.registration_token) {
        (Some(s), _) => Registration::SharedSecret(s.clone()),
        (None, Some(t)) => Registration::Token(t.clone()),
        _ => Registration::Open,
    };
    let run_id = format!(
        "{:x}",
        SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
            % 0xffffff
    );
    let mut users = Vec::new();
    for i in 0..12 {
        users.push(
            register(&http, &args.url, &reg, &format!("bench{run_id}u{i}"))
                .await
                .context("registering benchmark users")?,
        );
    }

    let wanted = |s: Scenario| args.only.is_empty() || args.only.contains(&s);
    if wanted(Scenario::Send) {
        send(
            &mut report,
            &users[..10],
            if args.quick { 200 } else { 2000 },
            repeat,
        )
        .await?;
    }
    if wanted(Scenario::Create) {
        create(
            &mut report,
            &users[0],
            if args.quick { 20 } else { 100 },
            repeat,
        )
        .await?;
    }
    let sync_scenarios = [
        Scenario::InitialSync,
        Scenario::IncrementalSync,
        Scenario::Longpolls,
    ];
    if sync_scenarios.into_iter().any(wanted) {
        let (rooms, msgs) = if args.quick { (10, 5) } else { (50, 20) };
        let (reader, since, a_room) =
            initial_sync(&mut report, &users[10], &users[11], rooms, msgs, repeat).await?;
        if wanted(Scenario::IncrementalSync) {
            incremental_and_wakeup(
                &mut report,
                &reader,
                &users[11],
                &a_room,
                since,
                if args.quick { 5 } else { 30 },
            )
            .await?;
        }
        if wanted(Scenario::Longpolls) {
            scale_longpolls(
                &mut report,
                &reader,
                &users[11],
                &a_room,
                if args.quick { 50 } else { args.longpolls },
                repeat,
                &server,
            )
            .await?;
        }
    }
    // The standard load ends here; the big room is extra (and restarts the server).
    // Memory after a load is read once the server has had a moment to settle: the
    // last answers have just been written, their connections are still closing.
    tokio::time::sleep(SETTLE).await;
    let after_load = server.rss_mib();
    let mut after_big = None;
    if let Some(n) = args.big_room {
        let big_room = messages_scale(&mut report, &users[..10], n, &server).await?;
        tokio::time::sleep(SETTLE).await;
        after_big = server.rss_mib().map(|(rss, _)| (n, rss));
        if let Some(cmd) = &args.launch {
            startup_loaded(&mut report, &mut server, cmd, &args.url, repeat, n).await?;
            let page = users[0]
                .get(&format!(
                    "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=10",
                    enc(&big_room)
                ))
                .await?;
            ensure!(
                page["chunk"].as_array().is_some_and(|c| c.len() == 10),
                "the big room is not served after the restart"
            );
        }
    }

    if let Some((rss, peak)) = after_load {
        report.add(
            "rss_after",
            "RSS after the load",
            "MiB",
            Better::Lower,
            &[rss],
        );
        report.add("rss_peak", "RSS peak", "MiB", Better::Lower, &[peak]);
    }
    if let Some((n, rss)) = after_big {
        report.add(
            "rss_after_big",
            &format!("RSS after filling the {n}-event room"),
            "MiB",
            Better::Lower,
            &[rss],
        );
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// Ten clients send into one room concurrently.
async fn send(
    report: &mut Report,
    senders: &[Client],
    total: usize,
    repeat: usize,
) -> anyhow::Result<()> {
    let room = senders[0]
        .create_room(json!({ "preset": "public_chat", "name": "send benchmark" }))
        .await?;
    for s in &senders[1..] {
        s.join(&room).await?;
    }
    let mut rates = Vec::new();
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    for r in 0..repeat {
        let per_client = total / senders.len();
        let start = Instant::now();
        let tasks = senders.iter().enumerate().map(|(c, client)| {
            let (client, room) = (client.clone(), room.clone());
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(per_client);
                for i in 0..per_client {
                    let t = Instant::now();
                    client
                        .send_text(
                            &room,
                            &format!("r{r}c{c}i{i}"),
                            &format!("message {i} from client {c}"),
                        )
                        .await?;
                    lat.push(ms(t.elapsed()));
                }
                anyhow::Ok(lat)
            })
        });
        let mut latencies = Vec::new();
        for res in join_all(tasks).await {
            latencies.extend(res??);
        }
        let elapsed = start.elapsed().as_secs_f64();
        rates.push(latencies.len() as f64 / elapsed);
        p50.push(percentile(&latencies, 50.0));
        p99.push(percentile(&latencies, 99.0));
    }
    report.add(
        "send_rate",
        &format!(
            "send: {total} messages, {} clients, one room",
            senders.len()
        ),
        "events/s",
        Better::Higher,
        &rates,
    );
    report.add("send_p50", "send latency p50", "ms", Better::Lower, &p50);
    report.add("send_p99", "send latency p99", "ms", Better::Lower, &p99);
    Ok(())
}

async fn create(
    report: &mut Report,
    client: &Client,
    count: usize,
    repeat: usize,
) -> anyhow::Result<()> {
    let mut rates = Vec::new();
    let mut p50 = Vec::new();
    for _ in 0..repeat {
        let start = Instant::now();
        let mut lat = Vec::with_capacity(count);
        for i in 0..count {
            let t = Instant::now();
            client
                .create_room(json!({ "name": format!("room {i}"), "preset": "private_chat" }))
                .await?;
            lat.push(ms(t.elapsed()));
        }
        rates.push(count as f64 / start.elapsed().as_secs_f64());
        p50.push(percentile(&lat, 50.0));
    }
    report.add(
        "create_rate",
        &format!("createRoom: {count} rooms"),
        "rooms/s",
        Better::Higher,
        &rates,
    );
    report.add(
        "create_p50",
        "createRoom latency p50",
        "ms",
        Better::Lower,
        &p50,
    );
    Ok(())
}

/// A user in `rooms` rooms of `msgs` messages each syncs from scratch on a new device.
async fn initial_sync(
    report: &mut Report,
    reader: &Client,
    other: &Client,
    rooms: usize,
    msgs: usize,
    repeat: usize,
) -> anyhow::Result<(Client, String, String)> {
    let mut first_room = String::new();
    for r in 0..rooms {
        let room = reader
            .create_room(json!({ "preset": "public_chat", "name": format!("sync room {r}") }))
            .await?;
        if r == 0 {
            other.join(&room).await?;
            first_room = room.clone();
        }
        for m in 0..msgs {
            reader
                .send_text(
                    &room,
                    &format!("sync{r}-{m}"),
                    &format!("history {m} of room {r}"),
                )
                .await?;
        }
    }
    let filter = json!({ "room": { "timeline": { "limit": msgs } } }).to_string();
    let mut samples = Vec::new();
    let mut since = String::new();
    let mut last_client = reader.clone();
    for _ in 0..repeat {
        let fresh = reader.login_again().await?;
        let t = Instant::now();
        let (done, body) = fresh.sync_timed(None, 0, Some(&filter)).await?;
        samples.push(ms(done - t));
        let joined = body["rooms"]["join"].as_object().context("rooms.join")?;
        ensure!(
            joined.len() >= rooms,
            "initial sync returned {} rooms, expected {rooms}",
            joined.len()
        );
        let full = joined
            .values()
            .filter(|r| {
                r["timeline"]["events"].as_array().is_some_and(|e| {
                    e.iter().filter(|e| e["type"] == "m.room.message").count() == msgs
                })
            })
            .count();
        ensure!(
            full >= rooms,
            "only {full} of {rooms} rooms came with their {msgs} messages"
        );
        since = body["next_batch"]
            .as_str()
            .context("next_batch")?
            .to_owned();
        last_client = fresh;
    }
    report.add(
        "initial_sync",
        &format!("initial sync, {rooms} rooms × {msgs} messages"),
        "ms",
        Better::Lower,
        &samples,
    );
    Ok((last_client, since, first_room))
}

/// Incremental sync after one message, and the wake-up of a waiting long-poll.
async fn incremental_and_wakeup(
    report: &mut Report,
    reader: &Client,
    sender: &Client,
    room: &str,
    mut since: String,
    n: usize,
) -> anyhow::Result<()> {
    let mut incremental = Vec::new();
    for i in 0..n {
        sender
            .send_text(room, &format!("inc{i}-{since}"), "one more")
            .await?;
        let t = Instant::now();
        let (done, body) = reader.sync_timed(Some(&since), 0, None).await?;
        incremental.push(ms(done - t));
        ensure!(
            body["rooms"]["join"][room]["timeline"]["events"]
                .as_array()
                .is_some_and(|e| !e.is_empty()),
            "incremental sync missed the message"
        );
        since = body["next_batch"]
            .as_str()
            .context("next_batch")?
            .to_owned();
    }
    report.add(
        "incremental_sync",
        "incremental sync after one message",
        "ms",
        Better::Lower,
        &incremental,
    );

    let mut wake = Vec::new();
    let mut syncs_per_wake = Vec::new();
    for i in 0..n {
        let waiter = {
            let (reader, since, room) = (reader.clone(), since.clone(), room.to_owned());
            tokio::spawn(async move {
                let mut since = since;
                let mut syncs = 0;
                loop {
                    let (done, body) = reader.sync_timed(Some(&since), 30_000, None).await?;
                    syncs += 1;
                    since = body["next_batch"]
                        .as_str()
                        .context("next_batch")?
                        .to_owned();
                    if body["rooms"]["join"][&room]["timeline"]["events"]
                        .as_array()
                        .is_some_and(|e| !e.is_empty())
                    {
                        return anyhow::Ok((done, since, syncs));
                    }
                    if syncs > 10 {
                        bail!("the long-poll never delivered the message");
                    }
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(30)).await;
        sender
            .send_text(room, &format!("wake{i}-{since}"), "wake up")
            .await?;
        let sent = Instant::now();
        let (done, next, syncs) = waiter.await??;
        wake.push(ms(done.saturating_duration_since(sent)));
        syncs_per_wake.push(syncs as f64);
        since = next;
    }
    report.add(
        "wakeup_p50",
        "long-poll wake-up after send returns",
        "ms",
        Better::Lower,
        &wake,
    );
    report.add(
        "wakeup_syncs",
        "syncs per wake-up",
        "syncs",
        Better::Lower,
        &syncs_per_wake,
    );
    Ok(())
}

/// Many long-polls held at once, then one message wakes them all; repeated, each time
/// from a fresh position. The answers are read once the server has written them all
/// (their arrival is the kernel's receive time), as if a thousand clients were on
/// machines of their own; then the same again with the generator reading each answer
/// as it comes, on the server's cores.
async fn scale_longpolls(
    report: &mut Report,
    reader: &Client,
    sender: &Client,
    room: &str,
    count: usize,
    repeat: usize,
    server: &Server,
) -> anyhow::Result<()> {
    let (mut held, mut p50, mut p99) = (Vec::new(), Vec::new(), Vec::new());
    let (mut p50_reading, mut server_cpu, mut own_cpu) = (Vec::new(), Vec::new(), Vec::new());
    // Each round starts where the last one's answers ended, as a client would go on. A
    // fresh initial sync is no good here: Synapse answers a repeated one from its
    // response cache for two minutes, with a position before the last round's message.
    let mut since = reader
        .sync(None, 0, Some(r#"{"room":{"timeline":{"limit":1}}}"#))
        .await?["next_batch"]
        .as_str()
        .context("next_batch")?
        .to_owned();
    for round in 0..2 * repeat {
        let read_meanwhile = round >= repeat;
        let woken = wake_longpolls(
            reader,
            sender,
            room,
            count,
            &since,
            round,
            read_meanwhile,
            server,
        )
        .await?;
        since = woken.next;
        held.extend(woken.held);
        let per_answer = |us: Option<f64>| us.map(|us| us / count as f64);
        if read_meanwhile {
            p50_reading.push(percentile(&woken.wake, 50.0));
            own_cpu.extend(per_answer(woken.own_cpu_us));
        } else {
            p50.push(percentile(&woken.wake, 50.0));
            p99.push(percentile(&woken.wake, 99.0));
            server_cpu.extend(per_answer(woken.server_cpu_us));
        }
    }
    if !held.is_empty() {
        report.add(
            "longpoll_rss",
            &format!("RSS with {count} long-polls held"),
            "MiB",
            Better::Lower,
            &held,
        );
    }
    report.add(
        "longpoll_wake_p50",
        &format!("{count} long-polls: wake-up p50"),
        "ms",
        Better::Lower,
        &p50,
    );
    report.add(
        "longpoll_wake_p99",
        &format!("{count} long-polls: wake-up p99"),
        "ms",
        Better::Lower,
        &p99,
    );
    report.add(
        "longpoll_wake_p50_reading",
        &format!("{count} long-polls: wake-up p50, read meanwhile"),
        "ms",
        Better::Lower,
        &p50_reading,
    );
    // What each side spends on an answer: on shared cores, the generator's reading
    // delays the answers still to be written.
    if !server_cpu.is_empty() {
        report.add(
            "longpoll_server_cpu",
            &format!("{count} long-polls: server CPU per answer"),
            "µs",
            Better::Lower,
            &server_cpu,
        );
    }
    if !own_cpu.is_empty() {
        report.add(
            "longpoll_bench_cpu",
            &format!("{count} long-polls: generator CPU per answer"),
            "µs",
            Better::Neither,
            &own_cpu,
        );
    }
    Ok(())
}

/// What one round of the scale scenario saw.
struct Woken {
    /// The server's memory while the long-polls were held.
    held: Option<f64>,
    /// Each long-poll's wake-up after the send returned, in milliseconds.
    wake: Vec<f64>,
    /// The position the answers ended at.
    next: String,
    /// The server's CPU time from just before the send until it had written every
    /// answer (or, while the generator reads, until every answer had been read), in µs.
    server_cpu_us: Option<f64>,
    /// The generator's CPU time from just before the send until it had read every
    /// answer, in µs.
    own_cpu_us: Option<f64>,
}

/// One round of the scale scenario: the memory while `count` long-polls are held, each
/// one's wake-up after the message's send returned, and the CPU both sides spent. The
/// answers are read as they come with `read_meanwhile`, else once the server is quiet.
#[allow(clippy::too_many_arguments)]
async fn wake_longpolls(
    reader: &Client,
    sender: &Client,
    room: &str,
    count: usize,
    since: &str,
    round: usize,
    read_meanwhile: bool,
    server: &Server,
) -> anyhow::Result<Woken> {
    let started = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Connections are opened a few dozen at a time: a thousand at once overflow a small
    // listen backlog (Synapse's), and the server then resets some of them.
    let connecting = Arc::new(tokio::sync::Semaphore::new(32));
    let (read, may_read) = tokio::sync::watch::channel(read_meanwhile);
    let mut tasks = Vec::with_capacity(count);
    for _ in 0..count {
        let (base, token) = (reader.base.clone(), reader.token.clone());
        let (started, connecting) = (started.clone(), connecting.clone());
        let mut may_read = may_read.clone();
        let path = sync_path(Some(since), 60_000, None);
        tasks.push(tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let sent = async {
                    let _permit = connecting.acquire().await?;
                    let mut c = rawhttp::Connection::open(&base).await?;
                    c.send_get(&path, &token).await?;
                    anyhow::Ok(c)
                }
                .await;
                if attempt == 1 {
                    started.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let answer = match sent {
                    Ok(c) => {
                        // Off the event loop until the server is done: this process
                        // then does not even wake as the answers arrive.
                        let mut c = if *may_read.borrow() {
                            c
                        } else {
                            let parked = c.park()?;
                            may_read
                                .wait_for(|yes| *yes)
                                .await
                                .context("the round ended")?;
                            parked.resume()?
                        };
                        c.answer(&path).await.map(|(at, body)| (at, body, c))
                    }
                    Err(e) => Err(e),
                };
                match answer {
                    // A client would try again on a new connection; an answer that
                    // arrives late that way counts as late.
                    Err(e) if attempt < 3 && rawhttp::is_connection_error(&e) => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    answer => return answer,
                }
            }
        }));
    }
    while started.load(std::sync::atomic::Ordering::SeqCst) < count {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Give the requests time to reach the server and park.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let held = server.rss_mib().map(|(rss, _)| rss);
    let text = format!("everyone wake up ({round})");
    let cpu_before = (server.cpu_ns(), cpu_ns_of("/proc/self"));
    sender
        .send_text(room, &format!("scale-{since}"), &text)
        .await?;
    let sent = SystemTime::now();
    let mut server_cpu_after = None;
    if !read_meanwhile {
        server.wait_quiet(Duration::from_secs(10)).await;
        server_cpu_after = server.cpu_ns();
        read.send_replace(true);
    }
    // Each answer is checked once all have arrived: parsing one while others are still
    // on their way would hold those up and count the benchmark's own work.
    let mut answers = Vec::with_capacity(count);
    for t in join_all(tasks).await {
        answers.push(t??);
    }
    let spent = |before: Option<u64>, after: Option<u64>| {
        Some(after?.saturating_sub(before?) as f64 / 1000.0)
    };
    let server_cpu_us = spent(cpu_before.0, server_cpu_after.or_else(|| server.cpu_ns()));
    let own_cpu_us = spent(cpu_before.1, cpu_ns_of("/proc/self"));
    let mut wake = Vec::with_capacity(count);
    let mut next = String::new();
    for (arrived, bytes, _connection) in answers {
        let body = parse(&bytes);
        ensure!(
            body["rooms"]["join"][room]["timeline"]["events"]
                .as_array()
                .is_some_and(|e| e.iter().any(|e| e["content"]["body"] == text)),
            "a long-poll woke without this round's message"
        );
        next = body["next_batch"]
            .as_str()
            .context("next_batch")?
            .to_owned();
        // An answer may arrive before the send's own answer is back.
        wake.push(ms(arrived.duration_since(sent).unwrap_or_default()));
    }
    Ok(Woken {
        held,
        wake,
        next,
        server_cpu_us,
        own_cpu_us,
    })
}

/// Startup again, now that the database holds the big room: the server is stopped and
/// started `repeat` times, and must still serve the room afterwards.
async fn startup_loaded(
    report: &mut Report,
    server: &mut Server,
    cmd: &str,
    url: &str,
    repeat: usize,
    big: usize,
) -> anyhow::Result<()> {
    let mut samples = Vec::new();
    for _ in 0..repeat {
        if let Some(mut child) = server.child.take() {
            stop(&mut child);
        }
        let start = Instant::now();
        let child = launch(cmd)?;
        wait_ready(url, Duration::from_secs(180)).await?;
        samples.push(ms(start.elapsed()));
        server.pid = Some(child.id());
        server.child = Some(child);
    }
    report.add(
        "startup_loaded",
        &format!("startup to /versions, {big}+ events stored"),
        "ms",
        Better::Lower,
        &samples,
    );
    Ok(())
}

/// Cost of a page of `/messages` deep in a big room against a small one.
async fn messages_scale(
    report: &mut Report,
    clients: &[Client],
    big: usize,
    server: &Server,
) -> anyhow::Result<String> {
    const SMALL: usize = 1000;
    // Both rooms are filled before either is read: both are read from the same
    // database, and only their sizes differ.
    let small_room = fill_room(clients, SMALL).await?;
    let big_room = fill_room(clients, big).await?;
    // The pages are timed once the server is done with the filling, so that both
    // rooms are read from a server at rest.
    server.settle(Duration::from_secs(20)).await;
    // Page back through the newer half of the big room, 100 events a page; the 20
    // pages from the end and the 20 before the middle are timed. Each timed page is
    // followed by a page of the small room, paged back through its newer half over and
    // over: both rooms are timed under the same conditions (a shared machine's speed
    // drifts over a run), and both medians come from 40 pages.
    let mut big_walk = Walk::new(&big_room, big);
    let mut small_walk = Walk::new(&small_room, SMALL);
    let (mut big_samples, mut small_samples) = (Vec::new(), Vec::new());
    while !big_walk.done() {
        let seen = big_walk.seen;
        let took = big_walk.page(&clients[0]).await?;
        if seen >= (big / 2).saturating_sub(20 * 100) || seen < 20 * 100 {
            big_samples.push(took);
            if small_walk.done() {
                small_walk = Walk::new(&small_room, SMALL);
            }
            small_samples.push(small_walk.page(&clients[0]).await?);
        }
    }
    let mut costs = Vec::new();
    for (size, samples) in [(SMALL, small_samples), (big, big_samples)] {
        let label = format!("/messages page of 100 in a {size}-event room");
        report.add(
            &format!("messages_{size}"),
            &label,
            "ms",
            Better::Lower,
            &samples,
        );
        costs.push(percentile(&samples, 50.0));
    }
    report.add(
        "messages_ratio",
        &format!("/messages cost, {big}-event room ÷ 1,000-event room"),
        "×",
        Better::Lower,
        &[costs[1] / costs[0]],
    );
    Ok(big_room)
}

/// A new public room that `clients` (all joined) fill with `size` messages at once.
async fn fill_room(clients: &[Client], size: usize) -> anyhow::Result<String> {
    let room = clients[0]
        .create_room(json!({ "preset": "public_chat" }))
        .await?;
    for c in &clients[1..] {
        c.join(&room).await?;
    }
    let per = size / clients.len();
    let tasks = clients.iter().enumerate().map(|(ci, c)| {
        let (c, room) = (c.clone(), room.clone());
        tokio::spawn(async move {
            for i in 0..per {
                c.send_text(&room, &format!("fill{size}-{ci}-{i}"), "filler")
                    .await?;
            }
            anyhow::Ok(())
        })
    });
    for t in join_all(tasks).await {
        t??;
    }
    Ok(room)
}

/// A client paging back from the end of a room through its newer half, 100 events a
/// page.
struct Walk<'a> {
    room: &'a str,
    size: usize,
    from: Option<String>,
    seen: usize,
    ended: bool,
}

impl<'a> Walk<'a> {
    fn new(room: &'a str, size: usize) -> Self {
        Self {
            room,
            size,
            from: None,
            seen: 0,
            ended: false,
        }
    }

    fn done(&self) -> bool {
        self.ended || self.seen >= self.size / 2
    }

    /// Reads the next page; returns how long it took to arrive, in milliseconds.
    async fn page(&mut self, client: &Client) -> anyhow::Result<f64> {
        let mut path = format!(
            "/_matrix/client/v3/rooms/{}/messages?dir=b&limit=100",
            enc(self.room)
        );
        if let Some(f) = &self.from {
            path.push_str(&format!("&from={}", enc(f)));
        }
        // Timed until the whole answer has arrived, as the syncs are.
        let t = Instant::now();
        let (done, page) = client.get_timed(&path).await?;
        let n = page["chunk"].as_array().map(Vec::len).unwrap_or(0);
        ensure!(
            n > 0,
            "pagination ended early at {} of {}",
            self.seen,
            self.size
        );
        self.seen += n;
        self.from = page["end"].as_str().map(str::to_owned);
        self.ended = self.from.is_none();
        Ok(ms(done - t))
    }
}
