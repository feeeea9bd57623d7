//! Parts of runc's contract a runc caller relies on, through the `runvm` binary with real VMs
//! (one per container; several checks share each container): seccomp on the init and on every
//! exec'd process, with every action; process start without PATH; loopback in a new network
//! namespace.

mod common;

use common::{exec_sh, spec, text, wait_for_output, Host};
use serde_json::{json, Value};

/// SIGSYS's exit status: a process killed by its seccomp filter (KILL, KILL_PROCESS, TRAP).
const KILLED_BY_SECCOMP: i32 = 128 + 31;

/// Creates and starts `id` from `config`; the init's stdout and stderr go to the returned file.
fn create_and_start(host: &Host, id: &str, config: &Value) -> std::path::PathBuf {
    let bundle = host.bundle(id, config);
    let (code, out, err) = host.run_to_files(
        &["create", "--bundle", bundle.to_str().unwrap(), id],
        &format!("{id}-create"),
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let start = host.run(&["start", id]);
    assert!(start.status.success(), "{}", text(&start.stderr));
    out
}

fn remove(host: &Host, id: &str) {
    let del = host.run(&["delete", "--force", id]);
    assert!(del.status.success(), "{}", text(&del.stderr));
}

#[test]
fn seccomp_reaches_the_init_and_every_exec_with_each_action() {
    let host = Host::new();
    let mut config = spec(&[
        "sh",
        "-c",
        "exec 2>&1; grep Seccomp: /proc/self/status; busybox pwd; echo pwd=$?; touch /dev/shm/f; \
         chmod 600 /dev/shm/f; echo chmod=$?; echo ready; exec sleep 600",
    ]);
    // runc's default spec (noNewPrivileges: the filter is loaded right before exec).
    config["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": [
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"},
            {"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO",
             "errnoRet": 13},
            {"names": ["sync"], "action": "SCMP_ACT_KILL"},
            {"names": ["mknod", "mknodat"], "action": "SCMP_ACT_KILL_PROCESS"},
            {"names": ["sethostname"], "action": "SCMP_ACT_TRAP"},
            {"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_LOG"},
            // Argument filters: SIGUSR1 (10) and signals from 30 up refused, others pass.
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 10, "op": "SCMP_CMP_EQ"}]},
            {"names": ["kill"], "action": "SCMP_ACT_ERRNO",
             "args": [{"index": 1, "value": 30, "op": "SCMP_CMP_GE"}]}
        ],
        "flags": ["SECCOMP_FILTER_FLAG_LOG", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"]
    });
    let out = create_and_start(&host, "sc", &config);

    // The init: filtered, getcwd fails with EPERM (no errnoRet), chmod with the errno given.
    let init = wait_for_output(&out, "ready");
    assert!(init.contains("Seccomp:\t2"), "{init}");
    assert!(init.contains("getcwd: Operation not permitted"), "{init}");
    assert!(init.contains("pwd=1"), "{init}");
    assert!(init.contains("Permission denied"), "{init}");
    assert!(init.contains("chmod=1"), "{init}");
    assert_eq!(host.state("sc")["status"], "running");

    // An exec'd process gets the container's filter, as with runc.
    let (code, stdout, stderr) = exec_sh(&host, "sc", "grep Seccomp: /proc/self/status");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Seccomp:\t2"), "{stdout}");
    let (code, _, stderr) = exec_sh(&host, "sc", "busybox pwd");
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("getcwd: Operation not permitted"),
        "{stderr}"
    );
    let (code, _, stderr) = exec_sh(&host, "sc", "chmod 644 /dev/shm/f");
    assert_eq!(code, Some(1));
    assert!(stderr.contains("Permission denied"), "{stderr}");
    // KILL, KILL_PROCESS and TRAP end the process with SIGSYS.
    for (what, script) in [
        ("KILL", "exec sync"),
        ("KILL_PROCESS", "exec mkfifo /dev/shm/p"),
        ("TRAP", "exec hostname other"),
    ] {
        let (code, _, stderr) = exec_sh(&host, "sc", script);
        assert_eq!(code, Some(KILLED_BY_SECCOMP), "{what}: {stderr}");
    }
    // Argument filters decide by the arguments.
    let (code, stdout, stderr) = exec_sh(
        &host,
        "sc",
        "kill -USR1 $$ 2>&1; echo usr1=$?; kill -0 $$; echo zero=$?; kill -30 $$ 2>&1; \
         echo pwr=$?; kill -CONT $$; echo cont=$?",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Operation not permitted"), "{stdout}");
    for expected in ["usr1=1", "zero=0", "pwr=1", "cont=0"] {
        assert!(stdout.contains(expected), "{expected}: {stdout}");
    }
    // LOG and ALLOW (the default) let the call through.
    let (code, _, stderr) = exec_sh(&host, "sc", "mkdir /dev/shm/d && test -d /dev/shm/d");
    assert_eq!(code, Some(0), "{stderr}");
    // The init was not disturbed.
    assert_eq!(host.state("sc")["status"], "running");
    remove(&host, "sc");

    // SCMP_ACT_NOTIFY is refused by name at create, before any VM boots.
    config["linux"]["seccomp"]["syscalls"] =
        json!([{"names": ["mkdir"], "action": "SCMP_ACT_NOTIFY"}]);
    let bundle = host.bundle("notify", &config);
    let create = host.run(&["create", "--bundle", bundle.to_str().unwrap(), "notify"]);
    common::assert_fails(
        &create,
        "linux.seccomp.syscalls[0].action: SCMP_ACT_NOTIFY is not supported by runvm",
    );
    host.assert_nothing_left();
}

