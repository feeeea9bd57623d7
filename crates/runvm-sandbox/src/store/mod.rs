//! The on-disk store of sandbox and container records, with per-sandbox locks between
//! processes.
//!
//! # Layout
//! ```text
//! ROOT/                                   0700 (runtime.root, default /run/runvm)
//!   ID/                                   0700, one per sandbox
//!     lock                                0600, flock: shared to read, exclusive to write
//!     sandbox.json                        0600, a SandboxRecord
//!     containers/CID/container.json       0600, a ContainerRecord
//!     vm/  shared/                        the VM's run folder and the virtio-fs share:
//!                                         made by others, removed only with the sandbox
//! ```
//!
//! # Guarantees
//! - **No torn files.** A record is written to a temp file beside it, synced, renamed over the
//!   old one, and the folder is synced. A crash at any point leaves the old or the new record in
//!   full. Temp files left by a crash are ignored by readers and removed by the next write or by
//!   [`Store::open`].
//! - **No half-made sandboxes or containers.** A new folder is built under a staging name
//!   (`.creating~…`, never a valid id) and renamed into place with `RENAME_NOREPLACE`, so it
//!   appears complete or not at all, and an existing one is never overwritten. Removal renames
//!   the folder away (`.removing~…`) before deleting it, so it disappears at once.
//! - **Writers hold the exclusive lock.** Every write takes the [`SandboxLock`] as a proof and
//!   refuses a shared lock or another sandbox's. Reads need no lock to see whole files; hold a
//!   shared lock to see the sandbox and its containers at one point in time.
//! - **Removal never reaches through a mount.** A folder with anything mounted under it (a
//!   container's rootfs bind mount in `shared/`) is not removed: [`StoreError::MountsRemain`].
//!
//! Lock calls block the calling thread (`lock_*`) or poll it (`*_timeout`); from async code,
//! call them in `spawn_blocking` or use `try_lock_*`.
//!
//! ```
//! use runvm_sandbox::store::Store;
//! use runvm_sandbox::SandboxId;
//! # let dir = tempfile::tempdir().unwrap();
//! let store = Store::open(dir.path().join("state")).unwrap();
//! let id = SandboxId::parse("pod-1").unwrap();
//! assert!(store.load_sandbox(&id).unwrap_err().is_not_found());
//! assert!(store.list_sandboxes().unwrap().is_empty());
//! ```

mod containers;
mod error;
mod fsio;
mod lock;

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use error::StoreError;
/// Decodes a field of `/proc/PID/mountinfo` (its `\NNN` escapes).
pub(crate) use fsio::unescape_octal as unescape_mountinfo_field;
pub use lock::{LockMode, SandboxLock};

use sha2::Digest;

use crate::id::{ContainerId, SandboxId};
use crate::state::{SandboxRecord, RECORD_VERSION};
use fsio::{FaultPoint, CREATING, REMOVING};
use lock::Wait;

