//! containerd 1.6 (Debian's) runs busybox through `containerd-shim-runvm-v2`, driven by `ctr`.
//! Each test starts its own containerd with a private config, state root and runvm state root,
//! and checks afterwards that no shim, QEMU or helper process and no runvm state is left.
//! These tests boot real VMs (about 5 s each under TCG): they run one at a time.

mod common;

use common::{kill9, Env, IMAGE, RUNTIME, SERIAL};

#[test]
fn ctr_run_prints_and_propagates_exit_codes() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let out = env.run_rm("t1", &["echo", "hi"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    env.assert_clean();

    let out = env.run_rm("t2", &["sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3));
    env.assert_clean();
}

/// The agent's log records travel to the host: a line the agent logged in the guest is in the
/// shim's log (which containerd copies into its own), with the sandbox id and its level.
#[test]
fn a_line_the_agent_logs_lands_in_the_shims_log_with_the_sandbox_id() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let out = env.run_rm("guestlog", &["echo", "hi"]);
    assert!(out.status.success());
    env.assert_clean();
    let log = std::fs::read_to_string(env.dir.path().join("ctd/containerd.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains("runvm::guest") && l.contains("runvm-agent listening"))
        .unwrap_or_else(|| panic!("no guest line in the shim's log:\n{log}"));
    assert!(line.contains("sandbox=guestlog"), "{line}");
    assert!(line.contains("INFO"), "{line}");
    assert!(line.contains("guest_time="), "{line}");
}

/// With `[tracing] otlp_endpoint`, a `ctr run` is traced through the shim: the pod's start is
/// one trace (`shim pod start`, its `shim Create` and `shim Start`), with the agent's spans in
/// the guest under the shim's calls; Delete has its span too; the shim flushes before it exits.
#[test]
fn ctr_run_with_tracing_makes_the_pods_start_one_trace_down_into_the_guest() {
    use runvm_telemetry::receiver::Receiver;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let receiver = Receiver::start().unwrap();
    let env = Env::start_configured(&format!(
        "[tracing]\notlp_endpoint = {:?}\n",
        receiver.endpoint()
    ));
    let out = env.run_rm("traced", &["echo", "hi"]);
    assert!(out.status.success());
    env.assert_clean();
    const SHIM: &str = "containerd-shim-runvm-v2";
    let spans = receiver.wait_for(std::time::Duration::from_secs(20), |s| {
        s.iter().any(|x| x.name == "shim Delete")
            && s.iter()
                .any(|x| x.service == "runvm-agent" && x.name == "StartContainer")
    });
    let pod = spans
        .iter()
        .find(|s| s.service == SHIM && s.name == "shim pod start")
        .unwrap_or_else(|| panic!("no pod start span: {spans:#?}"));
    assert_eq!(
        pod.parent_span_id, "",
        "containerd 1.6 sends no trace context"
    );
    for name in ["shim Create", "shim Start"] {
        let span = spans
            .iter()
            .find(|s| s.service == SHIM && s.name == name)
            .unwrap_or_else(|| panic!("no {name} span: {spans:#?}"));
        assert_eq!(span.parent_span_id, pod.span_id, "{span:?}");
    }
    // (The container exits by itself: containerd kills nothing, it deletes.)
    assert!(
        spans
            .iter()
            .any(|s| s.service == SHIM && s.name == "shim Delete"),
        "no shim Delete: {spans:#?}"
    );
    let shim_ids: std::collections::HashSet<&str> = spans
        .iter()
        .filter(|s| s.service == SHIM)
        .map(|s| s.span_id.as_str())
        .collect();
    for name in ["CreateContainer", "StartContainer"] {
        let guest = spans
            .iter()
            .find(|s| s.service == "runvm-agent" && s.name == name)
            .unwrap_or_else(|| panic!("no guest {name} span: {spans:#?}"));
        assert_eq!(guest.trace_id, pod.trace_id, "{guest:?}");
        assert!(
            shim_ids.contains(guest.parent_span_id.as_str()),
            "{guest:?}"
        );
    }
}

/// `ctr run -t` needs a terminal: `script` gives it one. The container's output comes back
/// through the guest's pty, and its exit code through ctr.
#[test]
fn ctr_run_with_a_terminal_relays_the_tty_and_exit_code() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let ctr = format!(
        "ctr -a {} run -t --rm --runtime {RUNTIME} {IMAGE} t4 sh -c 'echo in-a-tty; tty; exit 5'",
        env.socket
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &ctr, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running script");
    let text = String::from_utf8_lossy(&out.stdout);
    eprintln!("{out:?}");
    // The guest's terminal turns "\n" into "\r\n" (script's own terminal adds one more "\r",
    // as it does for runc).
    assert!(
        text.contains("in-a-tty\r"),
        "not through a terminal: {text:?}"
    );
    assert!(text.contains("/dev/pts/"), "not a terminal: {text:?}");
    assert_eq!(out.status.code(), Some(5), "{text:?}");
    env.assert_clean();
}

/// `ctr run` (ctr 1.6 always attaches stdin): the caller's stdin reaches the container through
/// containerd's FIFO and the agent, and its end is the container's EOF.
#[test]
fn ctr_run_with_stdin_relays_it_and_its_end() {
    use std::io::Write;
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let mut child = std::process::Command::new("ctr")
        .args(env.ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t5",
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running ctr");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"hello from stdin\n").unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(text, "HELLO FROM STDIN\ndone\n");
    env.assert_clean();
}

#[test]
fn ctr_task_exec_pause_resume_metrics_kill() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t3");

    let out = env.run(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "t3",
        "sh",
        "-c",
        "echo from-exec; exit 4",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-exec\n");
    assert_eq!(out.status.code(), Some(4));

    assert!(env.run(&["task", "pause", "t3"]).status.success());
    let ls = env.run(&["task", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("PAUSED"));
    assert!(env.run(&["task", "resume", "t3"]).status.success());
    let ls = env.run(&["task", "ls"]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("RUNNING"));

    let metrics = env.run(&["task", "metrics", "t3"]);
    assert!(metrics.status.success());
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("cpu.usage_usec") && text.contains("memory.usage"),
        "{text}"
    );

    env.kill_and_remove("t3");
}

#[test]
fn qemu_killed_stops_the_task_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t7");
    kill9(env.pid_of("qemu-system", "-name runvm"));
    // The task exits (an exit event reaches containerd), or containerd has already cleaned up
    // after the shim, which exits once its VM is gone.
    env.wait_task_list("t7 still running after QEMU died", |t| {
        t.contains("STOPPED") || !t.contains("t7")
    });
    env.assert_clean();
    let _ = env.run(&["task", "rm", "t7"]);
    assert!(env.run(&["containers", "rm", "t7"]).status.success());
    env.assert_clean();
}

#[test]
fn shim_killed_then_containerd_cleanup_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t8");
    kill9(env.pid_of("containerd-shim-runvm-v2", "-id t8"));
    // containerd notices the shim is gone and runs `containerd-shim-runvm-v2 delete`, which
    // must take the VM, its helpers, mounts and files with it.
    env.assert_clean();
    assert!(env.run(&["containers", "rm", "t8"]).status.success());
}

/// A process exec'd through the shim runs under the container's seccomp filter (`ctr run
/// --seccomp`: containerd's default profile), as the container's init does.
#[test]
fn an_exec_through_the_shim_gets_the_containers_seccomp_filter() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let out = env.run(&[
        "run",
        "-d",
        "--seccomp",
        "--runtime",
        RUNTIME,
        IMAGE,
        "t11",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success());
    for (exec_id, pid) in [("e1", "self"), ("e2", "1")] {
        let out = env.run(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            "t11",
            "grep",
            "Seccomp:",
            &format!("/proc/{pid}/status"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("\t2"), "/proc/{pid}: {text:?}");
    }
    env.kill_and_remove("t11");
    env.assert_clean();
}

/// The shim killed while the VM boots (QEMU up, the agent not answering yet): containerd's
/// cleanup (`shim delete`) must still find and remove the VM and its helpers, which the dead
/// shim had recorded as it spawned them.
#[test]
fn shim_killed_while_the_vm_boots_then_containerd_cleanup_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    let mut ctr = std::process::Command::new("ctr")
        .args(env.ctr(&[
            "run",
            "-d",
            "--runtime",
            RUNTIME,
            IMAGE,
            "t10",
            "sleep",
            "1000",
        ]))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("running ctr");
    let me = env.dir.path().to_string_lossy().to_string();
    let qemu_up = || {
        std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmd);
            cmd.contains("qemu-system") && cmd.contains(&me)
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !qemu_up() {
        assert!(std::time::Instant::now() < deadline, "QEMU never started");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    kill9(env.pid_of("containerd-shim-runvm-v2", "-id t10"));
    let _ = ctr.wait();
    env.assert_clean();
    let _ = env.run(&["task", "rm", "t10"]);
    assert!(env.run(&["containers", "rm", "t10"]).status.success());
    env.assert_clean();
}

/// The shim's own answers to bad requests, asked over its ttrpc socket directly (containerd
/// would refuse some of these before they reach the shim).
#[test]
fn bad_requests_get_the_right_ttrpc_codes_and_start_nothing() {
    use containerd_shim::protos::api::{CreateTaskRequest, KillRequest, StartRequest};
    use containerd_shim::protos::shim_async::{Client, TaskClient};
    use containerd_shim::protos::ttrpc::{context, Code, Error};

    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start();
    env.run_sleeper("t9");
    let task_dir = env
        .dir
        .path()
        .join("ctd/state/io.containerd.runtime.v2.task/default/t9");
    let address = std::fs::read_to_string(task_dir.join("address")).expect("shim address");
    let bad_bundle = env.dir.path().join("bad-bundle");
    std::fs::create_dir_all(bad_bundle.join("rootfs")).unwrap();
    std::fs::write(
        bad_bundle.join("config.json"),
        // It names t9's pod, so the shim routes it there and then finds the spec invalid.
        r#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/"},"root":{"path":"rootfs"},
            "annotations":{"io.kubernetes.cri.container-type":"container",
                           "io.kubernetes.cri.sandbox-id":"t9"}}"#,
    )
    .unwrap();
    let qemus_before = env
        .leftovers()
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let codes = runtime.block_on(async {
        let client = TaskClient::new(Client::connect(address.trim()).await.expect("connect"));
        let ctx = || context::with_timeout(30_000_000_000);
        let code = |r: Result<(), Error>| match r {
            Err(Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
            Ok(_) => (Code::OK, String::new()),
            Err(other) => (Code::UNKNOWN, other.to_string()),
        };
        let dup = CreateTaskRequest {
            id: "t9".into(),
            bundle: task_dir.display().to_string(),
            ..Default::default()
        };
        let bad = CreateTaskRequest {
            id: "bad".into(),
            bundle: bad_bundle.display().to_string(),
            ..Default::default()
        };
        let start = StartRequest {
            id: "nope".into(),
            ..Default::default()
        };
        let kill = KillRequest {
            id: "t9".into(),
            exec_id: "no-such-exec".into(),
            signal: 15,
            ..Default::default()
        };
        vec![
            (
                "duplicate create",
                code(client.create(ctx(), &dup).await.map(|_| ())),
            ),
            (
                "invalid config.json",
                code(client.create(ctx(), &bad).await.map(|_| ())),
            ),
            (
                "start unknown",
                code(client.start(ctx(), &start).await.map(|_| ())),
            ),
            (
                "kill unknown exec",
                code(client.kill(ctx(), &kill).await.map(|_| ())),
            ),
        ]
    });
    eprintln!("{codes:#?}");
    assert_eq!(codes[0].1 .0, Code::ALREADY_EXISTS, "{codes:?}");
    assert_eq!(codes[1].1 .0, Code::INVALID_ARGUMENT, "{codes:?}");
    assert!(codes[1].1 .1.contains("process.args"), "{codes:?}");
    assert_eq!(codes[2].1 .0, Code::NOT_FOUND, "{codes:?}");
    assert_eq!(codes[3].1 .0, Code::NOT_FOUND, "{codes:?}");
    let qemus_after = env
        .leftovers()
        .iter()
        .filter(|c| c.contains("qemu-system"))
        .count();
    assert_eq!(qemus_before, qemus_after, "a bad request started a VM");

    env.kill_and_remove("t9");
}

/// With `[factory] cache = 1` and `runvm factory init`, the shim's sandbox takes the factory's
/// booted VM (the factory counts the hit), and removing the task leaves nothing of it.
#[test]
fn ctr_run_takes_its_vm_from_the_factory() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let env = Env::start_configured("[factory]\ncache = 1\n");
    let runvm = std::path::Path::new(env!("CARGO_BIN_EXE_containerd-shim-runvm-v2"))
        .with_file_name("runvm");
    assert!(runvm.exists(), "{} is not built", runvm.display());
    let factory = |verb: &[&str]| {
        let mut cmd = std::process::Command::new(&runvm);
        cmd.arg("--config").arg(env.runvm_config()).arg("factory");
        cmd.args(verb);
        common::run_ok(&mut cmd)
    };
    factory(&["init"]);
    let out = env.run_rm("f1", &["cat", "/proc/sys/kernel/random/uuid"]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 36);
    let status: serde_json::Value =
        serde_json::from_slice(&factory(&["status", "--format", "json"]).stdout).unwrap();
    assert_eq!(status["hits"], 1, "{status}");
    factory(&["destroy"]);
    env.assert_clean();
}
