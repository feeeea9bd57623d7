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
use runvm_sandbox::agent::StdioSpec;
use runvm_sandbox::config::Config;
use runvm_sandbox::process::Streams;
use runvm_sandbox::sandbox::ExecRequest;
use runvm_sandbox::standalone;
use runvm_sandbox::standin::{relay, Control, IdleVm, Target};
use runvm_sandbox::state::StdioRecord;
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

/// What a stand-in is given besides its stdio.
#[derive(Debug)]
pub enum Handoff {
    /// The init of a container the caller created: its stdio stream sockets (stdin, stdout,
    /// stderr), which the stand-in inherits.
    Streams([Option<OwnedFd>; 3]),
    /// An exec the stand-in starts itself over its own agent connection (the only one the
    /// exec uses): the request, written to it through a pipe; [`Started::ready`] says how it
    /// went.
    Exec(ExecHandoff),
}

/// What an exec's stand-in needs to start it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct ExecHandoff {
    /// The OCI process.
    pub process: serde_json::Value,
    /// Whether it has a terminal.
    pub terminal: bool,
}

/// A stand-in started.
#[derive(Debug)]
pub struct Started {
    /// The process.
    pub child: Child,
    /// For an exec: where it writes `OK` or `ERR message`.
    pub ready: Option<std::fs::File>,
}

/// The fds a stand-in gets its hand-off on (stream sockets, or the exec request and the ready
/// pipe).
const HANDOFF_FDS: [i32; 3] = [3, 4, 5];

