//! Faults: the process driving a VM killed at the wrong moment, parts of a VM killed under a
//! running container, state files torn or tampered with, many callers at once. Each test
//! checks that nothing is lost or leaked: no process, mount or file is left.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{assert_fails, run_detached, spec, text, Host};
use serde_json::Value;

/// Processes with an argument under `dir` (a VM run folder): QEMU and its helpers.
fn processes_under(dir: &Path) -> Vec<(u32, String)> {
    let needle = format!("{}/", dir.display());
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            let exe = std::fs::read_link(entry.path().join("exe"))
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push((pid, exe));
        }
    }
    out
}

/// Polls `cond` every 2 ms for up to `timeout`.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

fn sigkill(pid: u32) {
    // SAFETY: kill(2) with plain integers on a process this test made (or found by name).
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
}

/// Starts `runvm create` for `id` in the background.
fn spawn_create(host: &Host, id: &str, bundle: &Path) -> Child {
    host.cmd(&["create", "--bundle", bundle.to_str().unwrap(), id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(host.dir.path().join(format!("{id}.create.err"))).unwrap())
        .spawn()
        .unwrap()
}

fn record(host: &Host, id: &str) -> Value {
    let text = std::fs::read_to_string(host.root.join(id).join("sandbox.json")).unwrap_or_default();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

/// After its creator was killed, the id is listed as unusable (not hidden), `delete --force`
/// removes everything and the id can be used again.
fn assert_removable(host: &Host, id: &str, run_dir: &Path) {
    let list = host.run(&["list", "--format", "json"]);
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    let entry = list
        .iter()
        .find(|e| e["id"] == id)
        .unwrap_or_else(|| panic!("{id} missing from list: {list:?}"));
    assert_eq!(entry["status"], "unknown", "{entry}");
    assert!(
        entry["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{entry}"
    );
    assert_fails(&host.run(&["state", id]), "delete --force");
    let del = host.run(&["delete", "--force", id]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert!(
        wait_for(Duration::from_secs(5), || processes_under(run_dir)
            .is_empty()),
        "VM processes left: {:?}",
        processes_under(run_dir)
    );
    assert!(!host.root.join(id).exists());
}

#[test]
fn sigkill_of_create_at_any_point_then_delete_force_leaves_nothing() {
    let host = Host::new();
    let bundle = host.bundle("b", &spec(&["sh", "-c", "echo hi; sleep 600"]));
    let qemu_up = |run_dir: &Path| {
        processes_under(run_dir)
            .iter()
            .any(|(_, exe)| exe.contains("qemu-system"))
    };

    // 1. QEMU just spawned.
    let id = "k1";
    let run_dir = host.root.join(id).join("vm");
    let mut create = spawn_create(&host, id, &bundle);
    assert!(
        wait_for(Duration::from_secs(30), || qemu_up(&run_dir)),
        "QEMU never started"
    );
    sigkill(create.id());
    create.wait().unwrap();
    // The helpers, spawned before QEMU, are in the record; QEMU is too unless the creator
    // died within the instant between its spawn and the record's write: then `delete --force`
    // finds it by its run folder.
    let rec = record(&host, id);
    let names: Vec<&str> = rec["vm"]["processes"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["name"].as_str()).collect())
        .unwrap_or_default();
    assert!(names.contains(&"virtiofsd"), "{rec}");
    assert!(qemu_up(&run_dir), "the VM should outlive its creator");

    // A tampered record: an unrelated process's pid under QEMU's name, and a run folder
    // outside the root. Neither is touched.
    let mut bystander = std::process::Command::new("sleep")
        .arg("600")
        .spawn()
        .unwrap();
    let outside = host.dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("keep"), "x").unwrap();
    let mut tampered = rec.clone();
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", bystander.id())).unwrap();
    let start: u64 = stat[stat.rfind(')').unwrap() + 1..]
        .split_whitespace()
        .nth(19)
        .unwrap()
        .parse()
        .unwrap();
    tampered["vm"]["processes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "qemu", "pid": bystander.id(), "start_time": start}));
    tampered["vm"]["config"]["run_dir"] = outside.to_str().unwrap().into();
    std::fs::write(
        host.root.join(id).join("sandbox.json"),
        serde_json::to_vec(&tampered).unwrap(),
    )
    .unwrap();
    assert_removable(&host, id, &run_dir);
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "an unrelated process was killed"
    );
    assert!(
        outside.join("keep").exists(),
        "a folder outside the root was touched"
    );
    bystander.kill().unwrap();
    bystander.wait().unwrap();

    // 2. The VM runs, the agent does not answer yet.
    let id = "k2";
    let run_dir = host.root.join(id).join("vm");
    let mut create = spawn_create(&host, id, &bundle);
    assert!(
        wait_for(Duration::from_secs(30), || run_dir
            .join("qmp.sock")
            .exists()),
        "QEMU's monitor never came up"
    );
    assert!(
        !record(&host, id)["timeline"]
            .to_string()
            .contains("agent-ready"),
        "too late: the agent answered already"
    );
    sigkill(create.id());
    create.wait().unwrap();
    assert_removable(&host, id, &run_dir);

    // 3. During CreateContainer: the agent answered, the container is being made.
    let id = "k3";
    let run_dir = host.root.join(id).join("vm");
    let mut create = spawn_create(&host, id, &bundle);
    assert!(
        wait_for(Duration::from_secs(60), || record(&host, id)["timeline"]
            .to_string()
            .contains("agent-ready")),
        "the agent never answered"
    );
    sigkill(create.id());
    create.wait().unwrap();
    assert!(
        !host.root.join(id).join("standin.json").exists(),
        "too late: the container was made"
    );
    assert_removable(&host, id, &run_dir);

    // The id can be created again, and goes as usual.
    let (code, _, err) = host.run_to_files(
        &["create", "--bundle", bundle.to_str().unwrap(), "k1"],
        "again",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    assert_eq!(host.state("k1")["status"], "created");
    let del = host.run(&["delete", "--force", "k1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}

#[test]
fn torn_garbage_and_newer_records_are_listed_and_removed_by_force() {
    let host = Host::new();
    let cases: [(&str, &[u8]); 4] = [
        ("empty", b""),
        ("torn", b"{\"version\": 1, \"id\": \"torn\", \"sta"),
        ("garbage", b"\x00\xffnot json at all"),
        ("newer", b"{\"version\": 999, \"id\": \"newer\"}"),
    ];
    for (id, contents) in cases {
        let dir = host.root.join(id);
        std::fs::create_dir_all(dir.join("containers").join(id)).unwrap();
        std::fs::write(dir.join("lock"), "").unwrap();
        std::fs::write(dir.join("sandbox.json"), contents).unwrap();
        std::fs::write(
            dir.join("containers").join(id).join("container.json"),
            contents,
        )
        .unwrap();
    }
    // A folder with no lock file and a container record that does not parse.
    let bare = host.root.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::write(bare.join("sandbox.json"), "[]").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host.root, std::fs::Permissions::from_mode(0o700)).unwrap();

    let list = host.run(&["list", "--format", "json"]);
    assert!(list.status.success(), "{}", text(&list.stderr));
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    let mut ids: Vec<&str> = list.iter().filter_map(|e| e["id"].as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["bare", "empty", "garbage", "newer", "torn"]);
    for e in &list {
        assert_eq!(e["status"], "unknown", "{e}");
    }
    let newer = list.iter().find(|e| e["id"] == "newer").unwrap();
    assert!(newer["reason"].as_str().unwrap().contains("999"), "{newer}");
    let table = text(&host.run(&["list"]).stdout);
    assert!(table.contains("unknown"), "{table}");
    for id in ["bare", "empty", "garbage", "newer", "torn"] {
        assert_fails(&host.run(&["state", id]), "delete --force");
        let del = host.run(&["delete", "--force", id]);
        assert!(del.status.success(), "{id}: {}", text(&del.stderr));
    }
    host.assert_nothing_left();
}

#[test]
fn a_state_root_others_can_write_is_refused() {
    let host = Host::new();
    std::fs::create_dir_all(&host.root).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&host.root, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = host.run(&["list"]);
    assert_fails(&out, "writable by others");
    assert_fails(&out, host.root.to_str().unwrap());
    std::fs::set_permissions(&host.root, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(host.run(&["list"]).status.success());
}

/// Makes this test process the reaper of orphans, so that a stand-in whose `runvm run -d`
/// exited can be waited for and its exit status read.
fn become_subreaper() {
    // SAFETY: prctl(2) with integer arguments only.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(rc, 0);
}

/// Waits up to `timeout` for the (adopted) process `pid` to exit; its exit code.
fn reap(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: waitpid(2) on a pid this process reaps (subreaper), status written to a local.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            if libc::WIFEXITED(status) {
                return Some(libc::WEXITSTATUS(status));
            }
            return Some(128 + libc::WTERMSIG(status));
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_dead_helper_or_qemu_stops_the_container_with_137_and_leaves_nothing() {
    become_subreaper();
    let host = Host::new();
    for victim in ["virtiofsd", "vhost-device-vsock", "qemu"] {
        let id = format!("v-{victim}");
        let standin = run_detached(&host, &id, &["sh", "-c", "echo up; exec sleep 600"]);
        let run_dir = host.root.join(&id).join("vm");
        // What the stand-in said (its stderr is the container's), for the failures below.
        let said = || {
            std::fs::read_to_string(host.dir.path().join(format!("{id}.err"))).unwrap_or_default()
        };
        assert_eq!(host.state(&id)["status"], "running", "{victim}: {}", said());
        let rec = record(&host, &id);
        let Some(pid) = rec["vm"]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == victim)
            .and_then(|p| p["pid"].as_u64())
        else {
            // The host has kernel vhost-vsock: there is no vhost-device-vsock to kill.
            assert_eq!(victim, "vhost-device-vsock", "{rec}");
            assert!(host.run(&["delete", "--force", &id]).status.success());
            continue;
        };
        sigkill(pid as u32);
        // While the container still runs in the VM, `state` says so; once it says stopped,
        // the VM is really gone.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = host.state(&id);
            if st["status"] == "stopped" {
                assert!(
                    // QEMU is gone; its helpers get SIGTERM and a grace of their own (30 s:
                    // on a loaded CI host the stand-in's clean-up has taken more than 10 s).
                    wait_for(Duration::from_secs(30), || processes_under(&run_dir)
                        .is_empty()),
                    "{victim}: stopped but VM processes remain: {:?}; stand-in alive: {}; it said: {}",
                    processes_under(&run_dir),
                    Path::new(&format!("/proc/{standin}")).exists(),
                    said()
                );
                break;
            }
            assert!(Instant::now() < deadline, "{victim}: never stopped: {st}");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(
            reap(standin, Duration::from_secs(30)),
            Some(137),
            "{victim}: the stand-in reports the container killed; it said: {}",
            said()
        );
        assert_eq!(host.state(&id)["status"], "stopped");
        let del = host.run(&["delete", &id]);
        assert!(del.status.success(), "{victim}: {}", text(&del.stderr));
    }
    host.assert_nothing_left();
}

#[test]
fn an_exited_container_holds_no_vm_and_delete_force_ends_a_running_exec() {
    become_subreaper();
    let host = Host::new();
    let standin = run_detached(&host, "e1", &["sh", "-c", "echo up; exec sleep 600"]);
    let run_dir = host.root.join("e1").join("vm");
    // An exec client in the foreground, as `kubectl exec` through runc's shim would be.
    let mut exec = host
        .cmd(&["exec", "e1", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(exec.try_wait().unwrap().is_none());
    let del = host.run(&["delete", "--force", "e1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    let ended = wait_for(Duration::from_secs(15), || {
        exec.try_wait().unwrap().is_some()
    });
    if !ended {
        let _ = exec.kill();
    }
    assert!(ended, "the exec client outlived its container");
    assert!(reap(standin, Duration::from_secs(10)).is_some());
    assert!(processes_under(&run_dir).is_empty());

    // A container whose init exits gives its VM back: its stand-in reports the exit at once
    // and the VM powers off behind it; state and delete still work.
    let standin = run_detached(&host, "e2", &["sh", "-c", "exit 7"]);
    let run_dir: PathBuf = host.root.join("e2").join("vm");
    assert_eq!(reap(standin, Duration::from_secs(30)), Some(7));
    assert_eq!(host.state("e2")["status"], "stopped");
    assert!(
        wait_for(Duration::from_secs(15), || processes_under(&run_dir)
            .is_empty()),
        "the VM of a stopped container still runs: {:?}",
        processes_under(&run_dir)
    );
    assert!(host.run(&["delete", "e2"]).status.success());
    // `delete` right after the exit, while the VM may still be powering off: it waits for
    // that, and nothing is left when it returns.
    let standin = run_detached(&host, "e3", &["sh", "-c", "exit 3"]);
    let run_dir: PathBuf = host.root.join("e3").join("vm");
    assert_eq!(reap(standin, Duration::from_secs(30)), Some(3));
    let del = host.run(&["delete", "e3"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert!(
        processes_under(&run_dir).is_empty(),
        "delete returned with the VM running: {:?}",
        processes_under(&run_dir)
    );
    host.assert_nothing_left();
}

/// The VM's teardown runs behind the stand-in's exit in `runvm __teardown`; killed half way
/// (a crash), it leaves records that `delete` finds: the VM, its helpers and files go then.
#[test]
fn a_teardown_killed_half_way_leaves_what_delete_removes() {
    become_subreaper();
    let host = Host::new();
    let standin = run_detached(&host, "t1", &["sh", "-c", "sleep 1; exit 4"]);
    let run_dir = host.root.join("t1").join("vm");
    let root = host.root.display().to_string();
    // The teardown starts when the container exits; it takes at least the guest's power-off.
    let mut killed = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while killed.is_none() && Instant::now() < deadline {
        killed = common::processes_with(&root)
            .into_iter()
            .find(|p| p.cmdline.iter().any(|a| a == "__teardown"))
            .map(|p| {
                sigkill(p.pid);
                p.pid
            });
        std::thread::sleep(Duration::from_millis(2));
    }
    let killed = killed.expect("the container's exit started `runvm __teardown`");
    assert_eq!(reap(standin, Duration::from_secs(30)), Some(4));
    let _ = reap(killed, Duration::from_secs(5));
    assert_eq!(host.state("t1")["status"], "stopped");
    let del = host.run(&["delete", "t1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert!(
        processes_under(&run_dir).is_empty(),
        "delete left the VM's processes: {:?}",
        processes_under(&run_dir)
    );
    host.assert_nothing_left();
}
