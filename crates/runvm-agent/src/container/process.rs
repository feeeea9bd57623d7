//! Processes of a container (its init and exec'd ones): exec, signals, waiting, their stdio
//! pipes or terminal (joined to the host's streams by `streams.rs`), and the read-only
//! container RPCs (list, stats).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runvm_protocol::agent;

use super::helper::{self, Request};
use super::stdio::{self, ProcessIo};
use super::{blocking, detached, spec, stats, Containers, Status, CONSOLES, STATE_ROOT};
use crate::error::{validate_id, AgentError, Result};
use crate::reaper::{self, Exit, ExitWatch};

/// How long libcontainer may take to hand over a terminal after creating a process.
const CONSOLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A process in a container.
#[derive(Debug)]
pub struct Process {
    /// Empty for the container's init.
    pub exec_id: String,
    /// Pid in the agent's (the VM's) pid namespace.
    pub pid: i32,
    exit: ExitWatch,
    pub io: ProcessIo,
}

impl Process {
    pub fn new(exec_id: String, pid: i32, exit: ExitWatch, io: ProcessIo) -> Process {
        Process {
            exec_id,
            pid,
            exit,
            io,
        }
    }

    /// The exit, once reaped.
    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> Option<Exit> {
        reaper::wait(self.exit.clone()).await
    }

    /// Exited and its output sent to the end (or its stream gone): nothing more to ask of it.
    pub fn finished(&self) -> bool {
        self.exited().is_some() && self.io.drained()
    }

    fn name(&self, container: &str) -> String {
        if self.exec_id.is_empty() {
            format!("the init of container {container:?}")
        } else {
            format!("exec {:?} of container {container:?}", self.exec_id)
        }
    }
}

/// A signal number from the host (0 checks existence).
fn signal_from(number: u32) -> Result<Option<Signal>> {
    if number == 0 {
        return Ok(None);
    }
    i32::try_from(number)
        .ok()
        .and_then(|n| Signal::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| AgentError::invalid(format!("unknown signal {number}")))
}

/// Creates the stdio of a new process: pipes for the streams `cfg` asks for (`/dev/null` for
/// the others), or a console socket for a terminal.
pub(super) fn new_stdio(
    cfg: &agent::StdioConfig,
) -> Result<(
    stdio::ChildStdio,
    Option<ProcessIo>,
    Option<stdio::ConsoleSocket>,
)> {
    let err = |e: std::io::Error| AgentError::internal(format!("cannot set up stdio: {e}"));
    if cfg.terminal {
        let socket = stdio::ConsoleSocket::bind(std::path::Path::new(CONSOLES)).map_err(err)?;
        Ok((stdio::null_stdio().map_err(err)?, None, Some(socket)))
    } else {
        let (child, io) = stdio::pipes(cfg.stdin, cfg.stdout, cfg.stderr).map_err(err)?;
        Ok((child, Some(io), None))
    }
}

/// The agent's side of a terminal: the pty master received on `socket`, sized as asked.
pub(super) async fn receive_tty(
    socket: stdio::ConsoleSocket,
    stdin: bool,
    size: Option<(u16, u16)>,
) -> Result<ProcessIo> {
    let master = socket
        .receive(CONSOLE_TIMEOUT)
        .await
        .map_err(|e| AgentError::internal(format!("cannot receive the terminal: {e}")))?;
    if let Some((rows, cols)) = size {
        if let Err(e) = stdio::set_window_size(&master, rows, cols) {
            tracing::warn!(error = %e, "cannot set the console size");
        }
    }
    ProcessIo::from_tty(master, stdin)
        .map_err(|e| AgentError::internal(format!("cannot use the terminal: {e}")))
}

impl Containers {
    /// ExecProcess: runs an OCI process in a created or running container, started at once.
    pub async fn exec(self: &Arc<Self>, req: agent::ExecProcessRequest) -> Result<()> {
        let me = Arc::clone(self);
        detached("ExecProcess", async move { me.exec_inner(req).await }).await
    }