/// Starts the stand-in for process `exec_id` ("" for the init) of container `id`, in its own
/// session (with a terminal, that terminal becomes its controlling one, so resizes reach it),
/// in the sandbox's host cgroup (`cgroup_procs`: its `cgroup.procs` files, which the stand-in
/// writes itself to before it runs), with `handoff` on fds 3 to 5.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    global: &Global,
    config: &Config,
    id: &ContainerId,
    exec_id: &str,
    terminal: bool,
    io: StandinIo,
    cgroup_procs: &[std::path::PathBuf],
    handoff: Handoff,
) -> Result<Started> {
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
    // The hand-off fds, duplicated above the range they go to (so that no source is also a
    // target), closed on exec here: the child's dup2 onto 3..5 makes the copies it keeps.
    let mut request = None;
    let mut ready = None;
    let sources: Vec<Option<OwnedFd>> = match handoff {
        Handoff::Streams(fds) => {
            let spec: String = fds
                .iter()
                .zip(['i', 'o', 'e'])
                .map(|(fd, c)| if fd.is_some() { c } else { '-' })
                .collect();
            cmd.args(["--streams", &spec]);
            fds.into_iter().collect()
        }
        Handoff::Exec(h) => {
            cmd.arg("--exec-request");
            let (request_r, request_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .context("cannot make the exec request pipe")?;
            let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .context("cannot make the exec ready pipe")?;
            let json = serde_json::to_vec(&h).context("cannot encode the exec request")?;
            request = Some((std::fs::File::from(request_w), json));
            ready = Some(std::fs::File::from(ready_r));
            vec![Some(request_r), Some(ready_w)]
        }
    };
    let high: Vec<Option<OwnedFd>> = sources
        .iter()
        .map(|fd| fd.as_ref().map(|fd| dup_high(fd.as_fd())).transpose())
        .collect::<std::result::Result<_, _>>()
        .context("cannot pass the stand-in its descriptors")?;
    drop(sources);
    let moves: Vec<(i32, i32)> = high
        .iter()
        .zip(HANDOFF_FDS)
        .filter_map(|(fd, to)| fd.as_ref().map(|fd| (fd.as_raw_fd(), to)))
        .collect();
    cmd.arg(id.as_str());
    let ctty = matches!(io, StandinIo::Pty(_));
    if let StandinIo::Pty(slave) = io {
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
    }
    // SAFETY: only async-signal-safe calls (write, dup2, setsid, ioctl) between fork and exec;
    // the cgroup and hand-off descriptors stay open in the parent (and so in the child) until
    // `spawn` returns, as `cgroup_files` and `high` outlive it, and `cgroup_fds` and `moves`
    // were allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            for &fd in &cgroup_fds {
                // "0": the writing process itself.
                if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // After the cgroup writes: a cgroup descriptor may have a number the hand-off
            // takes.
            for &(from, to) in &moves {
                // dup2 onto another number: the copy does not close on exec.
                if libc::dup2(from, to) < 0 {
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
    drop(high);
    let child = child?;
    if let Some((mut pipe, json)) = request {
        // The stand-in reads its request first thing; a write error means it died already,
        // which `ready` then reports (EOF).
        let _ = std::io::Write::write_all(&mut pipe, &json);
    }
    Ok(Started { child, ready })
}

/// Reads the exec stand-in's one line: Ok once the exec started, its error otherwise (also
/// when the stand-in ended without a word).
pub fn exec_started(ready: std::fs::File) -> Result<()> {
    let mut line = String::new();
    std::io::Read::read_to_string(&mut std::io::Read::take(ready, 64 * 1024), &mut line)
        .context("cannot read from the exec's stand-in")?;
    match line.trim_end().split_once(' ') {
        _ if line.trim_end() == "OK" => Ok(()),
        Some(("ERR", message)) => Err(anyhow::anyhow!("{message}")),
        _ => Err(anyhow::anyhow!(
            "the exec's stand-in ended before it started the process"
        )),
    }
}

/// What a stand-in was given (see [`Handoff`]).
#[derive(Debug)]
pub enum Received {
    /// Stream sockets on fds 3..5, as the spec (`io-`) says.
    Streams(String),
    /// An exec request on fd 3, the ready pipe on fd 4.
    Exec,
}

/// Takes fd `fd`, inherited from the parent.
fn inherited(fd: i32) -> Result<OwnedFd> {
    // SAFETY: fcntl(F_GETFD) only checks that the descriptor is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        anyhow::bail!("descriptor {fd} was not passed to the stand-in");
    }
    // SAFETY: the parent passed this open descriptor for this process to own, and nothing
    // else in this process uses it.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )?;
    Ok(fd)
}

/// The streams, and for an exec the sandbox it was started through.
async fn received_streams(
    config: &Config,
    id: &ContainerId,
    exec_id: &str,
    received: Received,
) -> Result<Option<(Option<runvm_sandbox::Sandbox>, Streams)>> {
    match received {
        Received::Streams(spec) => {
            let spec = spec.as_bytes();
            let mut fds: [Option<OwnedFd>; 3] = [None, None, None];
            for (i, slot) in fds.iter_mut().enumerate() {
                if spec.get(i).is_some_and(|c| *c != b'-') {
                    *slot = Some(inherited(HANDOFF_FDS[i])?);
                }
            }
            Ok(Some((None, Streams::from_fds(fds)?)))
        }
        Received::Exec => {
            let mut request = std::fs::File::from(inherited(HANDOFF_FDS[0])?);
            let mut ready = std::fs::File::from(inherited(HANDOFF_FDS[1])?);
            let mut json = Vec::new();
            std::io::Read::read_to_end(&mut request, &mut json)
                .context("cannot read the exec request")?;
            let started = async {
                let h: ExecHandoff =
                    serde_json::from_slice(&json).context("the exec request is not valid")?;
                let (mut sb, _) = standalone::open(config, id)?;
                let mut stdio = StdioSpec::attached(h.terminal);
                let streams = sb.open_streams(&mut stdio).await?;
                sb.exec(
                    id,
                    ExecRequest {
                        exec_id: exec_id.to_string(),
                        process: h.process,
                        stdio,
                        stdio_paths: StdioRecord::default(),
                    },
                )
                .await?;
                anyhow::Ok((sb.into_inner(), streams))
            }
            .await;
            let line = match &started {
                Ok(_) => "OK\n".to_string(),
                Err(e) => format!("ERR {}\n", format!("{e:#}").replace('\n', " ")),
            };
            let _ = std::io::Write::write_all(&mut ready, line.as_bytes());
            drop(ready);
            match started {
                Ok((sb, streams)) => Ok(Some((Some(sb), streams))),
                Err(e) => {
                    tracing::debug!(error = %format!("{e:#}"), "the exec did not start");
                    Ok(None)
                }
            }
        }
    }
}

/// The `__standin` command: relays the process until it exits, and exits with its code.
pub fn main(
    config: &Config,
    id: &str,
    exec_id: &str,
    terminal: bool,
    received: Received,
) -> Result<ExitCode> {
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
        let Some((sandbox, streams)) = received_streams(config, &id, exec_id, received).await?
        else {
            return anyhow::Ok(crate::ops::EXEC_FAILED_STATUS as i32);
        };
        let ended = relay(
            config,
            Target {
                id: &id,
                exec_id,
                terminal,
            },
            sandbox,
            streams,
            tokio::io::stdin(),
            tokio::io::stdout(),
            tokio::io::stderr(),
            rx,
        )
        .await?;
        // The exit is recorded: whoever waits on this process learns it now, while a process
        // of its own stops the VM (holding the teardown mark `delete` waits for).
        if let Some(vm) = ended.idle_vm {
            if let Err(e) = spawn_teardown(&vm) {
                tracing::warn!(error = %format!("{e:#}"), "stopping the VM here instead");
                vm.stop(config).await;
            }
        }
        anyhow::Ok(ended.code)
    });
    // The stdin relay may sit in a blocking read: do not wait for it.
    runtime.shutdown_background();
    Ok(ExitCode::from(code?.clamp(0, 255) as u8))
}

