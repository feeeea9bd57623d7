//! The libcontainer helper, helper side: `runvm-agent __libcontainer REQUEST_JSON`, run by the
//! agent (see `helper.rs`). Single-threaded: libcontainer clones this process. Its fds 0/1/2
//! are the container's stdio, so it never prints: logs go to the fd named by
//! `RUNVM_HELPER_LOG_FD` (the agent's console), the answer to `RUNVM_HELPER_RESULT_FD`.

use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, RawFd};
use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::container::Container;
use libcontainer::error::LibcontainerError;
use libcontainer::syscall::syscall::SyscallType;

use super::executor::RuncExecutor;
use super::helper::{ErrorKind, Reply, Request, LOG_FD_ENV, RESULT_FD_ENV};

fn env_fd(name: &str) -> Option<RawFd> {
    let fd: RawFd = std::env::var(name).ok()?.parse().ok()?;
    // Keep it from the container: libcontainer's children must not inherit it past exec.
    // SAFETY: fcntl on an fd number only reads/sets its flags; an invalid fd fails with EBADF.
    let ok = unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } == 0;
    ok.then_some(fd)
}

/// Runs the helper and exits. Never returns.
pub fn main(request: Option<OsString>) -> ! {
    let Some(result_fd) = env_fd(RESULT_FD_ENV) else {
        eprintln!(
            "runvm-agent: {} is for the agent's own use",
            super::helper::HIDDEN_ARG
        );
        std::process::exit(2);
    };
    if let Some(log_fd) = env_fd(LOG_FD_ENV) {
        // SAFETY: the agent passed the log fd for the helper alone; it is owned from here on.
        let log = unsafe { File::from_raw_fd(log_fd) };
        let _ = tracing_subscriber::fmt()
            .with_writer(std::sync::Mutex::new(log))
            .with_ansi(false)
            .with_target(false)
            .with_env_filter(tracing_subscriber::EnvFilter::new(LOG_FILTER))
            .try_init();
    }
    match request
        .as_ref()
        .and_then(|r| r.to_str())
        .map(serde_json::from_str::<Request>)
    {
        Some(Ok(req)) => answer(req, result_fd),
        Some(Err(e)) => reply_and_exit(
            result_fd,
            &error(ErrorKind::Internal, format!("bad helper request: {e}")),
        ),
        None => reply_and_exit(
            result_fd,
            &error(ErrorKind::Internal, "no helper request".into()),
        ),
    }
}

/// What the helper (and a zygote's worker) logs.
pub const LOG_FILTER: &str = "warn,libcgroups=error";

/// Runs `request` with libcontainer in this single-threaded process (its fds 0/1/2 are the
/// container's stdio), writes the [`Reply`] line on `result_fd` and exits. Never returns.
/// Shared by the re-executed helper and the zygote's workers.
pub fn answer(request: Request, result_fd: RawFd) -> ! {
    // The agent (a Rust program) ignores SIGPIPE; container processes must not inherit that.
    // SAFETY: setting a signal's disposition to the default has no memory-safety conditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    std::panic::set_hook(Box::new(move |info| {
        let reply = Reply::Error {
            kind: ErrorKind::Internal,
            message: format!("the libcontainer helper panicked: {info}"),
        };
        // SAFETY: writes to the result fd, still open: the hook only runs before exit.
        let mut f = std::mem::ManuallyDrop::new(unsafe { File::from_raw_fd(result_fd) });
        let _ = writeln!(f, "{}", serde_json::to_string(&reply).unwrap_or_default());
        std::process::exit(1);
    }));
    let started = std::time::Instant::now();
    let reply = execute(&request);
    tracing::debug!(
        libcontainer_us = started.elapsed().as_micros() as u64,
        "libcontainer done"
    );
    reply_and_exit(result_fd, &reply)
}

fn reply_and_exit(result_fd: RawFd, reply: &Reply) -> ! {
    // SAFETY: the result fd was handed to this process alone; it is owned from here on.
    let mut result = unsafe { File::from_raw_fd(result_fd) };
    let line = serde_json::to_string(reply).unwrap_or_default();
    let _ = writeln!(result, "{line}");
    std::process::exit(0);
}

fn error(kind: ErrorKind, message: String) -> Reply {
    Reply::Error { kind, message }
}

fn execute(req: &Request) -> Reply {
    let result = match req {
        Request::Create {
            id,
            root,
            bundle,
            console_socket,
        } => create(id, root, bundle, console_socket.as_deref()).map(Some),
        Request::Start { id, root } => Container::load(root.join(id))
            .and_then(|mut c| c.start())
            .map(|()| None),
        Request::Exec {
            id,
            root,
            process,
            console_socket,
        } => exec(id, root, process, console_socket.as_deref()).map(Some),
        Request::Delete { id, root } => Container::load(root.join(id))
            .and_then(|mut c| c.delete(true))
            .map(|()| None),
    };
    match result {
        Ok(pid) => Reply::Ok { pid },
        Err(e) => {
            let message = chain(&e);
            tracing::warn!(request = ?req, error = %message, "libcontainer failed");
            error(classify(&e, &message), message)
        }
    }
}

fn create(
    id: &str,
    root: &Path,
    bundle: &Path,
    console: Option<&Path>,
) -> Result<i32, LibcontainerError> {
    let container = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(root)?
        .with_console_socket(console)
        .with_executor(RuncExecutor)
        .validate_id()?
        .as_init(bundle)
        .with_systemd(false)
        .with_detach(true)
        // pivot_root fails when / is the initramfs (rootfs); move-mount + chroot works.
        .with_no_pivot(true)
        .build()?;
    container
        .pid()
        .map(|p| p.as_raw())
        .ok_or_else(|| LibcontainerError::Other("created container has no pid".into()))
}

fn exec(
    id: &str,
    root: &Path,
    process: &Path,
    console: Option<&Path>,
) -> Result<i32, LibcontainerError> {
    let pid = ContainerBuilder::new(id.to_string(), SyscallType::Linux)
        .with_root_path(root)?
        .with_console_socket(console)
        .with_executor(RuncExecutor)
        .validate_id()?
        .as_tenant()
        .with_detach(true)
        .with_process(Some(process))
        .build()?;
    Ok(pid.as_raw())
}

/// The error with its sources: libcontainer's own messages are often generic ("syscall error")
/// and the cause is in the chain.
fn chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = s.source();
    }
    message
}

fn classify(e: &LibcontainerError, message: &str) -> ErrorKind {
    match e {
        LibcontainerError::Exist => ErrorKind::AlreadyExists,
        LibcontainerError::NoDirectory => ErrorKind::NotFound,
        LibcontainerError::IncorrectStatus(_) => ErrorKind::FailedPrecondition,
        LibcontainerError::InvalidInput(_)
        | LibcontainerError::InvalidID(_)
        | LibcontainerError::MissingSpec(_)
        | LibcontainerError::InvalidSpec(_)
        | LibcontainerError::Spec(_) => ErrorKind::InvalidArgument,
        // The executable check runs in the container's init and comes back as text.
        _ if message.contains("exec: \"") => ErrorKind::InvalidArgument,
        _ if message.contains("cannot verify the working directory") => ErrorKind::InvalidArgument,
        _ => ErrorKind::Internal,
    }
}
