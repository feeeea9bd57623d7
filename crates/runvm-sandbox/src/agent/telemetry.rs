//! What the agent queues for the host: its log records and the spans of traced calls
//! (`ReadTelemetry`), checked as everything from the guest is.

use std::time::Duration;

use runvm_protocol::agent;
use runvm_protocol::telemetry::{
    LEVELS, MAX_READ_WAIT_MS, MAX_RECORDS_PER_READ, MAX_RECORD_MESSAGE,
};
use runvm_telemetry::MAX_GUEST_REQUEST_BYTES as MAX_SPAN_BYTES;

use super::AgentError;

/// Longest log target passed on, bytes.
const MAX_TARGET: usize = 128;
/// Most records asked for in one read.
pub const MAX_RECORDS: u32 = MAX_RECORDS_PER_READ;
/// The agent answers a read after at most this long, even with nothing queued.
pub const MAX_WAIT: Duration = Duration::from_millis(MAX_READ_WAIT_MS as u64);

/// A log level of the agent's records, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum GuestLogLevel {
    /// `error`.
    Error,
    /// `warn`.
    Warn,
    /// `info`.
    Info,
    /// `debug`.
    Debug,
    /// `trace`.
    Trace,
}

impl GuestLogLevel {
    /// Every level, most severe first.
    pub const ALL: [GuestLogLevel; 5] = [
        GuestLogLevel::Error,
        GuestLogLevel::Warn,
        GuestLogLevel::Info,
        GuestLogLevel::Debug,
        GuestLogLevel::Trace,
    ];

    /// The name on the wire (and in `tracing`'s filters).
    pub fn as_str(self) -> &'static str {
        LEVELS[self as usize]
    }

    /// The level named `name` (`warning` is `warn`, as logrus names it); `None` for another.
    pub fn parse(name: &str) -> Option<GuestLogLevel> {
        let name = name.trim().to_ascii_lowercase();
        let name = if name == "warning" { "warn" } else { &name };
        GuestLogLevel::ALL.into_iter().find(|l| l.as_str() == name)
    }

    /// The level a host's log filter lets through at most (its most verbose directive, the
    /// filter's `max_level_hint`; `None`: info): the host asks the agent to queue from there
    /// on, so what the host would filter out does not even cross the VM boundary. A filter
    /// that lets nothing through asks for errors (the fewest).
    pub fn of_filter(hint: Option<tracing::level_filters::LevelFilter>) -> GuestLogLevel {
        use tracing::level_filters::LevelFilter;
        match hint {
            None => GuestLogLevel::Info,
            Some(LevelFilter::TRACE) => GuestLogLevel::Trace,
            Some(LevelFilter::DEBUG) => GuestLogLevel::Debug,
            Some(LevelFilter::INFO) => GuestLogLevel::Info,
            Some(LevelFilter::WARN) => GuestLogLevel::Warn,
            Some(_) => GuestLogLevel::Error,
        }
    }
}

/// One of the agent's log records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestLogRecord {
    /// The guest's wall clock when it was logged, ns since the Unix epoch.
    pub time_unix_ns: u64,
    /// Its level.
    pub level: GuestLogLevel,
    /// The module that logged it.
    pub target: String,
    /// The message and its fields (bounded, control characters escaped).
    pub message: String,
}

/// What one `ReadTelemetry` brought.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestTelemetry {
    /// Log records, oldest first.
    pub records: Vec<GuestLogRecord>,
    /// Records the agent dropped (its queue was full) since the last read.
    pub dropped_records: u64,
    /// Finished guest spans: an encoded OTLP `ExportTraceServiceRequest` (`None`: none).
    pub spans: Option<Vec<u8>>,
    /// Spans the agent dropped since the last read.
    pub dropped_spans: u64,
}

/// A read of the agent's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryRequest {
    /// Longest wait while nothing is queued (capped at [`MAX_WAIT`]).
    pub wait: Duration,
    /// The least severe level the agent queues from now on.
    pub level: GuestLogLevel,
    /// Most records in the answer (capped at [`MAX_RECORDS`]).
    pub max_records: u32,
}

pub(crate) fn request(r: &TelemetryRequest) -> agent::ReadTelemetryRequest {
    agent::ReadTelemetryRequest {
        wait_ms: u32::try_from(r.wait.min(MAX_WAIT).as_millis()).unwrap_or(u32::MAX),
        log_level: r.level.as_str().to_string(),
        max_records: r.max_records.clamp(1, MAX_RECORDS),
        ..Default::default()
    }
}

