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
use std::time::Duration;

use crate::agent::{Agent, AgentError, GuestLogLevel, GuestLogRecord, GuestTelemetry, RpcCode};
use crate::agent::{TelemetryRequest, MAX_TELEMETRY_RECORDS};

/// How long one read waits in the guest while nothing is queued: the agent answers as soon as
/// a record is queued, so this bounds only how late spans of calls made without a record come
/// (and costs an idle guest one answer per period: about 4 ms of CPU under TCG).
const POLL_WAIT: Duration = crate::agent::MAX_TELEMETRY_WAIT;
/// Records asked for per read.
const BATCH: u32 = 256;
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
        let _ = read_once(sandbox, agent.as_ref(), relays.level, Duration::ZERO).await;
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
        let read = read_once(&sandbox, relay.agent.as_ref(), relays.level, Duration::ZERO);
        let _ = tokio::time::timeout(Duration::from_secs(2), read).await;
    }
}

/// The relay task: reads until the channel ends (the guest powered off) or the agent cannot
/// answer `ReadTelemetry` (an older agent).
async fn run(sandbox: String, agent: Arc<dyn Agent>, level: GuestLogLevel) {
    loop {
        match read_once(&sandbox, agent.as_ref(), level, POLL_WAIT).await {
            Ok(()) => {}
            Err(AgentError::Rpc {
                code: RpcCode::Unimplemented,
                ..
            }) => {
                tracing::debug!(sandbox = %sandbox, "the agent keeps its log: it has no ReadTelemetry");
                return;
            }
            Err(e) => {
                tracing::debug!(sandbox = %sandbox, error = %e, "guest log relay ends");
                return;
            }
        }
    }
}

async fn read_once(
    sandbox: &str,
    agent: &dyn Agent,
    level: GuestLogLevel,
    wait: Duration,
) -> Result<(), AgentError> {
    let request = TelemetryRequest {
        wait,
        level,
        max_records: BATCH.min(MAX_TELEMETRY_RECORDS),
    };
    let batch = agent.read_telemetry(request).await?;
    relay(sandbox, level, batch);
    Ok(())
}

/// Logs the records (those from `level` up) and hands the spans to the exporter.
pub fn relay(sandbox: &str, level: GuestLogLevel, batch: GuestTelemetry) {
    for record in batch.records.iter().filter(|r| r.level <= level) {
        log(sandbox, record);
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

/// One guest record as an event of this process, at its level.
fn log(sandbox: &str, r: &GuestLogRecord) {
    let time = crate::standalone::rfc3339(r.time_unix_ns);
    macro_rules! event {
        ($level:expr) => {
            tracing::event!(
                target: TARGET,
                $level,
                sandbox = %sandbox,
                guest_time = %time,
                source = %r.target,
                "guest: {}",
                r.message
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
        read_once("pod-1", agent.as_ref(), GuestLogLevel::Info, Duration::ZERO)
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
}
