//! Files in a container behave as on runc, through the `runvm` binary with a real VM (one boot,
//! one container for every check): shared mappings on the root file system, on a bind volume and
//! on `/dev/shm`; a ConfigMap-style `..data` swap made on the host seen in the container; the
//! shares `nosuid,nodev`; a read-only volume read-only down to its submounts, those made on the
//! host after the start too; a mount made on the host after the start under an `rshared` or
//! `rslave` volume seen in the container (what CSI drivers rely on).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{exec_sh, spec, text, wait_for_output, Host};
use serde_json::json;

/// A program that writes through a `MAP_SHARED` mapping of `argv[1]`, syncs and unmaps it, maps
/// it again and reads back: `ok PATH` on success, else the failing call and its errno.
const MMAP_CHECK_C: &str = r#"
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int fail(const char *what, const char *path) {
    printf("%s %s: %s\n", what, path, strerror(errno));
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 2) return 2;
    const char *path = argv[1];
    char msg[256];
    snprintf(msg, sizeof msg, "written through MAP_SHARED at %s\n", path);
    size_t len = strlen(msg);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return fail("open", path);
    if (ftruncate(fd, 4096) != 0) return fail("ftruncate", path);
    char *p = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return fail("mmap", path);
    memcpy(p, msg, len);
    if (msync(p, 4096, MS_SYNC) != 0) return fail("msync", path);
    if (munmap(p, 4096) != 0) return fail("munmap", path);
    if (ftruncate(fd, len) != 0) return fail("ftruncate", path);
    close(fd);
    fd = open(path, O_RDONLY);
    if (fd < 0) return fail("reopen", path);
    p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) return fail("remap", path);
    if (memcmp(p, msg, len) != 0) {
        printf("read back %.*s instead at %s\n", (int)len, p, path);
        return 1;
    }
    munmap(p, len);
    close(fd);
    printf("ok %s\n", path);
    return 0;
}
"#;

/// How soon a change made on the host must show in the container (kubelet's volume updates).
const HOST_CHANGE_DEADLINE: Duration = Duration::from_secs(2);

/// Compiles [`MMAP_CHECK_C`] statically into `out`.
fn build_mmap_check(dir: &Path, out: &Path) {
    let source = dir.join("mmap_check.c");
    std::fs::write(&source, MMAP_CHECK_C).unwrap();
    let gcc = std::process::Command::new("gcc")
        .args(["-static", "-O2", "-o"])
        .arg(out)
        .arg(&source)
        .output()
        .expect("run gcc");
    assert!(gcc.status.success(), "gcc: {}", text(&gcc.stderr));
}

/// Runs mount(8) or umount(8) with `args` and `path`.
fn run_mount(program: &str, args: &[&str], path: &Path) {
    let out = std::process::Command::new(program)
        .args(args)
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} {path:?}: {}",
        text(&out.stderr)
    );
}

/// Lays out `dir` as kubelet does a ConfigMap volume: `..data` a symbolic link to a timestamped
/// folder, each key a link through `..data`.
fn configmap_volume(dir: &Path, key: &str, value: &str) {
    std::fs::create_dir_all(dir.join("..2024_01_01_00_00_00.1")).unwrap();
    std::fs::write(dir.join("..2024_01_01_00_00_00.1").join(key), value).unwrap();
    std::os::unix::fs::symlink("..2024_01_01_00_00_00.1", dir.join("..data")).unwrap();
    std::os::unix::fs::symlink(format!("..data/{key}"), dir.join(key)).unwrap();
}

/// Updates a [`configmap_volume`] as kubelet's atomic writer does: a new timestamped folder, a
/// temporary link to it renamed over `..data`, the old folder removed.
fn swap_configmap(dir: &Path, key: &str, value: &str) {
    let new = dir.join("..2024_01_01_00_00_01.2");
    std::fs::create_dir_all(&new).unwrap();
    std::fs::write(new.join(key), value).unwrap();
    std::os::unix::fs::symlink("..2024_01_01_00_00_01.2", dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join("..2024_01_01_00_00_00.1")).unwrap();
}

