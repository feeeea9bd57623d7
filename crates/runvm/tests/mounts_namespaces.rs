//! Bind mounts with propagation options and namespaces given by path, through the `runvm`
//! binary with real VMs (one boot for the mounts; the namespace refusals boot nothing).

mod common;

use std::path::Path;

use common::{assert_fails, exec_sh, spec, text, wait_for_output, Host};
use serde_json::{json, Value};

/// The propagation options a bind may carry, each on its own host folder.
const PROPAGATIONS: [&str; 4] = ["shared", "rshared", "slave", "rslave"];

#[test]
fn binds_with_each_propagation_option_show_the_host_folder_both_ways() {
    let host = Host::new();
    let mut config = spec(&["sh", "-c", "echo ready; exec sleep 600"]);
    // A shared root, as a caller asking for mount propagation into the container would set it.
    config["linux"]["rootfsPropagation"] = "shared".into();
    let mounts = config["mounts"].as_array_mut().unwrap();
    for (i, option) in PROPAGATIONS.iter().enumerate() {
        let dir = host.dir.path().join(format!("host-{option}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("from-host"), format!("host {option}\n")).unwrap();
        // A shared mount, as most folders are on a systemd host, with a submount of its own.
        make_shared_with_submount(&dir);
        // Both spellings callers use: Docker's `type: bind` + `rbind`, and `none` + `bind`.
        let (typ, bind) = if i % 2 == 0 {
            ("bind", "rbind")
        } else {
            ("none", "bind")
        };
        mounts.push(json!({
            "destination": format!("/mnt/{option}"),
            "type": typ,
            "source": dir.display().to_string(),
            "options": [bind, option, "rw"]
        }));
    }
    let bundle = host.bundle("prop", &config);
    let (code, out, err) = host.run_to_files(
        &["create", "--bundle", bundle.to_str().unwrap(), "prop"],
        "prop-create",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let start = host.run(&["start", "prop"]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    wait_for_output(&out, "ready");

    for option in PROPAGATIONS {
        let dir = host.dir.path().join(format!("host-{option}"));
        // The host folder's content is at the destination.
        let (code, stdout, stderr) =
            exec_sh(&host, "prop", &format!("cat /mnt/{option}/from-host"));
        assert_eq!(code, Some(0), "{option}: {stderr}");
        assert_eq!(stdout, format!("host {option}\n"));
        // A file written in the container shows on the host...
        let (code, _, stderr) = exec_sh(
            &host,
            "prop",
            &format!("echo guest {option} > /mnt/{option}/from-guest"),
        );
        assert_eq!(code, Some(0), "{option}: {stderr}");
        assert_eq!(
            std::fs::read_to_string(dir.join("from-guest")).unwrap(),
            format!("guest {option}\n")
        );
        // ...and one written on the host after the start shows in the container.
        std::fs::write(dir.join("later"), format!("later {option}\n")).unwrap();
        let (code, stdout, stderr) = exec_sh(&host, "prop", &format!("cat /mnt/{option}/later"));
        assert_eq!(code, Some(0), "{option}: {stderr}");
        assert_eq!(stdout, format!("later {option}\n"));
        // A submount made before create shows; one made on the host after the start does too
        // (the source is shared).
        let (_, stdout, stderr) = exec_sh(&host, "prop", &format!("cat /mnt/{option}/sub/f"));
        assert_eq!(stdout, "submount\n", "{option}: {stderr}");
        tmpfs(&dir.join("late"));
        std::fs::write(dir.join("late/f"), "late mount\n").unwrap();
        let (_, stdout, stderr) = exec_sh(&host, "prop", &format!("cat /mnt/{option}/late/f"));
        assert_eq!(stdout, "late mount\n", "{option}: {stderr}");
    }
    // The container's root is shared, as asked.
    let (_, mountinfo, _) = exec_sh(&host, "prop", "cat /proc/self/mountinfo");
    let root = mountinfo
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some("/"))
        .unwrap_or_default();
    assert!(root.contains("shared:"), "root not shared: {mountinfo}");

    // Another container may join this one's ipc, uts, pid, network and cgroup namespaces (in
    // its VM: joined_namespaces.rs), not its mount namespace: refused by path, nothing made.
    let pid = host.state("prop")["pid"].as_u64().unwrap();
    let mut joiner = spec(&["true"]);
    let mnt = format!("/proc/{pid}/ns/mnt");
    set_namespace_path(&mut joiner, "mount", &mnt);
    let bundle = host.bundle("joiner", &joiner);
    let out = host.run(&["create", "--bundle", bundle.to_str().unwrap(), "joiner"]);
    assert_fails(&out, &mnt);
    assert_fails(&out, "cannot join the mount namespace of container prop");
    assert_fails(&host.run(&["state", "joiner"]), "does not exist");

    let del = host.run(&["delete", "--force", "prop"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    for option in PROPAGATIONS {
        let dir = host.dir.path().join(format!("host-{option}"));
        assert!(
            dir.join("from-host").exists(),
            "the host folder is untouched"
        );
        // The host's own submounts outlive the container's share of the folder.
        assert_eq!(
            std::fs::read_to_string(dir.join("sub/f")).unwrap(),
            "submount\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("late/f")).unwrap(),
            "late mount\n"
        );
        run_mount(&["-R", "-l"], &dir, "umount");
    }
    host.assert_nothing_left();
}

/// Runs mount(8) or umount(8) with `args` and `path`.
fn run_mount(args: &[&str], path: &Path, program: &str) {
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

fn tmpfs(at: &Path) {
    std::fs::create_dir_all(at).unwrap();
    run_mount(&["-t", "tmpfs", "tmpfs"], at, "mount");
}

/// Makes `dir` a shared mount (a bind onto itself) with a tmpfs at `dir/sub` holding `f`.
fn make_shared_with_submount(dir: &Path) {
    let bind = ["--bind", dir.to_str().unwrap()];
    run_mount(&bind, dir, "mount");
    run_mount(&["--make-shared"], dir, "mount");
    tmpfs(&dir.join("sub"));
    std::fs::write(dir.join("sub/f"), "submount\n").unwrap();
}

/// Gives the `typ` namespace of `config` the path `path` (adding the entry if missing).
fn set_namespace_path(config: &mut Value, typ: &str, path: &str) {
    let namespaces = config["linux"]["namespaces"].as_array_mut().unwrap();
    namespaces.retain(|ns| ns["type"] != typ);
    namespaces.push(json!({"type": typ, "path": path}));
}

#[test]
fn a_namespace_path_other_than_the_network_is_refused_at_create() {
    let host = Host::new();
    for (typ, path) in [
        ("ipc", "/proc/1/ns/ipc"),
        ("uts", "/proc/self/ns/uts"),
        ("pid", "/proc/1/ns/pid"),
        ("mount", "/proc/1/ns/mnt"),
        ("cgroup", "/proc/1/ns/cgroup"),
        ("user", "/proc/1/ns/user"),
    ] {
        let mut config = spec(&["true"]);
        set_namespace_path(&mut config, typ, path);
        let id = format!("ns-{typ}");
        let bundle = host.bundle(&id, &config);
        let out = host.run(&["create", "--bundle", bundle.to_str().unwrap(), &id]);
        assert_fails(&out, path);
        assert_fails(&out, "linux.namespaces[");
        assert_fails(&out, "only the network namespace");
        assert_fails(&host.run(&["state", &id]), "does not exist");
    }
    // features says so.
    let features: Value = serde_json::from_slice(&host.run(&["features"]).stdout).unwrap();
    let paths = features["annotations"]["io.runvm.namespace-paths"]
        .as_str()
        .unwrap_or_default();
    assert!(paths.starts_with("network only"), "{features}");
    assert!(features["annotations"]["io.runvm.mount-propagation"].is_string());
    host.assert_nothing_left();
}
