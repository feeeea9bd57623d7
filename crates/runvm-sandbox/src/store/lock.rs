//! Per-sandbox locks between processes: `flock(2)` on `ROOT/ID/lock`, shared for readers and
//! exclusive for writers.
//!
//! flock locks belong to an open file description, so two handles in one process exclude each
//! other just as two processes do. A lock is released when its [`SandboxLock`] is dropped (or
//! the process dies). After a wait the lock file is checked to still be the one at
//! `ROOT/ID/lock`: if the sandbox was removed (or removed and made again) meanwhile, the lock
//! taken is on a dead file and is not handed out.

use std::fmt;
use std::fs::{File, TryLockError};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::StoreError;
use crate::id::SandboxId;

/// Shared (read) or exclusive (read-write).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders; excludes exclusive holders.
    Shared,
    /// One holder; excludes everyone else.
    Exclusive,
}

impl fmt::Display for LockMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LockMode::Shared => "shared",
            LockMode::Exclusive => "exclusive",
        })
    }
}

/// How long to wait for a lock.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Wait {
    /// Until it is free.
    Forever,
    /// Not at all.
    No,
    /// Up to this long.
    Timeout(Duration),
}

/// A held lock on one sandbox; released on drop.
#[derive(Debug)]
pub struct SandboxLock {
    file: File,
    id: SandboxId,
    path: PathBuf,
    mode: LockMode,
}

/// The locked file: a child process that inherits it holds the lock too (`flock` locks
/// belong to the open file, not the process), until every copy is closed.
impl std::os::fd::AsFd for SandboxLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl SandboxLock {
    /// The sandbox locked.
    pub fn id(&self) -> &SandboxId {
        &self.id
    }

    /// Shared or exclusive.
    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wraps a file this process already locked in `mode`.
    pub(crate) fn held(file: File, id: SandboxId, path: PathBuf, mode: LockMode) -> SandboxLock {
        SandboxLock {
            file,
            id,
            path,
            mode,
        }
    }

    /// Takes the lock of sandbox `id` at `path` (`root` is for messages).
    pub(crate) fn acquire(
        id: &SandboxId,
        root: &Path,
        path: PathBuf,
        mode: LockMode,
        wait: Wait,
    ) -> Result<SandboxLock, StoreError> {
        let deadline = match wait {
            Wait::Timeout(t) => Some((Instant::now() + t, t)),
            Wait::No => Some((Instant::now(), Duration::ZERO)),
            Wait::Forever => None,
        };
        let not_found = || StoreError::SandboxNotFound {
            id: id.clone(),
            root: root.to_path_buf(),
        };
        let io = |action| {
            let path = path.clone();
            move |source| StoreError::Io {
                action,
                path,
                source,
            }
        };
        loop {
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
                Err(e) => return Err(io("open lock file")(e)),
            };
            match deadline {
                None => lock_blocking(&file, mode).map_err(io("lock"))?,
                Some((deadline, timeout)) => {
                    if !lock_polling(&file, mode, deadline).map_err(io("lock"))? {
                        let (id, path) = (id.clone(), path.clone());
                        return Err(match wait {
                            Wait::No => StoreError::LockBusy { id, path, mode },
                            _ => StoreError::LockTimeout {
                                id,
                                path,
                                mode,
                                timeout,
                            },
                        });
                    }
                }
            }
            // The file locked must still be the sandbox's lock file.
            let held = file.metadata().map_err(io("inspect lock file"))?;
            match std::fs::metadata(&path) {
                Ok(now) if (now.dev(), now.ino()) == (held.dev(), held.ino()) => {
                    return Ok(SandboxLock::held(file, id.clone(), path, mode));
                }
                // Replaced while we waited: the sandbox was removed and made again. Retry.
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(not_found()),
                Err(e) => return Err(io("inspect lock file")(e)),
            }
        }
    }
}

impl Drop for SandboxLock {
    fn drop(&mut self) {
        // Closing the file releases the lock too; unlocking first releases it even if a forked
        // child still shares the open file.
        if let Err(e) = self.file.unlock() {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot unlock sandbox lock");
        }
    }
}

/// Takes a lock on `file`, waiting as long as needed.
pub(crate) fn lock_blocking(file: &File, mode: LockMode) -> io::Result<()> {
    loop {
        let result = match mode {
            LockMode::Shared => file.lock_shared(),
            LockMode::Exclusive => file.lock(),
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Tries to take a lock on `file` once; `false` if another holder has it.
pub(crate) fn try_lock(file: &File, mode: LockMode) -> io::Result<bool> {
    let result = match mode {
        LockMode::Shared => file.try_lock_shared(),
        LockMode::Exclusive => file.try_lock(),
    };
    match result {
        Ok(()) => Ok(true),
        Err(TryLockError::WouldBlock) => Ok(false),
        Err(TryLockError::Error(e)) => Err(e),
    }
}

/// Tries until `deadline` (at least once); `false` if it passed without the lock.
fn lock_polling(file: &File, mode: LockMode, deadline: Instant) -> io::Result<bool> {
    let mut pause = Duration::from_millis(2);
    loop {
        if try_lock(file, mode)? {
            return Ok(true);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        std::thread::sleep(pause.min(left));
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}
