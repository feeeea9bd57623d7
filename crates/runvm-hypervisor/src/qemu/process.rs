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
    /// The program it must be running (checked before an adopted process is signalled).
    exe: Option<PathBuf>,
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

/// The CPU time (user + system) process `pid` has used; `None` if there is no such process.
pub fn proc_cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3; utime and stime are fields 14 and 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf(3) with a constant name; no memory involved.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0)?;
    let total = utime.saturating_add(stime);
    Some(
        Duration::from_secs(total / ticks)
            + Duration::from_nanos(total % ticks * 1_000_000_000 / ticks),
    )
}

/// The program process `pid` runs (`/proc/PID/exe`, without the " (deleted)" the kernel adds
/// once the binary was replaced on disk); `None` if there is no such process or it is a zombie.
pub fn proc_exe(pid: u32) -> Option<PathBuf> {
    let link = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
    let text = link.to_string_lossy();
    Some(match text.strip_suffix(" (deleted)") {
        Some(stripped) => PathBuf::from(stripped),
        None => link,
    })
}

/// Whether process `pid` runs `program` (compared after resolving symbolic links).
pub fn runs_program(pid: u32, program: &Path) -> bool {
    let Some(exe) = proc_exe(pid) else {
        return false;
    };
    let wanted = std::fs::canonicalize(program).unwrap_or_else(|_| program.to_path_buf());
    exe == wanted || exe == program
}

/// A live process found by what it was started with (see [`find_by_argument`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time in clock ticks since boot.
    pub start_time: u64,
    /// The program it runs.
    pub exe: PathBuf,
}

/// The live processes (zombies left out) one of whose arguments contains `needle`, e.g. a VM's
/// run folder: QEMU and its helpers all name a socket in it. This finds the processes of a VM
/// whose creator died before it recorded them.
pub fn find_by_argument(needle: &str) -> Vec<FoundProcess> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let matches = cmdline
            .split(|b| *b == 0)
            .any(|arg| String::from_utf8_lossy(arg).contains(needle));
        if !matches {
            continue;
        }
        let (Some((start_time, false)), Some(exe)) = (proc_start_time(pid), proc_exe(pid)) else {
            continue;
        };
        found.push(FoundProcess {
            pid,
            start_time,
            exe,
        });
    }
    found
}

/// What a child is given and where it runs, besides its program and arguments. Its steps
/// happen in the child between fork and exec, in this order.
#[derive(Debug, Default)]
pub struct Placement<'a> {
    /// Join this network namespace (a namespace file such as `/run/netns/NAME`).
    pub netns: Option<&'a Path>,
    /// Have these files open as the given descriptor numbers.
    pub fds: &'a [(i32, &'a File)],
    /// Move into the host cgroup whose `cgroup.procs` files (one per hierarchy on cgroup v1)
    /// these are: the child writes `0` (itself) to each, so everything it ever allocates is
    /// charged there. Those files are opened by the parent, so a missing one fails the spawn
    /// by name.
    pub cgroup_procs: &'a [PathBuf],
    /// Enter this jail last: own mount namespace, unprivileged user, no capabilities.
    pub jail: Option<super::jail::PreparedJail>,
}

impl ManagedChild {
    /// Starts `program` with `args`; stdout and stderr go to `log` (created or truncated), in
    /// its own process group (see [`spawn_placed`](Self::spawn_placed)).
    #[cfg(test)]
    pub fn spawn(
        name: &'static str,
        program: &Path,
        args: &[std::ffi::OsString],
        log: &Path,
    ) -> Result<ManagedChild> {
        Self::spawn_placed(name, program, args, log, Placement::default())
    }

