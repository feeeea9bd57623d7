//! What a host process costs, from `/proc`: CPU time and thread count (`stat`), resident and
//! proportional set size (`smaps_rollup`), open file descriptors (the entries of `fd/`). The
//! root is a parameter so that tests read a fake tree.

use std::io;
use std::path::{Path, PathBuf};

/// The cost of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Proportional set size (shared pages divided among their users), bytes.
    pub pss_bytes: u64,
    /// Threads.
    pub threads: u64,
    /// Open file descriptors.
    pub open_fds: u64,
}

/// The fields of `/proc/PID/stat` the monitor uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// User time, clock ticks.
    pub utime: u64,
    /// System time, clock ticks.
    pub stime: u64,
    /// Threads.
    pub num_threads: u64,
    /// Start time, clock ticks since boot.
    pub start_time: u64,
}

/// Parses a `/proc/PID/stat` text. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field N is at index N - 3.
    let num = |field: usize| fields.get(field - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        utime: num(14)?,
        stime: num(15)?,
        num_threads: num(20)?,
        start_time: num(22)?,
    })
}

/// (Rss, Pss) in bytes from a `/proc/PID/smaps_rollup` text.
pub fn parse_smaps_rollup(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib.saturating_mul(1024))
    };
    Some((field("Rss:")?, field("Pss:")?))
}

/// Why a process's cost could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    /// No such process, or the pid now belongs to another process (its start time differs).
    #[error("process {pid} is gone")]
    Gone {
        /// The pid.
        pid: u32,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// A file did not parse.
    #[error("cannot parse {path}")]
    Parse {
        /// The file.
        path: PathBuf,
    },
}

/// A `/proc` tree.
#[derive(Debug, Clone)]
pub struct ProcFs {
    root: PathBuf,
    ticks_per_second: f64,
}

impl Default for ProcFs {
    fn default() -> Self {
        ProcFs::new(PathBuf::from("/proc"))
    }
}

impl ProcFs {
    /// The tree under `root` (`/proc` on a host).
    pub fn new(root: PathBuf) -> ProcFs {
        // SAFETY: sysconf reads a constant of the system and has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        ProcFs {
            root,
            ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 },
        }
    }

    fn read(&self, path: PathBuf, pid: u32) -> Result<String, ProcError> {
        std::fs::read_to_string(&path).map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => ProcError::Gone { pid },
            // A process that exits while its files are read gives ESRCH.
            _ if source.raw_os_error() == Some(libc::ESRCH) => ProcError::Gone { pid },
            _ => ProcError::Read { path, source },
        })
    }

    /// The cost of process `pid`, which must have started at `start_time` (clock ticks since
    /// boot, as recorded when it was spawned; 0: not checked).
    pub fn usage(&self, pid: u32, start_time: u64) -> Result<ProcessUsage, ProcError> {
        let dir = self.root.join(pid.to_string());
        let stat_path = dir.join("stat");
        let stat = parse_stat(&self.read(stat_path.clone(), pid)?)
            .ok_or(ProcError::Parse { path: stat_path })?;
        if start_time != 0 && stat.start_time != start_time {
            return Err(ProcError::Gone { pid });
        }
        let rollup_path = dir.join("smaps_rollup");
        let (rss_bytes, pss_bytes) = parse_smaps_rollup(&self.read(rollup_path.clone(), pid)?)
            .ok_or(ProcError::Parse { path: rollup_path })?;
        let fd_dir = dir.join("fd");
        let open_fds = std::fs::read_dir(&fd_dir)
            .map_err(|source| ProcError::Read {
                path: fd_dir,
                source,
            })?
            .count() as u64;
        Ok(ProcessUsage {
            cpu_seconds: (stat.utime + stat.stime) as f64 / self.ticks_per_second,
            rss_bytes,
            pss_bytes,
            threads: stat.num_threads,
            open_fds,
        })
    }

    /// This process's CPU time, seconds (the monitor's own cost).
    pub fn own_cpu_seconds(&self) -> Option<f64> {
        let text = std::fs::read_to_string(self.root.join("self/stat")).ok()?;
        let stat = parse_stat(&text)?;
        Some((stat.utime + stat.stime) as f64 / self.ticks_per_second)
    }

    /// The root of the tree.
    pub fn root(&self) -> &Path {
        &self.root
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A QEMU stat line (the command name holds a space and a parenthesis): utime 250,
    /// stime 50, 7 threads, started at tick 123456.
    pub(crate) const STAT: &str = "4242 (qemu (x) 8) S 1 4242 4242 0 -1 4194560 9000 0 0 0 \
        250 50 0 0 20 0 7 0 123456 3000000000 40000 18446744073709551615 1 1 0 0 0 0 0 4096 \
        16386 0 0 0 17 1 0 0 0 0 0 0 0 0 0 0 0 0 0\n";

    pub(crate) const ROLLUP: &str = "\
55d0c0000000-7ffd4b9fe000 ---p 00000000 00:00 0                          [rollup]
Rss:              204800 kB
Pss:              102400 kB
Pss_Anon:          90000 kB
Shared_Clean:       1000 kB
";

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        let s = parse_stat(STAT).unwrap();
        assert_eq!(
            s,
            ProcStat {
                utime: 250,
                stime: 50,
                num_threads: 7,
                start_time: 123456
            }
        );
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn smaps_rollup_gives_rss_and_pss_in_bytes() {
        assert_eq!(
            parse_smaps_rollup(ROLLUP),
            Some((204_800 * 1024, 102_400 * 1024))
        );
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
    }

    #[test]
    fn usage_reads_a_fake_proc_tree_and_checks_the_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4242");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::write(p.join("stat"), STAT).unwrap();
        std::fs::write(p.join("smaps_rollup"), ROLLUP).unwrap();
        for fd in ["0", "1", "2"] {
            std::fs::write(p.join("fd").join(fd), "").unwrap();
        }
        let procfs = ProcFs::new(dir.path().to_path_buf());
        let u = procfs.usage(4242, 123456).unwrap();
        assert_eq!(u.cpu_seconds, 300.0 / procfs.ticks_per_second);
        assert_eq!((u.rss_bytes, u.pss_bytes), (204_800 * 1024, 102_400 * 1024));
        assert_eq!((u.threads, u.open_fds), (7, 3));
        // Another process with the same pid, or none at all, is gone.
        assert!(matches!(
            procfs.usage(4242, 99),
            Err(ProcError::Gone { pid: 4242 })
        ));
        assert!(matches!(
            procfs.usage(7, 0),
            Err(ProcError::Gone { pid: 7 })
        ));
        std::fs::write(p.join("smaps_rollup"), "nothing\n").unwrap();
        let err = procfs.usage(4242, 0).unwrap_err();
        assert!(err.to_string().contains("smaps_rollup"), "{err}");
    }

    #[test]
    fn this_process_is_read_from_the_real_proc() {
        let procfs = ProcFs::default();
        let me = procfs.usage(std::process::id(), 0).unwrap();
        assert!(me.threads >= 1 && me.open_fds >= 1 && me.rss_bytes > 0 && me.pss_bytes > 0);
        assert!(procfs.own_cpu_seconds().is_some());
    }
}
