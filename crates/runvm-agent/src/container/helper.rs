//! The libcontainer helper, agent side. libcontainer clones the calling process, which must
//! not be the agent's multi-threaded tokio runtime; so the agent re-executes itself as
//! `/proc/self/exe __libcontainer REQUEST_JSON` (see `helper_main.rs`). The helper is
//! single-threaded, gets the container's stdio as its own fds 0/1/2 (the container inherits
//! them), calls libcontainer, writes one JSON line (a [`Reply`]) on the result fd and exits.
//! The same work is done, without the exec, by a worker forked from the zygote
//! (`zygote.rs`); re-executing is the fallback when the zygote cannot take a request.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use serde::{Deserialize, Serialize};

use super::stdio::ChildStdio;
use super::zygote::Zygote;
use crate::error::{AgentError, Result};
use crate::reaper::{self, Reaper};

/// The hidden first argument that makes the agent binary run as the helper.
pub const HIDDEN_ARG: &str = "__libcontainer";
/// Environment variable naming the helper's result fd.
pub const RESULT_FD_ENV: &str = "RUNVM_HELPER_RESULT_FD";
/// Environment variable naming the fd the helper logs to (the agent's stderr, the console).
pub const LOG_FD_ENV: &str = "RUNVM_HELPER_LOG_FD";
/// Longest reply accepted from the helper.
const MAX_REPLY: usize = 64 * 1024;
/// How long a helper may run.
const HELPER_TIMEOUT: Duration = Duration::from_secs(120);

/// What the helper is asked to do (libcontainer's state lives in `root`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Create container `id` from `bundle/config.json`; its init waits for `Start`.
    Create {
        id: String,
        root: PathBuf,
        bundle: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Start a created container.
    Start { id: String, root: PathBuf },
    /// Run the OCI process in `process` (a JSON file) in running container `id`.
    Exec {
        id: String,
        root: PathBuf,
        process: PathBuf,
        console_socket: Option<PathBuf>,
    },
    /// Delete container `id` (killing what runs), its cgroup and state.
    Delete { id: String, root: PathBuf },
}

/// Kinds of helper failure, mapped to ttrpc codes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Internal,
}

