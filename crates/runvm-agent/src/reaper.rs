//! The reaper: the agent is PID 1 (or a child subreaper when run on a host for tests), so every
//! orphan ends up as its child. It reaps them all on SIGCHLD and hands each exit status to
//! whoever watches that pid (WaitProcess, the helper runner).
//!
//! A process may exit before anyone watches its pid (a short `true`, or a helper that fails at
//! once): such statuses are kept, unclaimed, for a while. A watcher passes the instant before
//! the process could have been created, so a stale status of an earlier process with the same
//! pid is never taken for the new one's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::sync::watch;

/// How long an unclaimed exit status is kept.
const UNCLAIMED_TTL: Duration = Duration::from_secs(120);
/// Most unclaimed statuses kept (orphans nobody waits for are dropped first when full).
const UNCLAIMED_MAX: usize = 4096;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    /// As a shell reports it: the exit code, or 128+N for death by signal N.
    pub status: i32,
    /// Unix time of the reaping, nanoseconds.
    pub at_unix_ns: i64,
}

/// Receives `Some(exit)` once the watched process has been reaped.
pub type ExitWatch = watch::Receiver<Option<Exit>>;

/// The pid, and the status a shell would report, of a wait status that means an exit.
pub fn shell_status(status: WaitStatus) -> Option<(i32, i32)> {
    match status {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), code)),
        WaitStatus::Signaled(pid, signal, _core) => Some((pid.as_raw(), 128 + signal as i32)),
        _ => None,
    }
}

fn unix_now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Exit statuses by pid.
#[derive(Debug, Default)]
pub struct Reaper {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    watched: HashMap<i32, watch::Sender<Option<Exit>>>,
    unclaimed: HashMap<i32, (Exit, Instant)>,
}

impl Reaper {
    pub fn new() -> Arc<Reaper> {
        Arc::new(Reaper::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock leaves plain maps behind: still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Watches `pid`, a process created after `since`. If it was already reaped (after
    /// `since`), the watch holds its exit at once.
    pub fn watch(&self, pid: i32, since: Instant) -> ExitWatch {
        let mut inner = self.lock();
        if let Some((exit, reaped_at)) = inner.unclaimed.remove(&pid) {
            if reaped_at >= since {
                return watch::channel(Some(exit)).1;
            }
        }
        if let Some(tx) = inner.watched.get(&pid) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(None);
        inner.watched.insert(pid, tx);
        rx
    }

    /// Records the exit of `pid`: to its watchers, or kept unclaimed.
    pub fn deliver(&self, pid: i32, exit: Exit) {
        self.deliver_at(pid, exit, Instant::now());
    }

    fn deliver_at(&self, pid: i32, exit: Exit, now: Instant) {
        let mut inner = self.lock();
        if let Some(tx) = inner.watched.remove(&pid) {
            tx.send_replace(Some(exit));
            return;
        }
        inner
            .unclaimed
            .retain(|_, (_, at)| now.saturating_duration_since(*at) < UNCLAIMED_TTL);
        if inner.unclaimed.len() >= UNCLAIMED_MAX {
            if let Some(oldest) = inner
                .unclaimed
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(p, _)| *p)
            {
                inner.unclaimed.remove(&oldest);
            }
        }
        inner.unclaimed.insert(pid, (exit, now));
    }

    /// Reaps every child that has exited, without blocking.
    pub fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(status) => {
                    if let Some((pid, code)) = shell_status(status) {
                        tracing::debug!(pid, status = code, "reaped");
                        self.deliver(
                            pid,
                            Exit {
                                status: code,
                                at_unix_ns: unix_now_ns(),
                            },
                        );
                    }
                }
            }
        }
    }

    /// Reaps children on SIGCHLD (every second instead when SIGCHLD cannot be watched).
    pub async fn run(self: Arc<Self>) {
        let mut sigchld = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot watch SIGCHLD; reaping every second");
                None
            }
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Children that exited before SIGCHLD was watched.
        self.reap_all();
        loop {
            // SIGCHLD is never lost (a pending signal is kept, and each pass reaps every child
            // that exited), so no timer wakes an idle guest while it is watched.
            match sigchld.as_mut() {
                Some(s) => {
                    if s.recv().await.is_none() {
                        tracing::error!("SIGCHLD is no longer delivered; reaping every second");
                        sigchld = None;
                    }
                }
                None => {
                    tick.tick().await;
                }
            }
            self.reap_all();
        }
    }
}

