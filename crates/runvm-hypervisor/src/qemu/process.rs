//! Child processes of a VM: started with their output in a log file, stopped with escalation.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::{HypervisorError, Result};

/// A process runvm started for a VM.
#[derive(Debug)]
pub struct ManagedChild {
    /// Its role, used in messages.
    pub name: &'static str,
    child: Child,
    pid: u32,
    log: PathBuf,
    exit: Option<std::process::ExitStatus>,
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
        let io_err = |source| HypervisorError::Io {
            action: "create log file",
            path: log.to_path_buf(),
            source,
        };
        let out = File::create(log).map_err(io_err)?;
        let err = out.try_clone().map_err(io_err)?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| HypervisorError::Spawn {
                program: name,
                path: program.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or_default();
        tracing::debug!(name, pid, program = %program.display(), "started");
        Ok(ManagedChild {
            name,
            child,
            pid,
            log: log.to_path_buf(),
            exit: None,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its exit status if it has exited (reaps it), `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Its exit status as text, or "still running".
    pub fn status_text(&mut self) -> String {
        match self.exited() {
            Some(s) => s.to_string(),
            None => "still running".into(),
        }
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
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => {
                self.exit = Some(status);
                true
            }
            Ok(Err(_)) | Err(_) => false,
        }
    }

    /// Sends `signal` if the process still runs.
    pub fn signal(&mut self, signal: Signal) {
        if self.exited().is_none() {
            if let Ok(pid) = i32::try_from(self.pid) {
                // The child is not reaped yet (try_wait returned None), so the pid is still ours.
                let _ = kill(Pid::from_raw(pid), signal);
            }
        }
    }

    /// SIGTERM, up to `grace` to exit, then SIGKILL; always reaps.
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
        let _ = self.child.start_kill();
        // Reap if it is already gone; otherwise tokio reaps it in the background.
        let _ = self.child.try_wait();
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
        c.terminate(Duration::from_secs(2)).await;
        assert!(c.exited().is_some());
        assert_eq!(c.log_tail(1), "started");
    }
}