/// The sandbox record's file in the sandbox folder.
pub const SANDBOX_FILE: &str = "sandbox.json";
/// The lock file in the sandbox folder.
pub const LOCK_FILE: &str = "lock";
/// The file a process holds locked while it tears the sandbox down behind an answer it gave
/// already (see [`Store::hold_teardown`]).
pub const TEARDOWN_FILE: &str = "teardown";
/// The folder of container folders in the sandbox folder.
pub const CONTAINERS_DIR: &str = "containers";
/// The container record's file in the container folder.
pub const CONTAINER_FILE: &str = "container.json";
/// The prefix of a VM run folder kept outside its sandbox folder (see [`vm_run_dir`]). `~` is
/// not allowed in ids, so such a folder is never taken for a sandbox.
pub const VM_DIR_PREFIX: &str = ".vm~";
/// The prefix of the folder of a factory VM (`ROOT/.vmhome~ID`: its run folder `vm/` and its
/// shared folder `shared/`), which the sandbox adopting the VM keeps (see [`crate::factory`]).
pub const VM_HOME_PREFIX: &str = ".vmhome~";
/// The longest file name runvm or its helpers create as a unix socket in a VM run folder
/// (`vsock.hv_1025`, with room for any vsock port).
const LONGEST_SOCKET_NAME: usize = "vsock.hv_4294967295".len();
/// The longest path a unix socket can have (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The VM run folder (QEMU's and the helpers' sockets and logs) of sandbox `id` under `root`:
/// `ROOT/ID/vm`, unless that makes a socket path longer than unix sockets allow (long ids, as
/// CRI's 64-character ones under a deep root); then `ROOT/.vm~HASH`, HASH being the first 16
/// hex digits of the id's SHA-256. The folder chosen is recorded in the sandbox's state.
pub fn vm_run_dir(root: &Path, id: &SandboxId) -> PathBuf {
    let inside = root.join(id.as_str()).join("vm");
    if inside.as_os_str().len() + 1 + LONGEST_SOCKET_NAME <= MAX_SOCKET_PATH {
        return inside;
    }
    let digest = sha2::Sha256::digest(id.as_str().as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    root.join(format!("{VM_DIR_PREFIX}{hash}"))
}

/// Refuses a state root that others than root (or the user runvm runs as) could change: not a
/// folder (a symbolic link is refused too), owned by another user, or writable by group or
/// others. A root that does not exist yet is fine: runvm makes it 0700.
pub fn check_root(root: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::MetadataExt;
    let meta = match fs::symlink_metadata(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("inspect the state root", root)(e)),
    };
    let unsafe_root = |problem: String| StoreError::UnsafeRoot {
        path: root.to_path_buf(),
        problem,
    };
    if meta.file_type().is_symlink() {
        return Err(unsafe_root("is a symbolic link".into()));
    }
    if !meta.is_dir() {
        return Err(unsafe_root("is not a folder".into()));
    }
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me && meta.uid() != 0 {
        return Err(unsafe_root(format!(
            "is owned by uid {} (runvm runs as uid {me})",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(unsafe_root(format!(
            "is writable by {} (mode {mode:04o})",
            if mode & 0o002 != 0 {
                "others"
            } else {
                "its group"
            }
        )));
    }
    Ok(())
}

/// A staging folder that never got its lock file is taken as abandoned after this long.
const STALE_STAGING: Duration = Duration::from_secs(60);

/// The store under one root folder. Cheap to clone; holds no open files.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Where writes stop as if the process died: set by tests only.
    crash_at: Option<FaultPoint>,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

impl Store {
    /// A store under `root`. Touches nothing on disk: the root is made with the first sandbox.
    pub fn new(root: PathBuf) -> Store {
        Store {
            root,
            crash_at: None,
        }
    }

    /// A store under `root`, made (0700) if missing, with what crashed writers left removed:
    /// temp files, half-built and half-removed folders. Sandboxes locked by another process are
    /// left alone.
    pub fn open(root: PathBuf) -> Result<Store, StoreError> {
        fsio::create_private_dir_all(&root).map_err(io_error("create the state root", &root))?;
        check_root(&root)?;
        let store = Store::new(root);
        store.clean_leftovers()?;
        Ok(store)
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of sandbox `id`.
    pub fn sandbox_dir(&self, id: &SandboxId) -> PathBuf {
        self.root.join(id.as_str())
    }

    /// The lock file of sandbox `id`.
    pub fn lock_path(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(LOCK_FILE)
    }

    /// The teardown file of sandbox `id` (see [`Store::hold_teardown`]).
    fn teardown_path(&self, id: &SandboxId) -> PathBuf {
        self.sandbox_dir(id).join(TEARDOWN_FILE)
    }

    /// Marks sandbox `id` as being torn down by this process until the returned lock is
    /// dropped: [`Store::wait_teardown`] in another process waits for it. The sandbox's record
    /// stays meanwhile, so a crash in between leaves it for `delete --force` to find.
    pub fn hold_teardown(&self, id: &SandboxId) -> Result<SandboxLock, StoreError> {
        let path = self.teardown_path(id);
        match fsio::create_private_file(&path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::SandboxNotFound {
                    id: id.clone(),
                    root: self.root.clone(),
                })
            }
            Err(source) => {
                return Err(StoreError::Io {
                    action: "create the teardown file",
                    path,
                    source,
                })
            }
        }
        SandboxLock::acquire(id, &self.root, path, LockMode::Exclusive, Wait::No)
    }

    /// Waits up to `timeout` for a teardown of sandbox `id` by another process
    /// ([`Store::hold_teardown`]) to end; at once when none runs or the sandbox is gone.
    pub fn wait_teardown(&self, id: &SandboxId, timeout: Duration) -> Result<(), StoreError> {
        // No teardown file (none ever ran) or no sandbox: SandboxNotFound, nothing to wait for.
        let path = self.teardown_path(id);
        match SandboxLock::acquire(
            id,
            &self.root,
            path,
            LockMode::Shared,
            Wait::Timeout(timeout),
        ) {
            Ok(_) | Err(StoreError::SandboxNotFound { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Whether another live process tears sandbox `id` down now ([`Store::hold_teardown`]).
    pub fn teardown_in_progress(&self, id: &SandboxId) -> bool {
        // No teardown file or no sandbox is SandboxNotFound: none in progress.
        let path = self.teardown_path(id);
        matches!(
            SandboxLock::acquire(id, &self.root, path, LockMode::Shared, Wait::No),
            Err(StoreError::LockBusy { .. })
        )
    }

    /// The folder of container `id` of sandbox `sandbox`.
    pub fn container_dir(&self, sandbox: &SandboxId, id: &ContainerId) -> PathBuf {
        self.sandbox_dir(sandbox)
            .join(CONTAINERS_DIR)
            .join(id.as_str())
    }

    // ---- locks ----

    /// Takes sandbox `id`'s lock shared, waiting as long as an exclusive holder keeps it.
    pub fn lock_shared(&self, id: &SandboxId) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Shared, Wait::Forever)
    }

    /// Takes sandbox `id`'s lock exclusive, waiting as long as any holder keeps it.
    pub fn lock_exclusive(&self, id: &SandboxId) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Exclusive, Wait::Forever)
    }

    /// Takes sandbox `id`'s lock shared if it is free now, else [`StoreError::LockBusy`].
    pub fn try_lock_shared(&self, id: &SandboxId) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Shared, Wait::No)
    }

    /// Takes sandbox `id`'s lock exclusive if it is free now, else [`StoreError::LockBusy`].
    pub fn try_lock_exclusive(&self, id: &SandboxId) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Exclusive, Wait::No)
    }

    /// Takes sandbox `id`'s lock shared, waiting up to `timeout`, else
    /// [`StoreError::LockTimeout`].
    pub fn lock_shared_timeout(
        &self,
        id: &SandboxId,
        timeout: Duration,
    ) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Shared, Wait::Timeout(timeout))
    }

    /// Takes sandbox `id`'s lock exclusive, waiting up to `timeout`, else
    /// [`StoreError::LockTimeout`].
    pub fn lock_exclusive_timeout(
        &self,
        id: &SandboxId,
        timeout: Duration,
    ) -> Result<SandboxLock, StoreError> {
        self.lock(id, LockMode::Exclusive, Wait::Timeout(timeout))
    }

    fn lock(&self, id: &SandboxId, mode: LockMode, wait: Wait) -> Result<SandboxLock, StoreError> {
        SandboxLock::acquire(id, &self.root, self.lock_path(id), mode, wait)
    }

    /// Refuses unless `lock` is the exclusive lock of sandbox `id` in this store.
    fn check_lock(
        &self,
        lock: &SandboxLock,
        id: &SandboxId,
        operation: &'static str,
    ) -> Result<(), StoreError> {
        let path = self.lock_path(id);
        let problem = if lock.id() != id {
            format!("the lock given is sandbox {}'s", lock.id())
        } else if lock.path() != path {
            format!("the lock given is {}", lock.path().display())
        } else if lock.mode() != LockMode::Exclusive {
            "the lock given is shared".to_string()
        } else {
            return Ok(());
        };
        Err(StoreError::LockNotHeld {
            operation,
            id: id.clone(),
            path,
            problem,
        })
    }

    // ---- sandboxes ----

    /// Makes sandbox `record.id`: its folder with the lock file, the record and an empty
    /// `containers/`, all at once. Refuses with [`StoreError::SandboxExists`] if the folder
    /// exists, whatever is in it; nothing is overwritten. Returns the sandbox's exclusive lock,
    /// held from before the folder appeared, so no other process sees the sandbox before the
    /// caller lets it go.
    pub fn create_sandbox(&self, record: &SandboxRecord) -> Result<SandboxLock, StoreError> {
        let id = &record.id;
        let dir = self.sandbox_dir(id);
        let exists = || StoreError::SandboxExists {
            id: id.clone(),
            path: dir.clone(),
        };
        if fs::symlink_metadata(&dir).is_ok() {
            return Err(exists());
        }
        fsio::create_private_dir_all(&self.root)
            .map_err(io_error("create the state root", &self.root))?;
        let staging = fsio::create_unique_dir(&self.root, &format!("{CREATING}{id}~"))
            .map_err(io_error("create a staging folder in", &self.root))?;
        let lock_file = match self.stage_sandbox(&staging, record) {
            Ok(file) => file,
            Err(e) => {
                self.discard_staging(&staging);
                return Err(e);
            }
        };
        match fsio::publish_dir(&staging, &dir) {
            Ok(()) => {}
            Err(e) => {
                self.discard_staging(&staging);
                return Err(match e.kind() {
                    io::ErrorKind::AlreadyExists => exists(),
                    _ => io_error("publish the sandbox folder", &dir)(e),
                });
            }
        }
        fsio::sync_dir(&self.root).map_err(io_error("sync", &self.root))?;
        tracing::debug!(sandbox = %id, dir = %dir.display(), "sandbox state created");
        Ok(SandboxLock::held(
            lock_file,
            id.clone(),
            self.lock_path(id),
            LockMode::Exclusive,
        ))
    }

    /// Fills a staging folder; returns its lock file, locked exclusive.
    fn stage_sandbox(&self, staging: &Path, record: &SandboxRecord) -> Result<File, StoreError> {
        // The lock file is made and locked under a temporary name, then renamed into place: a
        // lock file in a staging folder is therefore always held while its creator lives, and
        // `Store::open` in another process never takes a free lock for an abandoned creation.
        let lock_path = staging.join(LOCK_FILE);
        let unlocked = staging.join(format!("{LOCK_FILE}.new"));
        let lock_file = fsio::create_private_file(&unlocked)
            .map_err(io_error("create lock file", &unlocked))?;
        lock::lock_blocking(&lock_file, LockMode::Exclusive)
            .map_err(io_error("lock", &unlocked))?;
        fs::rename(&unlocked, &lock_path).map_err(io_error("rename into place", &lock_path))?;
        let containers = staging.join(CONTAINERS_DIR);
        fsio::create_private_dir(&containers).map_err(io_error("create", &containers))?;
        self.write_record(&staging.join(SANDBOX_FILE), record)?;
        fsio::sync_dir(staging).map_err(io_error("sync", staging))?;
        fsio::crash_here(self.crash_at, FaultPoint::Staged)
            .map_err(io_error("publish", staging))?;
        Ok(lock_file)
    }

    /// Removes a staging folder after a failure; a simulated crash leaves it, as a real one
    /// would.
    fn discard_staging(&self, staging: &Path) {
        if self.crash_at.is_none() {
            remove_leftover_dir(staging);
        }
    }

    /// Replaces the record of sandbox `record.id`, which must exist. Needs its exclusive lock.
    pub fn save_sandbox(
        &self,
        lock: &SandboxLock,
        record: &SandboxRecord,
    ) -> Result<(), StoreError> {
        self.check_lock(lock, &record.id, "saving the record")?;
        if !self.sandbox_dir(&record.id).is_dir() {
            return Err(self.sandbox_not_found(&record.id));
        }
        self.write_record(&self.sandbox_dir(&record.id).join(SANDBOX_FILE), record)
    }

    /// Reads the record of sandbox `id`.
    pub fn load_sandbox(&self, id: &SandboxId) -> Result<SandboxRecord, StoreError> {
        let path = self.sandbox_dir(id).join(SANDBOX_FILE);
        let record: SandboxRecord =
            read_record(&path)?.ok_or_else(|| self.sandbox_not_found(id))?;
        check_field(&path, "id", id.as_str(), record.id.as_str())?;
        Ok(record)
    }

    /// The sandboxes in the store, sorted. Entries that are not sandbox folders are skipped
    /// (with a warning, unless they are the store's own staging folders).
    pub fn list_sandboxes(&self) -> Result<Vec<SandboxId>, StoreError> {
        list_ids(&self.root, SandboxId::parse)
    }

    /// Removes sandbox `lock.id()`: its whole folder, `vm/` and `shared/` included. Consumes
    /// its exclusive lock. Refuses with [`StoreError::MountsRemain`] while anything is mounted
    /// under the folder. Once the folder is renamed away the sandbox is gone; a failure to
    /// delete what was renamed is only logged, and [`Store::open`] finishes it.
    pub fn remove_sandbox(&self, lock: SandboxLock) -> Result<(), StoreError> {
        let id = lock.id().clone();
        self.check_lock(&lock, &id, "removal")?;
        let dir = self.sandbox_dir(&id);
        check_no_mounts(&dir).map_err(|e| self.or_not_found(e, &id))?;
        let grave = self
            .root
            .join(format!("{REMOVING}{id}~{}", fsio::unique_suffix()));
        fs::rename(&dir, &grave)
            .map_err(io_error("move away the sandbox folder", &dir))
            .map_err(|e| self.or_not_found(e, &id))?;
        if let Err(e) = fsio::sync_dir(&self.root) {
            tracing::warn!(sandbox = %id, error = %e, "cannot sync the state root");
        }
        drop(lock);
        remove_leftover_dir(&grave);
        tracing::debug!(sandbox = %id, "sandbox state removed");
        Ok(())
    }

    /// Removes sandbox `id`'s folder whatever it holds (torn, garbage or newer-version records,
    /// a creation that never finished), and the VM run folder runvm would give it outside the
    /// folder ([`vm_run_dir`]): for `delete --force`. `lock` is its exclusive lock; `None` only
    /// when the folder has no lock file to take. Every mount under the folder must be gone
    /// ([`StoreError::MountsRemain`]). The paths removed are computed from the root and the id,
    /// never read from a record.
    pub fn remove_sandbox_forced(
        &self,
        id: &SandboxId,
        lock: Option<SandboxLock>,
    ) -> Result<(), StoreError> {
        if let Some(lock) = &lock {
            self.check_lock(lock, id, "forced removal")?;
        }
        let run_dir = vm_run_dir(&self.root, id);
        if run_dir.parent() == Some(self.root.as_path()) {
            remove_leftover_dir(&run_dir);
        }
        let dir = self.sandbox_dir(id);
        match fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(self.sandbox_not_found(id)),
            Err(e) => return Err(io_error("inspect", &dir)(e)),
            // Not a folder (a file or a symbolic link put there): remove it, never follow it.
            Ok(meta) if !meta.is_dir() => {
                return fs::remove_file(&dir).map_err(io_error("remove", &dir));
            }
            Ok(_) => {}
        }
        check_no_mounts(&dir)?;
        let grave = self
            .root
            .join(format!("{REMOVING}{id}~{}", fsio::unique_suffix()));
        fs::rename(&dir, &grave).map_err(io_error("move away the sandbox folder", &dir))?;
        if let Err(e) = fsio::sync_dir(&self.root) {
            tracing::warn!(sandbox = %id, error = %e, "cannot sync the state root");
        }
        drop(lock);
        remove_leftover_dir(&grave);
        tracing::debug!(sandbox = %id, "sandbox state removed by force");
        Ok(())
    }

    /// The folder of factory VM `vm` ([`VM_HOME_PREFIX`]): computed from the root and the id.
    pub fn vm_home(&self, vm: &SandboxId) -> PathBuf {
        self.root.join(format!("{VM_HOME_PREFIX}{vm}"))
    }

    /// The factory VMs whose folder lies in the root.
    pub fn vm_homes(&self) -> Result<Vec<SandboxId>, StoreError> {
        let entries = match fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error("list", &self.root)(e)),
        };
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io_error("list", &self.root))?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(|n| n.strip_prefix(VM_HOME_PREFIX)) else {
                continue;
            };
            if let Ok(id) = SandboxId::parse(id) {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The mount points at or under factory VM `vm`'s folder.
    pub fn mounts_of_vm_home(&self, vm: &SandboxId) -> Vec<PathBuf> {
        fsio::mounts_under(&self.vm_home(vm)).unwrap_or_default()
    }

    /// Removes factory VM `vm`'s folder (its VM must be gone); refused while anything is
    /// mounted under it. A folder already gone is fine.
    pub fn remove_vm_home(&self, vm: &SandboxId) -> Result<(), StoreError> {
        let home = self.vm_home(vm);
        match fs::symlink_metadata(&home) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("inspect", &home)(e)),
            Ok(meta) if !meta.is_dir() => {
                return fs::remove_file(&home).map_err(io_error("remove", &home));
            }
            Ok(_) => {}
        }
        check_no_mounts(&home)?;
        match fs::remove_dir_all(&home) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_error("remove the factory VM's folder", &home)(e)),
        }
    }

    /// The mount points at or under sandbox `id`'s folder.
    pub fn mounts_of(&self, id: &SandboxId) -> Vec<PathBuf> {
        fsio::mounts_under(&self.sandbox_dir(id)).unwrap_or_default()
    }

    fn sandbox_not_found(&self, id: &SandboxId) -> StoreError {
        StoreError::SandboxNotFound {
            id: id.clone(),
            root: self.root.clone(),
        }
    }

    /// Turns an I/O "not found" into [`StoreError::SandboxNotFound`].
    fn or_not_found(&self, e: StoreError, id: &SandboxId) -> StoreError {
        match e {
            StoreError::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                self.sandbox_not_found(id)
            }
            other => other,
        }
    }

    // ---- files ----

    fn write_record<T: Serialize>(&self, path: &Path, record: &T) -> Result<(), StoreError> {
        let mut data = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Encode {
            path: path.to_path_buf(),
            source,
        })?;
        data.push(b'\n');
        fsio::write_atomic(path, &data, self.crash_at).map_err(io_error("write", path))
    }

    /// Removes what crashed writers left: staging and removal folders in the root, and, in
    /// each sandbox whose exclusive lock is free now, temp files and container staging and
    /// removal folders.
    fn clean_leftovers(&self) -> Result<(), StoreError> {
        let entries = fs::read_dir(&self.root).map_err(io_error("list", &self.root))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if name.starts_with(REMOVING) {
                remove_leftover_dir(&path);
            } else if name.starts_with(CREATING) {
                remove_abandoned_staging(&path);
            } else if let Ok(id) = SandboxId::parse(&name) {
                // Busy (or not a sandbox folder): not ours to clean now.
                let Ok(_lock) = self.lock(&id, LockMode::Exclusive, Wait::No) else {
                    continue;
                };
                fsio::remove_temps_of(&path, SANDBOX_FILE);
                let Ok(containers) = fs::read_dir(path.join(CONTAINERS_DIR)) else {
                    continue;
                };
                for entry in containers.flatten() {
                    let name = entry.file_name();
                    let name = name.to_string_lossy();
                    if name.starts_with(REMOVING) || name.starts_with(CREATING) {
                        remove_leftover_dir(&entry.path());
                    } else {
                        fsio::remove_temps_of(&entry.path(), CONTAINER_FILE);
                    }
                }
            }
        }
        Ok(())
    }
}