/// Checks the agent's answer: at most the records asked for, known levels, bounded texts and
/// span batch.
pub(crate) fn from_reply(
    asked: &TelemetryRequest,
    reply: agent::TelemetryBatch,
) -> Result<GuestTelemetry, AgentError> {
    let invalid = |reason: String| AgentError::InvalidReply {
        method: "ReadTelemetry",
        reason,
    };
    let most = asked.max_records.clamp(1, MAX_RECORDS) as usize;
    if reply.records.len() > most {
        return Err(invalid(format!(
            "{} log records, {most} were asked for",
            reply.records.len()
        )));
    }
    if reply.spans.len() > MAX_SPAN_BYTES {
        return Err(invalid(format!(
            "a span batch of {} bytes (limit {MAX_SPAN_BYTES})",
            reply.spans.len()
        )));
    }
    let mut records = Vec::with_capacity(reply.records.len());
    for r in reply.records {
        let level = GuestLogLevel::parse(&r.level).ok_or_else(|| {
            invalid(format!(
                "log level {:?}; valid: error, warn, info, debug, trace",
                bounded_printable(&r.level, 16)
            ))
        })?;
        records.push(GuestLogRecord {
            time_unix_ns: r.time_unix_ns,
            level,
            target: bounded_printable(&r.target, MAX_TARGET),
            message: bounded_printable(&r.message, MAX_RECORD_MESSAGE),
        });
    }
    Ok(GuestTelemetry {
        records,
        dropped_records: reply.dropped_records,
        spans: (!reply.spans.is_empty()).then_some(reply.spans),
        dropped_spans: reply.dropped_spans,
    })
}

/// `s` cut to `max` bytes (marked with `…`), control characters escaped (`\n`, `\u{1b}`), so
/// a guest record is one line of the host's log and cannot forge another.
pub(crate) fn bounded_printable(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 4);
    for c in s.chars() {
        if out.len() >= max {
            out.push('…');
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn asked(max_records: u32) -> TelemetryRequest {
        TelemetryRequest {
            wait: Duration::ZERO,
            level: GuestLogLevel::Info,
            max_records,
        }
    }

    fn record(level: &str, message: &str) -> agent::LogRecord {
        agent::LogRecord {
            time_unix_ns: 1,
            level: level.into(),
            target: "runvm_agent".into(),
            message: message.into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_record_cannot_forge_a_log_line_or_grow_unbounded() {
        let reply = agent::TelemetryBatch {
            records: vec![record(
                "warn",
                "one\ntime=\"x\" level=error msg=\"forged\"\u{1b}[31m",
            )],
            ..Default::default()
        };
        let t = from_reply(&asked(10), reply).unwrap();
        assert_eq!(t.records[0].level, GuestLogLevel::Warn);
        assert!(!t.records[0].message.chars().any(char::is_control));
        assert!(t.records[0].message.starts_with("one\\ntime="));
        let long = "x".repeat(MAX_RECORD_MESSAGE * 2);
        let reply = agent::TelemetryBatch {
            records: vec![record("info", &long)],
            ..Default::default()
        };
        let t = from_reply(&asked(10), reply).unwrap();
        assert!(t.records[0].message.len() <= MAX_RECORD_MESSAGE + '…'.len_utf8());
    }

    #[test]
    fn unknown_levels_and_too_many_records_are_refused() {
        let reply = agent::TelemetryBatch {
            records: vec![record("loud", "m")],
            ..Default::default()
        };
        let e = from_reply(&asked(10), reply).unwrap_err().to_string();
        assert!(
            e.contains("\"loud\"") && e.contains("valid: error, warn"),
            "{e}"
        );
        let reply = agent::TelemetryBatch {
            records: vec![record("info", "a"), record("info", "b")],
            ..Default::default()
        };
        assert!(from_reply(&asked(1), reply).is_err());
    }

    #[test]
    fn levels_parse_as_logrus_and_tracing_name_them() {
        assert_eq!(GuestLogLevel::parse("warning"), Some(GuestLogLevel::Warn));
        assert_eq!(GuestLogLevel::parse("DEBUG"), Some(GuestLogLevel::Debug));
        assert_eq!(GuestLogLevel::parse("verbose"), None);
        assert!(GuestLogLevel::Error < GuestLogLevel::Trace);
    }
}
