//! The zygote, agent side: a single-threaded process, forked by the agent before its runtime
//! starts (re-executed as `runvm-agent __zygote` after a crash), that forks one worker per
//! libcontainer request; the worker does what the re-executed helper does (`helper_main.rs`).
//! This saves the exec of the agent binary for every create, start, exec and delete.
//!
//! Protocol, over a `SOCK_SEQPACKET` socket pair (one datagram per message, JSON):
//! - agent to zygote: an [`Order`] (`{"id":N,"request":{...}}`) with [`ORDER_FDS`] fds passed
//!   with `SCM_RIGHTS`: the process's stdin, stdout, stderr and the write end of the result
//!   pipe, on which the worker writes its [`super::helper::Reply`] line as the helper does;
//! - zygote to agent: [`Event`]s: `started` (the worker's pid, once forked), `exited` (its
//!   status, once the zygote reaped it) or `failed` (the order could not be run).
//!
//! The worker is the zygote's child and the zygote reaps it; the container processes it makes
//! are orphaned when it exits and reach the agent (PID 1) and its reaper as they did from the
//! helper. If the zygote dies, the socket reads end of stream: orders not yet started are
//! reported gone (the caller falls back to re-executing the helper, logged), a started
//! worker is orphaned to the agent and its exit comes from the agent's reaper, and the next
//! order starts a new zygote.

use std::collections::HashMap;
use std::io::IoSlice;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::socket::{
    recv, sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::helper::Request;
use super::stdio::ChildStdio;
use crate::reaper::{self, Exit, ExitWatch, Reaper};

/// The hidden first argument that makes the agent binary run as the zygote.
pub const ZYGOTE_ARG: &str = "__zygote";
/// Environment variable naming the re-executed zygote's socket.
pub const ZYGOTE_FD_ENV: &str = "RUNVM_ZYGOTE_FD";
/// Longest message either way.
pub const MAX_MESSAGE: usize = 64 * 1024;
/// Fds passed with an order: stdin, stdout, stderr, the result pipe.
pub const ORDER_FDS: usize = 4;
/// How long the zygote may take to fork a worker for an order.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// One request for the zygote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Order {
    /// Chosen by the agent; events name it.
    pub id: u64,
    pub request: Request,
}

/// What the zygote reports about an order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Event {
    /// Its worker runs, with this pid.
    Started { id: u64, pid: i32 },
    /// Its worker was reaped with this status (as a shell reports it).
    Exited { id: u64, status: i32 },
    /// It could not be run (no worker exists).
    Failed { id: u64, message: String },
}

/// Why an order did not start in the zygote; the caller then re-executes the helper.
#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    /// A new zygote could not be started.
    #[error("cannot start the zygote: {0}")]
    Launch(#[source] std::io::Error),
    /// The zygote died (or closed its socket) before starting the order.
    #[error("the zygote is gone")]
    Gone,
    /// The order could not be sent.
    #[error("cannot send the order to the zygote: {0}")]
    Send(#[source] std::io::Error),
    /// The zygote refused the order.
    #[error("the zygote could not run the order: {0}")]
    Refused(String),
    /// No worker within [`START_TIMEOUT`]; the zygote was killed.
    #[error("the zygote did not start the order within {} s", .0.as_secs())]
    Timeout(Duration),
}

/// A worker running an order.
#[derive(Debug)]
pub struct Started {
    pub pid: i32,
    /// Its exit, from the zygote (or from the agent's reaper if the zygote died).
    pub exit: ExitWatch,
}

/// Sends `event` on the zygote's (blocking) socket.
pub fn send_event(fd: RawFd, event: &Event) -> std::io::Result<()> {
    let text = serde_json::to_vec(event).map_err(std::io::Error::other)?;
    sendmsg::<()>(
        fd,
        &[IoSlice::new(&text)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Environment variable that turns the zygote off (`off`): every request re-executes the
/// helper. A kernel parameter `RUNVM_ZYGOTE=off` (`hypervisor.kernel_params`) sets it for the
/// agent, for measurements and as a way out should the zygote misbehave.
pub const ZYGOTE_ENV: &str = "RUNVM_ZYGOTE";

/// Whether requests go to the zygote (unless [`ZYGOTE_ENV`] is `off`).
pub fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| std::env::var(ZYGOTE_ENV).map_or(true, |v| v != "off"))
}

/// How a new zygote process is made after the first.
#[derive(Debug, Clone, Copy)]
pub enum Launcher {
    /// `/proc/self/exe __zygote` (the agent).
    ReExec,
    /// A command given the socket in [`ZYGOTE_FD_ENV`] (tests).
    Command(fn() -> Command),
}

/// The agent's handle on its zygote; restarts it when it is found dead.
#[derive(Debug)]
pub struct Zygote {
    launcher: Launcher,
    conn: tokio::sync::Mutex<Option<Arc<Conn>>>,
    /// A zygote forked before the runtime started, not attached yet.
    early: Mutex<Option<(OwnedFd, i32)>>,
}

/// The zygote forked at boot, handed over to [`Zygote::global`] on first use.
static EARLY: Mutex<Option<(OwnedFd, i32)>> = Mutex::new(None);

/// Forks the zygote. Call while the process is single-threaded (at the start of `main`,
/// before the runtime and logging); the child never returns from here. A failure is printed
/// and leaves the agent to start one on first use.
pub fn fork_early() {
    if !enabled() {
        return;
    }
    let (agent_end, zygote_end) = match socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    ) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("runvm-agent: cannot create the zygote's socket: {e}");
            return;
        }
    };
    // SAFETY: the caller guarantees the process is single-threaded, so the child may run any
    // code; it never returns (zygote_main::serve exits).
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            drop(agent_end);
            // As the re-executed helper: only PATH in the environment, `/` as the cwd.
            for (key, _) in std::env::vars_os() {
                std::env::remove_var(key);
            }
            std::env::set_var("PATH", HELPER_PATH);
            let _ = std::env::set_current_dir("/");
            super::zygote_main::init_logging();
            super::zygote_main::serve(zygote_end, super::helper_main::answer)
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => {
            drop(zygote_end);
            *EARLY.lock().unwrap_or_else(|p| p.into_inner()) = Some((agent_end, child.as_raw()));
        }
        Err(e) => eprintln!("runvm-agent: cannot fork the zygote: {e}"),
    }
}

