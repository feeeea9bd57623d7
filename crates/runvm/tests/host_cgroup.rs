//! The VM in its container's host cgroup (`linux.cgroupsPath`): made with the spec's limits
//! (memory plus the VM overhead) before the VM starts, holding QEMU, its helpers and the
//! stand-in, gone after delete; bad paths and values refused by name with nothing left.

mod common;

use std::path::{Path, PathBuf};

use common::{assert_fails, spec, text, Host};
use runvm_sandbox::config::DEFAULT_VM_MEMORY_OVERHEAD_MIB;
use serde_json::{json, Value};

const ROOT: &str = "/sys/fs/cgroup";

fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// The cgroup's folder in the hierarchy of `controller` (v1) or the unified one (v2).
fn dir(controller: &str, path: &str) -> PathBuf {
    let relative = path.trim_start_matches('/');
    if unified() {
        Path::new(ROOT).join(relative)
    } else {
        Path::new(ROOT).join(controller).join(relative)
    }
}

fn read(controller: &str, path: &str, v1: &str, v2: &str) -> String {
    let file = dir(controller, path).join(if unified() { v2 } else { v1 });
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .to_string()
}

fn procs(controller: &str, path: &str) -> Vec<u32> {
    read(controller, path, "cgroup.procs", "cgroup.procs")
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn exists_anywhere(path: &str) -> Vec<PathBuf> {
    [
        "memory", "cpu", "pids", "cpuset", "devices", "freezer", "blkio", "cpuacct",
    ]
    .iter()
    .map(|c| dir(c, path))
    .filter(|d| d.exists())
    .collect()
}

/// Removes the parents the test's paths made (the runtime removes only the leaf, as runc).
fn remove_parents(parents: &[&str]) {
    for c in [
        "memory", "cpu", "pids", "cpuset", "devices", "freezer", "blkio", "cpuacct",
    ] {
        for p in parents {
            let _ = std::fs::remove_dir(dir(c, p));
        }
    }
}

#[test]
fn the_vm_lives_in_its_host_cgroup_with_the_spec_limits_until_delete() {
    let host = Host::new();
    let id = format!("hostcg{}", std::process::id());
    // systemd's form, as containerd's CRI sends it with the systemd cgroup driver.
    let slice = format!("runvmtest-pod{}.slice", std::process::id());
    let given = format!("{slice}:cri-containerd:{id}");
    let path = format!("/runvmtest.slice/{slice}/cri-containerd-{id}.scope");
    let parents = [
        format!("/runvmtest.slice/{slice}"),
        "/runvmtest.slice".to_string(),
    ];
    let parents: Vec<&str> = parents.iter().map(String::as_str).collect();
    let mut s = spec(&["sleep", "1000"]);
    s["linux"]["cgroupsPath"] = json!(given);
    s["linux"]["resources"] = json!({
        "memory": {"limit": 268435456},
        "cpu": {"quota": 50000, "period": 100000},
        "pids": {"limit": 200}
    });
    let b = host.bundle(&id, &s);
    let (code, _, err) = host.run_to_files(&["create", "--bundle", b.to_str().unwrap(), &id], "c");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());

    let overhead = u64::from(DEFAULT_VM_MEMORY_OVERHEAD_MIB) << 20;
    let memory: u64 = read("memory", &path, "memory.limit_in_bytes", "memory.max")
        .parse()
        .unwrap();
    assert_eq!(memory, 268_435_456 + overhead, "memory limit plus overhead");
    if unified() {
        assert_eq!(read("cpu", &path, "", "cpu.max"), "50000 100000");
    } else {
        assert_eq!(read("cpu", &path, "cpu.cfs_quota_us", ""), "50000");
        assert_eq!(read("cpu", &path, "cpu.cfs_period_us", ""), "100000");
    }
    assert_eq!(read("pids", &path, "pids.max", "pids.max"), "200");

    // QEMU, its helpers and the init's stand-in are in it, in every hierarchy.
    let record: Value =
        serde_json::from_slice(&std::fs::read(host.root.join(&id).join("sandbox.json")).unwrap())
            .unwrap();
    assert_eq!(record["host_cgroup"]["given"], given.as_str());
    assert_eq!(record["host_cgroup"]["path"], path.as_str());
    let mut wanted: Vec<(String, u32)> = record["vm"]["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect();
    assert!(wanted.iter().any(|(n, _)| n == "qemu"), "{wanted:?}");
    assert!(wanted.len() >= 2, "QEMU and at least virtiofsd: {wanted:?}");
    let standin = host.state(&id)["pid"].as_u64().unwrap() as u32;
    wanted.push(("stand-in".into(), standin));
    for controller in ["memory", "cpu", "pids"] {
        let inside = procs(controller, &path);
        for (name, pid) in &wanted {
            assert!(
                inside.contains(pid),
                "{name} ({pid}) not in {}: {inside:?}",
                dir(controller, &path).display()
            );
        }
    }
    // `update` changes the host cgroup too (memory plus the overhead).
    let out = host.run(&["update", "--memory", "128m", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let memory: u64 = read("memory", &path, "memory.limit_in_bytes", "memory.max")
        .parse()
        .unwrap();
    assert_eq!(
        memory,
        (128 << 20) + overhead,
        "updated memory limit plus overhead"
    );

    // A process the container execs gets a stand-in there too.
    let pid_file = host.dir.path().join("exec.pid");
    let (code, _, err) = host.run_to_files(
        &[
            "exec",
            "-d",
            "--pid-file",
            pid_file.to_str().unwrap(),
            &id,
            "sleep",
            "100",
        ],
        "exec",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    let exec_standin: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(
        procs("memory", &path).contains(&exec_standin),
        "exec's stand-in"
    );

    assert!(host.run(&["kill", &id, "KILL"]).status.success());
    host.wait_status(&id, "stopped");
    let out = host.run(&["delete", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left = exists_anywhere(&path);
    remove_parents(&parents);
    assert!(left.is_empty(), "host cgroup left after delete: {left:?}");
    host.assert_nothing_left();

    // A relative cgroupfs path (under the root), removed by `delete --force` of a live VM.
    let forced = format!("runvmtest{}/forced", std::process::id());
    let mut s = spec(&["sleep", "1000"]);
    s["linux"]["cgroupsPath"] = json!(forced);
    let b = host.bundle("forced", &s);
    let (code, _, err) = host.run_to_files(
        &["create", "--bundle", b.to_str().unwrap(), "forced"],
        "forced",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    let absolute = format!("/{forced}");
    assert!(
        !procs("memory", &absolute).is_empty(),
        "the VM in /{forced}"
    );
    let out = host.run(&["delete", "--force", "forced"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let left = exists_anywhere(&absolute);
    remove_parents(&[&format!("/runvmtest{}", std::process::id())]);
    assert!(
        left.is_empty(),
        "host cgroup left after delete --force: {left:?}"
    );
    host.assert_nothing_left();
}

#[test]
fn bad_cgroups_paths_and_resources_are_refused_by_name_leaving_nothing() {
    let host = Host::new();
    let pid = std::process::id();
    let cases: Vec<(String, Value, String)> = vec![
        (
            format!("/runvmbad{pid}/../../etc"),
            json!(null),
            format!("linux.cgroupsPath \"/runvmbad{pid}/../../etc\" is invalid"),
        ),
        (
            format!("runvmbad{pid}.slice:only-two"),
            json!(null),
            "three `:`-separated parts".into(),
        ),
        (
            format!("/runvmbad{pid}/c"),
            json!({"memory": {"limit": 0}}),
            "linux.resources.memory.limit = 0 is invalid; valid: a positive byte count".into(),
        ),
        (
            format!("/runvmbad{pid}/c"),
            json!({"cpu": {"quota": -5, "period": 100000}}),
            "linux.resources.cpu.quota = -5 is invalid".into(),
        ),
        (
            format!("/runvmbad{pid}/c"),
            json!({"pids": {"limit": 0}}),
            "linux.resources.pids.limit = 0 is invalid".into(),
        ),
        // Valid in form, refused by the kernel while the cgroup is made: undone.
        (
            format!("/runvmbad{pid}/c"),
            json!({"cpu": {"cpus": "4095"}}),
            format!("host cgroup /runvmbad{pid}/c: cannot write the resources"),
        ),
    ];
    for (i, (path, resources, message)) in cases.iter().enumerate() {
        let mut s = spec(&["true"]);
        s["linux"]["cgroupsPath"] = json!(path);
        if !resources.is_null() {
            s["linux"]["resources"] = resources.clone();
        }
        let b = host.bundle(&format!("b{i}"), &s);
        let out = host.run(&[
            "create",
            "--bundle",
            b.to_str().unwrap(),
            &format!("bad{i}"),
        ]);
        assert_fails(&out, message);
        let left = exists_anywhere(&format!("/runvmbad{pid}/c"));
        assert!(left.is_empty(), "{path}: cgroup left: {left:?}");
        host.assert_nothing_left();
    }
    // A cgroup someone else's process is in is not taken over (nor killed on the way out).
    let busy = format!("/runvmbad{pid}/busy");
    let busy_dir = dir("memory", &busy);
    std::fs::create_dir_all(&busy_dir).unwrap();
    let mut sleeper = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(busy_dir.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
    let mut s = spec(&["true"]);
    s["linux"]["cgroupsPath"] = json!(busy);
    let b = host.bundle("busy", &s);
    let out = host.run(&["create", "--bundle", b.to_str().unwrap(), "busy"]);
    assert_fails(&out, "exists with processes in it");
    let untouched = sleeper.try_wait().unwrap().is_none() && busy_dir.exists();
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    let _ = std::fs::remove_dir(&busy_dir);
    remove_parents(&[&format!("/runvmbad{pid}")]);
    assert!(untouched, "the busy cgroup or its process was touched");
    host.assert_nothing_left();
}
