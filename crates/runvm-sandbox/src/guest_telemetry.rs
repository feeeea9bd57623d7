//! The host's side of the agent's telemetry (docs/observability.md): what the agent queued in
//! the guest (its log records, the spans of traced agent calls) is read over the agent channel
//! (`ReadTelemetry`) and relayed, records into this process's log as `tracing` events (target
//! `runvm::guest`, with the sandbox id and the guest's level and time), spans to the OTLP
//! exporter of `runvm-telemetry` when traces are exported.
//!
//! A front end turns the relay on once ([`enable`], with its log level); from then on every
//! sandbox whose agent this process connects to gets one relay task ([`watch`]), which long-polls
//! the agent until the channel ends. [`finish_all`] reads what is left (a CLI command calls it
//! before it exits); [`drain`] does so for one sandbox (before its guest is powered off).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::agent::{Agent, AgentError, GuestLogLevel, GuestLogRecord, GuestTelemetry, RpcCode};
use crate::agent::{TelemetryRequest, MAX_TELEMETRY_RECORDS};

/// How long one read waits in the guest while nothing is queued: the agent answers as soon as
/// a record is queued, so this bounds only how late spans of calls made without a record come
/// (and costs an idle guest one answer per period: about 4 ms of CPU under TCG).
const POLL_WAIT: Duration = crate::agent::MAX_TELEMETRY_WAIT;
/// Records asked for per read.
const BATCH: u32 = 256;
/// How long a last read ([`drain`], [`finish_all`]) may take in all, reading until the queues
/// are empty.
const LAST_READ: Duration = Duration::from_secs(2);
/// Guest records logged per second and sandbox, at most (a burst of [`RATE_BURST`]); more are
/// counted and said once a minute: a guest cannot flood the host's log.
const RATE_PER_SEC: f64 = 200.0;
const RATE_BURST: f64 = 1024.0;
/// Longest pause of a relay after a failed read (it doubles from 1 s).
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The shortest time between two reads of a relay: a guest answering at once with nothing
/// cannot make the host spin.
const MIN_READ_INTERVAL: Duration = Duration::from_millis(100);
/// The `tracing` target of relayed records.
pub const TARGET: &str = "runvm::guest";

struct Relay {
    agent: Arc<dyn Agent>,
    task: tokio::task::JoinHandle<()>,
}

struct Relays {
    level: GuestLogLevel,
    by_sandbox: Mutex<HashMap<String, Relay>>,
}

static RELAYS: OnceLock<Relays> = OnceLock::new();

/// Turns the relay on for this process: records from `level` up are queued by the agents it
/// talks to and land in its log. Off (never called), agents' records stay in the guest.
pub fn enable(level: GuestLogLevel) {
    let _ = RELAYS.set(Relays {
        level,
        by_sandbox: Mutex::new(HashMap::new()),
    });
}

fn relays() -> Option<&'static Relays> {
    RELAYS.get()
}

/// Starts relaying from `sandbox`'s agent over `agent` (a connection this process opened),
/// unless a relay for it runs already. Must be called inside a tokio runtime.
pub fn watch(sandbox: &str, agent: &Arc<dyn Agent>) {
    let Some(relays) = relays() else { return };
    let mut by_sandbox = relays.by_sandbox.lock().unwrap_or_else(|p| p.into_inner());
    if by_sandbox
        .get(sandbox)
        .is_some_and(|r| !r.task.is_finished())
    {
        return;
    }
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let task = handle.spawn(run(sandbox.to_string(), Arc::clone(agent), relays.level));
    by_sandbox.insert(
        sandbox.to_string(),
        Relay {
            agent: Arc::clone(agent),
            task,
        },
    );
}

/// Reads and relays what `sandbox`'s agent has queued now (its guest is about to be powered
/// off, or the process is about to exit), if a relay watches it.
pub async fn drain(sandbox: &str) {
    let Some(relays) = relays() else { return };
    let agent = {
        let by_sandbox = relays.by_sandbox.lock().unwrap_or_else(|p| p.into_inner());
        by_sandbox.get(sandbox).map(|r| Arc::clone(&r.agent))
    };
    if let Some(agent) = agent {
        read_all(sandbox, agent.as_ref(), relays.level).await;
    }
}

/// Reads what every watched agent has queued, relays it, and stops the relays (a CLI command
/// calls it before it exits, so records and spans of its own calls are not left behind).
pub async fn finish_all() {
    let Some(relays) = relays() else { return };
    let all: Vec<(String, Relay)> = relays
        .by_sandbox
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain()
        .collect();
    for (sandbox, relay) in all {
        relay.task.abort();
        read_all(&sandbox, relay.agent.as_ref(), relays.level).await;
    }
}

