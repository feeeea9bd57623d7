//! OCI bundles: the default spec (what `runc spec` writes) and a busybox rootfs made from the
//! host's `busybox-static`, for demos and tests.

use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

use serde_json::{json, Value};

/// The capabilities runc grants by default.
const DEFAULT_CAPS: &[&str] = &["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"];

/// The spec `runc spec` writes: `sh` in `rootfs`, read-only root, the usual mounts, masked paths.
/// `args` replaces the process; `terminal` as given.
pub fn default_spec(args: &[&str], terminal: bool) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": terminal,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                "bounding": DEFAULT_CAPS,
                "effective": DEFAULT_CAPS,
                "permitted": DEFAULT_CAPS,
                "ambient": DEFAULT_CAPS
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "runvm",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
             "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"},
                {"type": "mount"}, {"type": "cgroup"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// Errors making a rootfs.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// busybox is not installed.
    #[error("{} not found: install Debian's busybox-static (apt-get install busybox-static)", path.display())]
    NoBusybox {
        /// Where it was looked for.
        path: std::path::PathBuf,
    },
    /// A file could not be written.
    #[error("cannot write {}", path.display())]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Writes a busybox rootfs into `rootfs`: `/bin/busybox` from the host's busybox-static, a link
/// for each of its applets (`busybox --list`), `/etc/passwd` and `/etc/group` with root and
/// nobody.
pub fn busybox_rootfs(rootfs: &Path) -> Result<(), BundleError> {
    let busybox = Path::new("/bin/busybox");
    if !busybox.is_file() {
        return Err(BundleError::NoBusybox {
            path: busybox.to_path_buf(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| BundleError::Io { path, source }
    };
    for dir in [
        "bin", "etc", "dev", "proc", "sys", "tmp", "root", "var", "run",
    ] {
        let d = rootfs.join(dir);
        std::fs::create_dir_all(&d).map_err(io(&d))?;
    }
    let tmp = rootfs.join("tmp");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777)).map_err(io(&tmp))?;
    let target = rootfs.join("bin/busybox");
    std::fs::copy(busybox, &target).map_err(io(&target))?;
    let list = std::process::Command::new(busybox)
        .arg("--list")
        .output()
        .map_err(io(busybox))?;
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let link = rootfs.join("bin").join(applet);
        if !applet.is_empty() && applet != "busybox" && link.symlink_metadata().is_err() {
            symlink("busybox", &link).map_err(io(&link))?;
        }
    }
    for (name, text) in [
        (
            "etc/passwd",
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
        ),
        ("etc/group", "root:x:0:\nnogroup:x:65534:\n"),
        ("etc/hostname", "runvm\n"),
    ] {
        let p = rootfs.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    Ok(())
}

/// Writes a bundle at `bundle`: a busybox rootfs and `config.json` with `spec`.
pub fn busybox_bundle(bundle: &Path, spec: &Value) -> Result<(), BundleError> {
    busybox_rootfs(&bundle.join("rootfs"))?;
    let config = bundle.join("config.json");
    let text = serde_json::to_string_pretty(spec).unwrap_or_default();
    std::fs::write(&config, text).map_err(|source| BundleError::Io {
        path: config.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_spec_is_a_valid_oci_spec() {
        let spec = default_spec(&["sh", "-c", "echo hi"], false);
        let text = spec.to_string();
        super::super::spec::parse(Path::new("config.json"), &text).unwrap();
        assert_eq!(spec["process"]["args"][2], "echo hi");
        assert_eq!(spec["root"]["path"], "rootfs");
    }

    #[test]
    fn busybox_bundle_prepares_cleanly() {
        if !Path::new("/bin/busybox").is_file() {
            // scripts/setup.sh installs busybox-static; say so rather than pass silently.
            panic!("/bin/busybox missing: run scripts/setup.sh");
        }
        let dir = tempfile::tempdir().unwrap();
        let spec = default_spec(&["sh"], false);
        busybox_bundle(dir.path(), &spec).unwrap();
        assert!(dir.path().join("rootfs/bin/sh").symlink_metadata().is_ok());
        let loaded = super::super::spec::load(dir.path()).unwrap();
        let prepared = super::super::spec::prepare(dir.path(), &loaded, "c1").unwrap();
        assert!(
            !prepared.binds[0].readonly,
            "the rootfs share stays writable for mount points; the guest makes it read-only"
        );
        assert_eq!(prepared.guest_spec["root"]["readonly"], true);
    }
}
