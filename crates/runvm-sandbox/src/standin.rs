//! The stand-in: the host process that stands for a container's process (its init or an exec'd
//! one) for runc-style callers. It relays stdio between its own streams and the process in the
//! guest, passes on the signals and terminal resizes it is given, records the exit through
//! [`Sandbox::wait`](crate::Sandbox::wait) and returns the exit code for the stand-in to exit
//! with. A caller that waits on the stand-in's pid therefore sees the container's exit code.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::config::Config;
use crate::container::io::FirstWrite;
use crate::error::SandboxError;
use crate::id::{ContainerId, SandboxId};
use crate::process::{Process, Streams};
use crate::sandbox::{open_sandbox, Sandbox, VmFailure, KILLED_EXIT_STATUS};
use crate::standalone::Attached;

/// What the stand-in passes on to the process besides stdio.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// A signal (by number) the stand-in received.
    Signal(i32),
    /// The stand-in's terminal changed size.
    Resize {
        /// Rows.
        rows: u32,
        /// Columns.
        cols: u32,
    },
}

/// The process a stand-in stands for.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// The standalone container (and its sandbox).
    pub id: &'a ContainerId,
    /// The exec id; "" for the container's init.
    pub exec_id: &'a str,
    /// Whether the process has a terminal (stdout only, resizes passed on).
    pub terminal: bool,
}

/// Relays process `target` until it exits: `stdin` to its stdin, its stdout and stderr (only
/// stdout with a terminal) to `stdout` and `stderr`, through its stdio `streams`; `controls` to
/// it. Returns its exit code (128+N for signal N), recorded in the container's record.
/// `sandbox`: the sandbox, if the caller has it open already (its agent connection is used).
///
/// The init's stand-in is what callers wait on: `state` reports the container stopped once it
/// is gone. So it never leaves with the container's VM still running: when the VM dies it
/// cleans up what is left (exit 137), and when it fails itself (it lost the agent for good, its
/// records cannot be written), it ends the VM before returning the error.
#[allow(clippy::too_many_arguments)]
pub async fn relay<I, O, E>(
    config: &Config,
    target: Target<'_>,
    sandbox: Option<Sandbox>,
    streams: Streams,
    stdin: I,
    stdout: O,
    stderr: E,
    controls: mpsc::Receiver<Control>,
) -> Result<Ended, SandboxError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let id = target.id;
    let sid = match crate::standalone::sandbox_of(config, id) {
        Ok(sid) => sid,
        Err(crate::standalone::StandaloneError::Sandbox(e)) => return Err(e),
        Err(_) => SandboxId::parse(id.as_str())?,
    };
    let result = relay_until_exit(
        config, target, &sid, sandbox, streams, stdin, stdout, stderr, controls,
    )
    .await;
    match result {
        Err(e) if target.exec_id.is_empty() => {
            tracing::error!(container = %id, error = %e, "the stand-in lost its container; ending its VM");
            end_lost_vm(config, &sid).await;
            Err(e)
        }
        other => other,
    }
}