    /// Starts `program` with `args`; stdout and stderr go to `log` (created or truncated). The
    /// child gets its own process group so a terminal's Ctrl-C reaches only runvm, which then
    /// stops the VM in order. Before it runs `program` it takes the steps of `placement`: see
    /// [`Placement`].
    pub fn spawn_placed(
        name: &'static str,
        program: &Path,
        args: &[std::ffi::OsString],
        log: &Path,
        placement: Placement<'_>,
    ) -> Result<ManagedChild> {
        let Placement {
            netns,
            fds,
            cgroup_procs,
            jail,
        } = placement;
        let cgroup_files = cgroup_procs
            .iter()
            .map(|path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(|source| HypervisorError::Io {
                        action: "open host cgroup file",
                        path: path.clone(),
                        source,
                    })
            })
            .collect::<Result<Vec<File>>>()?;
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
        // Capped later by punching out its oldest part (see [`cap_log`]).
        let out = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(log)
            .map_err(io_err)?;
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
        if !cgroup_files.is_empty() {
            let raw: Vec<i32> = cgroup_files.iter().map(AsRawFd::as_raw_fd).collect();
            // SAFETY: the closure runs in the child between fork and exec and calls only
            // write(2), which is async-signal-safe, on descriptors that stay open in the parent
            // (and so in the child) until `spawn` returns, as `cgroup_files` outlives it; `raw`
            // was allocated before the fork.
            unsafe {
                command.pre_exec(move || {
                    for &fd in &raw {
                        // "0": the writing process itself.
                        if libc::write(fd, b"0".as_ptr().cast(), 1) != 1 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        if let Some(jail) = jail {
            // SAFETY: the closure runs in the child between fork and exec, last (after joining
            // the network namespace and the cgroup, which need privilege); `enter` makes only
            // system calls on strings prepared before the fork and allocates nothing.
            unsafe {
                command.pre_exec(move || jail.enter());
            }
        }
        let child = command.spawn().map_err(|source| HypervisorError::Spawn {
            program: name,
            path: program.to_path_buf(),
            source,
            log: tail(log, 3).join("; "),
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
            exe: Some(program.to_path_buf()),
            exit: None,
        })
    }

    /// A process started by another runvm process, known by `pid` and `start_time`, and, with
    /// `exe`, by the program it runs: a recorded pid is never signalled unless all match.
    pub fn adopt(
        name: &'static str,
        pid: u32,
        start_time: u64,
        log: &Path,
        exe: Option<&Path>,
    ) -> ManagedChild {
        ManagedChild {
            name,
            child: None,
            pid,
            start_time,
            log: log.to_path_buf(),
            exe: exe.map(Path::to_path_buf),
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
                    Some((_, true)) => Some("exited (zombie, not our child)".to_string()),
                    Some((start, false)) if start == self.start_time => match &self.exe {
                        Some(exe) if !runs_program(self.pid, exe) => Some(format!(
                            "exited (pid {} now runs another program than {})",
                            self.pid,
                            exe.display()
                        )),
                        _ => None,
                    },
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

/// Keeps the log at `path` near `max` bytes: when more than `max` bytes of it hold data, its
/// oldest part is punched out (`fallocate(PUNCH_HOLE)`), leaving the newest `max / 2` bytes.
/// Writers are not disturbed (their offset and the file's size stay; the hole takes no space
/// on tmpfs or a disk), so a guest that floods its console cannot fill the state root.
/// Returns the bytes freed. Best effort: a file system without hole punching is left alone.
pub fn cap_log(path: &Path, max: u64) -> u64 {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // Never through a link: the run folder is writable by the confined VM's group.
    let Ok(file) = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return 0;
    };
    let Ok(meta) = file.metadata() else {
        return 0;
    };
    // Bytes held: st_blocks counts 512-byte units actually allocated.
    let held = meta.blocks() * 512;
    if held <= max {
        return 0;
    }
    let keep = (max / 2).max(4096);
    let end = meta.len().saturating_sub(keep);
    // Whole pages only: a partial page would be zeroed but stay allocated.
    let end = end - end % 4096;
    if end == 0 {
        return 0;
    }
    let Ok(len) = libc::off_t::try_from(end) else {
        return 0;
    };
    // SAFETY: fallocate(2) on a descriptor we own, with plain integer arguments; no memory is
    // passed.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            len,
        )
    };
    if rc != 0 {
        tracing::debug!(path = %path.display(), error = %std::io::Error::last_os_error(), "cannot cap the log");
        return 0;
    }
    let after = file.metadata().map(|m| m.blocks() * 512).unwrap_or(held);
    held.saturating_sub(after)
}

/// The last `lines` lines of the file at `path`, reading at most its last 4 KiB.
pub fn tail(path: &Path, lines: usize) -> Vec<String> {
    use std::os::unix::fs::OpenOptionsExt;
    const MAX: u64 = 4096;
    // Never through a link: the run folder is writable by the confined VM's group.
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
    else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(MAX);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    let _ = f.take(MAX).read_to_end(&mut buf);
    // A capped log reads as zeros where its oldest part was punched out.
    buf.retain(|b| *b != 0);
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

    #[tokio::test]
    async fn a_placed_child_writes_itself_to_each_cgroup_file_before_it_runs() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // Stand-ins for two hierarchies' cgroup.procs: the child writes "0" (itself) to each.
        let files = [dir.path().join("a.procs"), dir.path().join("b.procs")];
        for f in &files {
            std::fs::write(f, "").unwrap();
        }
        let mut c = ManagedChild::spawn_placed(
            "sh",
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                format!("cat {} >&2", files[0].display()).into(),
            ],
            &log,
            Placement {
                cgroup_procs: &files,
                ..Placement::default()
            },
        )
        .unwrap();
        assert!(c.wait_exit(Duration::from_secs(5)).await);
        assert_eq!(c.log_tail(1), "0", "written before the program ran");
        assert_eq!(std::fs::read_to_string(&files[1]).unwrap(), "0");

        let missing = dir.path().join("gone/cgroup.procs");
        let err = ManagedChild::spawn_placed(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "true".into()],
            &log,
            Placement {
                cgroup_procs: std::slice::from_ref(&missing),
                ..Placement::default()
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains(&missing.display().to_string()), "{err}");
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_log_past_its_cap_keeps_its_newest_part_and_its_writer() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("console.log");
        let mut writer = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p)
            .unwrap();
        let line = format!("{}\n", "x".repeat(99));
        for _ in 0..5_000 {
            writer.write_all(line.as_bytes()).unwrap();
        }
        writer.write_all(b"newest line\n").unwrap();
        writer.flush().unwrap();
        let cap = 64 * 1024;
        assert!(cap_log(&p, cap) > 0);
        let held = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(held <= cap + 8192, "{held} bytes held");
        assert_eq!(cap_log(&p, cap), 0, "under the cap: nothing to do");
        // The writer goes on at the end; the tail reads the newest lines.
        writer.write_all(b"after the cap\n").unwrap();
        assert_eq!(tail(&p, 2), ["newest line", "after the cap"]);
    }

    #[test]
    fn logs_are_never_read_or_capped_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("host-file");
        std::fs::write(&target, "x\n".repeat(10_000)).unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(tail(&link, 3).is_empty());
        assert_eq!(cap_log(&link, 4096), 0);
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "x\n".repeat(10_000)
        );
    }

    #[test]
    fn a_small_log_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "short\n").unwrap();
        assert_eq!(cap_log(&p, 4096), 0);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "short\n");
        assert_eq!(cap_log(&dir.path().join("missing"), 4096), 0);
    }
}

