//! runc's lifecycle through the `runvm` binary, with real VMs (one per container; few boots).

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;

use common::{assert_fails, receive_master, spec, text, Host};
use serde_json::Value;

#[test]
fn one_container_through_its_whole_lifecycle() {
    let host = Host::new();
    // spec writes runc's default config.json and refuses to overwrite it.
    let specs = host.dir.path().join("spec");
    std::fs::create_dir_all(&specs).unwrap();
    let spec_dir = specs.to_str().unwrap();
    assert!(host.run(&["spec", "--bundle", spec_dir]).status.success());
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(specs.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["process"]["args"], serde_json::json!(["sh"]));
    assert_fails(&host.run(&["spec", "--bundle", spec_dir]), "exists");
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(["sh", "-c", "echo started; sleep 600"]);
    let bundle = host.bundle("b1", &config);
    let bundle = bundle.to_str().unwrap();
    let pid_file = host.dir.path().join("c1.pid");

    let (code, out, err) = host.run_to_files(
        &[
            "create",
            "--bundle",
            bundle,
            "--pid-file",
            pid_file.to_str().unwrap(),
            "c1",
        ],
        "create",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let st = host.state("c1");
    assert_eq!(st["status"], "created");
    assert_eq!(st["ociVersion"], "1.0.2");
    assert_eq!(st["bundle"], bundle);
    let pid: u32 = std::fs::read_to_string(&pid_file).unwrap().parse().unwrap();
    assert_eq!(st["pid"], pid);
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    // An id in use is refused and the existing container is untouched.
    let (code, _, err2) = host.run_to_files(&["create", "--bundle", bundle, "c1"], "dup");
    assert_eq!(code, Some(1));
    let msg = std::fs::read_to_string(&err2).unwrap();
    assert!(msg.contains("container with id exists: c1"), "{msg}");
    assert_eq!(host.state("c1")["status"], "created");

    assert!(host.run(&["start", "c1"]).status.success());
    assert_eq!(host.state("c1")["status"], "running");
    assert_fails(
        &host.run(&["start", "c1"]),
        "cannot start an already running container",
    );

    let ps = host.run(&["ps", "--format", "json", "c1"]);
    let pids: Vec<i32> = serde_json::from_slice(&ps.stdout).unwrap();
    assert!(!pids.is_empty(), "{}", text(&ps.stderr));
    let table = host.ps_table_showing("c1", "sleep 600");
    assert!(
        table.starts_with("UID          PID    PPID  C STIME TTY          TIME CMD")
            && table.contains("sleep 600"),
        "{table}"
    );

    let exec = host.run(&["exec", "c1", "sh", "-c", "echo from-exec; exit 5"]);
    assert_eq!(exec.status.code(), Some(5), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "from-exec\n");

    assert!(host.run(&["pause", "c1"]).status.success());
    assert_eq!(host.state("c1")["status"], "paused");
    assert!(host.run(&["resume", "c1"]).status.success());
    assert_fails(&host.run(&["resume", "c1"]), "container not paused");
    assert_eq!(host.state("c1")["status"], "running");

    let list = host.run(&["list", "--format", "json"]);
    let list: Vec<Value> = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], "c1");
    assert_eq!(list[0]["status"], "running");

    assert_fails(
        &host.run(&["delete", "c1"]),
        "cannot delete container c1 that is not stopped: running",
    );
    assert!(host.run(&["kill", "c1", "KILL"]).status.success());
    let st = host.wait_status("c1", "stopped");
    assert_eq!(st["pid"], 0);
    assert_fails(&host.run(&["pause", "c1"]), "container not running");
    assert_fails(
        &host.run(&["start", "c1"]),
        "cannot start a container that has stopped",
    );
    assert_fails(&host.run(&["kill", "c1", "9"]), "container not running");
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "started\n");

    let del = host.run(&["delete", "c1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    assert_fails(
        &host.run(&["state", "c1"]),
        "container \"c1\" does not exist",
    );
    host.assert_nothing_left();
}

#[test]
fn run_in_the_foreground_detached_and_with_a_console_socket() {
    let host = Host::new();
    // Foreground: stdio relayed, the container's exit code is runvm's, nothing is left.
    let b = host.bundle("fg", &spec(&["sh", "-c", "echo out; echo err >&2; exit 3"]));
    let out = host.run(&["run", "--bundle", b.to_str().unwrap(), "fg"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "out\n");
    assert!(text(&out.stderr).contains("err\n"));
    assert!(std::fs::read_dir(&host.root).unwrap().next().is_none());

    // Detached: runvm returns once it runs; the container stays until deleted.
    let b = host.bundle("bg", &spec(&["sh", "-c", "echo started; exec sleep 600"]));
    let (code, _, err) =
        host.run_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), "bg"], "bg");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    assert_eq!(host.state("bg")["status"], "running");

    // Its start timeline, host and guest phases in the order they happen, as text and SVG.
    let svg = host.dir.path().join("bg-timeline.svg");
    let mut waterfall = String::new();
    for _ in 0..50 {
        let out = host.run(&["events", "--timeline", "bg", "--svg", svg.to_str().unwrap()]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        waterfall = text(&out.stdout);
        if waterfall.contains("first-output:bg") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let order: Vec<&str> = waterfall
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let position = |phase: &str| {
        order
            .iter()
            .position(|p| *p == phase)
            .unwrap_or_else(|| panic!("{phase} missing from the timeline:\n{waterfall}"))
    };
    let expected = [
        "config-loaded",
        "created",
        "helpers-started",
        "qemu-spawned",
        "guest:init-entered",
        "guest:agent-listening",
        "agent-ready",
        "container-created:bg",
        "process-started:bg",
        "first-output:bg",
    ];
    for pair in expected.windows(2) {
        assert!(
            position(pair[0]) < position(pair[1]),
            "{} not before {}:\n{waterfall}",
            pair[0],
            pair[1]
        );
    }
    assert!(std::fs::read_to_string(&svg)
        .unwrap()
        .contains("first-output:bg"));
    let del = host.run(&["delete", "--force", "bg"]);
    assert!(del.status.success(), "{}", text(&del.stderr));

    // A terminal through --console-socket, as runc sends it.
    let mut tty_spec = spec(&["sh", "-c", "tty >/dev/null && echo tty-ok; exit 4"]);
    tty_spec["process"]["terminal"] = true.into();
    let b = host.bundle("tty", &tty_spec);
    let socket = host.dir.path().join("console.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || {
        let master = receive_master(&listener);
        let mut file = std::fs::File::from(master);
        let mut output = Vec::new();
        let mut buf = [0u8; 1024];
        // The master reads EIO once the last holder of the slave (the stand-in) exits.
        while let Ok(n) = file.read(&mut buf) {
            if n == 0 {
                break;
            }
            output.extend_from_slice(&buf[..n]);
        }
        output
    });
    let args = [
        "run",
        "-d",
        "--console-socket",
        socket.to_str().unwrap(),
        "--bundle",
        b.to_str().unwrap(),
        "tty",
    ];
    let (code, _, err) = host.run_to_files(&args, "tty");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    let output = text(&receiver.join().unwrap());
    assert!(output.contains("tty-ok"), "{output:?}");
    host.wait_status("tty", "stopped");
    assert!(host.run(&["delete", "tty"]).status.success());
    host.assert_nothing_left();
}
