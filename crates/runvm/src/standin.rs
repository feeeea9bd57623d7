//! The stand-in process on the command line's side: starting it (with runvm's stdio, or a
//! pseudo-terminal whose master goes to the --console-socket), its `__standin` entry point,
//! waiting for it in the foreground, and pid files.

use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};

use anyhow::{Context, Result};
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use nix::sys::termios;
use runvm_sandbox::config::Config;
use runvm_sandbox::standin::{relay, Control, Target};
use runvm_sandbox::ContainerId;
use tokio::sync::mpsc;

use crate::args::{Global, LogFormat};

/// The signals a stand-in (and runvm in the foreground) passes on.
const FORWARDED: &[libc::c_int] = &[
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGCONT,
];

/// The stand-in's stdio: runvm's own, or the slave of a pseudo-terminal.
#[derive(Debug)]
pub enum StandinIo {
    /// runvm's stdin, stdout and stderr.
    Inherit,
    /// A terminal (its master was sent to the console socket).
    Pty(OwnedFd),
}

/// Makes a pseudo-terminal, sends its master over `socket` as runc does (SCM_RIGHTS, with the
/// terminal's name as the payload) and returns the slave, in raw mode: the container's own
/// terminal in the guest does the line discipline.
pub fn console(socket: &Path) -> Result<StandinIo> {
    let pty = nix::pty::openpty(None, None).context("cannot open a pseudo-terminal")?;
    for fd in [&pty.master, &pty.slave] {
        nix::fcntl::fcntl(
            fd.as_raw_fd(),
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .context("cannot set close-on-exec on the terminal")?;
    }
    let mut attrs = termios::tcgetattr(&pty.slave).context("cannot read the terminal's mode")?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(&pty.slave, termios::SetArg::TCSANOW, &attrs)
        .context("cannot set the terminal raw")?;
    let name = nix::unistd::ttyname(pty.slave.as_fd())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "/dev/ptmx".into());
    let stream = UnixStream::connect(socket)
        .with_context(|| format!("cannot connect to the console socket {}", socket.display()))?;
    let fds = [pty.master.as_raw_fd()];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(name.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )
    .with_context(|| format!("cannot send the terminal to {}", socket.display()))?;
    Ok(StandinIo::Pty(pty.slave))
}

/// Starts the stand-in for process `exec_id` ("" for the init) of container `id`, in its own
/// session (with a terminal, that terminal becomes its controlling one, so resizes reach it),
/// in the sandbox's host cgroup (`cgroup_procs`: its `cgroup.procs` files, which the stand-in
/// writes itself to before it runs).
pub fn spawn(
    global: &Global,
    config: &Config,
    id: &ContainerId,
    exec_id: &str,
    terminal: bool,
    io: StandinIo,
    cgroup_procs: &[std::path::PathBuf],
) -> Result<Child> {
    let cgroup_files = cgroup_procs
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .with_context(|| format!("cannot open the host cgroup's {}", p.display()))
        })
        .collect::<Result<Vec<std::fs::File>>>()?;
    let cgroup_fds: Vec<i32> = cgroup_files.iter().map(AsRawFd::as_raw_fd).collect();
    let exe = std::env::current_exe().context("cannot find runvm's own binary")?;
    let mut cmd = Command::new(exe);
    cmd.arg("--root").arg(&config.runtime.root);
    if let Some(c) = &global.config {
        cmd.arg("--config").arg(c);
    }
    if let Some(log) = &global.log {
        let format = match global.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        cmd.arg("--log").arg(log).args(["--log-format", format]);
    }
    if global.debug {
        cmd.arg("--debug");
    }
    cmd.args([
        "--log-level",
        &global.log_level,
        "__standin",
        "--exec",
        exec_id,
    ]);
    if terminal {
        cmd.arg("--terminal");
    }
    cmd.arg(id.as_str());
    let ctty = matches!(io, StandinIo::Pty(_));
    if let StandinIo::Pty(slave) = io {
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
    }
    // SAFETY: only async-signal-safe calls (write, setsid, ioctl) between fork and exec; the
    // cgroup descriptors stay open in the parent (and so in the child) until `spawn` returns,
    // as `cgroup_files` outlives it, and `cgroup_fds` was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &cgroup_fds {
                // "0": the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().context("cannot start the stand-in process");
    drop(cgroup_files);
    child
}

