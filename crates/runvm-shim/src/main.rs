//! `containerd-shim-runvm-v2`: containerd's shim (task API v2) for runvm. containerd runs it
//! with Go-style flags (`-namespace`, `-id`, `-address`, then `start`, `delete` or nothing for
//! the daemon); containerd-shim parses them.

mod create;
mod error;
mod events;
mod pod;
mod process;
mod service;
mod shim;
mod task;

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Mutex, OnceLock};

use runvm_sandbox::agent::GuestLogLevel;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// What containerd asked the binary to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Start,
    Delete,
    Daemon,
}

/// Where the logs go: the daemon writes to containerd's `log` FIFO in the bundle (containerd
/// copies it into its own log); `delete` writes to stderr, which containerd logs.
fn log_writer(action: Action) -> Box<dyn Write + Send> {
    if action == Action::Start {
        // containerd reads `start`'s stdout and stderr together as the address: stay silent.
        return Box::new(std::io::sink());
    }
    if action == Action::Daemon {
        let fifo = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("log");
        if let Ok(f) = fifo {
            // Blocking again, so a slow reader does not drop lines.
            let _ = nix::fcntl::fcntl(
                f.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            );
            return Box::new(f);
        }
    }
    Box::new(std::io::stderr())
}

fn init_logging() {
    let args: Vec<String> = std::env::args().collect();
    let action = if args.iter().any(|a| a == "start") {
        Action::Start
    } else if args.iter().any(|a| a == "delete") {
        Action::Delete
    } else {
        Action::Daemon
    };
    let debug = args.iter().any(|a| a == "-debug" || a == "--debug");
    let default = if debug { "debug" } else { "info" };
    let filter = EnvFilter::try_from_env("RUNVM_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    let _ = GUEST_LOG_LEVEL.set(GuestLogLevel::of_filter(filter.max_level_hint()));
    let writer = Mutex::new(log_writer(action));
    // The daemon reads runvm's configuration once, now: it says where traces go, and the
    // task service takes it from here (`config`).
    let mut trace_error = None;
    let mut traces = None;
    if action == Action::Daemon {
        let config = shim::load_config();
        if let Ok(c) = &config {
            if c.tracing.enabled() {
                match runvm_telemetry::Telemetry::start(
                    &c.tracing.otlp_endpoint,
                    "containerd-shim-runvm-v2",
                ) {
                    Ok(t) => traces = Some(runvm_telemetry::install_global(t)),
                    Err(e) => trace_error = Some(e),
                }
            }
        }
        let _ = CONFIG.set(config);
    }
    let _ = tracing_subscriber::registry()
        .with(traces.map(|t| {
            t.layer::<tracing_subscriber::Registry>()
                .with_filter(runvm_telemetry::host_filter())
        }))
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(writer)
                .with_filter(filter),
        )
        .try_init();
    if let Some(e) = trace_error {
        tracing::warn!(error = %e, "traces are not exported");
    }
}

/// runvm's configuration as the daemon read it at its start.
static CONFIG: OnceLock<Result<runvm_sandbox::config::Config, String>> = OnceLock::new();

/// The configuration read at the start (read now if it was not: a test's task service).
pub(crate) fn config() -> Result<runvm_sandbox::config::Config, String> {
    CONFIG.get().cloned().unwrap_or_else(shim::load_config)
}
/// The least severe guest record the shim's log takes: its own level.
static GUEST_LOG_LEVEL: OnceLock<GuestLogLevel> = OnceLock::new();

/// The guest agents' records go to the shim's log from now on (docs/observability.md).
pub(crate) fn relay_guest_logs() {
    runvm_sandbox::guest_telemetry::enable(
        GUEST_LOG_LEVEL
            .get()
            .copied()
            .unwrap_or(GuestLogLevel::Info),
    );
}

fn main() -> anyhow::Result<()> {
    init_logging();
    std::panic::set_hook(Box::new(|info| {
        tracing::error!(%info, "the shim panicked");
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(containerd_shim::asynchronous::run::<shim::RunvmShim>(
            shim::RUNTIME_ID,
            Some(shim::shim_config()),
        ))
    }));
    // A FIFO whose other end never opened keeps a blocking thread in open(2); waiting for it
    // would keep the shim alive forever, so the runtime is not waited for.
    runtime.shutdown_background();
    // The last spans (the pod's teardown) are sent before the shim goes, within 2 s.
    runvm_telemetry::shutdown_global(std::time::Duration::from_secs(2));
    std::process::exit(if outcome.is_ok() { 0 } else { 2 });
}