/// Reads without waiting until the agent's queues are empty, within [`LAST_READ`].
async fn read_all(sandbox: &str, agent: &dyn Agent, level: GuestLogLevel) {
    let deadline = Instant::now() + LAST_READ;
    let mut limit = RateLimit::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let read = read_once(sandbox, agent, level, Duration::ZERO, &mut limit);
        match tokio::time::timeout(left, read).await {
            Ok(Ok(more)) if more && Instant::now() < deadline => continue,
            _ => break,
        }
    }
    limit.say_suppressed(sandbox);
}

/// The relay task: reads until the channel ends (the guest powered off, the connection
/// closed) or the agent cannot answer `ReadTelemetry` (an older agent). Other failures (a
/// paused or slow guest timing out, a reply that breaks the limits) are said once and the
/// relay goes on after a pause.
async fn run(sandbox: String, agent: Arc<dyn Agent>, level: GuestLogLevel) {
    let mut limit = RateLimit::new();
    let mut backoff = Duration::from_secs(1);
    let mut said = false;
    loop {
        let began = Instant::now();
        match read_once(&sandbox, agent.as_ref(), level, POLL_WAIT, &mut limit).await {
            Ok(more) => {
                backoff = Duration::from_secs(1);
                let spent = began.elapsed();
                if !more && spent < MIN_READ_INTERVAL {
                    tokio::time::sleep(MIN_READ_INTERVAL - spent).await;
                }
            }
            Err(AgentError::Rpc {
                code: RpcCode::Unimplemented,
                ..
            }) => {
                tracing::debug!(sandbox = %sandbox, "the agent keeps its log: it has no ReadTelemetry");
                return;
            }
            Err(e @ (AgentError::Transport { .. } | AgentError::Connect { .. })) => {
                tracing::debug!(sandbox = %sandbox, error = %e, "guest log relay ends: the channel is gone");
                return;
            }
            Err(
                e @ (AgentError::Timeout { .. }
                | AgentError::Rpc { .. }
                | AgentError::InvalidReply { .. }),
            ) => {
                if !said {
                    tracing::warn!(sandbox = %sandbox, error = %e, "cannot read the guest's log; trying again (said once)");
                    said = true;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
        limit.say_suppressed_if_due(&sandbox);
    }
}

/// One read; whether it brought a full batch or spans (more may be queued).
async fn read_once(
    sandbox: &str,
    agent: &dyn Agent,
    level: GuestLogLevel,
    wait: Duration,
    limit: &mut RateLimit,
) -> Result<bool, AgentError> {
    let request = TelemetryRequest {
        wait,
        level,
        max_records: BATCH.min(MAX_TELEMETRY_RECORDS),
    };
    let batch = agent.read_telemetry(request).await?;
    let more = batch.records.len() >= BATCH as usize || batch.spans.is_some();
    relay(sandbox, level, batch, limit);
    Ok(more)
}

/// A token bucket per relay: how many guest records may be logged now.
#[derive(Debug)]
struct RateLimit {
    tokens: f64,
    at: Instant,
    suppressed: u64,
    said_at: Instant,
}

impl RateLimit {
    fn new() -> RateLimit {
        RateLimit {
            tokens: RATE_BURST,
            at: Instant::now(),
            suppressed: 0,
            said_at: Instant::now(),
        }
    }

    fn allow(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * RATE_PER_SEC;
        self.tokens = (self.tokens + refill).min(RATE_BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    fn say_suppressed_if_due(&mut self, sandbox: &str) {
        if self.suppressed > 0 && self.said_at.elapsed() >= Duration::from_secs(60) {
            self.say_suppressed(sandbox);
        }
    }

    fn say_suppressed(&mut self, sandbox: &str) {
        if self.suppressed > 0 {
            tracing::warn!(
                sandbox = %sandbox,
                suppressed = self.suppressed,
                "guest log records not logged: the guest logs faster than {RATE_PER_SEC} a second"
            );
            self.suppressed = 0;
            self.said_at = Instant::now();
        }
    }
}

/// Logs the records (those from `level` up, within `limit`) and hands the spans to the
/// exporter.
fn relay(sandbox: &str, level: GuestLogLevel, batch: GuestTelemetry, limit: &mut RateLimit) {
    for record in batch.records.iter().filter(|r| r.level <= level) {
        if limit.allow() {
            log(sandbox, record);
        }
    }
    if batch.dropped_records > 0 {
        tracing::warn!(
            sandbox = %sandbox,
            dropped = batch.dropped_records,
            "the agent dropped log records: its queue was full before the host read it"
        );
    }
    if let Some(spans) = batch.spans {
        if let Some(telemetry) = runvm_telemetry::global() {
            telemetry.forward_guest_spans(spans);
        }
    }
    if batch.dropped_spans > 0 {
        tracing::warn!(sandbox = %sandbox, dropped = batch.dropped_spans, "the agent dropped spans");
    }
}

/// One guest record as an event of this process, at its level. The guest's text is the
/// event's message as a quoted string (`Debug`), so it cannot pass for the host's fields
/// (`sandbox=...`) in the log line.
fn log(sandbox: &str, r: &GuestLogRecord) {
    let time = crate::standalone::rfc3339(r.time_unix_ns);
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                message = ?r.message,
                sandbox = %sandbox,
                guest_time = %time,
                source = %r.target,
            )
        };
    }
    match r.level {
        GuestLogLevel::Error => event!(tracing::Level::ERROR),
        GuestLogLevel::Warn => event!(tracing::Level::WARN),
        GuestLogLevel::Info => event!(tracing::Level::INFO),
        GuestLogLevel::Debug => event!(tracing::Level::DEBUG),
        GuestLogLevel::Trace => event!(tracing::Level::TRACE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::MockAgentConnector;

    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn record(level: GuestLogLevel, message: &str) -> GuestLogRecord {
        GuestLogRecord {
            time_unix_ns: 1_700_000_000_000_000_000,
            level,
            target: "runvm_agent::container".into(),
            message: message.into(),
        }
    }

    #[tokio::test]
    async fn guest_records_land_in_the_host_log_with_the_sandbox_and_level_filtered() {
        let connector = MockAgentConnector::new();
        let state = connector.state();
        state.lock().unwrap().telemetry = GuestTelemetry {
            records: vec![
                record(GuestLogLevel::Warn, "disk nearly full"),
                record(GuestLogLevel::Debug, "too chatty"),
            ],
            dropped_records: 3,
            ..Default::default()
        };
        let agent: Arc<dyn Agent> = Arc::from(
            crate::agent::AgentConnector::connect(
                &connector,
                &runvm_hypervisor::AgentAddress::Vsock { cid: 3, port: 1024 },
                Duration::from_secs(1),
            )
            .await
            .unwrap(),
        );
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        let mut limit = RateLimit::new();
        read_once(
            "pod-1",
            agent.as_ref(),
            GuestLogLevel::Info,
            Duration::ZERO,
            &mut limit,
        )
        .await
        .unwrap();
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let line = text
            .lines()
            .find(|l| l.contains("disk nearly full"))
            .unwrap_or_else(|| panic!("no guest line in {text:?}"));
        assert!(
            line.contains("WARN") && line.contains("sandbox=pod-1"),
            "{line}"
        );
        assert!(
            line.contains("2023-11-14T22:13:20"),
            "the guest's time: {line}"
        );
        assert!(!text.contains("too chatty"), "{text}");
        assert!(text.contains("dropped=3"), "{text}");
        assert_eq!(
            state.lock().unwrap().telemetry_level,
            Some(GuestLogLevel::Info)
        );
    }

    #[tokio::test]
    async fn a_last_read_takes_everything_queued_and_a_flood_is_cut_and_counted() {
        let connector = MockAgentConnector::new();
        let state = connector.state();
        state.lock().unwrap().telemetry = GuestTelemetry {
            records: (0..1500)
                .map(|i| record(GuestLogLevel::Warn, &format!("flood {i}")))
                .collect(),
            ..Default::default()
        };
        let agent: Arc<dyn Agent> = Arc::from(
            crate::agent::AgentConnector::connect(
                &connector,
                &runvm_hypervisor::AgentAddress::Vsock { cid: 3, port: 1024 },
                Duration::from_secs(1),
            )
            .await
            .unwrap(),
        );
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _guard = tracing::subscriber::set_default(subscriber);
        read_all("pod-2", agent.as_ref(), GuestLogLevel::Info).await;
        assert!(
            state.lock().unwrap().telemetry.records.is_empty(),
            "all read"
        );
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        let logged = text.lines().filter(|l| l.contains("\"flood ")).count();
        // A burst's worth, plus what the bucket refilled meanwhile (200 a second).
        assert!(
            (RATE_BURST as usize..RATE_BURST as usize + 100).contains(&logged),
            "{logged} logged"
        );
        let suppressed: usize = text
            .split("suppressed=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no suppressed count in {text}"));
        assert_eq!(logged + suppressed, 1500, "every record logged or counted");
    }
}
