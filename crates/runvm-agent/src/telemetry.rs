//! What the agent tells the host of itself (docs/observability.md): its log records and the
//! spans of traced agent calls are queued here, bounded, and the host takes them with
//! `ReadTelemetry`. The serial console keeps the kernel's output: the agent writes its records
//! there too only until a host has read them once, so that a guest whose agent never reaches
//! the host (listening elsewhere, stuck) still leaves its account in the VM's console log.
//!
//! - Records: a `tracing` layer ([`HostLogLayer`]) queues each event from the level the host
//!   last asked for (info until it asks; youki's libraries capped at error and warn), at most
//!   [`MAX_QUEUED_RECORDS`], the oldest dropped (and counted) when the host does not read.
//! - Spans: a call whose ttrpc metadata carries a W3C `traceparent` (the host exports traces)
//!   runs in a span whose parent is the host's call span ([`traced`]); with `tracing-opentelemetry`
//!   every span opened inside it is recorded too, and finished spans wait in a
//!   [`runvm_telemetry::guest::SpanQueue`]. A call without one records nothing.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use runvm_protocol::agent;
use runvm_protocol::telemetry::{
    DEFAULT_RECORDS_PER_READ, LEVELS, MAX_READ_WAIT_MS, MAX_RECORDS_PER_READ,
    MAX_RECORD_BYTES_PER_READ, MAX_RECORD_MESSAGE,
};
use runvm_telemetry::guest::SpanQueue;
use tokio::sync::Notify;
use tracing::field::{Field, Visit};
use tracing::Instrument;
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;
use ttrpc::r#async::{MethodHandler, Service, TtrpcContext};

use crate::error::AgentError;

/// Most records kept for the host.
pub const MAX_QUEUED_RECORDS: usize = 1024;
/// Most spans in one answer.
const MAX_SPANS: usize = 512;
/// What a record costs in an answer beyond its message and target, bytes (time, level,
/// framing), for the answer's byte budget.
const RECORD_OVERHEAD: usize = 32;
/// The RPCs never traced: reading the telemetry (it would feed itself) and the health check.
const UNTRACED: [&str; 2] = ["ReadTelemetry", "Check"];

/// Levels as numbers, most severe lowest (`tracing`'s order).
const ERROR: u8 = 1;
const WARN: u8 = 2;
const INFO: u8 = 3;
const DEBUG: u8 = 4;
const TRACE: u8 = 5;

fn level_number(level: &tracing::Level) -> u8 {
    match *level {
        tracing::Level::ERROR => ERROR,
        tracing::Level::WARN => WARN,
        tracing::Level::INFO => INFO,
        tracing::Level::DEBUG => DEBUG,
        tracing::Level::TRACE => TRACE,
    }
}

/// The wire name of level `n` (`runvm_protocol::telemetry::LEVELS`, most severe first).
fn level_name(n: u8) -> &'static str {
    LEVELS[usize::from(n.clamp(ERROR, TRACE) - 1)]
}

/// The level named `name`, as the host names them.
fn parse_level(name: &str) -> Option<u8> {
    LEVELS
        .iter()
        .position(|&l| l == name)
        .and_then(|i| u8::try_from(i + 1).ok())
}

/// The most verbose level queued for a target: the agent's own records at any level; youki's
/// libraries are loud (libcgroups warns about every controller it does not know); the other
/// libraries only warn and error (ttrpc traces every message it sends, `ReadTelemetry`'s
/// answers included: queued, they would wake the next read at once, for ever).
fn target_cap(target: &str) -> u8 {
    if target.starts_with("runvm") {
        TRACE
    } else if target.starts_with("libcgroups") {
        ERROR
    } else {
        WARN
    }
}

/// The records waiting for the host.
#[derive(Debug)]
pub struct LogQueue {
    state: Mutex<QueueState>,
    ready: Notify,
    level: AtomicU8,
    /// Reads begun, to tell a read that was overtaken while it waited.
    reads: AtomicU64,
}

#[derive(Debug, Default)]
struct QueueState {
    records: VecDeque<agent::LogRecord>,
    dropped: u64,
}

impl LogQueue {
    fn new() -> LogQueue {
        LogQueue {
            state: Mutex::new(QueueState::default()),
            ready: Notify::new(),
            level: AtomicU8::new(INFO),
            reads: AtomicU64::new(0),
        }
    }

    fn wants(&self, level: &tracing::Level, target: &str) -> bool {
        let n = level_number(level);
        n <= self.level.load(Ordering::Relaxed) && n <= target_cap(target)
    }

    fn push(&self, record: agent::LogRecord) {
        {
            let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.records.len() >= MAX_QUEUED_RECORDS {
                state.records.pop_front();
                state.dropped += 1;
            }
            state.records.push_back(record);
        }
        self.ready.notify_one();
    }