/// The helper's answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// Done; the pid of the created or executed process, if any.
    Ok {
        pid: Option<i32>,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Reply {
    fn into_result(self) -> Result<Option<i32>> {
        match self {
            Reply::Ok { pid } => Ok(pid),
            Reply::Error { kind, message } => Err(match kind {
                ErrorKind::InvalidArgument => AgentError::invalid(message),
                ErrorKind::NotFound => AgentError::not_found(message),
                ErrorKind::AlreadyExists => AgentError::exists(message),
                ErrorKind::FailedPrecondition => AgentError::precondition(message),
                ErrorKind::Internal => AgentError::internal(message),
            }),
        }
    }
}

/// Parses the reply line of a helper.
pub fn parse_reply(bytes: &[u8]) -> Result<Option<i32>> {
    let line = bytes.split(|b| *b == b'\n').next().unwrap_or_default();
    let reply: Reply = serde_json::from_slice(line).map_err(|e| {
        AgentError::internal(format!(
            "unreadable answer from the libcontainer helper ({e}): {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        ))
    })?;
    reply.into_result()
}

fn cloexec_dup(fd: RawFd) -> std::io::Result<OwnedFd> {
    let new = fcntl(fd, FcntlArg::F_DUPFD_CLOEXEC(3))?;
    // SAFETY: F_DUPFD_CLOEXEC returned a new fd that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(new) })
}

/// Runs `request` in a single-threaded process with `stdio` as its fds 0/1/2 and returns the
/// pid it reports: a worker forked by the zygote (`zygote.rs`), or, if the zygote cannot take
/// the order, the agent re-executed as the helper.
pub async fn run(
    reaper: &Arc<Reaper>,
    request: &Request,
    stdio: ChildStdio,
) -> Result<Option<i32>> {
    let io_err = |what: &str, e: std::io::Error| {
        AgentError::internal(format!("libcontainer helper: cannot {what}: {e}"))
    };
    let (result_r, result_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| io_err("create a pipe", e.into()))?;
    let since = Instant::now();
    let zygote = if super::zygote::enabled() {
        Some(
            Zygote::global()
                .start(reaper, request, &stdio, &result_w, since)
                .await,
        )
    } else {
        None
    };
    let (pid, exit, via) = match zygote {
        Some(Ok(started)) => {
            // The worker has its copies: close the agent's (the container's stdio ends).
            drop(stdio);
            (started.pid, started.exit, "zygote")
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "re-executing the libcontainer helper instead");
            let pid = spawn(request, stdio, &result_w).map_err(|e| io_err("start", e))?;
            (pid, reaper.watch(pid, since), "re-exec")
        }
        None => {
            let pid = spawn(request, stdio, &result_w).map_err(|e| io_err("start", e))?;
            (pid, reaper.watch(pid, since), "re-exec")
        }
    };
    // Only the worker may hold the result pipe's write end: its exit ends the pipe.
    drop(result_w);
    let spawned = since.elapsed();

    let reply = tokio::time::timeout(HELPER_TIMEOUT, read_reply(result_r, exit.clone())).await;
    let reply = match reply {
        Ok(r) => r.map_err(|e| io_err("read its answer", e))?,
        Err(_) => {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            return Err(AgentError::internal(format!(
                "the libcontainer helper did not answer within {} s ({request:?})",
                HELPER_TIMEOUT.as_secs()
            )));
        }
    };
    if reply.is_empty() {
        let status = reaper::wait(exit).await.map(|e| e.status);
        return Err(AgentError::internal(format!(
            "the libcontainer helper exited (status {status:?}) without an answer"
        )));
    }
    let answered = since.elapsed();
    // It exits right after answering; wait, so that its work (state files) is complete.
    let _ = tokio::time::timeout(Duration::from_secs(10), reaper::wait(exit)).await;
    tracing::debug!(
        via,
        started_us = spawned.as_micros() as u64,
        answered_us = answered.as_micros() as u64,
        exited_us = since.elapsed().as_micros() as u64,
        "libcontainer helper timing"
    );
    parse_reply(&reply)
}

/// Re-executes the agent as the helper (`helper_main.rs`); returns its pid.
fn spawn(request: &Request, stdio: ChildStdio, result_w: &OwnedFd) -> std::io::Result<i32> {
    let arg = serde_json::to_string(request).map_err(std::io::Error::other)?;
    let log = cloexec_dup(2)?;
    let inherit = [result_w.as_raw_fd(), log.as_raw_fd()];
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HIDDEN_ARG)
        .arg(arg)
        .env_clear()
        .env("PATH", super::zygote::HELPER_PATH)
        .env(RESULT_FD_ENV, inherit[0].to_string())
        .env(LOG_FD_ENV, inherit[1].to_string())
        .current_dir("/")
        .stdin(Stdio::from(stdio.stdin))
        .stdout(Stdio::from(stdio.stdout))
        .stderr(Stdio::from(stdio.stderr));
    // SAFETY: the closure runs in the child between fork and exec and only calls fcntl, which
    // is async-signal-safe; it touches no memory shared with other threads.
    unsafe {
        cmd.pre_exec(move || {
            for fd in inherit {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    // `cmd` (with the stdio) and `log` go here: the child has its copies.
    Ok(child.id() as i32)
}

/// Reads the reply line. Reads until a newline, not EOF: a container init waiting for start
/// may still hold the pipe (it closes it at exec). If the helper exits, what it wrote is taken.
async fn read_reply(fd: OwnedFd, mut exit: reaper::ExitWatch) -> std::io::Result<Vec<u8>> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    let fd = super::stdio::async_fd(fd, tokio::io::Interest::READABLE)?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut exited = false;
    loop {
        if out.contains(&b'\n') || out.len() > MAX_REPLY {
            return Ok(out);
        }
        if exited {
            // Take whatever is left without waiting.
            match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
                Ok(n) if n > 0 => out.extend_from_slice(&buf[..n]),
                _ => return Ok(out),
            }
            continue;
        }
        tokio::select! {
            ready = fd.readable() => {
                let mut ready = ready?;
                match ready.try_io(|inner| {
                    nix::unistd::read(inner.as_raw_fd(), &mut buf).map_err(std::io::Error::from)
                }) {
                    Ok(Ok(0)) => return Ok(out),
                    Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => {}
                }
            }
            _ = exit.wait_for(Option::is_some) => exited = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let r = Request::Exec {
            id: "c1".into(),
            root: "/run/runvm/containers".into(),
            process: "/run/runvm/bundles/c1/exec-e1.json".into(),
            console_socket: None,
        };
        let text = serde_json::to_string(&r).unwrap();
        assert!(text.contains("\"op\":\"exec\""), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
        assert_eq!(parse_reply(b"{\"ok\":{\"pid\":42}}\n"), Ok(Some(42)));
        let err = parse_reply(
            b"{\"error\":{\"kind\":\"failed_precondition\",\"message\":\"not running\"}}\ntrailing",
        )
        .unwrap_err();
        assert_eq!(err.code, ttrpc::Code::FAILED_PRECONDITION);
        assert_eq!(err.message, "not running");
        let err = parse_reply(b"garbage").unwrap_err();
        assert_eq!(err.code, ttrpc::Code::INTERNAL);
        assert!(err.message.contains("garbage"), "{err}");
    }
}