    async fn exec_inner(self: Arc<Self>, req: agent::ExecProcessRequest) -> Result<()> {
        let (id, exec_id) = (req.container_id.as_str(), req.exec_id.as_str());
        validate_id("exec id", exec_id)?;
        let cfg = req.stdio.clone().unwrap_or_default();
        super::streams::check_config(&cfg)?;
        let c = self.get(id)?;
        let process = spec::parse_process(&req.oci_process_json, id, exec_id, cfg.terminal)?;
        let _op = c.lock_op().await?;
        let status = c.status();
        // As runc: a created container (its init waiting for start) takes new processes. A
        // paused one does not: the new process would freeze before it reports to this call,
        // which holds the container's operation lock that resume needs.
        if !matches!(status, Status::Running | Status::Created) {
            return Err(AgentError::precondition(format!(
                "cannot exec {exec_id:?} in container {id:?}: it is {status}"
            )));
        }
        c.prune_execs();
        if let Some(old) = c.execs().get(exec_id) {
            if !old.finished() {
                return Err(AgentError::exists(format!(
                    "exec {exec_id:?} already exists in container {id:?}"
                )));
            }
        }
        let size = process
            .console_size()
            .map(|b| (b.height() as u16, b.width() as u16));
        let file = c.bundle.join(format!("exec-{exec_id}.json"));
        let json = serde_json::to_vec(&process)
            .map_err(|e| AgentError::internal(format!("cannot encode the process: {e}")))?;
        std::fs::write(&file, json)
            .map_err(|e| AgentError::internal(format!("cannot write {}: {e}", file.display())))?;
        let claimed = self.claim_streams(&cfg).await?;
        let (child_stdio, io, console) = new_stdio(&cfg)?;
        let request = Request::Exec {
            id: id.to_string(),
            root: PathBuf::from(STATE_ROOT),
            process: file.clone(),
            console_socket: console.as_ref().map(|s| s.path().to_path_buf()),
        };
        let since = Instant::now();
        let result = helper::run(&self.reaper, &request, child_stdio).await;
        let _ = std::fs::remove_file(&file);
        let pid = result?
            .ok_or_else(|| AgentError::internal("the helper reported no pid for the exec"))?;
        let exit = self.reaper.watch(pid, since);
        let io = match (io, console) {
            (Some(io), _) => io,
            (None, Some(socket)) => match receive_tty(socket, cfg.stdin, size).await {
                Ok(io) => io,
                Err(e) => {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    return Err(e.context(format!("exec {exec_id:?} in container {id:?}")));
                }
            },
            (None, None) => return Err(AgentError::internal("no stdio for the exec")),
        };
        tracing::info!(container = id, exec = exec_id, pid, "exec started");
        let p = Arc::new(Process::new(exec_id.to_string(), pid, exit, io));
        if let Some(claimed) = claimed {
            super::streams::attach(&p, claimed);
        }
        c.execs().insert(exec_id.to_string(), p);
        Ok(())
    }

    /// SignalProcess: to one process, or to every process of the container.
    pub fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let signal = signal_from(req.signal)?;
        if req.all {
            for pid in c.pids() {
                if let Err(e) = kill(Pid::from_raw(pid), signal) {
                    tracing::debug!(container = %c.id, pid, error = %e, "signal");
                }
            }
            return Ok(());
        }
        let p = c.process(&req.exec_id)?;
        if p.exited().is_some() {
            return Err(AgentError::not_found(format!(
                "{} has already exited",
                p.name(&c.id)
            )));
        }
        kill(Pid::from_raw(p.pid), signal).map_err(|e| match e {
            nix::errno::Errno::ESRCH => {
                AgentError::not_found(format!("{} has already exited", p.name(&c.id)))
            }
            e => AgentError::internal(format!("cannot signal {}: {e}", p.name(&c.id))),
        })?;
        tracing::info!(container = %c.id, exec = %req.exec_id, signal = req.signal, "signalled");
        Ok(())
    }

    /// WaitProcess: the exit status once the process has exited.
    pub async fn wait(
        &self,
        req: &agent::WaitProcessRequest,
    ) -> Result<agent::WaitProcessResponse> {
        let c = self.get(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.wait().await.ok_or_else(|| {
            AgentError::internal(format!("the exit of {} was lost", p.name(&c.id)))
        })?;
        Ok(agent::WaitProcessResponse {
            status: exit.status,
            exited_at_unix_ns: exit.at_unix_ns,
            ..Default::default()
        })
    }

    /// TtyWinResize.
    pub fn resize(&self, req: &agent::TtyWinResizeRequest) -> Result<()> {
        let c = self.get(&req.container_id)?;
        let p = c.process(&req.exec_id)?;
        let Some(tty) = p.io.tty.as_ref() else {
            return Err(AgentError::precondition(format!(
                "{} has no terminal",
                p.name(&c.id)
            )));
        };
        let (rows, cols) = match (u16::try_from(req.rows), u16::try_from(req.cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(AgentError::invalid(format!(
                    "window size {}x{} is too large",
                    req.rows, req.cols
                )))
            }
        };
        stdio::set_window_size(tty, rows, cols).map_err(|e| {
            AgentError::internal(format!(
                "cannot resize the terminal of {}: {e}",
                p.name(&c.id)
            ))
        })
    }

    /// ListProcesses: the processes in the container's cgroup.
    pub fn list_processes(&self, id: &str) -> Result<agent::ListProcessesResponse> {
        let c = self.get(id)?;
        let mut pids = c.pids();
        pids.sort_unstable();
        pids.dedup();
        let processes = pids
            .into_iter()
            .map(|pid| {
                let info = ps_info(pid).unwrap_or_default();
                agent::ProcessInfo {
                    pid,
                    cmd: command_line(pid),
                    ppid: info.ppid,
                    uid: info.uid,
                    started_unix_ns: info.started_unix_ns,
                    tty: info.tty,
                    cpu_time_ns: info.cpu_time_ns,
                    ..Default::default()
                }
            })
            .collect();
        Ok(agent::ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }

    /// StatsContainer.
    pub async fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        let c = self.get(id)?;
        let net_dev = match c.init.exited() {
            None => PathBuf::from(format!("/proc/{}/net/dev", c.init.pid)),
            Some(_) => PathBuf::from("/proc/net/dev"),
        };
        let dir = c.cgroup_dir.clone();
        blocking("StatsContainer", move || {
            Ok(stats::read_stats(&dir, &net_dev))
        })
        .await
    }
}