    /// Up to `max` records (oldest first) of at most `budget` bytes together, and the count
    /// dropped since the last take; waits up to `wait` while none are queued. A read that a
    /// newer one overtook while it waited (its host gave up on it: the connection closed, or a
    /// last read came) takes nothing: what it would take goes to the newer one.
    async fn take(
        &self,
        max: usize,
        budget: usize,
        wait: Duration,
    ) -> Option<(Vec<agent::LogRecord>, u64)> {
        let generation = self.reads.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = tokio::time::Instant::now() + wait;
        // A permit left by records a read already took wakes this one with nothing to take:
        // wait again until the deadline.
        while self.is_empty() && tokio::time::Instant::now() < deadline {
            let _ = tokio::time::timeout_at(deadline, self.ready.notified()).await;
            if self.reads.load(Ordering::Acquire) != generation {
                return None;
            }
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let mut n = 0;
        let mut bytes = 0;
        for r in state.records.iter().take(max) {
            let size = r.message.len() + r.target.len() + RECORD_OVERHEAD;
            if n > 0 && bytes + size > budget {
                break;
            }
            bytes += size;
            n += 1;
        }
        let records = state.records.drain(..n).collect();
        Some((records, std::mem::take(&mut state.dropped)))
    }

    fn is_empty(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .records
            .is_empty()
    }
}

static LOGS: LazyLock<LogQueue> = LazyLock::new(LogQueue::new);
/// Whether records also go to the console (PID 1, until the host first reads them).
static CONSOLE_UNTIL_READ: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);
static SPANS: LazyLock<SpanQueue> = LazyLock::new(SpanQueue::new);
/// Kept for the life of the agent: the tracer of the OpenTelemetry layer exports through it.
static PROVIDER: OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> = OnceLock::new();

/// Queues the agent's events for the host.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostLogLayer;

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.insert_str(0, value);
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0.insert_str(0, &format!("{value:?}"));
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

fn bounded(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

impl<S: tracing::Subscriber> Layer<S> for HostLogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        if !LOGS.wants(meta.level(), meta.target()) {
            return;
        }
        let mut message = Message::default();
        event.record(&mut message);
        if CONSOLE_UNTIL_READ.load(Ordering::Relaxed) {
            eprintln!(
                "runvm-agent: {} {}: {}",
                meta.level(),
                meta.target(),
                message.0
            );
        }
        LOGS.push(agent::LogRecord {
            time_unix_ns: unix_now_ns(),
            level: level_name(level_number(meta.level())).to_string(),
            target: meta.target().to_string(),
            message: bounded(message.0, MAX_RECORD_MESSAGE),
            ..Default::default()
        });
    }
}

/// Sets up the agent's logging: records queued for the host, spans of traced calls recorded,
/// and, outside a VM (`pid1` false: tests), the log on stderr as well (`console_filter`).
pub fn init_logging(pid1: bool, console_filter: &str) {
    CONSOLE_UNTIL_READ.store(pid1, Ordering::Relaxed);
    let provider = SPANS.tracer_provider();
    let tracer = opentelemetry::trace::TracerProvider::tracer(&provider, "runvm-agent");
    let _ = PROVIDER.set(provider);
    // Spans of every level; of the events inside them only warnings and errors (span events).
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(|m| {
            m.is_span() || *m.level() <= tracing::Level::WARN
        }));
    let console = (!pid1).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(false)
            .with_filter(tracing_subscriber::EnvFilter::new(console_filter))
    });
    let subscriber = tracing_subscriber::registry()
        .with(console)
        .with(HostLogLayer)
        .with(otel);
    let _ = tracing::subscriber::set_global_default(subscriber);
    // Records of libraries logging through the `log` crate (ttrpc): warnings and errors only,
    // so that nothing below is even formatted.
    let _ = tracing_log::LogTracer::builder()
        .with_max_level(tracing_log::log::LevelFilter::Warn)
        .init();
}

/// `ReadTelemetry`: sets the level asked for, then takes what is queued.
pub async fn read(req: &agent::ReadTelemetryRequest) -> Result<agent::TelemetryBatch, AgentError> {
    // A host reads them: from now on they reach it, and the console is the kernel's.
    CONSOLE_UNTIL_READ.store(false, Ordering::Relaxed);
    if !req.log_level.is_empty() {
        let level = parse_level(&req.log_level).ok_or_else(|| {
            AgentError::invalid(format!(
                "log level {:?}; valid: error, warn, info, debug, trace",
                bounded(req.log_level.clone(), 32)
            ))
        })?;
        LOGS.level.store(level, Ordering::Relaxed);
    }
    let max = match req.max_records {
        0 => DEFAULT_RECORDS_PER_READ,
        n => n.min(MAX_RECORDS_PER_READ),
    };
    let wait = Duration::from_millis(u64::from(req.wait_ms.min(MAX_READ_WAIT_MS)));
    let Some((records, dropped_records)) = LOGS
        .take(max as usize, MAX_RECORD_BYTES_PER_READ, wait)
        .await
    else {
        // Overtaken by a newer read: answer empty, leave everything to it.
        return Ok(agent::TelemetryBatch::default());
    };
    let (spans, dropped_spans) = SPANS.take(MAX_SPANS);
    Ok(agent::TelemetryBatch {
        records,
        dropped_records,
        spans: spans.unwrap_or_default(),
        dropped_spans,
        ..Default::default()
    })
}