/// Reads a record; `None` if the file does not exist.
fn read_record<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let data = match fs::read(path) {
        Ok(data) => data,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("read", path)(e)),
    };
    parse_record(path, &data).map(Some)
}

/// Parses the text `data` of the record file `path` (a [`SandboxRecord`] or a
/// [`ContainerRecord`](crate::state::ContainerRecord)) as [`Store::load_sandbox`] and [`Store::load_container`] do, before
/// they check its ids against its folders: a file of a newer [`RECORD_VERSION`] is refused,
/// anything else that is not a whole record is [`StoreError::Corrupt`].
pub fn parse_record<T: DeserializeOwned>(path: &Path, data: &[u8]) -> Result<T, StoreError> {
    #[derive(Deserialize)]
    struct Version {
        #[serde(default)]
        version: Option<u32>,
    }
    let corrupt = |source| StoreError::Corrupt {
        path: path.to_path_buf(),
        source,
    };
    // The version first: a newer file may not parse as this version's record at all.
    let version = serde_json::from_slice::<Version>(data)
        .map_err(corrupt)?
        .version
        .unwrap_or(RECORD_VERSION);
    if version > RECORD_VERSION {
        return Err(StoreError::NewerVersion {
            path: path.to_path_buf(),
            found: version,
            supported: RECORD_VERSION,
        });
    }
    serde_json::from_slice(data).map_err(corrupt)
}

