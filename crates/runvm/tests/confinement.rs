//! The VM's host processes are confined, checked on a running VM (one boot): QEMU and
//! vhost-device-vsock run as the unprivileged `hypervisor.user` with no capabilities, each in a
//! mount namespace of its own whose root holds only what it needs; QEMU and virtiofsd under
//! seccomp, virtiofsd in a mount namespace whose root is the share. And a guest that tries to
//! leave the share through virtiofsd (`..` past its root, absolute symbolic links made by the
//! guest or planted on the host, a device node of the host's disk) gets nowhere: checked with
//! the guest's own tools from a privileged container that mounts the share itself.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::{exec_sh, processes_with, spec, text, Host, Proc};
use serde_json::json;

/// The value of `key` in `/proc/PID/status`.
fn status(pid: u32, key: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

fn mount_ns(pid: impl std::fmt::Display) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap()
}

/// The names in folder `path`.
fn names(path: impl AsRef<Path>) -> BTreeSet<String> {
    std::fs::read_dir(path.as_ref())
        .unwrap_or_else(|e| panic!("{}: {e}", path.as_ref().display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// The path of the first entry called `name` under `dir`, at most `depth` folders down.
fn find_in(dir: &Path, name: &str, depth: u32) -> Option<PathBuf> {
    let entries: Vec<_> = std::fs::read_dir(dir).ok()?.flatten().collect();
    if let Some(e) = entries.iter().find(|e| e.file_name() == name) {
        return Some(e.path());
    }
    if depth == 0 {
        return None;
    }
    entries
        .iter()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .find_map(|e| find_in(&e.path(), name, depth - 1))
}

/// Asserts that process `pid` (`what`) runs as a non-root user with no capability at all.
fn assert_unprivileged(pid: u32, what: &str) {
    for key in ["Uid", "Gid"] {
        let ids = status(pid, key);
        assert!(
            ids.split_whitespace().all(|id| id != "0"),
            "{what} runs with {key} {ids}"
        );
    }
    for key in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status(pid, key), "0000000000000000", "{what}'s {key}");
    }
    assert_eq!(status(pid, "NoNewPrivs"), "1", "{what}'s no_new_privs");
}

#[test]
fn vm_processes_are_confined_and_the_guest_cannot_leave_the_share() {
    let host = Host::new();
    // A host file outside the share that the guest must never read.
    let secret_dir = tempfile::Builder::new()
        .prefix("runvm-secret-")
        .tempdir()
        .unwrap();
    let secret = secret_dir.path().join("secret");
    std::fs::write(&secret, "host-only-secret-4f1c\n").unwrap();
    let secret_path = secret.to_str().unwrap().to_string();
    // The host's root disk: its first bytes must not reach the guest through a device node.
    let disk = std::fs::metadata("/").unwrap().dev();
    let (major, minor) = (libc::major(disk), libc::minor(disk));

    let mut config = spec(&["sh", "-c", "echo ready; exec sleep 600"]);
    config["root"]["readonly"] = false.into();
    let caps = json!([
        "CAP_SYS_ADMIN",
        "CAP_MKNOD",
        "CAP_DAC_OVERRIDE",
        "CAP_CHOWN"
    ]);
    for set in ["bounding", "effective", "permitted"] {
        config["process"]["capabilities"][set] = caps.clone();
    }
    config["linux"]["resources"]["devices"] = json!([{ "allow": true, "access": "rwm" }]);
    let bundle = host.bundle("jail", &config);
    // Absolute links planted on the host, in the container's root: they resolve in the guest.
    std::os::unix::fs::symlink("/", bundle.join("rootfs/escape")).unwrap();
    std::os::unix::fs::symlink(&secret, bundle.join("rootfs/secret-link")).unwrap();
    // Output to files: the container's stand-in keeps them open.
    let (code, _, err) = host.run_to_files(
        &["run", "-d", "--bundle", bundle.to_str().unwrap(), "jail"],
        "run",
    );
    assert_eq!(
        code,
        Some(0),
        "run: {}",
        std::fs::read_to_string(err).unwrap()
    );
    host.wait_status("jail", "running");

    let root = host.root.to_str().unwrap();
    let procs = processes_with(root);
    let find = |program: &str| -> Vec<&Proc> {
        procs
            .iter()
            .filter(|p| p.cmdline.first().is_some_and(|a| a.ends_with(program)))
            .collect()
    };
    let own_ns = mount_ns("self");

    // QEMU: unprivileged, seccomp, a root of its own with only what it needs.
    let qemu = find("qemu-system-x86_64");
    assert_eq!(qemu.len(), 1, "{procs:#?}");
    let qemu = qemu[0].pid;
    assert_unprivileged(qemu, "qemu");
    assert_eq!(status(qemu, "Seccomp"), "2", "qemu's seccomp mode");
    assert_ne!(
        mount_ns(qemu),
        own_ns,
        "qemu shares the host's mount namespace"
    );
    let qemu_root = PathBuf::from(format!("/proc/{qemu}/root"));
    assert_eq!(
        names(qemu_root.join("etc")),
        BTreeSet::from(["ld.so.cache".into()])
    );
    let devices = names(qemu_root.join("dev"));
    let allowed: BTreeSet<String> = ["null", "zero", "urandom", "random", "kvm"]
        .map(String::from)
        .into();
    assert!(devices.is_subset(&allowed), "qemu's /dev: {devices:?}");
    for absent in ["root", "home", "proc", "sys", "boot", "srv"] {
        assert!(
            !qemu_root.join(absent).exists(),
            "qemu's root holds /{absent}"
        );
    }
    assert!(
        !qemu_root.join(secret_path.trim_start_matches('/')).exists(),
        "qemu sees a host file outside its run folder"
    );
    // Its root and /usr are read-only to it.
    assert!(
        std::fs::read_to_string(format!("/proc/{qemu}/mountinfo"))
            .unwrap()
            .lines()
            .filter(|l| l.split_whitespace().nth(4) == Some("/usr"))
            .all(|l| l
                .split_whitespace()
                .nth(5)
                .is_some_and(|o| o.starts_with("ro"))),
        "qemu's /usr is writable"
    );

    // vhost-device-vsock: unprivileged, a mount namespace of its own.
    let vsock = find("vhost-device-vsock");
    assert_eq!(vsock.len(), 1, "{procs:#?}");
    assert_unprivileged(vsock[0].pid, "vhost-device-vsock");
    assert_ne!(mount_ns(vsock[0].pid), own_ns);
    // Both run as the VM's own uid: one of the user's subordinate uids where it has some.
    let uid = |pid: u32| -> u32 {
        status(pid, "Uid")
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(uid(qemu), uid(vsock[0].pid));
    let user = runvm_hypervisor::qemu::jail::VmmUser::lookup("runvm-vmm").unwrap();
    match user.subuids {
        Some((first, count)) => assert!(
            (u64::from(first)..u64::from(first) + u64::from(count)).contains(&u64::from(uid(qemu))),
            "qemu's uid {} is not one of runvm-vmm's subordinate uids {first}+{count}",
            uid(qemu)
        ),
        None => assert_eq!(uid(qemu), user.uid),
    }
    assert_eq!(
        status(qemu, "Gid").split_whitespace().next().unwrap(),
        user.gid.to_string()
    );

    // virtiofsd: the process serving the guest (the child its namespace sandbox forks; the
    // parent, capability-less, only waits for it) sits in a mount namespace whose root is the
    // share, under seccomp.
    let virtiofsd = find("virtiofsd");
    let share = virtiofsd[0]
        .cmdline
        .windows(2)
        .find(|w| w[0] == "--shared-dir")
        .map(|w| PathBuf::from(&w[1]))
        .expect("virtiofsd's --shared-dir");
    let pids: Vec<String> = virtiofsd.iter().map(|p| p.pid.to_string()).collect();
    let server = virtiofsd
        .iter()
        .find(|p| pids.contains(&status(p.pid, "PPid")))
        .unwrap_or_else(|| panic!("no virtiofsd serving child: {virtiofsd:#?}"));
    for p in &virtiofsd {
        assert_ne!(
            mount_ns(p.pid),
            own_ns,
            "virtiofsd {} shares the host's mount namespace",
            p.pid
        );
    }
    assert_eq!(
        status(server.pid, "Seccomp"),
        "2",
        "virtiofsd's seccomp mode"
    );
    assert_eq!(
        names(format!("/proc/{}/root", server.pid)),
        names(&share),
        "virtiofsd's root is not the share"
    );

    // The guest tries to leave the share, with its own tools.
    let script = format!(
        "mkdir -p /m && mount -t virtiofs runvm /m || echo MOUNT-FAILED
         ls /m >/dev/null && echo share-mounted
         cat /m/../../../../..{secret_path} 2>&1
         ln -s {secret_path} /m/abs-link && cat /m/abs-link 2>&1
         ln -s ../../../../../.. /m/up-link && ls /m/up-link/ 2>&1 | head -3
         cat /escape{secret_path} 2>&1
         cat /secret-link 2>&1
         mknod /m/hostdisk b {major} {minor} && echo node-made
         head -c 16 /m/hostdisk 2>&1 | od -An -tx1
         echo guest-done"
    );
    let (code, out, err) = exec_sh(&host, "jail", &script);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        out.contains("share-mounted") && out.contains("guest-done"),
        "{out}\n{err}"
    );
    assert!(
        !out.contains("host-only-secret"),
        "the guest read a host file: {out}"
    );
    // What the guest made landed in the share on the host, and only there (the guest's mount
    // of the tag shows the container's folder of the share).
    let landed = find_in(&share, "abs-link", 3)
        .unwrap_or_else(|| panic!("the guest's link is not in the share {}", share.display()));
    assert!(std::fs::symlink_metadata(&landed)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(out.contains("node-made"), "{out}");
    let node = std::fs::symlink_metadata(landed.with_file_name("hostdisk")).unwrap();
    assert!(node.file_type().is_block_device());
    // The node reads the guest's device (if any), never the host's disk.
    let mut first = vec![0u8; 16];
    let dev = PathBuf::from(format!("/dev/block/{major}:{minor}"));
    if let Ok(mut f) = std::fs::File::open(&dev) {
        use std::io::Read;
        f.read_exact(&mut first).unwrap();
        let hex: Vec<String> = first.iter().map(|b| format!("{b:02x}")).collect();
        assert!(
            !out.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .contains(&hex.join(" ")),
            "the guest read the host's disk: {out}"
        );
    }

    let out = host.run(&["delete", "--force", "jail"]);
    assert!(out.status.success(), "delete: {}", text(&out.stderr));
    host.assert_nothing_left();
}