/// Waits until the watched process has exited.
pub async fn wait(mut watch: ExitWatch) -> Option<Exit> {
    watch.wait_for(Option::is_some).await.ok().and_then(|v| *v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;

    fn exit(status: i32) -> Exit {
        Exit {
            status,
            at_unix_ns: 1,
        }
    }

    #[test]
    fn statuses_map_like_a_shell() {
        let p = Pid::from_raw(7);
        assert_eq!(shell_status(WaitStatus::Exited(p, 3)), Some((7, 3)));
        assert_eq!(
            shell_status(WaitStatus::Signaled(p, Signal::SIGTERM, false)),
            Some((7, 143))
        );
        assert_eq!(
            shell_status(WaitStatus::Signaled(p, Signal::SIGKILL, true)),
            Some((7, 137))
        );
        assert_eq!(shell_status(WaitStatus::StillAlive), None);
        assert_eq!(shell_status(WaitStatus::Continued(p)), None);
    }

    #[tokio::test]
    async fn watcher_registered_first_gets_the_exit() {
        let r = Reaper::new();
        let w = r.watch(10, Instant::now());
        let w2 = r.watch(10, Instant::now());
        assert_eq!(*w.borrow(), None);
        r.deliver(10, exit(3));
        assert_eq!(wait(w).await, Some(exit(3)));
        assert_eq!(wait(w2).await, Some(exit(3)));
        assert!(r.lock().watched.is_empty() && r.lock().unclaimed.is_empty());
    }

    #[tokio::test]
    async fn exit_before_registration_is_kept_for_the_watcher() {
        let r = Reaper::new();
        let spawned = Instant::now();
        r.deliver(11, exit(0));
        let w = r.watch(11, spawned);
        assert_eq!(wait(w).await, Some(exit(0)));
        assert!(r.lock().unclaimed.is_empty());
    }

    #[tokio::test]
    async fn stale_status_of_a_reused_pid_is_ignored() {
        let r = Reaper::new();
        r.deliver(12, exit(9));
        let spawned_later = Instant::now() + Duration::from_millis(1);
        let w = r.watch(12, spawned_later);
        assert_eq!(*w.borrow(), None, "old status must not be claimed");
        r.deliver(12, exit(1));
        assert_eq!(wait(w).await, Some(exit(1)));
    }

    #[test]
    fn unclaimed_statuses_expire_and_are_bounded() {
        let r = Reaper::new();
        let t0 = Instant::now();
        r.deliver_at(1, exit(0), t0);
        r.deliver_at(2, exit(0), t0 + UNCLAIMED_TTL + Duration::from_secs(1));
        assert!(!r.lock().unclaimed.contains_key(&1));
        for pid in 100..(100 + UNCLAIMED_MAX as i32 + 10) {
            r.deliver_at(pid, exit(0), t0 + UNCLAIMED_TTL + Duration::from_secs(2));
        }
        assert!(r.lock().unclaimed.len() <= UNCLAIMED_MAX);
    }

    // The reaper waits for the child, not `Child::wait`.
    #[allow(clippy::zombie_processes)]
    #[tokio::test]
    async fn real_children_are_reaped_with_their_status() {
        let r = Reaper::new();
        let since = Instant::now();
        let child = std::process::Command::new("sh")
            .args(["-c", "exit 7"])
            .spawn()
            .unwrap();
        let w = r.watch(child.id() as i32, since);
        let deadline = Instant::now() + Duration::from_secs(10);
        while w.borrow().is_none() {
            assert!(Instant::now() < deadline, "child never reaped");
            r.reap_all();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(wait(w).await.map(|e| e.status), Some(7));
    }
}
