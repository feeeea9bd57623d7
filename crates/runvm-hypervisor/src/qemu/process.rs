//! Child processes of a VM: started with their output in a log file, stopped with escalation.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{HypervisorError, Result};

/// A process of a VM: started by this process (a child, reaped here) or adopted from the state
/// another runvm process saved (known by pid and start time, so a reused pid is not mistaken
/// for it).
#[derive(Debug)]
pub struct ManagedChild {
    /// Its role, used in messages.
    pub name: &'static str,
    child: Option<Child>,
    pid: u32,
    start_time: u64,
    log: PathBuf,
    exit: Option<String>,
}

/// The start time of `pid` in clock ticks since boot (`/proc/PID/stat` field 22), and whether it
/// is a zombie; `None` if there is no such process.
pub fn proc_start_time(pid: u32) -> Option<(u64, bool)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is at index 19.
    let state = fields.first()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((start, *state == "Z"))
}

impl ManagedChild {
    /// Starts `program` with `args`; stdout and stderr go to `log` (created or truncated). The
    /// child gets its own process group so a terminal's Ctrl-C reaches only runvm, which then
    /// stops the VM in order.
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[std::ffi::OsString],
        log: &Path,
    ) -> Result<ManagedChild> {
        Self::spawn_in(name, program, args, log, None, &[])
    }

    /// As [`spawn`](Self::spawn), the child joining the network namespace `netns` (a namespace
    /// file such as `/run/netns/NAME`) before it runs `program`, and getting `fds` open as file
    /// descriptors `target`, `target + 1`, ... (`fds.0`: the first target).
    pub fn spawn_in(
        name: &'static str,
        program: &Path,
        args: &[std::ffi::OsString],
        log: &Path,
        netns: Option<&Path>,
        fds: &[(i32, &File)],
    ) -> Result<ManagedChild> {
        let netns_file = netns
            .map(|path| {
                File::open(path).map_err(|source| HypervisorError::Netns {
                    path: path.to_path_buf(),
                    source,
                })
            })
            .transpose()?;
        let io_err = |source| HypervisorError::Io {
            action: "create log file",
            path: log.to_path_buf(),
            source,
        };
        let out = File::create(log).map_err(io_err)?;
        let err = out.try_clone().map_err(io_err)?;
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false);
        let inherit: Vec<(i32, i32)> = fds.iter().map(|(t, f)| (f.as_raw_fd(), *t)).collect();
        if !inherit.is_empty() {
            // SAFETY: the closure runs in the child between fork and exec and calls only dup2(2)
            // and fcntl(2), which are async-signal-safe; the source descriptors stay open in the
            // parent until `spawn` returns, as `fds` borrows them.
            unsafe {
                command.pre_exec(move || {
                    for &(src, target) in &inherit {
                        if src == target {
                            // dup2 would keep close-on-exec set: clear it.
                            if libc::fcntl(src, libc::F_SETFD, 0) < 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                        } else if libc::dup2(src, target) < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(file) = &netns_file {
            let fd = file.as_raw_fd();
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // setns(2), which is async-signal-safe; `fd` stays open in the parent (and so in
            // the child) until `spawn` returns, as `netns_file` outlives it.
            unsafe {
                command.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command.spawn().map_err(|source| HypervisorError::Spawn {
            program: name,
            path: program.to_path_buf(),
            source,
        })?;
        let pid = child.id().unwrap_or_default();
        let start_time = proc_start_time(pid).map(|(t, _)| t).unwrap_or_default();
        tracing::debug!(name, pid, program = %program.display(), "started");
        Ok(ManagedChild {
            name,
            child: Some(child),
            pid,
            start_time,
            log: log.to_path_buf(),
            exit: None,
        })
    }

    /// A process started by another runvm process, known by `pid` and `start_time`.
    pub fn adopt(name: &'static str, pid: u32, start_time: u64, log: &Path) -> ManagedChild {
        ManagedChild {
            name,
            child: None,
            pid,
            start_time,
            log: log.to_path_buf(),
            exit: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its start time in clock ticks since boot.
    pub fn start_time(&self) -> u64 {
        self.start_time
    }

    /// How it ended if it has (reaping a child), `None` while it runs.
    pub fn exited(&mut self) -> Option<&str> {
        if self.exit.is_none() {
            self.exit = match self.child.as_mut() {
                Some(child) => child.try_wait().ok().flatten().map(|s| s.to_string()),
                None => match proc_start_time(self.pid) {
                    Some((start, zombie)) if start == self.start_time => {
                        zombie.then(|| "exited (zombie, not our child)".to_string())
                    }
                    _ => Some("exited (status unknown: not our child)".to_string()),
                },
            };
        }
        self.exit.as_deref()
    }

    /// Its exit status as text, or "still running".
    pub fn status_text(&mut self) -> String {
        self.exited().unwrap_or("still running").to_string()
    }

    /// The last `lines` lines of its log, at most 4 KiB.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines).join("\n")
    }

    /// Waits up to `timeout` for the process to exit by itself.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        if self.exited().is_some() {
            return true;
        }
        if let Some(child) = self.child.as_mut() {
            return match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(status)) => {
                    self.exit = Some(status.to_string());
                    true
                }
                Ok(Err(_)) | Err(_) => false,
            };
        }
        let mut exited = false;
        crate::poll_until(timeout, || {
            exited = self.exited().is_some();
            exited
        })
        .await;
        exited
    }

    /// Sends `signal` if the process still runs.
    pub fn signal(&mut self, signal: Signal) {
        if self.exited().is_none() {
            if let Ok(pid) = i32::try_from(self.pid) {
                // Checked just above: the pid is still this process (a child not yet reaped,
                // or an adopted one whose start time matches).
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps a child.
    pub async fn terminate(&mut self, grace: Duration) {
        self.signal(Signal::SIGTERM);
        if !self.wait_exit(grace).await {
            tracing::warn!(
                name = self.name,
                pid = self.pid,
                "did not exit on SIGTERM, killing"
            );
            self.signal(Signal::SIGKILL);
            self.wait_exit(Duration::from_secs(5)).await;
        }
    }

    /// Kills without waiting (for `Drop` paths).
    pub fn kill_now(&mut self) {
        self.signal(Signal::SIGKILL);
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
            // Reap if it is already gone; otherwise tokio reaps it in the background.
            let _ = child.try_wait();
        }
    }
}

/// The last `lines` lines of the file at `path`, reading at most its last 4 KiB.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    const MAX: u64 = 4096;
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A cut first line is partial; drop it when the read started mid-file.
    let all = if start > 0 && all.len() > 1 {
        &all[1..]
    } else {
        &all[..]
    };
    let skip = all.len().saturating_sub(lines);
    all[skip..]
        .iter()
        .map(|s| s.trim_end().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_returns_last_lines_and_skips_blank() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\nb\n\nc\nd\n").unwrap();
        assert_eq!(tail(&p, 2), ["c", "d"]);
        assert_eq!(tail(&p, 10), ["a", "b", "c", "d"]);
        assert!(tail(&dir.path().join("missing"), 3).is_empty());
    }

    #[test]
    fn tail_reads_a_bounded_amount_of_a_big_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let mut text = "x".repeat(100_000);
        text.push_str("\nlast\n");
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail(&p, 5), ["last"]);
    }

    #[tokio::test]
    async fn spawn_reports_missing_program_by_role_and_path() {
        let dir = tempfile::tempdir().unwrap();
        let err = ManagedChild::spawn(
            "virtiofsd",
            Path::new("/nonexistent/virtiofsd"),
            &[],
            &dir.path().join("log"),
        )
        .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("virtiofsd") && text.contains("/nonexistent/virtiofsd"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn terminate_stops_a_running_child_and_log_keeps_its_output() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut c = ManagedChild::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "echo started >&2; exec sleep 30".into()],
            &log,
        )
        .unwrap();
        assert!(
            crate::poll_until(Duration::from_secs(5), || std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("started"))
            .await
        );
        assert!(c.exited().is_none());
        let (start, zombie) = proc_start_time(c.pid()).unwrap();
        assert_eq!((start, zombie), (c.start_time(), false));
        c.terminate(Duration::from_secs(2)).await;
        assert!(c.exited().is_some());
        assert_eq!(c.log_tail(1), "started");
    }
}

#[cfg(test)]
mod adopt_tests {
    use super::*;

    #[tokio::test]
    async fn adopted_process_is_watched_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        let mut owner =
            ManagedChild::spawn("sleep", Path::new("/bin/sleep"), &["30".into()], &log).unwrap();
        let mut adopted = ManagedChild::adopt("sleep", owner.pid(), owner.start_time(), &log);
        assert!(adopted.exited().is_none());
        // Same pid but another start time: a reused pid is not the process.
        let mut impostor = ManagedChild::adopt("sleep", owner.pid(), owner.start_time() + 1, &log);
        assert!(impostor.exited().is_some());
        adopted.signal(Signal::SIGKILL);
        assert!(owner.wait_exit(Duration::from_secs(5)).await);
        assert!(adopted.wait_exit(Duration::from_secs(5)).await);
    }
}