#[test]
fn shared_mappings_host_updates_and_mount_flags_behave_as_on_runc() {
    let host = Host::new();
    let vol = host.dir.path().join("vol");
    let config_vol = host.dir.path().join("configmap");
    let ro_vol = host.dir.path().join("ro");
    std::fs::create_dir_all(&vol).unwrap();
    std::fs::create_dir_all(ro_vol.join("sub")).unwrap();
    configmap_volume(&config_vol, "key", "first\n");
    // A read-only volume with a submount of its own.
    run_mount("mount", &["-t", "tmpfs", "tmpfs"], &ro_vol.join("sub"));
    std::fs::write(ro_vol.join("sub/f"), "submount\n").unwrap();
    // A volume on a shared mount, as kubelet's pod folders are: mounts made under it later
    // propagate to its binds.
    let prop_vol = host.dir.path().join("prop");
    std::fs::create_dir_all(prop_vol.join("later")).unwrap();
    run_mount("mount", &["--bind", prop_vol.to_str().unwrap()], &prop_vol);
    run_mount("mount", &["--make-shared"], &prop_vol);

    let mut config = spec(&["sh", "-c", "echo ready; exec sleep 600"]);
    // A writable root, as a Kubernetes container's.
    config["root"]["readonly"] = false.into();
    let mounts = config["mounts"].as_array_mut().unwrap();
    for (dest, source, options) in [
        ("/vol", &vol, json!(["rbind", "rw"])),
        ("/etc/config", &config_vol, json!(["rbind", "ro"])),
        ("/ro", &ro_vol, json!(["rbind", "ro"])),
        ("/prop-shared", &prop_vol, json!(["rbind", "rshared"])),
        ("/prop-slave", &prop_vol, json!(["rbind", "rslave"])),
        ("/prop-ro", &prop_vol, json!(["rbind", "ro", "rslave"])),
    ] {
        mounts.push(json!({
            "destination": dest,
            "type": "bind",
            "source": source.display().to_string(),
            "options": options,
        }));
    }
    let bundle = host.bundle("files", &config);
    build_mmap_check(host.dir.path(), &bundle.join("rootfs/bin/mmap_check"));
    let (code, out, err) = host.run_to_files(
        &["create", "--bundle", bundle.to_str().unwrap(), "files"],
        "files-create",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let start = host.run(&["start", "files"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    wait_for_output(&out, "ready");

    // MAP_SHARED works on the root file system, on /tmp (part of it), on a bind volume and on
    // /dev/shm; the volume's file on the host holds the bytes written through the mapping.
    for path in ["/mapped", "/tmp/mapped", "/vol/mapped", "/dev/shm/mapped"] {
        let (code, stdout, stderr) = exec_sh(&host, "files", &format!("mmap_check {path}"));
        assert_eq!(code, Some(0), "{path}: {stdout}{stderr}");
        assert_eq!(stdout, format!("ok {path}\n"));
    }
    assert_eq!(
        std::fs::read_to_string(vol.join("mapped")).unwrap(),
        "written through MAP_SHARED at /vol/mapped\n"
    );
    assert_eq!(
        std::fs::read_to_string(bundle.join("rootfs/mapped")).unwrap(),
        "written through MAP_SHARED at /mapped\n"
    );

    // A ConfigMap update (kubelet's `..data` swap) shows in the container within the deadline.
    let (_, stdout, stderr) = exec_sh(&host, "files", "cat /etc/config/key");
    assert_eq!(stdout, "first\n", "{stderr}");
    swap_configmap(&config_vol, "key", "second\n");
    let swapped = Instant::now();
    loop {
        let (_, stdout, _) = exec_sh(&host, "files", "cat /etc/config/key");
        if stdout == "second\n" {
            break;
        }
        assert!(
            swapped.elapsed() < HOST_CHANGE_DEADLINE,
            "still {stdout:?} {:?} after the swap",
            swapped.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("..data swap seen after {:?}", swapped.elapsed());

    // The root file system and the volumes are nosuid,nodev in the container.
    let (_, mountinfo, _) = exec_sh(&host, "files", "cat /proc/self/mountinfo");
    for dest in ["/", "/vol", "/etc/config", "/ro"] {
        let line = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some(dest))
            .unwrap_or_else(|| panic!("no mount on {dest}: {mountinfo}"));
        let options = line.split_whitespace().nth(5).unwrap_or_default();
        for flag in ["nosuid", "nodev"] {
            assert!(
                options.split(',').any(|o| o == flag),
                "{dest} not {flag}: {line}"
            );
        }
    }

    // A read-only volume is read-only down to its submounts.
    let (_, stdout, stderr) = exec_sh(&host, "files", "cat /ro/sub/f");
    assert_eq!(stdout, "submount\n", "{stderr}");
    for path in ["/ro/new", "/ro/sub/new", "/ro/sub/f"] {
        let (code, _, stderr) = exec_sh(&host, "files", &format!("echo x > {path}"));
        assert_ne!(code, Some(0), "{path} was writable");
        assert!(stderr.contains("Read-only file system"), "{path}: {stderr}");
    }
    assert_eq!(
        std::fs::read_to_string(ro_vol.join("sub/f")).unwrap(),
        "submount\n"
    );

    // A mount made on the host after the start under an rshared or rslave volume shows in the
    // container (as a CSI driver's), read-only under a read-only bind.
    run_mount("mount", &["-t", "tmpfs", "tmpfs"], &prop_vol.join("later"));
    std::fs::write(prop_vol.join("later/f"), "later mount\n").unwrap();
    let mounted = Instant::now();
    let all = "cat /prop-shared/later/f /prop-slave/later/f /prop-ro/later/f";
    loop {
        let (_, stdout, stderr) = exec_sh(&host, "files", all);
        if stdout == "later mount\n".repeat(3) {
            break;
        }
        assert!(
            mounted.elapsed() < HOST_CHANGE_DEADLINE,
            "after {:?}: {stdout:?} {stderr:?}",
            mounted.elapsed()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("host mount seen after {:?}", mounted.elapsed());
    let (code, _, stderr) = exec_sh(&host, "files", "echo x > /prop-ro/later/g");
    assert_ne!(
        code,
        Some(0),
        "a later submount of a read-only volume was writable"
    );
    assert!(stderr.contains("Read-only file system"), "{stderr}");
    let (code, _, stderr) = exec_sh(&host, "files", "echo x > /prop-shared/later/g");
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(prop_vol.join("later/g")).unwrap(),
        "x\n"
    );

    let del = host.run(&["delete", "--force", "files"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    run_mount("umount", &["-l"], &ro_vol.join("sub"));
    run_mount("umount", &["-l"], &prop_vol.join("later"));
    run_mount("umount", &["-l"], &prop_vol);
    host.assert_nothing_left();
}
