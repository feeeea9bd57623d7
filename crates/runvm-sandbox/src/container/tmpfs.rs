//! Pod memory that stays in the guest: a pod's `/dev/shm` and its memory-backed emptyDir
//! volumes.
//!
//! On the host both are tmpfs mounts bind-mounted into every container of the pod: containerd's
//! CRI plugin mounts a tmpfs per pod (`.../sandboxes/ID/shm`, `size=65536k`) and binds it at
//! `/dev/shm` in each container; kubelet mounts a tmpfs per `emptyDir: {medium: Memory}` volume
//! (`/var/lib/kubelet/pods/UID/volumes/kubernetes.io~empty-dir/NAME`). Through virtio-fs, the
//! containers would share files but not memory: POSIX shared memory between two containers
//! needs the same pages, and the guest kernel cannot map a host tmpfs. So such a bind becomes a
//! tmpfs in the guest, one per host source and VM, made by the agent when the first container
//! names it, kept as long as the VM (the pod) lives, with the size and mode of the host's mount.
//! The data stays in the guest: the host's tmpfs never sees it (as with Kata's "ephemeral"
//! storage).

use std::path::{Component, Path, PathBuf};

use sha2::Digest;

/// Where the guest's pod-level tmpfs mounts go, one folder per host source.
pub const GUEST_TMPFS_DIR: &str = "/run/runvm/tmpfs";

/// The path component kubelet puts in every emptyDir volume's host path.
const EMPTY_DIR_PLUGIN: &str = "kubernetes.io~empty-dir";

/// A host tmpfs replaced by a tmpfs in the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestTmpfs {
    /// The host mount point (canonical), which names the guest tmpfs: every container whose
    /// bind has this source shares it.
    pub host_source: PathBuf,
    /// The guest mount point, under [`GUEST_TMPFS_DIR`].
    pub mount_point: String,
    /// Mount options for the guest: `nosuid`, `nodev`, and the host mount's `noexec`, `size=`
    /// and `mode=`.
    pub options: Vec<String>,
}

/// What a bind mount is, for the guest: the pod's `/dev/shm` (a tmpfs bound at `/dev/shm`) or a
/// memory-backed emptyDir (a tmpfs mount point under kubelet's `kubernetes.io~empty-dir`) is a
/// guest tmpfs; anything else (`None`) goes through virtio-fs. `mountinfo` is the text of
/// `/proc/thread-self/mountinfo`.
pub fn guest_tmpfs(destination: &str, source: &Path, mountinfo: &str) -> Option<GuestTmpfs> {
    let source = std::fs::canonicalize(source).ok()?;
    let shm = Path::new(destination)
        .components()
        .eq(Path::new("/dev/shm").components());
    let empty_dir = source
        .components()
        .any(|c| c == Component::Normal(EMPTY_DIR_PLUGIN.as_ref()));
    if !shm && !empty_dir {
        return None;
    }
    let options = tmpfs_options(mountinfo, &source)?;
    let digest = sha2::Sha256::digest(source.as_os_str().as_encoded_bytes());
    let name: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(GuestTmpfs {
        mount_point: format!("{GUEST_TMPFS_DIR}/{name}"),
        host_source: source,
        options,
    })
}

/// When the topmost mount on `path` (a mount point itself, not a folder in one) is a tmpfs:
/// the guest options that reproduce it.
fn tmpfs_options(mountinfo: &str, path: &Path) -> Option<Vec<String>> {
    let line = mountinfo.lines().rfind(|l| {
        l.split(' ')
            .nth(4)
            .is_some_and(|mp| Path::new(&crate::store::unescape_mountinfo_field(mp)) == path)
    })?;
    let fields: Vec<&str> = line.split(' ').collect();
    let dash = fields.iter().position(|f| *f == "-")?;
    if fields.get(dash + 1) != Some(&"tmpfs") {
        return None;
    }
    let mut options = vec!["nosuid".to_string(), "nodev".to_string()];
    if fields
        .get(5)
        .is_some_and(|o| o.split(',').any(|o| o == "noexec"))
    {
        options.push("noexec".into());
    }
    for o in fields.get(dash + 3).copied().unwrap_or_default().split(',') {
        let wanted = match o.split_once('=') {
            Some(("size", v)) => valid_size(v),
            Some(("mode", v)) => {
                !v.is_empty() && v.len() <= 4 && v.bytes().all(|d| (b'0'..=b'7').contains(&d))
            }
            _ => false,
        };
        if wanted {
            options.push(o.to_string());
        }
    }
    Some(options)
}

