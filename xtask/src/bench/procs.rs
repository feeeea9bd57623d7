//! Host processes of the benchmark: running commands with a deadline, finding the processes
//! that name a folder, their memory, and the sweep that ends whatever a failed step left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::stats::parse_smaps_rollup;
use crate::cmd::describe;

/// How long one benchmarked command may take before it is killed and reported as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(300);

/// Waits for `child` for up to `timeout`; kills it (by its pid) when it takes longer.
pub fn wait_timeout(child: &mut Child, timeout: Duration, what: &str) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child
            .try_wait()
            .with_context(|| format!("wait for `{what}`"))?
        {
            if !status.success() {
                bail!("`{what}` failed ({status})");
            }
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("`{what}` took more than {} s", timeout.as_secs());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `cmd` with stdin from /dev/null and stdout and stderr into `LOGS/NAME.out` and
/// `.err` (a detached container's stand-in keeps them open, so no pipes); returns the time from
/// its start to its exit. A failure quotes the end of its stderr.
pub fn timed(cmd: &mut Command, logs: &Path, name: &str) -> Result<Duration> {
    let what = describe(cmd);
    let out = logs.join(format!("{name}.out"));
    let err = logs.join(format!("{name}.err"));
    let started = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).with_context(|| out.display().to_string())?)
        .stderr(std::fs::File::create(&err).with_context(|| err.display().to_string())?)
        .spawn()
        .with_context(|| format!("cannot run `{what}`"))?;
    let result = wait_timeout(&mut child, COMMAND_TIMEOUT, &what);
    let elapsed = started.elapsed();
    result.map_err(|e| {
        let text = std::fs::read_to_string(&err).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        e.context(strip_ansi(&tail.join(" | ")))
    })?;
    Ok(elapsed)
}

/// `text` without terminal escape sequences (`ESC [ ... letter`), which logs may carry.
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A process and its command line.
#[derive(Debug, Clone)]
pub struct Proc {
    pub pid: u32,
    pub cmdline: String,
}

/// The processes (other than this one) whose command line names `marker`.
pub fn naming(marker: &Path) -> Vec<Proc> {
    let marker = marker.to_string_lossy().to_string();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_string_lossy().parse().ok()?;
            let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmd).replace('\0', " ");
            (pid != me && cmdline.contains(&marker)).then_some(Proc { pid, cmdline })
        })
        .collect()
}

/// What a process of a pod is, from its command line.
pub fn kind_of(cmdline: &str) -> &'static str {
    let program = cmdline.split_whitespace().next().unwrap_or("");
    let name = Path::new(program)
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    if name.starts_with("qemu-system") {
        "qemu"
    } else if name == "virtiofsd" {
        "virtiofsd"
    } else if name == "vhost-device-vsock" {
        "vhost-device-vsock"
    } else if cmdline.contains(" __standin ") {
        "stand-in"
    } else if name.starts_with("containerd-shim") {
        "shim"
    } else {
        "other"
    }
}

/// The host memory of a set of processes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// Sum of PSS, KiB.
    pub pss_kib: u64,
    /// Sum of RSS, KiB.
    pub rss_kib: u64,
    /// PSS per kind of process (see [`kind_of`]), KiB.
    pub pss_by_kind_kib: std::collections::BTreeMap<String, u64>,
    /// How many processes were summed.
    pub processes: usize,
}

/// The memory of the processes naming `marker`.
pub fn memory_of(marker: &Path) -> Result<Memory> {
    let mut m = Memory::default();
    for p in naming(marker) {
        let path = format!("/proc/{}/smaps_rollup", p.pid);
        let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
        let (rss, pss) = parse_smaps_rollup(&text);
        m.rss_kib += rss;
        m.pss_kib += pss;
        *m.pss_by_kind_kib
            .entry(kind_of(&p.cmdline).to_string())
            .or_default() += pss;
        m.processes += 1;
    }
    Ok(m)
}

/// On drop, kills (SIGKILL, by pid) every process still naming its folder and lazily unmounts
/// what is mounted under it: the last line of cleanup after a failed step.
#[derive(Debug)]
pub struct Sweep {
    pub marker: PathBuf,
}

impl Sweep {
    /// Ends what is left now; returns what it found.
    pub fn sweep(&self) -> Vec<Proc> {
        let left = naming(&self.marker);
        for p in &left {
            let _ = Command::new("kill")
                .args(["-KILL", &p.pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if !left.is_empty() {
            std::thread::sleep(Duration::from_millis(300));
        }
        let marker = self.marker.to_string_lossy().to_string();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4))
            .filter(|m| m.starts_with(&marker))
            .collect();
        points.sort_unstable_by(|a, b| b.cmp(a));
        for m in points {
            let _ = Command::new("umount")
                .args(["-l", m])
                .stderr(Stdio::null())
                .status();
        }
        left
    }
}

impl Drop for Sweep {
    fn drop(&mut self) {
        let left = self.sweep();
        for p in left {
            eprintln!("==> ended a leftover process {}: {}", p.pid, p.cmdline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_processes_are_told_apart_by_their_command_lines() {
        assert_eq!(kind_of("/usr/bin/qemu-system-x86_64 -name runvm"), "qemu");
        assert_eq!(
            kind_of("/opt/runvm/bin/virtiofsd --shared-dir /x"),
            "virtiofsd"
        );
        assert_eq!(
            kind_of("/opt/runvm/bin/vhost-device-vsock --guest-cid 3"),
            "vhost-device-vsock"
        );
        assert_eq!(
            kind_of("/w/target/release/runvm --root /r __standin --exec  s1 "),
            "stand-in"
        );
        assert_eq!(kind_of("/b/containerd-shim-runvm-v2 -id x"), "shim");
        assert_eq!(kind_of("sleep 1"), "other");
    }

    #[test]
    fn escape_sequences_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m x"),
            "2026  WARN x"
        );
    }

    #[test]
    fn a_failing_timed_command_quotes_its_stderr() {
        let logs = tempfile::tempdir().unwrap();
        let err = timed(
            Command::new("sh").args(["-c", "echo broke-here >&2; exit 2"]),
            logs.path(),
            "t",
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("broke-here"), "{err:#}");
    }
}
