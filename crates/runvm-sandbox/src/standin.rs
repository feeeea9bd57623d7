//! The stand-in: the host process that stands for a container's process (its init or an exec'd
//! one) for runc-style callers. It relays stdio between its own streams and the process in the
//! guest, passes on the signals and terminal resizes it is given, records the exit through
//! [`Sandbox::wait`](crate::Sandbox::wait) and returns the exit code for the stand-in to exit
//! with. A caller that waits on the stand-in's pid therefore sees the container's exit code.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;

use crate::agent::ProcessRef;
use crate::config::Config;
use crate::container::io::{copy_input, copy_output, FirstWrite, OutputStream};
use crate::error::SandboxError;
use crate::id::{ContainerId, SandboxId};
use crate::sandbox::open_sandbox;
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
/// stdout with a terminal) to `stdout` and `stderr`, `controls` to it. Returns its exit code
/// (128+N for signal N), recorded in the container's record.
pub async fn relay<I, O, E>(
    config: &Config,
    target: Target<'_>,
    mut stdin: I,
    stdout: O,
    mut stderr: E,
    mut controls: mpsc::Receiver<Control>,
) -> Result<i32, SandboxError>
where
    I: AsyncRead + Unpin + Send,
    O: AsyncWrite + Unpin + Send,
    E: AsyncWrite + Unpin + Send,
{
    let Target {
        id,
        exec_id,
        terminal,
    } = target;
    let mut sb = Attached::new(open_sandbox(config, &SandboxId::parse(id.as_str())?)?);
    let agent = sb.agent().await?;
    let process = ProcessRef::exec(id.as_str(), exec_id);
    let (mut stdout, _, first_output) = FirstWrite::new(stdout);
    // The init process's first output goes into the sandbox's timeline, once.
    let mut first_output = (exec_id.is_empty()).then_some(first_output);
    let streams = async {
        let o = async {
            copy_output(&*agent, &process, OutputStream::Stdout, &mut stdout)
                .await
                .map(|_| ())
        };
        let e = async {
            if terminal {
                Ok(())
            } else {
                copy_output(&*agent, &process, OutputStream::Stderr, &mut stderr)
                    .await
                    .map(|_| ())
            }
        };
        let i = async {
            // Input ending early is normal (stdin is /dev/null, or the caller closed it).
            if let Err(e) = copy_input(&*agent, &process, &mut stdin).await {
                tracing::debug!(error = %e, "stdin relay ended");
            }
        };
        // The output streams end at the process's exit; the input may never end.
        tokio::select! {
            r = async { tokio::try_join!(o, e) } => r.map(|_| ()),
            () = async { i.await; std::future::pending::<()>().await } => Ok(()),
        }
    };
    tokio::pin!(streams);
    loop {
        tokio::select! {
            r = &mut streams => {
                if let Err(e) = r {
                    tracing::warn!(error = %e, "output relay failed");
                }
                break;
            }
            Some(control) = controls.recv() => pass_on(&*agent, &process, control).await,
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
    // while waiting for its status.
    let wait = sb.wait(id, exec_id);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            status = &mut wait => return Ok(status?.code),
            Some(control) = controls.recv() => pass_on(&*agent, &process, control).await,
        }
    }
}

async fn pass_on(agent: &dyn crate::agent::Agent, process: &ProcessRef, control: Control) {
    let result = match control {
        Control::Signal(signal) => agent.signal_process(process, signal, false).await,
        Control::Resize { rows, cols } => agent.resize_tty(process, rows, cols).await,
    };
    if let Err(e) = result {
        tracing::debug!(?control, error = %e, "cannot pass on to the container");
    }
}