/// The `__standin` command: relays the process until it exits, and exits with its code.
pub fn main(config: &Config, id: &str, exec_id: &str, terminal: bool) -> Result<ExitCode> {
    let id = ContainerId::parse(id)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let code = runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let (tx, rx) = mpsc::channel(16);
        for &number in FORWARDED {
            let mut stream = signal(SignalKind::from_raw(number))?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    if tx.send(Control::Signal(number)).await.is_err() {
                        break;
                    }
                }
            });
        }
        if terminal {
            let mut winch = signal(SignalKind::window_change())?;
            let tx = tx.clone();
            tokio::spawn(async move {
                loop {
                    if let Some((rows, cols)) = window_size() {
                        if tx.send(Control::Resize { rows, cols }).await.is_err() {
                            break;
                        }
                    }
                    if winch.recv().await.is_none() {
                        break;
                    }
                }
            });
        }
        drop(tx);
        let code = relay(
            config,
            Target {
                id: &id,
                exec_id,
                terminal,
            },
            tokio::io::stdin(),
            tokio::io::stdout(),
            tokio::io::stderr(),
            rx,
        )
        .await?;
        anyhow::Ok(code)
    });
    // The stdin relay may sit in a blocking read: do not wait for it.
    runtime.shutdown_background();
    Ok(ExitCode::from(code?.clamp(0, 255) as u8))
}

fn window_size() -> Option<(u32, u32)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which lives across the call.
    let rc = unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0).then_some((u32::from(ws.ws_row), u32::from(ws.ws_col)))
}

/// Waits in the foreground for the stand-in `child`, passing on the signals runvm gets, with
/// runvm's terminal (if `terminal` and stdin is one) in raw mode meanwhile. Returns the exit
/// code to exit with.
pub fn wait_foreground(mut child: Child, terminal: bool) -> Result<u8> {
    let pid = child.id() as libc::pid_t;
    let stdin = std::io::stdin();
    let saved = if terminal {
        termios::tcgetattr(stdin.as_fd()).ok()
    } else {
        None
    };
    if let Some(attrs) = &saved {
        let mut raw = attrs.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, &raw);
    }
    let mut signals = FORWARDED.to_vec();
    signals.push(libc::SIGWINCH);
    let forwarding = std::thread::spawn(move || forward_signals(pid, &signals));
    let status = child.wait().context("waiting for the stand-in")?;
    drop(forwarding);
    if let Some(attrs) = &saved {
        let _ = termios::tcsetattr(stdin.as_fd(), termios::SetArg::TCSANOW, attrs);
    }
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(code), _) => code as u8,
        (None, Some(sig)) => (128 + sig) as u8,
        _ => 255,
    })
}

fn forward_signals(pid: libc::pid_t, signals: &[libc::c_int]) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(_) => return,
    };
    runtime.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut tasks = Vec::new();
        for &number in signals {
            let Ok(mut stream) = signal(SignalKind::from_raw(number)) else {
                continue;
            };
            tasks.push(tokio::spawn(async move {
                while stream.recv().await.is_some() {
                    // SAFETY: kill(2) on our own child, not yet reaped; no memory involved.
                    unsafe { libc::kill(pid, number) };
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
}

/// Writes `pid` to `path` as runc does: the number alone, written to a temporary file renamed
/// into place.
pub fn write_pid_file(path: &Path, pid: u32) -> Result<()> {
    let path = std::path::absolute(path)?;
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    std::fs::write(&tmp, pid.to_string())
        .and_then(|()| std::fs::rename(&tmp, &path))
        .with_context(|| format!("cannot write the pid file {}", path.display()))
}
