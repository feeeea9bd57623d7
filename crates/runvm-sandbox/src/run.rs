//! `run` in the foreground: a new sandbox with one container, its stdio relayed, its exit code
//! returned, everything removed afterwards (what `runc run` does, in a VM).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::agent::{ExitStatus, ProcessRef, StdioSpec};
use crate::config::Config;
use crate::container::io::{copy_input, copy_output, FirstWrite, OutputStream};
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
    mut stdin: I,
    stdout: O,
    mut stderr: E,
    mut signals: mpsc::Receiver<i32>,
) -> Result<RunOutcome, SandboxError>
where
    I: AsyncRead + Unpin + Send,
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
        sb.create_container(NewContainer {
            id: id.clone(),
            bundle: bundle.clone(),
            stdio: StdioSpec::attached(terminal),
            stdio_paths: StdioRecord::default(),
            annotations: BTreeMap::new(),
        })
        .await?;
        sb.start_container(&id).await?;
        let agent = sb.agent().await?;
        let process = ProcessRef::init(id.as_str());
        let (mut out, first, _) = FirstWrite::new(stdout);
        let relay = async {
            let o = copy_output(&*agent, &process, OutputStream::Stdout, &mut out);
            let e = async {
                if terminal {
                    Ok(0)
                } else {
                    copy_output(&*agent, &process, OutputStream::Stderr, &mut stderr).await
                }
            };
            let i = async {
                // Input ending early is normal (e.g. stdin is /dev/null); the relay then ends.
                if let Err(e) = copy_input(&*agent, &process, &mut stdin).await {
                    tracing::debug!(error = %e, "stdin relay ended");
                }
            };
            let (o, e, ()) = tokio::join!(o, e, i);
            o.and(e)
        };
        let waiting = async {
            if let Err(e) = relay.await {
                tracing::warn!(error = %e, "output relay failed");
            }
            agent.wait_process(&process).await
        };
        tokio::pin!(waiting);
        let exit = loop {
            tokio::select! {
                exit = &mut waiting => break exit?,
                Some(signal) = signals.recv() => {
                    if let Err(e) = agent.signal_process(&process, signal, false).await {
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
