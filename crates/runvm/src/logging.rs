//! Logging as runc does it: to stderr, or with `--log FILE` to that file, as text
//! (`time="..." level=info msg="..."`) or JSON lines (`{"level":"error","msg":"...","time":"..."}`,
//! what containerd's runc shim reads back to report a failure).

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
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

struct LogFile {
    file: Mutex<File>,
    json: bool,
}

static LOG_FILE: OnceLock<LogFile> = OnceLock::new();

/// Sets up logging. With `log`, events go to that file; else to stderr unless `quiet` (the
/// stand-in, whose stderr is the container's).
pub fn init(log: Option<&Path>, format: LogFormat, level: &str, quiet: bool) {
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_default_env()
            .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    if let Some(path) = log {
        match OpenOptions::new().create(true).append(true).open(path) {
            Ok(file) => {
                let _ = LOG_FILE.set(LogFile {
                    file: Mutex::new(file),
                    json: format == LogFormat::Json,
                });
                tracing_subscriber::registry()
                    .with(FileLayer.with_filter(filter()))
                    .init();
                return;
            }
            Err(e) => eprintln!("runvm: cannot open the log file {}: {e}", path.display()),
        }
    }
    if quiet {
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .init();
}

/// Writes `msg` at error level to the log file, if there is one.
pub fn error(msg: &str) {
    write_line("error", msg);
}

fn write_line(level: &str, msg: &str) {
    let Some(log) = LOG_FILE.get() else { return };
    let time = rfc3339(unix_now_ns());
    let line = if log.json {
        serde_json::json!({"level": level, "msg": msg, "time": time}).to_string()
    } else {
        format!("time={time:?} level={level} msg={msg:?}")
    };
    let mut file = log.file.lock().unwrap_or_else(|p| p.into_inner());
    let _ = writeln!(file, "{line}");
}

/// Writes tracing events to the log file.
struct FileLayer;

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

impl<S: tracing::Subscriber> Layer<S> for FileLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let mut msg = Message::default();
        event.record(&mut msg);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        write_line(&level, msg.0.trim_start());
    }
}
