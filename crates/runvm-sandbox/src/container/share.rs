//! Host paths bind-mounted into the sandbox's shared folder, where virtiofsd exports them.

use std::path::{Path, PathBuf};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use super::spec::ShareBind;

/// A bind mount into the shared folder failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot share {} with the guest (bind mount on {}): {reason}", source_path.display(), target.display())]
pub struct ShareError {
    /// The host path.
    pub source_path: PathBuf,
    /// The mount point in the shared folder.
    pub target: PathBuf,
    /// Why.
    pub reason: String,
}

fn mount_one(shared_dir: &Path, bind: &ShareBind) -> Result<PathBuf, ShareError> {
    let target = shared_dir.join(&bind.target);
    let fail = |reason: String| ShareError {
        source_path: bind.source.clone(),
        target: target.clone(),
        reason,
    };
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    }
    if bind.source.is_dir() {
        std::fs::create_dir_all(&target).map_err(|e| fail(e.to_string()))?;
    } else {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&target)
            .map_err(|e| fail(e.to_string()))?;
    }
    mount(
        Some(&bind.source),
        &target,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(|e| fail(e.to_string()))?;
    // The copy must not be a peer of the source: unmounting it (with its submounts) would then
    // unmount the source's submounts on the host too. As a slave it still receives the mounts
    // made later under a shared source (the guest sees them as virtio-fs submounts); private,
    // when the bind asks for it, not even those.
    let propagation = if bind.private {
        MsFlags::MS_PRIVATE
    } else {
        MsFlags::MS_SLAVE
    };
    let flags = propagation | MsFlags::MS_REC;
    if let Err(e) = mount(None::<&str>, &target, None::<&str>, flags, None::<&str>) {
        let _ = umount2(&target, MntFlags::MNT_DETACH);
        return Err(fail(format!("propagation change: {e}")));
    }
    if bind.readonly {
        if let Err(e) = make_readonly_recursively(&target) {
            let _ = umount2(&target, MntFlags::MNT_DETACH);
            return Err(fail(format!("read-only remount (with its submounts): {e}")));
        }
    }
    Ok(target)
}

/// `mount_setattr(2)`'s argument (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

/// Makes the mount on `target` and every mount under it read-only, in one step
/// (`mount_setattr(2)` with `AT_RECURSIVE`, Linux 5.12): virtiofsd then cannot write into a
/// read-only volume's submounts either.
fn make_readonly_recursively(target: &Path) -> nix::Result<()> {
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let path = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|_| nix::errno::Errno::EINVAL)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: `path` is a valid NUL-terminated string and `attr` a valid `mount_attr` of the
    // size passed; both outlive the call, which only reads them.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            path.as_ptr(),
            AT_RECURSIVE | libc::AT_SYMLINK_NOFOLLOW as libc::c_uint,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    nix::errno::Errno::result(rc).map(drop)
}

/// Bind-mounts each of `binds` under `shared_dir`, in order. Returns the mount points made. On
/// error, what was mounted is unmounted again.
pub fn mount_binds(shared_dir: &Path, binds: &[ShareBind]) -> Result<Vec<PathBuf>, ShareError> {
    let mut done = Vec::new();
    for bind in binds {
        match mount_one(shared_dir, bind) {
            Ok(target) => done.push(target),
            Err(e) => {
                unmount_all(&done);
                return Err(e);
            }
        }
    }
    Ok(done)
}

/// Unmounts `targets` (last first) and removes the mount points. Not-mounted and missing
/// targets are fine; other failures are logged.
pub fn unmount_all(targets: &[PathBuf]) {
    for target in targets.iter().rev() {
        match umount2(target, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!(target = %target.display(), error = %e, "cannot unmount"),
        }
        let removed = if target.is_dir() {
            std::fs::remove_dir(target)
        } else {
            std::fs::remove_file(target)
        };
        if let Err(e) = removed {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(target = %target.display(), error = %e, "cannot remove mount point");
            }
        }
    }
}