/// The agent's services with every call (but [`UNTRACED`]) run by [`Traced`].
pub fn traced(services: HashMap<String, Service>) -> HashMap<String, Service> {
    services
        .into_iter()
        .map(|(name, mut service)| {
            service.methods = service
                .methods
                .into_iter()
                .map(|(method, inner)| {
                    if UNTRACED.contains(&method.as_str()) {
                        return (method, inner);
                    }
                    let traced: Box<dyn MethodHandler + Send + Sync> = Box::new(Traced {
                        name: method.clone(),
                        inner,
                    });
                    (method, traced)
                })
                .collect();
            (name, service)
        })
        .collect()
}

/// One RPC: when the host sent trace context, it runs in a span (named after the RPC) whose
/// parent is the host's span of the call.
struct Traced {
    name: String,
    inner: Box<dyn MethodHandler + Send + Sync>,
}

#[async_trait]
impl MethodHandler for Traced {
    async fn handler(
        &self,
        ctx: TtrpcContext,
        req: ttrpc::Request,
    ) -> ttrpc::Result<ttrpc::Response> {
        if !ctx.metadata.contains_key("traceparent") {
            return self.inner.handler(ctx, req).await;
        }
        let span = tracing::info_span!(
            "agent",
            otel.name = %self.name,
            otel.kind = "server",
            rpc.method = %self.name
        );
        runvm_telemetry::set_parent_from_metadata(&span, &ctx.metadata);
        self.inner.handler(ctx, req).instrument(span).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_keeps_the_newest_records_and_counts_the_dropped() {
        let q = LogQueue::new();
        for i in 0..MAX_QUEUED_RECORDS + 5 {
            q.push(agent::LogRecord {
                message: i.to_string(),
                ..Default::default()
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (records, dropped) = rt
            .block_on(q.take(MAX_QUEUED_RECORDS, usize::MAX, Duration::ZERO))
            .unwrap();
        assert_eq!(dropped, 5);
        assert_eq!(records.len(), MAX_QUEUED_RECORDS);
        assert_eq!(records[0].message, "5");
        let (records, dropped) = rt
            .block_on(q.take(MAX_QUEUED_RECORDS, usize::MAX, Duration::from_millis(10)))
            .unwrap();
        assert!(records.is_empty() && dropped == 0);
    }

    #[test]
    fn an_answer_keeps_to_its_byte_budget_and_an_overtaken_read_takes_nothing() {
        let q = std::sync::Arc::new(LogQueue::new());
        for _ in 0..10 {
            q.push(agent::LogRecord {
                message: "x".repeat(1000),
                ..Default::default()
            });
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let (records, _) = rt.block_on(q.take(100, 3500, Duration::ZERO)).unwrap();
        assert_eq!(records.len(), 3, "3 records of about 1 KiB fit 3500 bytes");
        let (records, _) = rt
            .block_on(q.take(100, usize::MAX, Duration::ZERO))
            .unwrap();
        assert_eq!(records.len(), 7);
        // A read waiting on an empty queue is overtaken by a newer one.
        let waiting = {
            let q = std::sync::Arc::clone(&q);
            rt.spawn(async move { q.take(100, usize::MAX, Duration::from_secs(5)).await })
        };
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        q.push(agent::LogRecord::default());
        let newer = rt
            .block_on(q.take(100, usize::MAX, Duration::ZERO))
            .unwrap();
        assert_eq!(newer.0.len(), 1);
        assert!(rt.block_on(waiting).unwrap().is_none());
    }

    #[test]
    fn the_level_the_host_asks_for_decides_what_is_queued_and_youki_stays_quiet() {
        let q = LogQueue::new();
        assert!(q.wants(&tracing::Level::INFO, "runvm_agent"));
        assert!(!q.wants(&tracing::Level::DEBUG, "runvm_agent"));
        assert!(!q.wants(&tracing::Level::WARN, "libcgroups::v2"));
        assert!(!q.wants(&tracing::Level::INFO, "ttrpc::r#async::server"));
        q.level.store(DEBUG, Ordering::Relaxed);
        assert!(q.wants(&tracing::Level::DEBUG, "runvm_agent"));
        assert!(!q.wants(&tracing::Level::INFO, "libcontainer::process"));
        assert!(q.wants(&tracing::Level::WARN, "libcontainer::process"));
        assert_eq!(parse_level("warn"), Some(WARN));
        assert_eq!(parse_level("loud"), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let s = bounded("é".repeat(MAX_RECORD_MESSAGE), 5);
        assert_eq!(s, "éé…");
    }
}