#[cfg(test)]
mod adopt_tests {
    use super::*;

    #[tokio::test]
    async fn adopted_process_is_watched_by_pid_and_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        // A duration no other process of the host has as an argument.
        let unique = format!("30.{}", std::process::id());
        let mut owner = ManagedChild::spawn(
            "sleep",
            Path::new("/bin/sleep"),
            &[unique.clone().into()],
            &log,
        )
        .unwrap();
        let mut adopted = ManagedChild::adopt(
            "sleep",
            owner.pid(),
            owner.start_time(),
            &log,
            Some(Path::new("/bin/sleep")),
        );
        assert!(adopted.exited().is_none());
        // Same pid but another start time: a reused pid is not the process.
        let mut impostor =
            ManagedChild::adopt("sleep", owner.pid(), owner.start_time() + 1, &log, None);
        assert!(impostor.exited().is_some());
        // Same pid and start time but another program: not the process either.
        let mut other = ManagedChild::adopt(
            "sleep",
            owner.pid(),
            owner.start_time(),
            &log,
            Some(Path::new("/bin/sh")),
        );
        assert!(other.exited().is_some());
        // It is found by its arguments.
        let found = find_by_argument(&log.display().to_string());
        assert!(found.is_empty(), "{found:?}");
        let mut found = Vec::new();
        let seen = crate::poll_until(Duration::from_secs(5), || {
            found = find_by_argument(&unique);
            found.iter().any(|p| p.pid == owner.pid())
        })
        .await;
        assert!(
            seen,
            "sleep {unique} (pid {}) not found: {found:?}",
            owner.pid()
        );
        adopted.signal(Signal::SIGKILL);
        assert!(owner.wait_exit(Duration::from_secs(5)).await);
        assert!(adopted.wait_exit(Duration::from_secs(5)).await);
    }
}