/// Whether `path` is a mount point (listed in the calling thread's mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    let wanted = path.display().to_string();
    info.lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|mount_point| mount_point == wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("hello"), "hi").unwrap();
        std::fs::write(dir.path().join("file"), "f").unwrap();
        let shared = dir.path().join("shared");
        std::fs::create_dir_all(&shared).unwrap();
        (dir, src, shared)
    }

    #[test]
    fn folders_and_files_are_shared_and_unshared() {
        let (dir, src, shared) = setup();
        let binds = vec![
            ShareBind {
                source: src.clone(),
                target: "c1/rootfs".into(),
                readonly: false,
                private: false,
            },
            ShareBind {
                source: dir.path().join("file"),
                target: "c1/mounts/0-file".into(),
                readonly: true,
                private: true,
            },
        ];
        let targets = mount_binds(&shared, &binds).unwrap();
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/rootfs/hello")).unwrap(),
            "hi"
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/mounts/0-file")).unwrap(),
            "f"
        );
        assert!(is_mounted(&shared.join("c1/rootfs")));
        let ro = std::fs::write(shared.join("c1/mounts/0-file"), "x").unwrap_err();
        assert_eq!(ro.raw_os_error(), Some(libc::EROFS), "{ro}");
        unmount_all(&targets);
        assert!(!is_mounted(&shared.join("c1/rootfs")));
        assert!(!shared.join("c1/rootfs").exists());
        assert!(src.join("hello").exists(), "the source is untouched");
    }

    #[test]
    fn failure_midway_unmounts_what_was_mounted() {
        let (_dir, src, shared) = setup();
        let binds = vec![
            ShareBind {
                source: src,
                target: "c1/rootfs".into(),
                readonly: false,
                private: false,
            },
            ShareBind {
                source: "/nonexistent/source".into(),
                target: "c1/mounts/1-x".into(),
                readonly: false,
                private: false,
            },
        ];
        let err = mount_binds(&shared, &binds).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/source"), "{err}");
        assert!(!is_mounted(&shared.join("c1/rootfs")));
    }

    /// The optional fields (after the mount point) of `path`'s line in mountinfo.
    fn propagation_of(path: &Path) -> String {
        let info = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap();
        let wanted = path.display().to_string();
        let line = info
            .lines()
            .rfind(|l| l.split_whitespace().nth(4) == Some(wanted.as_str()))
            .unwrap();
        let fields: Vec<&str> = line.split_whitespace().collect();
        let end = fields.iter().position(|f| *f == "-").unwrap();
        fields[6..end].join(" ")
    }

    #[test]
    fn a_read_only_share_is_read_only_with_its_submounts() {
        let child = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let none = None::<&str>;
            let rprivate = MsFlags::MS_PRIVATE | MsFlags::MS_REC;
            mount(none, "/", none, rprivate, none).unwrap();
            let (_dir, src, shared) = setup();
            std::fs::create_dir_all(src.join("sub")).unwrap();
            let tmpfs = Some("tmpfs");
            mount(tmpfs, &src.join("sub"), tmpfs, MsFlags::empty(), none).unwrap();
            let bind = ShareBind {
                source: src.clone(),
                target: "c1/mounts/0-src".into(),
                readonly: true,
                private: false,
            };
            let targets = mount_binds(&shared, &[bind]).unwrap();
            for file in ["f", "sub/f"] {
                let err = std::fs::write(targets[0].join(file), "x").unwrap_err();
                assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{file}: {err}");
            }
            // The source itself stays writable.
            std::fs::write(src.join("sub/f"), "x").unwrap();
            unmount_all(&targets);
            assert!(is_mounted(&src.join("sub")));
        });
        child.join().unwrap();
    }

    #[test]
    fn unsharing_a_shared_source_leaves_its_submounts_and_later_mounts_reach_the_copy() {
        // In a mount namespace of its own, so the shared mounts made here stay here.
        let child = std::thread::spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS).unwrap();
            let none = None::<&str>;
            let rprivate = MsFlags::MS_PRIVATE | MsFlags::MS_REC;
            mount(none, "/", none, rprivate, none).unwrap();
            let (_dir, src, shared) = setup();
            let bind = MsFlags::MS_BIND;
            mount(Some(&src), &src, none, bind, none).unwrap();
            mount(none, &src, none, MsFlags::MS_SHARED, none).unwrap();
            std::fs::create_dir_all(src.join("before")).unwrap();
            std::fs::create_dir_all(src.join("later")).unwrap();
            mount(
                Some("tmpfs"),
                &src.join("before"),
                Some("tmpfs"),
                MsFlags::empty(),
                none,
            )
            .unwrap();
            let binds = [false, true].map(|private| ShareBind {
                source: src.clone(),
                target: format!("c1/mounts/{private}").into(),
                readonly: false,
                private,
            });
            let targets = mount_binds(&shared, &binds).unwrap();
            assert!(propagation_of(&targets[0]).starts_with("master:"));
            assert_eq!(propagation_of(&targets[1]), "");
            // A mount made later under the source reaches the slave copy, not the private one.
            mount(
                Some("tmpfs"),
                &src.join("later"),
                Some("tmpfs"),
                MsFlags::empty(),
                none,
            )
            .unwrap();
            std::fs::write(src.join("later/f"), "later").unwrap();
            assert_eq!(
                std::fs::read_to_string(targets[0].join("later/f")).unwrap(),
                "later"
            );
            assert!(!targets[1].join("later/f").exists());
            unmount_all(&targets);
            // The source keeps its own submounts.
            assert!(is_mounted(&src.join("before")));
            assert!(is_mounted(&src.join("later")));
        });
        child.join().unwrap();
    }
}