#[allow(clippy::too_many_arguments)]
async fn relay_until_exit<I, O, E>(
    config: &Config,
    target: Target<'_>,
    sid: &SandboxId,
    sandbox: Option<Sandbox>,
    streams: Streams,
    stdin: I,
    stdout: O,
    stderr: E,
    mut controls: mpsc::Receiver<Control>,
) -> Result<Ended, SandboxError>
where
    I: AsyncRead + Unpin + Send + 'static,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let Target { id, exec_id, .. } = target;
    let init = exec_id.is_empty();
    let mut sb = Attached::new(match sandbox {
        Some(sb) => sb,
        None => open_sandbox(config, sid)?,
    });
    // The init's stand-in watches the VM (a handle of its own): the CLI has no other process
    // that would notice QEMU or a helper dying.
    let watcher = if init {
        Some(Attached::new(open_sandbox(config, sid)?))
    } else {
        None
    };
    let watch = watch_vm(watcher);
    tokio::pin!(watch);
    let process = sb.process(id, exec_id, None).await?;
    let (stdout, _, first_output) = FirstWrite::new(stdout);
    // The init process's first output goes into the sandbox's timeline, once.
    let mut first_output = init.then_some(first_output);
    let streams = crate::process::relay(streams, stdin, stdout, stderr);
    tokio::pin!(streams);
    loop {
        tokio::select! {
            r = &mut streams => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "output relay failed");
                }
                break;
            }
            (watcher, failure) = &mut watch => return Ok(Ended::exited(vm_died(watcher, failure).await)),
            Some(control) = controls.recv() => pass_on(&process, control).await,
            told = async { first_output.as_mut().expect("guarded").await },
                if first_output.is_some() =>
            {
                first_output = None;
                if let Ok((_, at_ns)) = told {
                    if let Err(e) = sb.note_first_output(id, at_ns) {
                        tracing::debug!(error = %e, "cannot record the first output");
                    }
                }
            }
        }
    }
    // The output has ended: the process has exited or is about to; keep passing signals on
    // while waiting for its status (recorded by the handle).
    let mut waited = {
        let wait = process.wait();
        tokio::pin!(wait);
        loop {
            tokio::select! {
                status = &mut wait => break status,
                (watcher, failure) = &mut watch => return Ok(Ended::exited(vm_died(watcher, failure).await)),
                Some(control) = controls.recv() => pass_on(&process, control).await,
            }
        }
    };
    // The agent connection broke: if the VM died, the watcher says so (the container was
    // killed with it); otherwise a fresh connection waits again, a few times.
    let mut attempts = 0;
    let code = loop {
        match waited {
            Ok(status) => break status.code,
            Err(e) if init && attempts < REWAIT_ATTEMPTS => {
                attempts += 1;
                tracing::warn!(error = %e, attempts, "lost the wait for the container's init");
                waited = tokio::select! {
                    (watcher, failure) = &mut watch => return Ok(Ended::exited(vm_died(watcher, failure).await)),
                    r = rewait(&mut sb, id) => r,
                };
            }
            Err(e) => return Err(e),
        }
    };
    if !init {
        return Ok(Ended::exited(code));
    }
    // The init has exited (its exit is recorded): the VM goes with the last container in it
    // (others may have joined this one's namespaces, or this one another's), and `state` and
    // `delete` work from the records. Each init's stand-in records its exit before it looks,
    // so the last one to exit sees every container stopped. The VM is handed back marked
    // (the caller stops it, here or in a process of its own, after reporting the exit).
    let idle_vm = match all_stopped(&mut sb) {
        Ok(true) => match sb.hold_teardown() {
            Ok(mark) => Some(IdleVm {
                sandbox: sid.clone(),
                mark,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "another process tears the VM down");
                None
            }
        },
        Ok(false) => {
            tracing::debug!(container = %id, "other containers still use the VM");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot tell whether the VM is still in use");
            None
        }
    };
    Ok(Ended { code, idle_vm })
}

/// How a stand-in's process ended.
#[derive(Debug)]
pub struct Ended {
    /// Its exit code (128+N for signal N; 137 when its VM died).
    pub code: i32,
    /// The VM, when this was the last container running in it: to stop.
    pub idle_vm: Option<IdleVm>,
}

impl Ended {
    /// Ended with `code`, no VM to stop.
    fn exited(code: i32) -> Ended {
        Ended {
            code,
            idle_vm: None,
        }
    }
}

/// A VM whose containers have all stopped, marked as being torn down
/// ([`Store::hold_teardown`](crate::store::Store::hold_teardown)) for as long as this (or a
/// process that inherited [`IdleVm::mark`]) lives: `delete` waits for the teardown rather than
/// racing it, and a crash in between leaves the records for `delete` to finish the work.
#[derive(Debug)]
pub struct IdleVm {
    sandbox: SandboxId,
    mark: crate::store::SandboxLock,
}

impl IdleVm {
    /// The VM's sandbox.
    pub fn sandbox(&self) -> &SandboxId {
        &self.sandbox
    }

