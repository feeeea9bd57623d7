//! The zygote, zygote side: a single-threaded process kept alive in the guest that forks one
//! worker per libcontainer request (see `zygote.rs` for the agent side and the protocol).
//!
//! It is either forked by the agent at the very start of `main` (before any thread, runtime or
//! logging exists) or, after a crash, re-executed as `runvm-agent __zygote` with its socket
//! named by `RUNVM_ZYGOTE_FD`. Either way it holds no tokio state: it polls its socket and a
//! SIGCHLD self-pipe, reaps its workers and reports their exits.
//!
//! A worker is a plain `fork` of this process (single-threaded, so safe): it puts the
//! request's stdio on fds 0/1/2 and does exactly what the re-executed helper does
//! (`helper_main::answer`). Every other fd of the zygote is close-on-exec (its socket and pipe
//! are closed in the worker at once, received fds arrive with `MSG_CMSG_CLOEXEC`), and
//! libcontainer marks all fds above the stdio close-on-exec again in the container's init.

use std::collections::HashMap;
use std::fs::File;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicI32, Ordering};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{fork, ForkResult, Pid};

use super::helper::Request;
use super::zygote::{send_event, Event, Order, MAX_MESSAGE, ORDER_FDS, ZYGOTE_FD_ENV};

/// What a worker does with a request: answer on the result fd (its stdio already on 0/1/2)
/// and exit. Production: [`super::helper_main::answer`]; tests pass a fake.
pub type Handler = fn(Request, RawFd) -> !;

/// The write end of the SIGCHLD self-pipe (-1 when none).
static SIGCHLD_PIPE: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_sigchld(_: libc::c_int) {
    let fd = SIGCHLD_PIPE.load(Ordering::Relaxed);
    if fd >= 0 {
        let byte = 1u8;
        // SAFETY: write(2) is async-signal-safe; the buffer is a local byte. A full pipe
        // (EAGAIN) already means a wake-up is pending.
        unsafe { libc::write(fd, (&byte as *const u8).cast(), 1) };
    }
}

/// `runvm-agent __zygote`: the re-executed zygote. Never returns.
pub fn main() -> ! {
    let Some(fd) = std::env::var(ZYGOTE_FD_ENV)
        .ok()
        .and_then(|v| v.parse::<RawFd>().ok())
    else {
        eprintln!(
            "runvm-agent: {} is for the agent's own use",
            super::zygote::ZYGOTE_ARG
        );
        std::process::exit(2);
    };
    // SAFETY: the agent passed this fd for the zygote alone; it is owned from here on.
    let control = unsafe { OwnedFd::from_raw_fd(fd) };
    // Keep it from the workers' containers (it is closed in each worker anyway).
    // SAFETY: fcntl on an owned fd only sets its flags.
    unsafe { libc::fcntl(control.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    init_logging();
    serve(control, super::helper_main::answer)
}

/// Logs to a close-on-exec copy of fd 2 (the console): the workers' fd 2 becomes the
/// container's stderr.
pub fn init_logging() {
    // SAFETY: F_DUPFD_CLOEXEC returns a new fd that nothing else owns (or -1).
    let fd = unsafe { libc::fcntl(2, libc::F_DUPFD_CLOEXEC, 3) };
    if fd < 0 {
        return;
    }
    // SAFETY: as above, the new fd is this process's to own.
    let log = unsafe { File::from_raw_fd(fd) };
    let _ = tracing_subscriber::fmt()
        .with_writer(std::sync::Mutex::new(log))
        .with_ansi(false)
        .with_target(false)
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            super::helper_main::LOG_FILTER,
        ))
        .try_init();
}

/// Serves orders on `control` until the agent closes its end. Never returns.
pub fn serve(control: OwnedFd, handler: Handler) -> ! {
    let (wake_r, wake_w) =
        match nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "zygote: cannot create its SIGCHLD pipe");
                std::process::exit(1);
            }
        };
    SIGCHLD_PIPE.store(wake_w.as_raw_fd(), Ordering::Relaxed);
    let action = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::Handler(on_sigchld),
        nix::sys::signal::SaFlags::SA_RESTART | nix::sys::signal::SaFlags::SA_NOCLDSTOP,
        nix::sys::signal::SigSet::empty(),
    );
    // SAFETY: the handler only calls write(2) on an fd read from an atomic.
    if let Err(e) = unsafe { nix::sys::signal::sigaction(nix::sys::signal::SIGCHLD, &action) } {
        tracing::error!(error = %e, "zygote: cannot handle SIGCHLD");
        std::process::exit(1);
    }
    let zygote = Zygote {
        control,
        wake_r,
        wake_w,
        handler,
        workers: HashMap::new(),
    };
    zygote.run()
}