/// What `ps -ef` shows of a process besides its pid and command line.
#[derive(Debug, Default, PartialEq)]
struct PsInfo {
    ppid: i32,
    uid: u32,
    started_unix_ns: u64,
    tty: String,
    cpu_time_ns: u64,
}

/// Reads [`PsInfo`] from `/proc`: `stat` (parent, terminal, CPU time, start in clock ticks
/// since boot), `status` (real uid) and `/proc/stat`'s boot time.
fn ps_info(pid: i32) -> Option<PsInfo> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = boot
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf reads a constant of the system and has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    parse_ps_info(&stat, &status, btime, ticks)
}

fn parse_ps_info(stat: &str, status: &str, btime: u64, ticks: u64) -> Option<PsInfo> {
    // The command name (field 2) may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
    let tty_nr = num(4)?;
    let cpu_ticks = num(11)? + num(12)?;
    let start_ticks = num(19)?;
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())?;
    let to_ns = |t: u64| t.saturating_mul(1_000_000_000) / ticks;
    Some(PsInfo {
        ppid: f.get(1)?.parse().ok()?,
        uid,
        started_unix_ns: btime
            .saturating_mul(1_000_000_000)
            .saturating_add(to_ns(start_ticks)),
        tty: tty_name(tty_nr),
        cpu_time_ns: to_ns(cpu_ticks),
    })
}

/// The name ps gives a `tty_nr` (`pts/N`, `ttyN`, `console`), empty for none or another.
fn tty_name(tty_nr: u64) -> String {
    let major = (tty_nr >> 8) & 0xfff;
    let minor = (tty_nr & 0xff) | ((tty_nr >> 12) & 0xfff00);
    match major {
        0 => String::new(),
        136..=143 => format!("pts/{}", (major - 136) * 256 + minor),
        4 if minor < 64 => format!("tty{minor}"),
        5 if minor == 1 => "console".into(),
        _ => String::new(),
    }
}

/// A process's command line, arguments separated by spaces (`[comm]` for kernel-like ones).
fn command_line(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let args: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if !args.is_empty() {
        return args.join(" ");
    }
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    format!("[{}]", comm.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_checked() {
        assert_eq!(signal_from(0), Ok(None));
        assert_eq!(signal_from(15), Ok(Some(Signal::SIGTERM)));
        assert_eq!(signal_from(9), Ok(Some(Signal::SIGKILL)));
        let err = signal_from(999).unwrap_err();
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(err.message.contains("999"));
    }

    #[test]
    fn ps_columns_are_read_from_proc() {
        let stat = "42 (my (odd) cmd) S 7 42 42 34817 42 4194560 1 0 0 0 150 50 0 0 20 0 1 0 \
                    1000 1 1";
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\n";
        let info = parse_ps_info(stat, status, 1_700_000_000, 100).unwrap();
        assert_eq!(
            info,
            PsInfo {
                ppid: 7,
                uid: 1000,
                started_unix_ns: 1_700_000_010_000_000_000,
                tty: "pts/1".into(),
                cpu_time_ns: 2_000_000_000,
            }
        );
        assert_eq!(tty_name(0), "");
        let me = ps_info(std::process::id() as i32).unwrap();
        assert!(me.started_unix_ns > 0);
    }

    #[test]
    fn own_command_line_is_read() {
        let me = command_line(std::process::id() as i32);
        assert!(!me.is_empty() && !me.starts_with('['), "{me}");
    }
}
