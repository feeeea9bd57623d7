//! Storages: what the agent mounts before creating a container (the virtio-fs share holding the
//! rootfs). A storage serves many containers: it is mounted by the first that lists it and
//! unmounted when the last of them is removed. A mount the agent did not make is left alone.
//! A virtio-fs share is always mounted `nosuid,nodev`: its files come from the host, and a
//! set-user-id program or a device node in them grants nothing in the guest.
//! A tmpfs storage (a pod's `/dev/shm`, a memory-backed emptyDir) is the pod's, not its
//! containers': it stays mounted, with its data, until the VM ends, so that a container that
//! restarts finds it as it left it (as kubelet keeps an emptyDir across restarts).

use std::collections::{HashMap, HashSet};
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use runvm_protocol::agent;

use crate::error::{AgentError, Result};

/// Mount points the agent mounted, with the containers using each.
#[derive(Debug, Default)]
pub struct Storages {
    users: Mutex<HashMap<PathBuf, HashSet<String>>>,
}

/// Checks a storage request: an absolute mount point without `..`, a file system type.
pub fn validate(storage: &agent::Storage) -> Result<()> {
    let mp = Path::new(&storage.mount_point);
    if !mp.is_absolute() || mp.components().any(|c| c == Component::ParentDir) {
        return Err(AgentError::invalid(format!(
            "storage mount_point {:?} must be an absolute path without \"..\"",
            storage.mount_point
        )));
    }
    if storage.fstype.is_empty() || storage.source.is_empty() {
        return Err(AgentError::invalid(format!(
            "storage for {:?} needs a source and an fstype (got source {:?}, fstype {:?})",
            storage.mount_point, storage.source, storage.fstype
        )));
    }
    Ok(())
}

/// Mount flags and the remaining file-system-specific data of mount options.
fn mount_options(fstype: &str, options: &[String]) -> (MsFlags, Option<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match o.as_str() {
            "ro" => flags |= MsFlags::MS_RDONLY,
            "rw" => flags &= !MsFlags::MS_RDONLY,
            "nosuid" => flags |= MsFlags::MS_NOSUID,
            "nodev" => flags |= MsFlags::MS_NODEV,
            "noexec" => flags |= MsFlags::MS_NOEXEC,
            "relatime" => flags |= MsFlags::MS_RELATIME,
            "noatime" => flags |= MsFlags::MS_NOATIME,
            "sync" => flags |= MsFlags::MS_SYNCHRONOUS,
            "bind" => flags |= MsFlags::MS_BIND,
            "rbind" => flags |= MsFlags::MS_BIND | MsFlags::MS_REC,
            other => data.push(other.to_string()),
        }
    }
    if fstype == "bind" {
        flags |= MsFlags::MS_BIND;
    }
    if fstype == "virtiofs" {
        flags |= MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    }
    let data = (!data.is_empty()).then(|| data.join(","));
    (flags, data)
}

/// Undoes the octal escapes (`\040` for a space, ...) of a /proc/self/mountinfo field.
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let digits = bytes.get(i + 1..i + 4).unwrap_or_default();
        if bytes[i] == b'\\'
            && digits.len() == 3
            && digits.iter().all(|d| (b'0'..=b'7').contains(d))
        {
            let v = digits
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(v) = u8::try_from(v) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether a mountinfo text lists a mount on `path`.
fn mountinfo_has(text: &str, path: &Path) -> bool {
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)) == path)
}

/// Whether something is mounted on `path` in the agent's mount namespace.
pub fn is_mounted(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| mountinfo_has(&t, path))
        .unwrap_or(false)
}

impl Storages {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, HashSet<String>>> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Mounts the storages container `id` needs (those not mounted yet). Returns the mount
    /// points it now holds, to pass to [`Storages::release`]. On error, nothing is held.
    pub fn acquire(&self, id: &str, storages: &[agent::Storage]) -> Result<Vec<PathBuf>> {
        for s in storages {
            validate(s)?;
        }
        let mut held = Vec::new();
        for s in storages {
            if let Err(e) = self.acquire_one(id, s, &mut held) {
                self.release(id, &held);
                return Err(e);
            }
        }
        Ok(held)
    }