    /// The teardown mark: a process that inherits it holds the mark until it exits.
    pub fn mark(&self) -> std::os::fd::BorrowedFd<'_> {
        std::os::fd::AsFd::as_fd(&self.mark)
    }

    /// Stops the VM in this process ([`stop_idle_vm`]); the mark goes once it is stopped.
    pub async fn stop(self, config: &Config) {
        if let Err(e) = stop_idle_vm(config, &self.sandbox).await {
            tracing::warn!(sandbox = %self.sandbox, error = %e, "stopping the VM after the container's exit");
        }
        drop(self.mark);
    }
}

/// Stops the VM of sandbox `sid` once its containers have all stopped (checked again: one may
/// have joined it since): the guest powers off, QEMU and its helpers end; the records stay for
/// `state` and `delete`. The caller holds the teardown mark.
pub async fn stop_idle_vm(config: &Config, sid: &SandboxId) -> Result<(), SandboxError> {
    let sb = match open_sandbox(config, sid) {
        Ok(sb) => sb,
        // Deleted meanwhile (`runvm run` deletes its container and sandbox as soon as the
        // init exited): nothing is left to stop.
        Err(e) if e.kind() == crate::error::ErrorKind::NotFound => {
            tracing::debug!(sandbox = %sid, "the sandbox is gone already");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut sb = Attached::new(sb);
    if all_stopped(&mut sb)? {
        sb.stop().await?;
    } else {
        tracing::debug!(sandbox = %sid, "a container joined the VM: it stays");
    }
    Ok(())
}

/// How many times the init's stand-in waits again over a fresh agent connection after the
/// wait broke while the VM's processes still ran.
const REWAIT_ATTEMPTS: u32 = 3;

/// Waits again for the init of `id` over a fresh agent connection, after a pause.
async fn rewait(
    sb: &mut Sandbox,
    id: &ContainerId,
) -> Result<crate::agent::ExitStatus, SandboxError> {
    tokio::time::sleep(WATCH_INTERVAL).await;
    sb.forget_agent();
    sb.process(id, "", None).await?.wait().await
}

/// Ends the VM of sandbox `sid` after its init's stand-in failed: without the stand-in the
/// container counts as stopped, so nothing of it may keep running. Best effort, logged.
async fn end_lost_vm(config: &Config, sid: &SandboxId) {
    match open_sandbox(config, sid) {
        Ok(mut sb) => {
            if let Err(e) = sb.kill().await {
                tracing::error!(sandbox = %sid, error = %e, "cannot end the VM");
            }
        }
        Err(e) => {
            tracing::error!(sandbox = %sid, error = %e, "cannot open the sandbox to end its VM")
        }
    }
}

/// Whether every container of the sandbox has stopped (read afresh).
fn all_stopped(sb: &mut crate::Sandbox) -> Result<bool, SandboxError> {
    for id in sb.containers()? {
        if sb.container(&id)?.state != crate::state::State::Stopped {
            return Ok(false);
        }
    }
    Ok(true)
}

/// How often the init's stand-in checks the VM's processes.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Checks the VM of `watcher` every [`WATCH_INTERVAL`] until it fails; never ends without a
/// watcher.
async fn watch_vm(watcher: Option<Attached>) -> (Attached, VmFailure) {
    let Some(mut watcher) = watcher else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        if let Err(failure) = watcher.check_vm().await {
            return (watcher, failure);
        }
    }
}

/// After the VM died under a running container: what is left of it is stopped and removed,
/// the container's exit recorded as killed (137), which the stand-in exits with.
async fn vm_died(mut watcher: Attached, failure: VmFailure) -> i32 {
    if let Err(e) = watcher.handle_vm_failure(&failure).await {
        tracing::warn!(error = %e, "cleaning up after the VM");
    }
    KILLED_EXIT_STATUS
}

async fn pass_on(process: &Process, control: Control) {
    let result = match control {
        Control::Signal(signal) => process.signal(signal, false).await,
        Control::Resize { rows, cols } => process.resize(rows, cols).await,
    };
    if let Err(e) = result {
        tracing::debug!(?control, error = %e, "cannot pass on to the container");
    }
}