#[test]
fn default_spec_without_path_or_no_new_privileges_has_loopback_and_filters_execs() {
    let host = Host::new();
    // runc's default spec (a new network namespace), an environment without PATH as in images
    // built FROM scratch, an absolute args[0], and a filter loaded before the capabilities
    // are dropped (no noNewPrivileges).
    let mut config = spec(&[
        "/bin/sh",
        "-c",
        "echo ready; /bin/nc -l -p 7777; echo server-done; exec /bin/sleep 600",
    ]);
    config["process"]["env"] = json!(["TERM=xterm"]);
    config["process"]
        .as_object_mut()
        .unwrap()
        .remove("noNewPrivileges");
    config["linux"]["seccomp"] = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": ["chmod", "fchmod", "fchmodat"], "action": "SCMP_ACT_ERRNO"}]
    });
    let out = create_and_start(&host, "lo", &config);
    wait_for_output(&out, "ready");

    // An exec'd process without noNewPrivileges is filtered too.
    let (code, stdout, stderr) = exec_sh(
        &host,
        "lo",
        "/bin/grep Seccomp: /proc/self/status; /bin/chmod 600 /dev/shm 2>&1; echo chmod=$?",
    );
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("Seccomp:\t2"), "{stdout}");
    assert!(stdout.contains("Operation not permitted"), "{stdout}");
    assert!(stdout.contains("chmod=1"), "{stdout}");

    // Without PATH a bare name is not found, and named; an absolute path runs.
    let missing = host.run(&["exec", "lo", "nosuch"]);
    common::assert_fails(
        &missing,
        "exec: \"nosuch\": executable file not found in $PATH",
    );
    common::assert_fails(&missing, "runvm: error: exec failed: ");
    // As runc: a process that could not start is 255, not a status of its own.
    assert_eq!(missing.status.code(), Some(255));
    let missing = host.run(&["exec", "lo", "/bin/nosuch"]);
    common::assert_fails(&missing, "/bin/nosuch: no such file or directory");
    // A bare name is looked up in the process's own PATH.
    let found = host.run(&["exec", "--env", "PATH=/bin", "lo", "true"]);
    assert!(found.status.success(), "{}", text(&found.stderr));

    // lo is up in the container's own network namespace: a client reaches the server.
    let (code, stdout, stderr) = exec_sh(&host, "lo", "/bin/ip -o link show lo");
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stdout.contains("UP"), "{stdout}");
    let (code, _, stderr) = exec_sh(
        &host,
        "lo",
        "echo hello-over-loopback | /bin/nc -w 5 127.0.0.1 7777",
    );
    assert_eq!(code, Some(0), "{stderr}");
    let served = wait_for_output(&out, "server-done");
    assert!(served.contains("hello-over-loopback"), "{served}");
    remove(&host, "lo");
    host.assert_nothing_left();
}
