//! Containers in a real VM, through the agent API: one VM boot (slow under TCG) for every
//! scenario, run in sequence. Needs the host set-up and the guest image (`make test` builds
//! both), and Debian's busybox-static for the containers' rootfs.

mod guest;

use std::path::Path;
use std::time::{Duration, Instant};

use guest::*;
use runvm_protocol::agent;
use runvm_sandbox::config::{Config, VsockMode};
use runvm_sandbox::sandbox::create_qemu_sandbox;
use runvm_sandbox::SandboxId;
use serde_json::json;
use ttrpc::Code;

/// The counter a container writes to /tmp/count of its rootfs, seen through the share.
fn counter(rootfs: &Path) -> Option<u64> {
    std::fs::read_to_string(rootfs.join("tmp/count"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn wait_counter(rootfs: &Path, pred: impl Fn(u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if counter(rootfs).is_some_and(&pred) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "counter stuck at {:?}",
            counter(rootfs)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scenarios(g: &Guest) {
    exit_status_and_output(g).await;
    stdin_round_trip(g).await;
    exec_and_signals(g).await;
    init_with_a_sigterm_handler(g).await;
    two_containers_at_once(g).await;
    pause_and_resume(g).await;
    terminals(g).await;
    bad_requests(g).await;
    oom_kill(g).await;
    only_stdio_reaches_container_processes(g).await;
    a_killed_zygote_is_replaced(g).await;
}

async fn exit_status_and_output(g: &Guest) {
    g.run(
        "io",
        &["sh", "-c", "echo out; echo err >&2; exit 3"],
        stdio(false, true, true, false),
    )
    .await;
    let (out, err) = tokio::join!(g.read_all("io", "", false), g.read_all("io", "", true));
    assert_eq!(String::from_utf8_lossy(&out), "out\n");
    assert_eq!(String::from_utf8_lossy(&err), "err\n");
    assert_eq!(g.wait("io", "").await, 3);
    // EOF stays EOF; a second wait gives the same status.
    assert!(g.read_all("io", "", false).await.is_empty());
    assert_eq!(g.wait("io", "").await, 3);
    // A stopped container takes no exec and cannot start again.
    let (code, msg) = g
        .exec("io", "late", &["true"], stdio(false, false, false, false))
        .await
        .unwrap_err();
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("stopped"), "{msg}");
    let (code, msg) = g.start("io").await.unwrap_err();
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    g.remove("io", 0).await;
    let (code, _) = g
        .exec("io", "late", &["true"], stdio(false, false, false, false))
        .await
        .unwrap_err();
    assert_eq!(code, Code::NOT_FOUND);
}

async fn stdin_round_trip(g: &Guest) {
    g.run("cat", &["cat"], stdio(true, true, false, false))
        .await;
    let mut data = vec![0u8; 1 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .unwrap();
    let mut out = g.take_output("cat", "", false).expect("stdout is attached");
    let reader = tokio::spawn(async move { read_to_end(&mut out).await });
    for chunk in data.chunks(100_000) {
        g.write("cat", "", chunk).await;
    }
    g.close_stdin("cat", "").await;
    let echoed = reader.await.unwrap();
    assert_eq!(echoed.len(), data.len());
    assert!(echoed == data, "cat gave back different bytes");
    assert_eq!(g.wait("cat", "").await, 0);
    g.remove("cat", 0).await;
}

async fn exec_and_signals(g: &Guest) {
    g.run("svc", &["sleep", "1000"], stdio(false, false, false, false))
        .await;
    g.exec(
        "svc",
        "e1",
        &["echo", "hi"],
        stdio(false, true, true, false),
    )
    .await
    .unwrap();
    assert_eq!(g.read_all("svc", "e1", false).await, b"hi\n");
    assert!(g.read_all("svc", "e1", true).await.is_empty());
    assert_eq!(g.wait("svc", "e1").await, 0);
    // A process that exits at once: its status is not lost.
    g.exec(
        "svc",
        "quick",
        &["sh", "-c", "exit 5"],
        stdio(false, false, false, false),
    )
    .await
    .unwrap();
    assert_eq!(g.wait("svc", "quick").await, 5);

    // An exec'd sleep is not PID 1 of the namespace: SIGTERM kills it (128+15).
    g.exec(
        "svc",
        "e2",
        &["sleep", "1000"],
        stdio(false, false, false, false),
    )
    .await
    .unwrap();
    let (code, _) = g
        .exec("svc", "e2", &["true"], stdio(false, false, false, false))
        .await
        .unwrap_err();
    assert_eq!(code, Code::ALREADY_EXISTS);
    // A started process execs its program a moment after the start returned.
    let sleepers =
        |procs: &[(i32, String)]| procs.iter().filter(|(_, c)| c == "sleep 1000").count();
    let mut procs = Vec::new();
    for _ in 0..100 {
        procs = g.list("svc").await.unwrap();
        if sleepers(&procs) == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(sleepers(&procs), 2, "{procs:?}");
    g.signal("svc", "e2", 15, false).await;
    assert_eq!(g.wait("svc", "e2").await, 143);

    let s = g.stats("svc").await;
    assert!(s.memory.usage_bytes > 0, "{s:?}");
    assert!(s.cpu.usage_total_ns > 0, "{s:?}");
    assert!(s.pids.current >= 1, "{s:?}");
    assert_eq!(s.memory.limit_bytes, u64::MAX, "no limit set: {s:?}");

    // SIGKILL to everything ends the init too.
    g.signal("svc", "", 9, true).await;
    assert_eq!(g.wait("svc", "").await, 137);
    g.remove("svc", 0).await;
}

/// runc semantics: a container's init is PID 1 of its pid namespace, where SIGTERM is ignored
/// without a handler (so `docker stop` of a bare `sleep` waits, then kills). A shell that traps
/// TERM exits as asked.
async fn init_with_a_sigterm_handler(g: &Guest) {
    g.run(
        "trap",
        &[
            "sh",
            "-c",
            "trap 'exit 143' TERM; echo ready; sleep 1000 & wait",
        ],
        stdio(false, true, false, false),
    )
    .await;
    let first = g.read_at_least("trap", "", 6).await;
    assert_eq!(first, b"ready\n");
    g.signal("trap", "", 15, false).await;
    assert_eq!(g.wait("trap", "").await, 143);
    // Signalling an exited process is NOT_FOUND.
    let req = agent::SignalProcessRequest {
        container_id: "trap".into(),
        signal: 15,
        ..Default::default()
    };
    let (code, _) = status(g.c.signal_process(ctx(), &req).await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND);
    g.remove("trap", 0).await;
}

async fn two_containers_at_once(g: &Guest) {
    let script = ["sh", "-c", "echo $(hostname) up; read x; echo bye $x"];
    g.run("two-a", &script, stdio(true, true, false, false))
        .await;
    g.run("two-b", &script, stdio(true, true, false, false))
        .await;
    for cid in ["two-a", "two-b"] {
        // Start returns once the init was told to go; its exec of the program follows.
        let mut procs = Vec::new();
        for _ in 0..100 {
            procs = g.list(cid).await.unwrap();
            if procs.iter().any(|(_, c)| c.starts_with("sh -c")) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(
            procs.iter().any(|(_, c)| c.starts_with("sh -c")),
            "{procs:?}"
        );
    }
    g.write("two-b", "", b"b\n").await;
    g.write("two-a", "", b"a\n").await;
    let (a, b) = tokio::join!(
        g.read_all("two-a", "", false),
        g.read_all("two-b", "", false)
    );
    assert_eq!(String::from_utf8_lossy(&a), "two-a up\nbye a\n");
    assert_eq!(String::from_utf8_lossy(&b), "two-b up\nbye b\n");
    assert_eq!(g.wait("two-a", "").await, 0);
    assert_eq!(g.wait("two-b", "").await, 0);
    g.remove("two-a", 0).await;
    g.remove("two-b", 0).await;
}

async fn pause_and_resume(g: &Guest) {
    let rootfs = g.shared.join("count/rootfs");
    g.run(
        "count",
        &[
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done",
        ],
        stdio(false, false, false, false),
    )
    .await;
    wait_counter(&rootfs, |n| n >= 3).await;
    g.pause("count", true).await.unwrap();
    let (code, _) = g.pause("count", true).await.unwrap_err();
    assert_eq!(code, Code::FAILED_PRECONDITION);
    let (code, msg) = g
        .exec("count", "x", &["true"], stdio(false, false, false, false))
        .await
        .unwrap_err();
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let frozen = counter(&rootfs);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(counter(&rootfs), frozen, "the counter moved while paused");
    g.pause("count", false).await.unwrap();
    let frozen = frozen.unwrap_or(0);
    wait_counter(&rootfs, |n| n > frozen + 2).await;
    // A paused container is removed all the same (SIGTERM cannot reach it; SIGKILL does).
    g.pause("count", true).await.unwrap();
    g.remove("count", 1).await;
}

async fn terminals(g: &Guest) {
    // The init's terminal, resized before start.
    make_rootfs(&g.shared, "tty");
    g.try_create(
        "tty",
        &spec("tty", &["stty", "size"], true),
        stdio(false, true, false, true),
    )
    .await
    .unwrap();
    g.resize("tty", "", 40, 100).await;
    g.start("tty").await.unwrap();
    let out = String::from_utf8_lossy(&g.read_all("tty", "", false).await).into_owned();
    assert_eq!(out.trim_end(), "40 100", "{out:?}");
    assert!(
        g.read_all("tty", "", true).await.is_empty(),
        "stderr is merged"
    );
    assert_eq!(g.wait("tty", "").await, 0);
    g.remove("tty", 0).await;

    // An exec's terminal, with input.
    g.run(
        "ttyx",
        &["sleep", "1000"],
        stdio(false, false, false, false),
    )
    .await;
    g.exec(
        "ttyx",
        "t1",
        &["sh", "-c", "read x; stty size; echo got $x"],
        stdio(true, true, false, true),
    )
    .await
    .unwrap();
    g.resize("ttyx", "t1", 33, 77).await;
    g.write("ttyx", "t1", b"line\n").await;
    let out = String::from_utf8_lossy(&g.read_all("ttyx", "t1", false).await).into_owned();
    assert!(out.contains("33 77") && out.contains("got line"), "{out:?}");
    assert_eq!(g.wait("ttyx", "t1").await, 0);
    let req = agent::TtyWinResizeRequest {
        container_id: "ttyx".into(),
        rows: 1,
        cols: 1,
        ..Default::default()
    };
    let (code, _) = status(g.c.tty_win_resize(ctx(), &req).await.unwrap_err());
    assert_eq!(code, Code::FAILED_PRECONDITION, "the init has no terminal");
    g.remove("ttyx", 1).await;
}

async fn bad_requests(g: &Guest) {
    make_rootfs(&g.shared, "bad");
    let none = stdio(false, false, false, false);
    let mut no_process = spec("bad", &["true"], false);
    no_process.as_object_mut().unwrap().remove("process");
    let (code, msg) = g
        .try_create("bad", &no_process, none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("no process"), "{msg}");

    let missing = spec("nope", &["true"], false);
    let (code, msg) = g
        .try_create("bad", &missing, none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("/run/runvm/shared/nope/rootfs"), "{msg}");

    let mut bad_cwd = spec("bad", &["true"], false);
    bad_cwd["process"]["cwd"] = "/no/such/dir".into();
    let (code, msg) = g
        .try_create("bad", &bad_cwd, none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("/no/such/dir"), "{msg}");

    let no_binary = spec("bad", &["/bin/no-such-program"], false);
    let (code, msg) = g
        .try_create("bad", &no_binary, none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("no-such-program"), "{msg}");

    let (code, msg) = g
        .try_create("../x", &spec("bad", &["true"], false), none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");

    // After all these failures the id is free and works; a second create is refused.
    g.try_create("bad", &spec("bad", &["sleep", "1000"], false), none.clone())
        .await
        .unwrap();
    let (code, msg) = g
        .try_create("bad", &spec("bad", &["true"], false), none.clone())
        .await
        .unwrap_err();
    assert_eq!(code, Code::ALREADY_EXISTS, "{msg}");
    // Exec before start works, as with runc: the container is created, its init waits.
    g.exec("bad", "e", &["true"], none.clone()).await.unwrap();
    assert_eq!(g.wait("bad", "e").await, 0);
    let (code, _) = g.pause("bad", true).await.unwrap_err();
    assert_eq!(code, Code::FAILED_PRECONDITION);
    let req = agent::WaitProcessRequest {
        container_id: "bad".into(),
        exec_id: "nosuch".into(),
        ..Default::default()
    };
    let (code, msg) = status(g.c.wait_process(ctx(), &req).await.unwrap_err());
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("nosuch"), "{msg}");
    g.remove("bad", 0).await;
}

async fn oom_kill(g: &Guest) {
    g.run("oom", &["sleep", "1000"], stdio(false, false, false, false))
        .await;
    let limit = 32u64 << 20;
    let req = agent::UpdateContainerRequest {
        container_id: "oom".into(),
        resources: protobuf::MessageField::some(agent::LinuxResources {
            oci_resources_json: serde_json::to_vec(
                &json!({"memory": {"limit": limit, "swap": limit}}),
            )
            .unwrap(),
            ..Default::default()
        }),
        ..Default::default()
    };
    g.c.update_container(ctx(), &req).await.unwrap();
    assert_eq!(g.stats("oom").await.memory.limit_bytes, limit);
    let events = g.c.clone();
    let event = tokio::spawn(async move {
        events
            .get_oom_event(ctx(), &agent::GetOOMEventRequest::new())
            .await
    });
    // busybox dd allocates its whole block: 64 MiB in a 32 MiB cgroup.
    g.exec(
        "oom",
        "hog",
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
        stdio(false, false, false, false),
    )
    .await
    .unwrap();
    assert_eq!(g.wait("oom", "hog").await, 137);
    let event = event.await.unwrap().unwrap();
    assert_eq!(event.container_id, "oom");
    assert!(g.stats("oom").await.memory.oom_kills >= 1);
    let list = g.list("oom").await.unwrap();
    assert!(
        list.iter().any(|(_, c)| c == "sleep 1000"),
        "init survived: {list:?}"
    );
    g.remove("oom", 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containers_run_in_the_guest() {
    assert!(
        Path::new(BUSYBOX).is_file(),
        "{BUSYBOX} is missing: apt-get install busybox-static (scripts/setup.sh does)"
    );
    let root = tempfile::Builder::new()
        .prefix("runvm-agent-it-")
        .tempdir()
        .unwrap();
    let mut config = Config::default();
    config.runtime.root = root.path().join("state");
    config.hypervisor.vsock = VsockMode::VhostUser;
    for p in [&config.guest.kernel, &config.guest.initrd] {
        assert!(
            p.is_file(),
            "{} is missing: build the guest image with `cargo xtask guest` (make test does)",
            p.display()
        );
    }
    let id = SandboxId::parse("agent-it").unwrap();
    let (mut sb, _boot) = create_qemu_sandbox(&config, id, Default::default())
        .await
        .unwrap();
    let guest = Guest::new(&sb.dir().join("vm/vsock.hv"), sb.dir().join("shared")).await;
    let console = sb.dir().join("vm/console.log");
    let outcome = tokio::spawn(async move {
        scenarios(&guest).await;
    })
    .await;
    if outcome.is_err() || std::env::var_os("RUNVM_TEST_CONSOLE").is_some() {
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(200).collect();
        eprintln!("--- guest console (last lines) ---");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    sb.stop().await.unwrap();
    sb.delete(true).await.unwrap();
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
    let marker = root.path().display().to_string();
    let left = processes_naming(&marker);
    assert!(left.is_empty(), "processes left behind: {left:#?}");
}

/// Nothing the agent, its zygote or libcontainer's worker holds reaches a container's
/// processes: the init and an exec'd process have their stdio and nothing else.
async fn only_stdio_reaches_container_processes(g: &Guest) {
    g.run("fds", &["sleep", "1000"], stdio(false, false, false, false))
        .await;
    for (exec, dir, expected) in [
        ("init-fds", "/proc/1/fd", "0\n1\n2\n"),
        // ls's own fd 3 is the folder it lists.
        ("own-fds", "/proc/self/fd", "0\n1\n2\n3\n"),
    ] {
        g.exec("fds", exec, &["ls", dir], stdio(false, true, false, false))
            .await
            .unwrap();
        let out = g.read_all("fds", exec, false).await;
        assert_eq!(g.wait("fds", exec).await, 0);
        assert_eq!(String::from_utf8_lossy(&out), expected, "{dir}");
    }
    g.remove("fds", 0).await;
}

/// The agent's zygote (the only `/init` but PID 1 once its workers are gone), killed from a
/// container that shares the guest's pid namespace, is replaced: the next exec works.
async fn a_killed_zygote_is_replaced(g: &Guest) {
    let cid = "zk";
    make_rootfs(&g.shared, cid);
    let mut s = spec(cid, &["sleep", "1000"], false);
    s["linux"]["namespaces"] = json!([{"type": "ipc"}, {"type": "uts"}, {"type": "mount"}]);
    g.try_create(cid, &s, stdio(false, false, false, false))
        .await
        .unwrap();
    g.start(cid).await.unwrap();
    let script = "sleep 1; for p in /proc/[0-9]*; do n=${p#/proc/}; \
        [ \"$(tr '\\0' ' ' < $p/cmdline)\" = '/init ' ] && [ $n != 1 ] && kill -9 $n && echo killed; \
        done; true";
    g.exec(
        cid,
        "kill",
        &["sh", "-c", script],
        stdio(false, true, false, false),
    )
    .await
    .unwrap();
    let out = g.read_all(cid, "kill", false).await;
    assert_eq!(g.wait(cid, "kill").await, 0);
    assert_eq!(String::from_utf8_lossy(&out), "killed\n");
    for exec in ["after1", "after2"] {
        g.exec(cid, exec, &["echo", "ok"], stdio(false, true, false, false))
            .await
            .unwrap();
        let out = g.read_all(cid, exec, false).await;
        assert_eq!(g.wait(cid, exec).await, 0);
        assert_eq!(String::from_utf8_lossy(&out), "ok\n");
    }
    g.remove(cid, 0).await;
}
