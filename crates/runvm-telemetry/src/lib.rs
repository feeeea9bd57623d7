//! runvm's OpenTelemetry traces (issue #16, docs/observability.md).
//!
//! - Host side ([`Telemetry`]): a process (CLI command, shim, monitor) exports its `tracing` spans
//!   over OTLP/gRPC to the `[tracing] otlp_endpoint` and relays the guest's spans to the same
//!   endpoint. An unreachable endpoint never blocks or fails the process: it is reported once.
//! - Propagation ([`inject_current`], [`extract`], [`set_parent_from`],
//!   [`set_parent_from_metadata`]): W3C trace context as
//!   (key, value) pairs, carried in the agent channel's ttrpc metadata.
//! - Guest side ([`guest::SpanQueue`]): the agent has no network out; it records only spans whose
//!   parent came from the host, queues them in memory, and the host takes them over the agent
//!   channel as an encoded OTLP `ExportTraceServiceRequest`.
//! - Tests ([`receiver`], feature `receiver`): an in-process OTLP receiver.

use std::sync::OnceLock;
use std::time::Duration;

mod forward;
pub mod guest;
mod guest_ids;
mod host;
mod propagation;
#[cfg(feature = "receiver")]
pub mod receiver;

pub use host::Telemetry;

/// The filter of the host's OpenTelemetry layer: spans of info level and above (runvm's
/// lifecycle and calls, not libraries' debug spans), and of the events inside them only
/// warnings and errors (as span events); without it the layer would enable every callsite.
pub fn host_filter() -> tracing_subscriber::filter::FilterFn<fn(&tracing::Metadata<'_>) -> bool> {
    fn keep(m: &tracing::Metadata<'_>) -> bool {
        if m.is_span() {
            *m.level() <= tracing::Level::INFO
        } else {
            *m.level() <= tracing::Level::WARN
        }
    }
    tracing_subscriber::filter::filter_fn(keep as fn(&tracing::Metadata<'_>) -> bool)
}
pub use propagation::{extract, inject_current, set_parent_from, set_parent_from_metadata};

/// The largest encoded `ExportTraceServiceRequest` the host accepts from a guest (and the guest's
/// [`guest::SpanQueue::take`] makes): half of ttrpc's 4 MiB message limit, the rest of a
/// `ReadTelemetry` answer being log records.
pub const MAX_GUEST_REQUEST_BYTES: usize = 2 << 20;

/// What can go wrong when starting the export.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The `[tracing] otlp_endpoint` value is not one runvm can export to.
    #[error("invalid [tracing] otlp_endpoint {value:?}: {reason}")]
    InvalidEndpoint {
        /// The value as configured.
        value: String,
        /// What is wrong and what would be valid.
        reason: String,
    },
    /// The exporter could not be set up (its thread, runtime or client).
    #[error("cannot start the trace export: {reason}")]
    Start {
        /// What failed.
        reason: String,
    },
}

const VALID: &str = "expected \"\" (off) or http://HOST:PORT (OTLP over gRPC)";

/// Checks a `[tracing] otlp_endpoint` value: `""` (off) or an `http://HOST:PORT` URL (OTLP over
/// gRPC, so no path). `https://` is refused: this build has no TLS for OTLP.
///
/// ```
/// assert!(runvm_telemetry::validate_endpoint("").is_ok());
/// assert!(runvm_telemetry::validate_endpoint("http://127.0.0.1:4317").is_ok());
/// assert!(runvm_telemetry::validate_endpoint("127.0.0.1:4317").is_err());
/// ```
pub fn validate_endpoint(value: &str) -> Result<(), TelemetryError> {
    if value.is_empty() {
        return Ok(());
    }
    check_url(value).map_err(|reason| TelemetryError::InvalidEndpoint {
        value: value.to_owned(),
        reason,
    })
}

fn check_url(value: &str) -> Result<(), String> {
    if value.starts_with("https://") {
        // tonic is built without TLS here (its TLS stack is not among runvm's dependencies):
        // every export would fail, so the value is refused up front.
        return Err(format!(
            "https:// is not supported (this build has no TLS for OTLP); send to a local \
             collector over http:// instead; {VALID}"
        ));
    }
    let authority = value
        .strip_prefix("http://")
        .ok_or_else(|| format!("no http:// scheme; {VALID}"))?;
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains(['/', '?', '#', '@']) || authority.chars().any(char::is_whitespace) {
        return Err(format!(
            "only HOST:PORT may follow the scheme (OTLP over gRPC has no path); {VALID}"
        ));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| format!("no port; {VALID}"))?;
    let host_ok = match host.strip_prefix('[') {
        Some(v6) => v6
            .strip_suffix(']')
            .is_some_and(|v6| v6.parse::<std::net::Ipv6Addr>().is_ok()),
        None => {
            !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
        }
    };
    if !host_ok {
        return Err(format!("no valid HOST; {VALID}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!("PORT must be 1 to 65535; {VALID}")),
    }
}

static GLOBAL: OnceLock<Telemetry> = OnceLock::new();

/// Makes `t` the process-wide instance (for code deep in libraries, such as the sandbox
/// library forwarding guest spans) and returns it. If one is installed already, that one stays
/// and is returned, and `t` is stopped.
pub fn install_global(t: Telemetry) -> &'static Telemetry {
    // When one is installed already, the closure (and `t` in it) is dropped, which stops `t`.
    GLOBAL.get_or_init(move || t)
}

/// The process-wide instance, if [`install_global`] was called.
pub fn global() -> Option<&'static Telemetry> {
    GLOBAL.get()
}

/// Flushes and stops the process-wide instance (a CLI before it exits), bounded by `timeout`.
pub fn shutdown_global(timeout: Duration) {
    if let Some(t) = GLOBAL.get() {
        t.stop(timeout);
    }
}

/// Whether traces are exported in this process (a global instance is installed and running):
/// the agent client sends trace context only then.
pub fn enabled() -> bool {
    GLOBAL.get().is_some_and(Telemetry::is_running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_endpoint_accepts_off_and_grpc_urls() {
        for ok in [
            "",
            "http://127.0.0.1:4317",
            "http://collector.example.com:4317/",
            "http://[::1]:4317",
        ] {
            assert!(validate_endpoint(ok).is_ok(), "{ok:?} refused");
        }
    }

    #[test]
    fn validate_endpoint_refuses_others_naming_the_value() {
        for bad in [
            "https://collector:4317",
            "127.0.0.1:4317",
            "ftp://x",
            "http://",
            "http://host",
            "http://host:0",
            "http://host:99999",
            "http://host:4317/v1/traces",
            "http://:4317",
            "http://[::1:4317",
            " http://host:4317",
        ] {
            let err = validate_endpoint(bad).expect_err(bad).to_string();
            assert!(err.contains(&format!("{bad:?}")), "{err}");
            assert!(err.contains("http://HOST:PORT"), "{err}");
        }
    }

    /// The only test in this binary touching the process-wide instance.
    #[test]
    fn global_is_enabled_from_install_until_shutdown() {
        assert!(!enabled() && global().is_none());
        let first = Telemetry::start("http://127.0.0.1:1", "runvm-test").expect("start");
        assert_eq!(install_global(first).endpoint(), "http://127.0.0.1:1");
        assert!(enabled());
        // A second one is refused (and stopped); the first stays.
        let second = Telemetry::start("http://127.0.0.1:2", "runvm-test").expect("start");
        assert_eq!(install_global(second).endpoint(), "http://127.0.0.1:1");
        let started = std::time::Instant::now();
        shutdown_global(Duration::from_secs(1));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(!enabled());
        assert!(global().is_some());
    }

    #[test]
    fn start_refuses_off_and_invalid_endpoints() {
        for bad in ["", "localhost:4317"] {
            let err = Telemetry::start(bad, "runvm-test").expect_err(bad);
            assert!(
                matches!(err, TelemetryError::InvalidEndpoint { .. }),
                "{err}"
            );
        }
    }
}
