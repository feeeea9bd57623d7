//! Containers that share namespaces through the `runvm` command line, as podman's pods do: a
//! container whose spec names `/proc/PID/ns/TYPE` of another runvm container (PID as `runvm
//! state` prints it) is made in that container's VM and joins its namespaces there. One VM.

mod common;

use std::time::{Duration, Instant};

use common::{assert_fails, exec_sh, spec, text, wait_for_output, Host};
use serde_json::{json, Value};

/// Gives `config` exactly the namespaces `entries` (type, optional path).
fn with_namespaces(mut config: Value, entries: &[(&str, Option<String>)]) -> Value {
    config["linux"]["namespaces"] = entries
        .iter()
        .map(|(typ, path)| match path {
            Some(p) => json!({"type": typ, "path": p}),
            None => json!({"type": typ}),
        })
        .collect();
    config
}

/// `run -d` of `config` as `id`, its output in `ID.out`; returns that file.
fn run_detached(host: &Host, id: &str, config: &Value) -> std::path::PathBuf {
    let bundle = host.bundle(id, config);
    let (code, out, err) =
        host.run_to_files(&["run", "-d", "--bundle", bundle.to_str().unwrap(), id], id);
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    out
}

/// The QEMU processes started for this test.
fn qemus(host: &Host) -> usize {
    let marker = host.dir.path().display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            cmdline.starts_with("qemu-system") || cmdline.contains("/qemu-system")
        })
        .filter(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            String::from_utf8_lossy(&cmdline).contains(&marker)
        })
        .count()
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_container_naming_another_containers_namespaces_joins_them_in_its_vm() {
    let host = Host::new();
    // The owner: its own namespaces (runc's default spec: a new network namespace, lo up), a
    // hostname, a server on loopback.
    let mut owner = spec(&[
        "/bin/sh",
        "-c",
        "echo ready; /bin/nc -l -p 7777; echo server-done; /bin/sleep 600; echo owner-marker",
    ]);
    owner["hostname"] = json!("alpha");
    let owner_out = run_detached(&host, "owner", &owner);
    wait_for_output(&owner_out, "ready");
    let pid = host.state("owner")["pid"].as_u64().unwrap();
    let ns = |name: &str| Some(format!("/proc/{pid}/ns/{name}"));

    // A member joining the owner's uts, ipc, network and cgroup namespaces (not its pid one).
    let mut member = spec(&["/bin/sh", "-c", "echo member-up; exec /bin/sleep 600"]);
    member.as_object_mut().unwrap().remove("hostname");
    let member = with_namespaces(
        member,
        &[
            ("pid", None),
            ("mount", None),
            ("uts", ns("uts")),
            ("ipc", ns("ipc")),
            ("network", ns("net")),
            ("cgroup", ns("cgroup")),
        ],
    );
    let member_out = run_detached(&host, "member", &member);
    wait_for_output(&member_out, "member-up");
    // The same hostname, the owner's server on 127.0.0.1, its own pid namespace.
    let (code, stdout, stderr) = exec_sh(
        &host,
        "member",
        "hostname; echo hello-from-member | /bin/nc -w 5 127.0.0.1 7777; echo sent=$?; \
         cat /proc/1/cmdline | tr '\\0' ' '",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.starts_with("alpha\n"), "{stdout}");
    assert!(stdout.contains("sent=0"), "{stdout}");
    assert!(!stdout.contains("owner-marker"), "{stdout}");
    let served = wait_for_output(&owner_out, "server-done");
    assert!(served.contains("hello-from-member"), "{served}");

    // A second member joining the owner's pid namespace only: it sees the owner's processes.
    let pid_member = with_namespaces(
        spec(&["/bin/sh", "-c", "echo pid-member-up; exec /bin/sleep 600"]),
        &[
            ("pid", ns("pid")),
            ("mount", None),
            ("network", None),
            ("ipc", None),
            ("uts", None),
        ],
    );
    let pid_member_out = run_detached(&host, "pidmember", &pid_member);
    wait_for_output(&pid_member_out, "pid-member-up");
    let (code, stdout, stderr) = exec_sh(&host, "pidmember", "cat /proc/*/cmdline | tr '\\0' ' '");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("owner-marker"), "{stdout}");
    assert_eq!(qemus(&host), 1, "the three containers share one VM");

    // list shows all three, each with its own pid.
    let list = host.run(&["list", "--format", "json"]);
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    let ids: Vec<&str> = list.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["owner", "member", "pidmember"], "{list:?}");
    assert!(list.iter().all(|s| s["status"] == "running"), "{list:?}");

    // What cannot be joined is refused by name, and nothing is made.
    for (typ, name, message) in [
        (
            "mount",
            "mnt",
            "cannot join the mount namespace of container owner",
        ),
        ("ipc", "uts", "is not a ipc namespace"),
    ] {
        let bad = with_namespaces(spec(&["true"]), &[(typ, ns(name))]);
        let bundle = host.bundle("bad", &bad);
        let out = host.run(&["create", "--bundle", bundle.to_str().unwrap(), "bad"]);
        assert_fails(&out, message);
        assert_fails(&host.run(&["state", "bad"]), "does not exist");
    }

    // The owner's init ends: the pid namespace goes with it (so does its member), the VM
    // stays for the other member.
    let kill = host.run(&["kill", "owner", "KILL"]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    host.wait_status("owner", "stopped");
    host.wait_status("pidmember", "stopped");
    let (code, stdout, stderr) = exec_sh(&host, "member", "echo still-here");
    assert_eq!(
        (code, stdout.as_str()),
        (Some(0), "still-here\n"),
        "{stderr}"
    );
    assert_eq!(qemus(&host), 1);

    // The owner cannot go while containers run in its VM; a stopped one can go alone.
    assert_fails(
        &host.run(&["delete", "owner"]),
        "containers member, pidmember run in its VM",
    );
    let del = host.run(&["delete", "pidmember"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert_fails(&host.run(&["state", "pidmember"]), "does not exist");

    // The last container's exit ends the VM.
    let kill = host.run(&["kill", "member", "KILL"]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    host.wait_status("member", "stopped");
    wait_until("the VM is gone", || qemus(&host) == 0);
    // A stopped container's namespaces cannot be joined: its pid names no container now.
    let late = with_namespaces(spec(&["true"]), &[("ipc", ns("ipc"))]);
    let bundle = host.bundle("late", &late);
    let out = host.run(&["create", "--bundle", bundle.to_str().unwrap(), "late"]);
    assert_fails(&out, "linux.namespaces[0].path");

    for id in ["member", "owner"] {
        let del = host.run(&["delete", id]);
        assert!(del.status.success(), "{id}: {}", text(&del.stderr));
    }
    host.assert_nothing_left();
}

#[test]
fn delete_force_of_a_container_takes_the_containers_in_its_vm_with_it() {
    let host = Host::new();
    let owner_out = run_detached(
        &host,
        "owner",
        &spec(&["/bin/sh", "-c", "echo ready; exec /bin/sleep 600"]),
    );
    wait_for_output(&owner_out, "ready");
    let pid = host.state("owner")["pid"].as_u64().unwrap();
    let member = with_namespaces(
        spec(&["/bin/sh", "-c", "echo member-up; exec /bin/sleep 600"]),
        &[
            ("pid", None),
            ("mount", None),
            ("uts", None),
            ("network", None),
            ("ipc", Some(format!("/proc/{pid}/ns/ipc"))),
        ],
    );
    let member_out = run_detached(&host, "member", &member);
    wait_for_output(&member_out, "member-up");
    let member_pid = host.state("member")["pid"].as_u64().unwrap();
    let del = host.run(&["delete", "--force", "owner"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert_fails(&host.run(&["state", "member"]), "does not exist");
    assert!(
        !std::path::Path::new(&format!("/proc/{member_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{member_pid}/stat"))
                .is_ok_and(|s| s.contains(") Z ")),
        "the member's stand-in was left running"
    );
    host.assert_nothing_left();
}
