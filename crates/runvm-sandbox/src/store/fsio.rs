//! File-system steps of the store: atomic replacement of a file, atomic publication of a new
//! folder, private modes, and the mount table check that keeps removal from reaching through a
//! mount.

use std::ffi::{CString, OsString};
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Mode of every folder the store makes: state may hold secrets (environment variables).
pub(crate) const DIR_MODE: u32 = 0o700;
/// Mode of every file the store makes.
pub(crate) const FILE_MODE: u32 = 0o600;
/// Prefix of a folder being built before it is published under its real name. `~` cannot occur
/// in an id, so these never collide with a sandbox or container.
pub(crate) const CREATING: &str = ".creating~";
/// Prefix of a folder renamed away to be deleted.
pub(crate) const REMOVING: &str = ".removing~";

/// Where a write may stop as if the process had died there. Only tests choose one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) enum FaultPoint {
    /// The temp file exists and is empty.
    TempCreated,
    /// Half of the new content is in the temp file.
    HalfWritten,
    /// All of it is written, not yet synced.
    Written,
    /// The temp file is synced, not yet renamed.
    Synced,
    /// Renamed over the target; the folder is not synced yet.
    Renamed,
    /// A new folder is complete under its staging name, not yet published.
    Staged,
}

/// A step that failed: a simulated crash leaves everything as it is, a real error is cleaned up.
enum Failure {
    Crash(io::Error),
    Io(io::Error),
}

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure::Io(e)
    }
}

/// Returns the simulated crash if `crash_at` is `point`.
pub(crate) fn crash_here(crash_at: Option<FaultPoint>, point: FaultPoint) -> io::Result<()> {
    if crash_at == Some(point) {
        Err(io::Error::other(format!("simulated crash at {point:?}")))
    } else {
        Ok(())
    }
}

fn step(crash_at: Option<FaultPoint>, point: FaultPoint) -> Result<(), Failure> {
    crash_here(crash_at, point).map_err(Failure::Crash)
}

/// A suffix unique among this process's names; a clash with a dead process's leftover is
/// handled by the callers retrying with the next one.
pub(crate) fn unique_suffix() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn temp_prefix(target_name: &str) -> String {
    format!(".{target_name}~")
}

/// Whether `name` is a temp file of an atomic write to `target_name`.
pub(crate) fn is_temp_of(name: &str, target_name: &str) -> bool {
    name.starts_with(&temp_prefix(target_name)) && name.ends_with(".tmp")
}

/// Makes folder `path` (its parent must exist) with mode 0700, whatever the umask.
pub(crate) fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(DIR_MODE).create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Makes `path` and any missing parent with mode 0700; leaves existing folders as they are.
pub(crate) fn create_private_dir_all(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    DirBuilder::new()
        .mode(DIR_MODE)
        .recursive(true)
        .create(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))
}

/// Makes a new folder `parent/PREFIX SUFFIX` with a unique suffix.
pub(crate) fn create_unique_dir(parent: &Path, prefix: &str) -> io::Result<PathBuf> {
    loop {
        let path = parent.join(format!("{prefix}{}", unique_suffix()));
        match create_private_dir(&path) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            other => return other.map(|()| path),
        }
    }
}

/// Creates file `path`, which must not exist, with mode 0600.
pub(crate) fn create_private_file(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(file)
}

/// Flushes a folder's entries (new names, renames) to disk.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Replaces `path` with `data` atomically: a temp file in the same folder is written, synced
/// and renamed over `path`, then the folder is synced. Whenever the process dies, `path` holds
/// either its old or its new content in full; a temp file may be left behind, which readers
/// ignore and the next successful write removes. The caller holds the folder's exclusive lock.
pub(crate) fn write_atomic(
    path: &Path,
    data: &[u8],
    crash_at: Option<FaultPoint>,
) -> io::Result<()> {
    let (dir, name) = split(path)?;
    let (temp, file) = loop {
        let temp = dir.join(format!("{}{}.tmp", temp_prefix(name), unique_suffix()));
        match create_private_file(&temp) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            other => break (temp.clone(), other?),
        }
    };
    match fill_and_rename(file, &temp, path, data, crash_at) {
        Ok(()) => {}
        Err(Failure::Crash(e)) => return Err(e),
        Err(Failure::Io(e)) => {
            let _ = fs::remove_file(&temp);
            return Err(e);
        }
    }
    crash_here(crash_at, FaultPoint::Renamed)?;
    sync_dir(dir)?;
    remove_temps_of(dir, name);
    Ok(())
}

fn fill_and_rename(
    mut file: File,
    temp: &Path,
    target: &Path,
    data: &[u8],
    crash_at: Option<FaultPoint>,
) -> Result<(), Failure> {
    step(crash_at, FaultPoint::TempCreated)?;
    let (first, second) = data.split_at(data.len() / 2);
    file.write_all(first)?;
    step(crash_at, FaultPoint::HalfWritten)?;
    file.write_all(second)?;
    step(crash_at, FaultPoint::Written)?;
    file.sync_all()?;
    step(crash_at, FaultPoint::Synced)?;
    fs::rename(temp, target)?;
    Ok(())
}

fn split(path: &Path) -> io::Result<(&Path, &str)> {
    let dir = path.parent();
    let name = path.file_name().and_then(|n| n.to_str());
    match (dir, name) {
        (Some(dir), Some(name)) => Ok((dir, name)),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file path", path.display()),
        )),
    }
}

/// Removes what interrupted writes to `dir/target_name` left. Errors are only logged: a
/// leftover is harmless.
pub(crate) fn remove_temps_of(dir: &Path, target_name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| is_temp_of(n, target_name)) {
            let path = entry.path();
            match fs::remove_file(&path) {
                Ok(()) => tracing::debug!(path = %path.display(), "removed a leftover temp file"),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover temp file")
                }
            }
        }
    }
}

/// Renames folder `staging` to `target` unless `target` exists (then `AlreadyExists`).
pub(crate) fn publish_dir(staging: &Path, target: &Path) -> io::Result<()> {
    match rename_noreplace(staging, target) {
        Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS)) => {
            // A file system without RENAME_NOREPLACE. A plain rename would replace an empty
            // folder, so look first; the window between look and rename is what remains.
            if fs::symlink_metadata(target).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(staging, target)
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            Err(io::ErrorKind::AlreadyExists.into())
        }
        other => other,
    }
}

fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from = CString::new(from.as_os_str().as_bytes())?;
    let to = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call, which only
    // reads them; the other arguments are plain integers of the types renameat2 takes.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_renameat2,
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The mount points at or below `dir`, from this process's mount table.
pub(crate) fn mounts_under(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = fs::canonicalize(dir)?;
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    Ok(mount_points(&table)
        .into_iter()
        .filter(|m| m.starts_with(&dir))
        .collect())
}

/// The mount points (field 5) of a `/proc/PID/mountinfo` text, with `\NNN` escapes decoded.
pub(crate) fn mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// Undoes the octal escapes (`\040` for a space, ...) of a mountinfo field.
pub(crate) fn unescape_octal(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match escape {
            Some(d) => {
                let value = d.iter().fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}