/// Starts `runvm __teardown` for `vm` in a session of its own, detached (stdio on
/// /dev/null), with the stand-in's global options and the teardown mark as its fd 3.
fn spawn_teardown(vm: &IdleVm) -> Result<()> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().context("cannot find runvm's own binary")?;
    // The global options are this stand-in's own, up to its command.
    let global: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .take_while(|a| a != "__standin")
        .collect();
    let mark = dup_high(vm.mark()).context("cannot pass on the teardown mark")?;
    let raw = mark.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.args(global)
        .arg("__teardown")
        .arg(vm.sandbox().as_str())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: the closure runs in the child between fork and exec and calls only setsid(2)
    // and dup2(2), both async-signal-safe; `raw` stays open in the parent until the spawn
    // returned (`mark` is dropped after it).
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid()?;
            // dup2 leaves the new fd open across exec.
            nix::unistd::dup2(raw, TEARDOWN_MARK_FD)?;
            Ok(())
        });
    }
    cmd.spawn().context("cannot start the VM's teardown")?;
    drop(mark);
    Ok(())
}

/// A close-on-exec copy of `fd` numbered 10 or above: a child's `dup2` onto the hand-off
/// numbers (3 and up) then never finds its source among its targets, and always makes a copy
/// it keeps across exec.
fn dup_high(fd: std::os::fd::BorrowedFd<'_>) -> nix::Result<OwnedFd> {
    let raw = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(10))?;
    // SAFETY: F_DUPFD_CLOEXEC just made this fd; nothing else owns it.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// Where `__teardown` finds the teardown mark.
const TEARDOWN_MARK_FD: i32 = 3;

/// The `__teardown` command: stops the VM of sandbox `sandbox` (its containers have all
/// exited), holding the teardown mark it inherited at fd 3 until done.
pub fn teardown_main(config: &Config, sandbox: &str) -> Result<ExitCode> {
    let sid = runvm_sandbox::SandboxId::parse(sandbox)?;
    let mark = inherited(TEARDOWN_MARK_FD)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(runvm_sandbox::standin::stop_idle_vm(config, &sid));
    drop(mark);
    result.with_context(|| format!("cannot stop the VM of {sid}"))?;
    Ok(ExitCode::SUCCESS)
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