fn check_field(
    path: &Path,
    field: &'static str,
    expected: &str,
    found: &str,
) -> Result<(), StoreError> {
    if expected == found {
        return Ok(());
    }
    Err(StoreError::Mismatch {
        path: path.to_path_buf(),
        field,
        expected: expected.to_string(),
        found: found.to_string(),
    })
}

/// The folders in `dir` named by a valid id, sorted; nothing if `dir` does not exist.
fn list_ids<T: Ord, E: std::fmt::Display>(
    dir: &Path,
    parse: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<T>, StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error("list", dir)(e)),
    };
    let mut ids = Vec::new();
    for entry in entries {
        let entry = entry.map_err(io_error("list", dir))?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        // `~` is never in an id: staging, removal, VM run and boot-slot folders.
        if name.contains('~') {
            continue;
        }
        match parse(&name) {
            Ok(id) if entry.file_type().is_ok_and(|t| t.is_dir()) => ids.push(id),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "skipping a state entry that is not a folder")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping a state entry that is not named by an id")
            }
        }
    }
    ids.sort();
    Ok(ids)
}

/// Refuses while anything is mounted at or under `dir`.
fn check_no_mounts(dir: &Path) -> Result<(), StoreError> {
    let mounts = fsio::mounts_under(dir).map_err(io_error("check the mounts under", dir))?;
    if mounts.is_empty() {
        Ok(())
    } else {
        Err(StoreError::MountsRemain {
            dir: dir.to_path_buf(),
            mounts,
        })
    }
}

/// Deletes a folder the store renamed away or never published, unless something is mounted
/// in it. Errors are logged: the folder is invisible to the store already.
fn remove_leftover_dir(path: &Path) {
    if let Err(e) = check_no_mounts(path) {
        tracing::warn!(error = %e, "leaving a leftover folder in place");
        return;
    }
    match fs::remove_dir_all(path) {
        Ok(()) => tracing::debug!(path = %path.display(), "removed a leftover folder"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover folder")
        }
    }
}

/// Removes a sandbox staging folder whose creator is gone: its lock file is free, or it never
/// got one and is older than [`STALE_STAGING`].
fn remove_abandoned_staging(staging: &Path) {
    match File::open(staging.join(LOCK_FILE)) {
        Ok(file) => {
            if lock::try_lock(&file, LockMode::Exclusive).unwrap_or(false) {
                remove_leftover_dir(staging);
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let age = fs::symlink_metadata(staging)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if age.is_some_and(|age| age > STALE_STAGING) {
                remove_leftover_dir(staging);
            }
        }
        Err(_) => {}
    }
}

#[cfg(test)]
mod lock_tests;
#[cfg(test)]
mod tests;
