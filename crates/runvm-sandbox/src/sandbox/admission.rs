//! Admission and boot deadlines that hold under load.
//!
//! - At most `runtime.max_parallel_boots` VMs boot at once on the host (the CPUs are the
//!   host's, whichever state root or front end starts them): a boot holds one of that many
//!   slots ([`BOOT_SLOTS_DIR`]`/N`, each an `flock`ed file, so a creator that dies frees its
//!   slot) from QEMU's start until the agent answers; the others wait their turn instead of all
//!   crawling past their deadlines together.
//! - The agent's boot deadline counts the work the VM got to do, not only the wall clock: it
//!   expires once `boot_timeout` has passed *and* QEMU has had half of it in CPU time, or after
//!   [`HARD_LIMIT_FACTOR`] × `boot_timeout` whatever happened. A guest starved by a busy host
//!   is given the time it did not get; a guest that spins or hangs still fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::SandboxError;

/// The host-wide folder of boot-slot lock files.
pub const BOOT_SLOTS_DIR: &str = "/run/lock/runvm-boot-slots";

/// The boot deadline is never stretched past this many boot timeouts.
pub const HARD_LIMIT_FACTOR: u32 = 4;
/// How often a queued boot looks for a free slot.
const POLL: Duration = Duration::from_millis(50);

/// One boot slot, held until dropped.
#[derive(Debug)]
pub struct BootSlot {
    _file: File,
    /// Which slot.
    pub index: u32,
    /// How long the boot waited for it.
    pub waited: Duration,
}

fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock(2) on a descriptor we own; no memory involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(e)
    }
}

/// Takes one of `slots` boot slots in folder `dir` ([`BOOT_SLOTS_DIR`] outside tests),
/// waiting (without a deadline: every holder finishes or fails within its own bounded boot)
/// while all are taken.
pub async fn acquire(dir: &Path, slots: u32) -> Result<BootSlot, SandboxError> {
    let io = |action: &'static str, path: PathBuf| {
        move |source| SandboxError::Io {
            action,
            path,
            source,
        }
    };
    {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create the boot slots folder", dir.to_path_buf()))?;
    }
    let slots = slots.max(1);
    let started = Instant::now();
    let mut told = false;
    loop {
        for index in 0..slots {
            let path = dir.join(index.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .map_err(io("open boot slot", path.clone()))?;
            if try_lock(&file).map_err(io("lock boot slot", path.clone()))? {
                let waited = started.elapsed();
                if told {
                    tracing::info!(
                        slot = index,
                        waited_ms = waited.as_millis() as u64,
                        "boot slot free"
                    );
                }
                return Ok(BootSlot {
                    _file: file,
                    index,
                    waited,
                });
            }
        }
        if !told {
            tracing::info!(slots, "every boot slot is taken; waiting for one");
            told = true;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A boot deadline that stretches while a busy host starves the VM (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct BootDeadline {
    started: Instant,
    cpu_at_start: Option<Duration>,
    timeout: Duration,
}

impl BootDeadline {
    /// A deadline of `timeout` from now; `cpu_now` is the VM's CPU time now, if known.
    pub fn new(timeout: Duration, cpu_now: Option<Duration>) -> BootDeadline {
        BootDeadline {
            started: Instant::now(),
            cpu_at_start: cpu_now,
            timeout,
        }
    }

    /// Whether the deadline has passed, given the VM's CPU time now (`None`: unknown, the
    /// wall clock alone decides).
    pub fn expired(&self, cpu_now: Option<Duration>) -> bool {
        let wall = self.started.elapsed();
        self.expired_at(wall, cpu_now)
    }

    fn expired_at(&self, wall: Duration, cpu_now: Option<Duration>) -> bool {
        if wall < self.timeout {
            return false;
        }
        if wall >= self.timeout * HARD_LIMIT_FACTOR {
            return true;
        }
        match (self.cpu_at_start, cpu_now) {
            (Some(start), Some(now)) => now.saturating_sub(start) >= self.timeout / 2,
            _ => true,
        }
    }

    /// The longest a single attempt should wait now: what is left of the wall-clock budget,
    /// at least a little while the deadline stretches.
    pub fn left(&self) -> Duration {
        let wall = self.started.elapsed();
        let hard = self.timeout * HARD_LIMIT_FACTOR;
        if wall < self.timeout {
            self.timeout - wall
        } else {
            hard.saturating_sub(wall).min(Duration::from_secs(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_starved_vm_gets_more_time_a_busy_one_does_not() {
        let t = Duration::from_secs(30);
        let d = BootDeadline::new(t, Some(Duration::from_secs(1)));
        // Before the timeout: never expired.
        assert!(!d.expired_at(Duration::from_secs(29), Some(Duration::from_secs(100))));
        // After it, with the VM having had half the timeout in CPU: expired.
        assert!(d.expired_at(t, Some(Duration::from_secs(16))));
        // After it, starved (little CPU): stretched...
        assert!(!d.expired_at(t * 2, Some(Duration::from_secs(5))));
        // ...but never past the hard limit.
        assert!(d.expired_at(t * HARD_LIMIT_FACTOR, Some(Duration::from_secs(5))));
        // Unknown CPU time: the wall clock alone.
        let d = BootDeadline::new(t, None);
        assert!(d.expired_at(t, None));
        assert!(!d.expired_at(t - Duration::from_millis(1), None));
    }

    #[tokio::test]
    async fn boots_beyond_the_slots_wait_for_one_to_be_freed() {
        let dir = tempfile::tempdir().unwrap();
        let a = acquire(dir.path(), 2).await.unwrap();
        let b = acquire(dir.path(), 2).await.unwrap();
        assert_ne!(a.index, b.index);
        let root = dir.path().to_path_buf();
        let third = tokio::spawn(async move { acquire(&root, 2).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!third.is_finished(), "a third boot must wait");
        let freed = a.index;
        drop(a);
        let c = tokio::time::timeout(Duration::from_secs(5), third)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.index, freed);
        assert!(c.waited >= Duration::from_millis(250));
        drop(b);
    }
}
