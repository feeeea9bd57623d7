//! `run` in the foreground: a new sandbox with one container, its stdio relayed, its exit code
//! returned, everything removed afterwards (what `runc run` does, in a VM).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::agent::{ExitStatus, StdioSpec};
use crate::config::Config;
use crate::container::io::FirstWrite;
use crate::error::SandboxError;
use crate::id::{ContainerId, SandboxId};
use crate::sandbox::{BootReport, NewContainer};
use crate::state::StdioRecord;

/// What a foreground run reports.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// How the container's process ended.
    pub exit: ExitStatus,
    /// The sandbox's boot report.
    pub boot: BootReport,
    /// From the start of `run` to the container's first byte of output.
    pub first_output: Option<Duration>,
    /// From the start of `run` to the container's exit.
    pub total: Duration,
}

/// Runs the bundle's container `id` in a new sandbox of the same id: stdin is relayed from
/// `stdin`, output to `stdout` and `stderr` (with a terminal, both go to `stdout`); signals
/// received on `signals` are passed to the container's process. Returns its exit status once
/// the sandbox is stopped and removed.
pub async fn run_foreground<I, O, E>(
    config: &Config,
    id: ContainerId,
    bundle: &Path,
    stdin: I,
    stdout: O,
    stderr: E,
    mut signals: mpsc::Receiver<i32>,
) -> Result<RunOutcome, SandboxError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    // Check the bundle (once) before booting a VM for it.
    let bundle = crate::container::spec::Bundle::load(bundle, id.as_str())?;
    let terminal = bundle.terminal();
    let sandbox_id = SandboxId::parse(id.as_str())?;
    // The VM is this container's: in its host cgroup, booted with its limits.
    let (mut sb, boot) = crate::sandbox::create_qemu_sandbox_for(
        config,
        sandbox_id,
        bundle.annotations.clone(),
        None,
        Some(&bundle.spec),
    )
    .await?;
    let result = async {
        let mut stdio = StdioSpec::attached(terminal);
        let streams = sb.open_streams(&mut stdio).await?;
        sb.create_container(NewContainer {
            id: id.clone(),
            bundle: bundle.clone(),
            stdio,
            stdio_paths: StdioRecord::default(),
            annotations: BTreeMap::new(),
        })
        .await?;
        sb.start_container(&id).await?;
        let process = sb.process(&id, "", Some(streams)).await?;
        let (out, first, _) = FirstWrite::new(stdout);
        let waiting = async {
            if let Err(e) = process.relay(stdin, out, stderr).await {
                tracing::warn!(error = %e, "output relay failed");
            }
            process.wait().await
        };
        tokio::pin!(waiting);
        let exit = loop {
            tokio::select! {
                exit = &mut waiting => break exit?,
                Some(signal) = signals.recv() => {
                    if let Err(e) = process.signal(signal, false).await {
                        tracing::warn!(signal, error = %e, "cannot pass the signal on");
                    }
                }
            }
        };
        let first_output = first.get().copied();
        if let Some((_, at_ns)) = first_output {
            sb.note_first_output(&id, at_ns)?;
        }
        let first_output = first_output.map(|(at, _)| at.duration_since(start));
        Ok::<_, SandboxError>((exit, first_output))
    }
    .await;
    if let Err(e) = sb.stop().await {
        tracing::warn!(error = %e, "stopping the sandbox after run");
    }
    sb.delete(true).await?;
    let (exit, first_output) = result?;
    Ok(RunOutcome {
        exit,
        boot,
        first_output,
        total: start.elapsed(),
    })
}
