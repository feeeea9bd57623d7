//! What a host process costs, from `/proc`: CPU time and thread count (`stat`), resident set
//! size (`statm`), open file descriptors (the entries of `fd/`), all cheap; and the
//! proportional set size (`smaps_rollup`), for which the kernel walks the process's page
//! tables: about 2 ms for an idle QEMU with 140 MiB resident, most of a scrape's cost, so the
//! collector caches it ([`PssCache`]). The root is a parameter so that tests read a fake tree.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use std::io;
use std::path::{Path, PathBuf};

/// The cost of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessUsage {
    /// User and system CPU time, seconds.
    pub cpu_seconds: f64,
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// Proportional set size (shared pages divided among their users), bytes, as of its last
    /// reading (see [`PssCache`]); `None` when it could not be read.
    pub pss_bytes: Option<u64>,
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

/// Pss in bytes from a `/proc/PID/smaps_rollup` text.
pub fn parse_smaps_rollup(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib.saturating_mul(1024))
}

/// Resident pages (the second field) of a `/proc/PID/statm` text.
pub fn parse_statm(text: &str) -> Option<u64> {
    text.split_whitespace().nth(1)?.parse().ok()
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
    page_size: u64,
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
        // SAFETY: as above.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        ProcFs {
            root,
            ticks_per_second: if ticks > 0 { ticks as f64 } else { 100.0 },
            page_size: u64::try_from(page).ok().filter(|p| *p > 0).unwrap_or(4096),
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

    /// The cheap part of the cost of process `pid` (all but PSS), which must have started at
    /// `start_time` (clock ticks since boot, as recorded when it was spawned; 0: not checked).
    pub fn usage(&self, pid: u32, start_time: u64) -> Result<ProcessUsage, ProcError> {
        let dir = self.root.join(pid.to_string());
        let stat_path = dir.join("stat");
        let stat = parse_stat(&self.read(stat_path.clone(), pid)?)
            .ok_or(ProcError::Parse { path: stat_path })?;
        if start_time != 0 && stat.start_time != start_time {
            return Err(ProcError::Gone { pid });
        }
        let statm_path = dir.join("statm");
        let resident = parse_statm(&self.read(statm_path.clone(), pid)?)
            .ok_or(ProcError::Parse { path: statm_path })?;
        let fd_dir = dir.join("fd");
        let open_fds = std::fs::read_dir(&fd_dir)
            .map_err(|source| ProcError::Read {
                path: fd_dir,
                source,
            })?
            .count() as u64;
        Ok(ProcessUsage {
            cpu_seconds: (stat.utime + stat.stime) as f64 / self.ticks_per_second,
            rss_bytes: resident.saturating_mul(self.page_size),
            pss_bytes: None,
            threads: stat.num_threads,
            open_fds,
        })
    }

    /// The PSS of process `pid`, bytes (the kernel walks its page tables).
    pub fn pss(&self, pid: u32) -> Result<u64, ProcError> {
        let path = self.root.join(pid.to_string()).join("smaps_rollup");
        parse_smaps_rollup(&self.read(path.clone(), pid)?).ok_or(ProcError::Parse { path })
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

/// PSS readings kept for up to a maximum age, by process (pid and start time). A process seen
/// for the first time is read at once; its later readings are spread over the age (each
/// process's due time is shifted by a share of the age drawn from its pid), so a scrape of many
/// sandboxes reads only some of them.
#[derive(Debug)]
pub struct PssCache {
    max_age: Duration,
    readings: HashMap<(u32, u64), (u64, Instant)>,
}

impl PssCache {
    /// Readings are reused for up to `max_age` (zero: every call reads).
    pub fn new(max_age: Duration) -> PssCache {
        PssCache {
            max_age,
            readings: HashMap::new(),
        }
    }

    /// The PSS of process `pid` started at `start_time`: read through `procfs` when the kept
    /// reading is older than the maximum age, else the kept one.
    pub fn get(&mut self, procfs: &ProcFs, pid: u32, start_time: u64) -> Result<u64, ProcError> {
        let now = Instant::now();
        let key = (pid, start_time);
        if let Some((pss, due)) = self.readings.get(&key) {
            if now < *due {
                return Ok(*pss);
            }
        }
        let pss = procfs.pss(pid)?;
        let due = if self.readings.contains_key(&key) || self.max_age.is_zero() {
            now + self.max_age
        } else {
            // First reading: the next one is due after a share of the age, so that processes
            // first seen together are read again at different scrapes.
            let share = u64::from(pid) % 64;
            now + self.max_age.mul_f64((share + 1) as f64 / 64.0)
        };
        self.readings.insert(key, (pss, due));
        Ok(pss)
    }

    /// Forgets the processes not in `live`.
    pub fn retain(&mut self, live: &std::collections::HashSet<(u32, u64)>) {
        self.readings.retain(|key, _| live.contains(key));
    }

    /// Readings kept.
    pub fn len(&self) -> usize {
        self.readings.len()
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.readings.is_empty()
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
    fn smaps_rollup_gives_pss_and_statm_resident_pages() {
        assert_eq!(parse_smaps_rollup(ROLLUP), Some(102_400 * 1024));
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        assert_eq!(parse_statm("1000 250 30 1 0 500 0\n"), Some(250));
        assert_eq!(parse_statm("1000"), None);
    }

    #[test]
    fn usage_reads_a_fake_proc_tree_and_checks_the_start_time() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4242");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        std::fs::write(p.join("stat"), STAT).unwrap();
        std::fs::write(p.join("smaps_rollup"), ROLLUP).unwrap();
        std::fs::write(p.join("statm"), "1000 250 30 1 0 500 0\n").unwrap();
        for fd in ["0", "1", "2"] {
            std::fs::write(p.join("fd").join(fd), "").unwrap();
        }
        let procfs = ProcFs::new(dir.path().to_path_buf());
        let u = procfs.usage(4242, 123456).unwrap();
        assert_eq!(u.cpu_seconds, 300.0 / procfs.ticks_per_second);
        assert_eq!(u.rss_bytes, 250 * procfs.page_size);
        assert_eq!(u.pss_bytes, None);
        assert_eq!((u.threads, u.open_fds), (7, 3));
        assert_eq!(procfs.pss(4242).unwrap(), 102_400 * 1024);
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
        let err = procfs.pss(4242).unwrap_err();
        assert!(err.to_string().contains("smaps_rollup"), "{err}");
        std::fs::write(p.join("statm"), "x").unwrap();
        let err = procfs.usage(4242, 0).unwrap_err();
        assert!(err.to_string().contains("statm"), "{err}");
    }

    #[test]
    fn pss_readings_are_kept_for_their_age_and_spread_after_the_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("4242");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("smaps_rollup"), "Pss: 1 kB\n").unwrap();
        let procfs = ProcFs::new(dir.path().to_path_buf());
        let mut cache = PssCache::new(Duration::from_secs(3600));
        assert_eq!(cache.get(&procfs, 4242, 9).unwrap(), 1024);
        std::fs::write(p.join("smaps_rollup"), "Pss: 2 kB\n").unwrap();
        // Kept: the first reading's next one is due after 4242 % 64 + 1 = 19/64 of an hour.
        assert_eq!(cache.get(&procfs, 4242, 9).unwrap(), 1024);
        let due = cache.readings[&(4242, 9)].1;
        let after = due.saturating_duration_since(Instant::now());
        assert!(
            after <= Duration::from_secs_f64(3600.0 * 19.0 / 64.0)
                && after > Duration::from_secs(1000)
        );
        // Another process (same pid, another start) is read afresh; a zero age always reads.
        assert_eq!(cache.get(&procfs, 4242, 10).unwrap(), 2048);
        cache.retain(&[(4242, 10)].into_iter().collect());
        assert_eq!(cache.len(), 1);
        let mut always = PssCache::new(Duration::ZERO);
        assert_eq!(always.get(&procfs, 4242, 9).unwrap(), 2048);
        std::fs::write(p.join("smaps_rollup"), "Pss: 3 kB\n").unwrap();
        assert_eq!(always.get(&procfs, 4242, 9).unwrap(), 3072);
    }

    #[test]
    fn this_process_is_read_from_the_real_proc() {
        let procfs = ProcFs::default();
        let me = procfs.usage(std::process::id(), 0).unwrap();
        assert!(me.threads >= 1 && me.open_fds >= 1 && me.rss_bytes > 0);
        assert!(procfs.pss(std::process::id()).unwrap() > 0);
        assert!(procfs.own_cpu_seconds().is_some());
    }
}
