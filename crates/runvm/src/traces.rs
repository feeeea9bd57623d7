//! The CLI's part of observability (docs/observability.md): each command that drives a sandbox
//! runs in one span, the root of its trace (exported when `[tracing] otlp_endpoint` is set),
//! and relays what the agents it talks to logged into its own log.

use std::time::Duration;

use runvm_sandbox::config::Config;

use crate::Command;

/// How long a command's exit may wait for its spans to be sent.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(2);

/// The command's span, entered; on drop it ends and what is left of the trace is sent.
#[derive(Debug)]
pub struct CommandTrace {
    entered: Option<tracing::span::EnteredSpan>,
}

impl Drop for CommandTrace {
    fn drop(&mut self) {
        // The root span ends first, so that it is in what the shutdown sends.
        drop(self.entered.take());
        runvm_telemetry::shutdown_global(EXPORT_TIMEOUT);
    }
}

/// The OCI name of a command that drives sandboxes, `None` for the others (they neither trace
/// nor take agents' logs: `monitor` reads guests' metrics and must leave their logs to the
/// shim or the command that owns the sandbox).
fn traced_name(command: &Command) -> Option<&'static str> {
    Some(match command {
        Command::Boot { .. } => "boot",
        Command::Create(_) => "create",
        Command::Start { .. } => "start",
        Command::Run { .. } => "run",
        Command::Kill { .. } => "kill",
        Command::Delete { .. } => "delete",
        Command::Exec(_) => "exec",
        Command::Ps { .. } => "ps",
        Command::Pause { .. } => "pause",
        Command::Resume { .. } => "resume",
        Command::Update(_) => "update",
        Command::Events { .. } => "events",
        Command::State { .. } => "state",
        Command::Check
        | Command::Env
        | Command::Network(_)
        | Command::Factory(_)
        | Command::List { .. }
        | Command::Spec { .. }
        | Command::Features
        | Command::Monitor(_)
        | Command::Version
        | Command::Standin { .. }
        | Command::Teardown { .. } => return None,
    })
}

/// The process's span exporter when `command` drives sandboxes and `[tracing] otlp_endpoint`
/// is set: started before logging, whose subscriber takes its layer.
pub fn exporter(
    config: &Config,
    command: &Command,
) -> Result<Option<&'static runvm_telemetry::Telemetry>, runvm_telemetry::TelemetryError> {
    if traced_name(command).is_none() || !config.tracing.enabled() {
        return Ok(None);
    }
    let telemetry = runvm_telemetry::Telemetry::start(&config.tracing.otlp_endpoint, "runvm")?;
    Ok(Some(runvm_telemetry::install_global(telemetry)))
}

/// Starts `command`'s trace (the root span, exported when [`exporter`] gave one) and the relay
/// of guest logs into this process's log (at its level).
pub fn start(command: &Command) -> CommandTrace {
    if matches!(command, Command::Teardown { .. }) {
        // The VM's last records are read before it powers off, into `--log` if given.
        runvm_sandbox::guest_telemetry::enable(crate::logging::guest_level());
    }
    let Some(name) = traced_name(command) else {
        return CommandTrace { entered: None };
    };
    runvm_sandbox::guest_telemetry::enable(crate::logging::guest_level());
    let span = tracing::info_span!(
        "runvm",
        otel.name = %format!("runvm {name}"),
        otel.kind = "internal",
        runvm.command = name
    );
    CommandTrace {
        entered: Some(span.entered()),
    }
}