/// The `PATH` of the helper, the zygote and their workers.
pub const HELPER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl Zygote {
    pub fn new(launcher: Launcher) -> Zygote {
        Zygote {
            launcher,
            conn: tokio::sync::Mutex::new(None),
            early: Mutex::new(None),
        }
    }

    /// The agent's zygote (the one forked at boot, if any, else started on first use).
    pub fn global() -> &'static Zygote {
        static GLOBAL: OnceLock<Zygote> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let z = Zygote::new(Launcher::ReExec);
            *z.early.lock().unwrap_or_else(|p| p.into_inner()) =
                EARLY.lock().unwrap_or_else(|p| p.into_inner()).take();
            z
        })
    }

    /// The pid of the zygote in use, if one runs.
    pub async fn pid(&self) -> Option<i32> {
        let conn = self.conn.lock().await;
        conn.as_ref().filter(|c| !c.gone()).map(|c| c.pid)
    }

    /// Has a worker run `request` with `stdio` and `result` (the write end of the result
    /// pipe). The fds are sent as copies: the caller still owns them (and closes them once
    /// this returns, so that only the worker holds them). `since`: an instant before the
    /// request, for the agent's reaper should the zygote die.
    pub async fn start(
        &self,
        reaper: &Arc<Reaper>,
        request: &Request,
        stdio: &ChildStdio,
        result: &OwnedFd,
        since: Instant,
    ) -> Result<Started, ZygoteError> {
        let order = |id| Order {
            id,
            request: request.clone(),
        };
        let fds = [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
            result.as_raw_fd(),
        ];
        // A zygote found dead on the way (its socket refuses the order) is replaced once.
        let mut retried = false;
        let (conn, mut events) = loop {
            let conn = self.conn().await?;
            let id = conn.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, events) = mpsc::unbounded_channel();
            {
                let mut pending = conn.lock_pending();
                if !conn.gone() {
                    pending.insert(id, tx);
                }
            }
            let sent = if conn.gone() {
                Err(std::io::Error::other("the zygote is gone"))
            } else {
                conn.send(&order(id), &fds).await
            };
            match sent {
                Ok(()) => break (conn, events),
                Err(e) => {
                    conn.lock_pending().remove(&id);
                    conn.set_gone();
                    if retried {
                        return Err(ZygoteError::Send(e));
                    }
                    retried = true;
                }
            }
        };
        let pid = match tokio::time::timeout(START_TIMEOUT, events.recv()).await {
            Ok(Some(Event::Started { pid, .. })) => pid,
            Ok(Some(Event::Failed { message, .. })) => return Err(ZygoteError::Refused(message)),
            Ok(Some(Event::Exited { .. })) => {
                return Err(ZygoteError::Refused("exited before it started".into()))
            }
            Ok(None) => return Err(ZygoteError::Gone),
            Err(_) => {
                // A wedged zygote must not start the order later, after the fallback ran it.
                tracing::warn!(pid = conn.pid, "the zygote does not answer: killing it");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(conn.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
                conn.set_gone();
                return Err(ZygoteError::Timeout(START_TIMEOUT));
            }
        };
        let (exit_tx, exit) = watch::channel(None);
        let reaper = Arc::clone(reaper);
        tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Some(Event::Exited { status, .. }) => {
                        exit_tx.send_replace(Some(Exit {
                            status,
                            at_unix_ns: unix_now_ns(),
                        }));
                        return;
                    }
                    Some(_) => {}
                    None => {
                        // The zygote died: its worker is now the agent's child.
                        let exited = reaper::wait(reaper.watch(pid, since)).await;
                        exit_tx.send_replace(exited);
                        return;
                    }
                }
            }
        });
        Ok(Started { pid, exit })
    }

    /// The live connection, starting a zygote if there is none or it died.
    async fn conn(&self) -> Result<Arc<Conn>, ZygoteError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref().filter(|c| !c.gone()) {
            return Ok(Arc::clone(c));
        }
        let early = self.early.lock().unwrap_or_else(|p| p.into_inner()).take();
        let (fd, pid) = match early {
            Some((fd, pid)) => {
                tracing::info!(pid, "zygote (forked at boot) in use");
                (fd, pid)
            }
            None => {
                let (fd, pid) = self.launch().map_err(ZygoteError::Launch)?;
                if slot.is_some() {
                    tracing::warn!(pid, "the zygote died: started a new one");
                } else {
                    tracing::info!(pid, "zygote started");
                }
                (fd, pid)
            }
        };
        let conn = Arc::new(Conn::new(fd, pid).map_err(ZygoteError::Launch)?);
        tokio::spawn(Arc::clone(&conn).read_events());
        *slot = Some(Arc::clone(&conn));
        Ok(conn)
    }

    fn launch(&self) -> std::io::Result<(OwnedFd, i32)> {
        let (agent_end, zygote_end) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )?;
        let mut cmd = match self.launcher {
            Launcher::ReExec => {
                let mut cmd = Command::new("/proc/self/exe");
                cmd.arg(ZYGOTE_ARG)
                    .env_clear()
                    .env("PATH", HELPER_PATH)
                    .current_dir("/");
                cmd
            }
            Launcher::Command(make) => make(),
        };
        let raw = zygote_end.as_raw_fd();
        cmd.env(ZYGOTE_FD_ENV, raw.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        // SAFETY: the closure runs in the child between fork and exec and only calls fcntl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::fcntl(raw, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn()?;
        drop(zygote_end);
        Ok((agent_end, child.id() as i32))
    }
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// One zygote process and its socket.
#[derive(Debug)]
struct Conn {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, mpsc::UnboundedSender<Event>>>,
    gone: AtomicBool,
}

