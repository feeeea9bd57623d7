//! Logging as runc does it: to stderr, or with `--log FILE` to that file, as text
//! (`time="..." level=info msg="..."`) or JSON lines (`{"level":"error","msg":"...","time":"..."}`,
//! what containerd's runc shim reads back to report a failure); never with terminal colours.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use runvm_sandbox::standalone::rfc3339;
use runvm_sandbox::state::unix_now_ns;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

use crate::args::LogFormat;

/// Where log lines go: the `--log` file, or stderr.
struct LogSink {
    out: Mutex<Box<dyn std::io::Write + Send>>,
    json: bool,
    /// The `--log` file (errors are written there as well as to stderr).
    file: bool,
}

static LOG: OnceLock<LogSink> = OnceLock::new();
/// The least severe guest record this process's log takes (its filter's most verbose level).
static GUEST_LEVEL: OnceLock<runvm_sandbox::agent::GuestLogLevel> = OnceLock::new();

/// The level guest agents are asked to queue from: what this process's log lets through.
pub fn guest_level() -> runvm_sandbox::agent::GuestLogLevel {
    GUEST_LEVEL
        .get()
        .copied()
        .unwrap_or(runvm_sandbox::agent::GuestLogLevel::Warn)
}

/// Sets up logging, as runc's logrus: with `log`, events go to that file; else to stderr unless
/// `quiet` (the stand-in, whose stderr is the container's). Either way a line is logrus text
/// (`time="..." level=warning msg="..."`, never terminal colour codes) or, with `--log-format
/// json`, a JSON object.
/// With `traces`, spans are exported through it (`[tracing] otlp_endpoint`).
pub fn init(
    log: Option<&Path>,
    format: LogFormat,
    level: &str,
    quiet: bool,
    traces: Option<&'static runvm_telemetry::Telemetry>,
) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    let json = format == LogFormat::Json;
    let mut sink = None;
    if let Some(path) = log {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => {
                let out: Box<dyn std::io::Write + Send> = Box::new(file);
                sink = Some((out, true));
            }
            Err(e) => eprintln!("runvm: cannot open the log file {}: {e}", path.display()),
        }
    }
    if sink.is_none() && !quiet {
        sink = Some((Box::new(std::io::stderr()), false));
    }
    let traces = traces.map(|t| {
        t.layer::<tracing_subscriber::Registry>()
            .with_filter(runvm_telemetry::host_filter())
    });
    let sink_layer = sink.map(|(out, file)| {
        let _ = LOG.set(LogSink {
            out: Mutex::new(out),
            json,
            file,
        });
        let filter = filter();
        let _ = GUEST_LEVEL.set(runvm_sandbox::agent::GuestLogLevel::of_filter(
            filter.max_level_hint(),
        ));
        SinkLayer.with_filter(filter)
    });
    let _ = tracing_subscriber::registry()
        .with(traces)
        .with(sink_layer)
        .try_init();
}

/// Writes `msg` at error level to the log file, if there is one (stderr gets the error from
/// `main`).
pub fn error(msg: &str) {
    if LOG.get().is_some_and(|l| l.file) {
        write_line("error", msg);
    }
}

/// One log line in logrus's text format or as JSON. logrus calls `warn` `warning`.
fn format_line(json: bool, time: &str, level: &str, msg: &str) -> String {
    let level = if level == "warn" { "warning" } else { level };
    if json {
        serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level={level} msg={msg:?}")
    }
}

fn write_line(level: &str, msg: &str) {
    let Some(log) = LOG.get() else { return };
    let mut line = format_line(log.json, &rfc3339(unix_now_ns()), level, msg);
    line.push('\n');
    let mut out = log.out.lock().unwrap_or_else(|p| p.into_inner());
    // One write per line: other runvm processes (the stand-in, the teardown) append to the same
    // `--log` file (O_APPEND), and a line written in two pieces could be split by theirs.
    let _ = out.write_all(line.as_bytes());
    let _ = out.flush();
}

/// Writes tracing events to the log sink.
struct SinkLayer;

#[derive(Default)]
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> Layer<S> for SinkLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut msg = Message::default();
        event.record(&mut msg);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        write_line(&level, msg.0.trim_start());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_logrus_text_or_json_without_colour() {
        let t = format_line(false, "2024-01-01T00:00:00Z", "warn", "a \"b\"");
        assert_eq!(
            t,
            r#"time="2024-01-01T00:00:00Z" level=warning msg="a \"b\"""#
        );
        assert!(!t.contains('\x1b'));
        let j: serde_json::Value =
            serde_json::from_str(&format_line(true, "T", "debug", "m")).unwrap();
        assert_eq!(
            j,
            serde_json::json!({"level": "debug", "msg": "m", "time": "T"})
        );
    }
}