struct Zygote {
    control: OwnedFd,
    wake_r: OwnedFd,
    wake_w: OwnedFd,
    handler: Handler,
    /// Worker pid -> order id.
    workers: HashMap<i32, u64>,
}

impl Zygote {
    fn run(mut self) -> ! {
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.control.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.wake_r.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: poll reads and writes the two pollfd structs of the local array only.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "zygote: poll failed");
                std::process::exit(1);
            }
            if fds[1].revents != 0 {
                let mut buf = [0u8; 64];
                while matches!(nix::unistd::read(self.wake_r.as_raw_fd(), &mut buf), Ok(n) if n > 0)
                {
                }
            }
            self.reap();
            if fds[0].revents & libc::POLLIN != 0 {
                self.receive();
            } else if fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                // The agent is gone: so is our purpose. Workers carry on as orphans.
                std::process::exit(0);
            }
        }
    }

    /// Reaps exited workers and reports each exit.
    fn reap(&mut self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(status) => {
                    let Some((pid, code)) = crate::reaper::shell_status(status) else {
                        continue;
                    };
                    if let Some(id) = self.workers.remove(&pid) {
                        self.send(&Event::Exited { id, status: code });
                    }
                }
            }
        }
    }

    fn send(&self, event: &Event) {
        if let Err(e) = send_event(self.control.as_raw_fd(), event) {
            tracing::warn!(error = %e, "zygote: cannot report to the agent");
        }
    }

    /// Takes one order (with its fds) and forks its worker.
    fn receive(&mut self) {
        let mut buf = vec![0u8; MAX_MESSAGE];
        let mut cmsg = nix::cmsg_space!([RawFd; ORDER_FDS]);
        let (len, fds) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(
                self.control.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => return,
                Err(e) => {
                    tracing::error!(error = %e, "zygote: cannot receive");
                    std::process::exit(1);
                }
            };
            let mut fds: Vec<OwnedFd> = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(raw) = c {
                        // SAFETY: SCM_RIGHTS gave this process new fds that nothing owns yet.
                        fds.extend(raw.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                    }
                }
            }
            (msg.bytes, fds)
        };
        if len == 0 && fds.is_empty() {
            // End of stream: the agent closed its end.
            std::process::exit(0);
        }
        let order: Order = match serde_json::from_slice(&buf[..len]) {
            Ok(o) => o,
            Err(e) => {
                self.send(&Event::Failed {
                    id: 0,
                    message: format!("unreadable order: {e}"),
                });
                return;
            }
        };
        let Ok(fds) = <[OwnedFd; ORDER_FDS]>::try_from(fds) else {
            self.send(&Event::Failed {
                id: order.id,
                message: format!("an order carries {ORDER_FDS} fds"),
            });
            return;
        };
        // SAFETY: this process is single-threaded (no runtime, no threads), so the child may
        // run any code; it ends with `handler`, which exits.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => self.worker(order.request, fds),
            Ok(ForkResult::Parent { child }) => {
                drop(fds);
                self.workers.insert(child.as_raw(), order.id);
                self.send(&Event::Started {
                    id: order.id,
                    pid: child.as_raw(),
                });
            }
            Err(e) => self.send(&Event::Failed {
                id: order.id,
                message: format!("cannot fork: {e}"),
            }),
        }
    }

    /// In the forked worker: drop the zygote's own fds and handler, put the stdio on 0/1/2,
    /// run the request. Never returns.
    fn worker(&self, request: Request, fds: [OwnedFd; ORDER_FDS]) -> ! {
        SIGCHLD_PIPE.store(-1, Ordering::Relaxed);
        // SAFETY: restoring a signal's default disposition has no memory-safety conditions.
        unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
        for fd in [&self.control, &self.wake_r, &self.wake_w] {
            // SAFETY: closes this process's copy; the OwnedFds are never dropped here, as the
            // handler below exits without returning.
            unsafe { libc::close(fd.as_raw_fd()) };
        }
        let handler = self.handler;
        let [stdin, stdout, stderr, result] = fds;
        for (fd, target) in [(stdin, 0), (stdout, 1), (stderr, 2)] {
            // dup2 gives the target without close-on-exec: the container inherits it.
            // SAFETY: dup2 onto 0/1/2 replaces them; `fd` is owned and closed after.
            if unsafe { libc::dup2(fd.as_raw_fd(), target) } < 0 {
                std::process::exit(121);
            }
        }
        handler(request, result.into_raw_fd())
    }
}