impl Conn {
    fn new(fd: OwnedFd, pid: i32) -> std::io::Result<Conn> {
        let flags = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Conn {
            fd: super::stdio::async_fd(
                fd,
                tokio::io::Interest::READABLE | tokio::io::Interest::WRITABLE,
            )?,
            pid,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            gone: AtomicBool::new(false),
        })
    }

    fn lock_pending(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<u64, mpsc::UnboundedSender<Event>>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    /// Marks the zygote dead and drops every pending order's channel (their waiters see the
    /// end of it).
    fn set_gone(&self) {
        let mut pending = self.lock_pending();
        self.gone.store(true, Ordering::SeqCst);
        pending.clear();
    }

    async fn send(&self, order: &Order, fds: &[RawFd]) -> std::io::Result<()> {
        let text = serde_json::to_vec(order).map_err(std::io::Error::other)?;
        if text.len() > MAX_MESSAGE {
            return Err(std::io::Error::other("order too long"));
        }
        loop {
            let mut ready = self.fd.writable().await?;
            let sent = ready.try_io(|fd| {
                sendmsg::<()>(
                    fd.as_raw_fd(),
                    &[IoSlice::new(&text)],
                    &[ControlMessage::ScmRights(fds)],
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match sent {
                Ok(r) => return r.map(|_| ()),
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads the zygote's events until its socket ends, then marks it gone.
    async fn read_events(self: Arc<Self>) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let why = loop {
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => break e.to_string(),
            };
            let got = ready.try_io(|fd| {
                recv(fd.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT).map_err(std::io::Error::from)
            });
            match got {
                Err(_would_block) => continue,
                Ok(Err(e)) => break e.to_string(),
                Ok(Ok(0)) => break "end of stream".to_string(),
                Ok(Ok(n)) => match serde_json::from_slice::<Event>(&buf[..n]) {
                    Ok(event) => self.dispatch(event),
                    Err(e) => tracing::warn!(error = %e, "unreadable event from the zygote"),
                },
            }
        };
        if !self.gone() {
            tracing::warn!(pid = self.pid, reason = %why, "the zygote is gone");
        }
        self.set_gone();
    }

    fn dispatch(&self, event: Event) {
        let mut pending = self.lock_pending();
        let (id, last) = match &event {
            Event::Started { id, .. } => (*id, false),
            Event::Exited { id, .. } => (*id, true),
            Event::Failed { id, message } => {
                if !pending.contains_key(id) {
                    tracing::warn!(id, message, "the zygote refused an order");
                }
                (*id, true)
            }
        };
        let tx = if last {
            pending.remove(&id)
        } else {
            pending.get(&id).cloned()
        };
        if let Some(tx) = tx {
            let _ = tx.send(event);
        }
    }
}

#[cfg(test)]
#[path = "zygote_tests.rs"]
mod tests;