    fn acquire_one(&self, id: &str, s: &agent::Storage, held: &mut Vec<PathBuf>) -> Result<()> {
        let mp = PathBuf::from(&s.mount_point);
        let mut users = self.lock();
        if let Some(set) = users.get_mut(&mp) {
            set.insert(id.to_string());
            held.push(mp);
            return Ok(());
        }
        if is_mounted(&mp) {
            tracing::info!(container = id, mount_point = %mp.display(), "storage already mounted");
            return Ok(());
        }
        std::fs::create_dir_all(&mp).map_err(|e| {
            AgentError::internal(format!("cannot create mount point {}: {e}", mp.display()))
        })?;
        let (flags, data) = mount_options(&s.fstype, &s.options);
        let fstype = (s.fstype != "bind").then_some(s.fstype.as_str());
        mount(Some(s.source.as_str()), &mp, fstype, flags, data.as_deref()).map_err(|e| {
            AgentError::internal(format!(
                "cannot mount {} ({}) on {}: {e}",
                s.source,
                s.fstype,
                mp.display()
            ))
        })?;
        tracing::info!(container = id, source = %s.source, fstype = %s.fstype,
            mount_point = %mp.display(), "storage mounted");
        if s.fstype == "tmpfs" {
            // The pod's: never released, so not held (see the module's documentation).
            return Ok(());
        }
        users.insert(mp.clone(), HashSet::from([id.to_string()]));
        held.push(mp);
        Ok(())
    }

    /// Drops container `id`'s hold on `mount_points`; unmounts those nobody holds any more.
    pub fn release(&self, id: &str, mount_points: &[PathBuf]) {
        let mut users = self.lock();
        for mp in mount_points {
            let Some(set) = users.get_mut(mp) else {
                continue;
            };
            set.remove(id);
            if set.is_empty() {
                users.remove(mp);
                match umount2(mp, MntFlags::MNT_DETACH) {
                    Ok(()) => {
                        tracing::info!(container = id, mount_point = %mp.display(), "storage unmounted")
                    }
                    Err(e) => {
                        tracing::warn!(container = id, mount_point = %mp.display(), error = %e, "cannot unmount storage")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(mp: &str) -> agent::Storage {
        agent::Storage {
            source: "runvm".into(),
            fstype: "virtiofs".into(),
            mount_point: mp.into(),
            ..Default::default()
        }
    }

    #[test]
    fn mount_points_must_be_absolute_without_dot_dot() {
        validate(&storage("/run/runvm/shared")).unwrap();
        for bad in ["run/x", "/run/../etc", ""] {
            let err = validate(&storage(bad)).unwrap_err();
            assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT);
            assert!(err.message.contains(&format!("{bad:?}")), "{err}");
        }
        let mut s = storage("/mnt");
        s.fstype.clear();
        assert!(validate(&s).is_err());
    }

    #[test]
    fn options_split_into_flags_and_data_and_virtiofs_is_nosuid_nodev() {
        let (f, d) = mount_options(
            "virtiofs",
            &["ro".into(), "nodev".into(), "dax=never".into(), "x".into()],
        );
        assert_eq!(
            f,
            MsFlags::MS_RDONLY | MsFlags::MS_NODEV | MsFlags::MS_NOSUID
        );
        assert_eq!(d.as_deref(), Some("dax=never,x"));
        let (f, d) = mount_options("bind", &["nosuid".into()]);
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_NOSUID);
        assert_eq!(d, None);
        let (f, d) = mount_options("bind", &[]);
        assert_eq!(f, MsFlags::MS_BIND);
        assert_eq!(d, None);
    }

    #[test]
    fn mountinfo_is_read_with_escapes() {
        let text = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                    40 22 0:40 / /run/runvm/shared rw - virtiofs runvm rw\n\
                    41 22 0:41 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        assert!(mountinfo_has(text, Path::new("/run/runvm/shared")));
        assert!(mountinfo_has(text, Path::new("/mnt/a b")));
        assert!(!mountinfo_has(text, Path::new("/run/runvm")));
        assert_eq!(unescape_mountinfo("a\\134b\\"), "a\\b\\");
    }

    #[test]
    fn a_tmpfs_is_the_pods_and_outlives_the_containers_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mp = dir.path().join("tmpfs/0123");
        let tmpfs = agent::Storage {
            source: "tmpfs".into(),
            fstype: "tmpfs".into(),
            options: vec!["nosuid".into(), "size=1m".into()],
            mount_point: mp.display().to_string(),
            ..Default::default()
        };
        let s = Storages::default();
        let held = s.acquire("c1", std::slice::from_ref(&tmpfs)).unwrap();
        assert!(held.is_empty(), "a tmpfs is never held: {held:?}");
        assert!(is_mounted(&mp));
        std::fs::write(mp.join("f"), "kept").unwrap();
        s.release("c1", &held);
        // A later container gets the same tmpfs, with its content.
        assert!(s.acquire("c2", &[tmpfs]).unwrap().is_empty());
        assert_eq!(std::fs::read_to_string(mp.join("f")).unwrap(), "kept");
        umount2(&mp, MntFlags::MNT_DETACH).unwrap();
    }

    #[test]
    fn failed_acquire_holds_nothing() {
        let s = Storages::default();
        let err = s.acquire("c1", &[storage("relative")]).unwrap_err();
        assert_eq!(err.code, ttrpc::Code::INVALID_ARGUMENT);
        assert!(s.lock().is_empty());
        // An existing mount the agent did not make is used but never held.
        assert!(s.acquire("c1", &[storage("/")]).unwrap().is_empty());
    }
}