/// A tmpfs size as the kernel prints it: digits with an optional `k`, `m`, `g` or `%`.
fn valid_size(v: &str) -> bool {
    let digits = v.trim_end_matches(['k', 'm', 'g', 'K', 'M', 'G', '%']);
    !digits.is_empty() && v.len() - digits.len() <= 1 && digits.bytes().all(|d| d.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mountinfo(path: &Path) -> String {
        let p = path.display().to_string().replace(' ', "\\040");
        format!(
            "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
             30 22 0:30 / {p} rw,nosuid,nodev,noexec,relatime - tmpfs shm rw,size=65536k,mode=1777,inode64\n\
             31 22 0:31 / /plain rw - ext4 /dev/vda rw\n"
        )
    }

    #[test]
    fn the_pods_shm_becomes_a_guest_tmpfs_with_the_hosts_size_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let shm = std::fs::canonicalize(dir.path())
            .unwrap()
            .join("sandboxes/p 1/shm");
        std::fs::create_dir_all(&shm).unwrap();
        let t = guest_tmpfs("/dev/shm/", &shm, &mountinfo(&shm)).unwrap();
        assert_eq!(t.host_source, shm);
        assert!(t.mount_point.starts_with("/run/runvm/tmpfs/"), "{t:?}");
        assert_eq!(t.mount_point.len(), GUEST_TMPFS_DIR.len() + 17);
        assert_eq!(
            t.options,
            ["nosuid", "nodev", "noexec", "size=65536k", "mode=1777"]
        );
        // The same source gives the same guest mount: the pod's containers share it.
        let again = guest_tmpfs("/dev/shm", &shm, &mountinfo(&shm)).unwrap();
        assert_eq!(again.mount_point, t.mount_point);
        // Elsewhere than /dev/shm, a tmpfs that is not an emptyDir stays a virtio-fs share.
        assert_eq!(guest_tmpfs("/data", &shm, &mountinfo(&shm)), None);
    }

    #[test]
    fn a_memory_backed_empty_dir_becomes_a_guest_tmpfs_anywhere() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        let vol = root.join("pods/u1/volumes/kubernetes.io~empty-dir/cache");
        std::fs::create_dir_all(&vol).unwrap();
        let t = guest_tmpfs("/cache", &vol, &mountinfo(&vol)).unwrap();
        assert_eq!(t.host_source, vol);
        // An emptyDir on disk (not a tmpfs mount point) stays a virtio-fs share, and so does a
        // folder inside a tmpfs.
        let info = "31 22 0:31 / / rw - ext4 /dev/vda rw\n";
        assert_eq!(guest_tmpfs("/cache", &vol, info), None);
        let inside = vol.join("sub");
        std::fs::create_dir_all(&inside).unwrap();
        assert_eq!(guest_tmpfs("/dev/shm", &inside, &mountinfo(&vol)), None);
        // A missing source is no tmpfs.
        assert_eq!(
            guest_tmpfs("/dev/shm", &root.join("none"), &mountinfo(&vol)),
            None
        );
    }

    #[test]
    fn only_well_formed_sizes_and_modes_are_carried() {
        assert!(valid_size("65536k") && valid_size("1073741824") && valid_size("50%"));
        assert!(!valid_size("") && !valid_size("k") && !valid_size("1kk") && !valid_size("1,x"));
        let info = "30 22 0:30 / /s rw - tmpfs tmpfs rw,size=1x,mode=99999,nr_inodes=5\n";
        assert_eq!(
            tmpfs_options(info, Path::new("/s")).unwrap(),
            ["nosuid", "nodev"]
        );
        // The topmost mount counts: an ext4 mounted over the tmpfs is no tmpfs.
        let stacked = format!("{info}31 30 0:31 / /s rw - ext4 /dev/vda rw\n");
        assert_eq!(tmpfs_options(&stacked, Path::new("/s")), None);
    }
}
