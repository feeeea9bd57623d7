//! The corners of runc's command line through the `runvm` binary, with real VMs (three boots:
//! one container carries most checks).

mod common;

use std::io::{BufRead, BufReader, Read};
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{assert_fails, receive_master, spec, text, Host};
use serde_json::{json, Value};

/// Everything a terminal master gives until the last holder of its slave goes (EIO).
fn read_master(master: OwnedFd) -> String {
    let mut file = std::fs::File::from(master);
    let mut output = Vec::new();
    let mut buf = [0u8; 1024];
    while let Ok(n) = file.read(&mut buf) {
        if n == 0 {
            break;
        }
        output.extend_from_slice(&buf[..n]);
    }
    text(&output)
}

/// Runs `sh -c script` in container `id`, expecting success; its stdout.
fn exec_sh(host: &Host, id: &str, script: &str) -> String {
    let out = host.run(&["exec", id, "sh", "-c", script]);
    assert!(
        out.status.success(),
        "exec {script:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The stats of `events --stats`.
fn stats(host: &Host, id: &str) -> Value {
    let out = host.run(&["events", "--stats", id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 1, "one event: {lines:?}");
    serde_json::from_str(lines[0]).unwrap()
}

/// Lines of a streaming `events` until `done` says stop (or 60 s pass); the command is killed.
fn stream_events(host: &Host, args: &[&str], mut done: impl FnMut(&[Value]) -> bool) -> Vec<Value> {
    let mut child = host
        .cmd(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut events = Vec::new();
    while !done(&events) {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => events.push(serde_json::from_str(&line).unwrap()),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    events
}

#[test]
fn a_created_container_takes_execs_and_every_corner_of_the_cli_works_on_it() {
    let host = Host::new();
    // `list` with nothing: Go's encoding of an empty list.
    let out = host.run(&["list", "--format", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "null\n");

    // /dev read-only, as the spec asks.
    let mut config = spec(&["sh", "-c", "echo started; exec sleep 600"]);
    for m in config["mounts"].as_array_mut().unwrap() {
        if m["destination"] == "/dev" {
            m["options"].as_array_mut().unwrap().push(json!("ro"));
        }
    }
    let bundle = host.bundle("c1", &config);
    let bundle = bundle.to_str().unwrap();
    let (code, _, err) = host.run_to_files(&["create", "--bundle", bundle, "c1"], "create");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());

    // `list` as runc prints it: Go's tabwriter columns, containerState's keys in order.
    let table = text(&host.run(&["list"]).stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER"],
        "{table}"
    );
    assert!(lines[0].starts_with("ID          PID"), "{table}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        (row[0], row[2], row[3], row[5]),
        ("c1", "created", bundle, "root")
    );
    let list = text(&host.run(&["list", "-f", "json"]).stdout);
    assert!(
        list.starts_with(r#"[{"ociVersion":"1.0.2","id":"c1","pid":"#),
        "{list}"
    );
    let list: Vec<Value> = serde_json::from_str(&list).unwrap();
    let keys: Vec<&String> = list[0].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "bundle",
            "created",
            "id",
            "ociVersion",
            "owner",
            "pid",
            "rootfs",
            "status"
        ]
    );
    assert_eq!(list[0]["status"], "created");

    // A created container takes new processes, as runc's does; signal 0 checks it is alive.
    assert_eq!(exec_sh(&host, "c1", "echo in-created"), "in-created\n");
    let kill0 = host.run(&["kill", "c1", "0"]);
    assert!(kill0.status.success(), "{}", text(&kill0.stderr));
    assert_eq!(host.state("c1")["status"], "created");

    // exec -p with only args: runc's defaults fill the rest (root, /).
    let process = host.dir.path().join("process.json");
    std::fs::write(
        &process,
        r#"{"args": ["/bin/sh", "-c", "id -u; id -g; pwd"]}"#,
    )
    .unwrap();
    let out = host.run(&["exec", "-p", process.to_str().unwrap(), "c1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "0\n0\n/\n");

    assert!(host.run(&["start", "c1"]).status.success());
    assert_eq!(host.state("c1")["status"], "running");

    // /dev is read-only; its devices still work.
    let out = exec_sh(
        &host,
        "c1",
        "touch /dev/x 2>&1; echo ok >/dev/null && echo null-ok",
    );
    assert!(out.contains("Read-only file system"), "{out}");
    assert!(out.contains("null-ok"), "{out}");

    // exec -t with --console-socket, as a non-root user: the terminal is the user's.
    let socket = host.dir.path().join("exec-console.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let receiver = std::thread::spawn(move || read_master(receive_master(&listener)));
    let args = [
        "exec",
        "-t",
        "--console-socket",
        socket.to_str().unwrap(),
        "-u",
        "1000:1000",
        "c1",
        "sh",
        "-c",
        "echo owner=$(stat -c %u $(tty)); exit 3",
    ];
    let (code, _, err) = host.run_to_files(&args, "exec-tty");
    assert_eq!(code, Some(3), "{}", std::fs::read_to_string(&err).unwrap());
    let output = receiver.join().unwrap();
    assert!(output.contains("owner=1000"), "{output:?}");

    // exec --detach with --pid-file: the pid is the exec's stand-in, alive until the process
    // ends.
    let pid_file = host.dir.path().join("exec.pid");
    let args = [
        "exec",
        "-d",
        "--pid-file",
        pid_file.to_str().unwrap(),
        "c1",
        "sleep",
        "500",
    ];
    let (code, _, err) = host.run_to_files(&args, "exec-d");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let exec_pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{exec_pid}/cmdline")).unwrap();
    assert!(text(&cmdline).contains("__standin"), "{}", text(&cmdline));

    // ps: ps -ef's columns with guest pids; -f json the pids.
    let table = host.ps_table_showing("c1", "sleep 500");
    let mut lines = table.lines();
    assert_eq!(
        lines.next(),
        Some("UID          PID    PPID  C STIME TTY          TIME CMD")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    let sleeper = rows
        .iter()
        .find(|r| r[7..] == ["sleep", "500"])
        .unwrap_or_else(|| panic!("no sleep 500 in {table}"));
    assert_eq!(sleeper[0], "root");
    let out = host.run(&["ps", "-f", "json", "c1"]);
    let pids: Vec<i32> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        pids.contains(&sleeper[1].parse().unwrap()),
        "{pids:?} {table}"
    );
    assert!(pids.len() >= 2, "{pids:?}");

    // update, one resource at a time, each seen in the container's cgroup.
    let cgroup = "d=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup); cat $d/";
    let updates: [(&[&str], &str, &str); 9] = [
        (&["--memory", "256m"], "memory.max", "268435456"),
        (&["--memory-reservation", "128m"], "memory.low", "134217728"),
        // Swap with the limit (as runc, the spec's swap is memory + swap).
        (
            &["--memory", "256m", "--memory-swap", "512m"],
            "memory.swap.max",
            "268435456",
        ),
        // Swap alone: merged with the current limit (256 MiB), as runc.
        (&["--memory-swap", "768m"], "memory.swap.max", "536870912"),
        // runc's (1.3+) quadratic shares-to-weight rule.
        (&["--cpu-share", "512"], "cpu.weight", "59"),
        (
            &["--cpu-quota", "50000", "--cpu-period", "100000"],
            "cpu.max",
            "50000 100000",
        ),
        (&["--cpuset-cpus", "0"], "cpuset.cpus", "0"),
        (&["--pids-limit", "50"], "pids.max", "50"),
        // BFQ's weight as it is, else io.weight scaled to 1-10000 (runc's rule).
        (
            &["--blkio-weight", "500"],
            "io.bfq.weight 2>/dev/null || cat $d/io.weight",
            "default 500|default 4950",
        ),
    ];
    for (flags, file, want) in updates {
        let mut args = vec!["update"];
        args.extend_from_slice(flags);
        args.push("c1");
        let out = host.run(&args);
        assert!(out.status.success(), "{flags:?}: {}", text(&out.stderr));
        let got = exec_sh(&host, "c1", &format!("{cgroup}{file}"));
        assert!(
            want.split('|').any(|w| w == got.trim()),
            "{flags:?}: {got:?}"
        );
    }
    // -r: the OCI resources as JSON from stdin.
    let mut update = host
        .cmd(&["update", "-r", "-", "c1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    update
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"pids": {"limit": 60}}"#)
        .unwrap();
    let out = update.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        exec_sh(&host, "c1", &format!("{cgroup}pids.max")).trim(),
        "60"
    );

    // events --stats: runc's event, with the limits just set.
    let e = stats(&host, "c1");
    assert_eq!(
        (e["type"].as_str(), e["id"].as_str()),
        (Some("stats"), Some("c1"))
    );
    let d = &e["data"];
    assert_eq!(d["pids"]["limit"], 60);
    assert!(d["pids"]["current"].as_u64().unwrap() >= 2, "{d}");
    assert_eq!(d["memory"]["usage"]["limit"], 268435456u64);
    assert!(d["memory"]["usage"]["usage"].as_u64().unwrap() > 0, "{d}");
    assert!(d["cpu"]["usage"]["total"].as_u64().unwrap() > 0, "{d}");
    for key in [
        "cpuset",
        "blkio",
        "hugetlb",
        "intel_rdt",
        "network_interfaces",
    ] {
        assert!(d.get(key).is_some(), "{key} missing: {d}");
    }
    // events streams every --interval.
    let started = Instant::now();
    let events = stream_events(&host, &["events", "--interval", "300ms", "c1"], |e| {
        e.len() >= 3
    });
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(events
        .iter()
        .all(|e| e["type"] == "stats" && e["id"] == "c1"));
    assert!(started.elapsed() >= Duration::from_millis(600));

    // A paused container: its state, and exec refused as runc refuses it.
    assert!(host.run(&["pause", "c1"]).status.success());
    let st = host.state("c1");
    assert_eq!(st["status"], "paused");
    assert!(st["pid"].as_u64().unwrap() > 0);
    assert_fails(
        &host.run(&["exec", "c1", "true"]),
        "cannot exec in a paused container (use --ignore-paused to override)",
    );
    assert!(host.run(&["resume", "c1"]).status.success());

    // kill --all: every process, the detached exec too (its stand-in exits).
    let out = host.run(&["kill", "--all", "c1", "KILL"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    host.wait_status("c1", "stopped");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{exec_pid}")).exists() {
        assert!(Instant::now() < deadline, "the exec's stand-in lives on");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_fails(&host.run(&["kill", "c1", "0"]), "container not running");
    let del = host.run(&["delete", "c1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}

#[test]
fn oom_kills_are_events() {
    let host = Host::new();
    let mut config = spec(&["sleep", "600"]);
    config["linux"]["resources"]["memory"] = json!({"limit": 64 << 20});
    let b = host.bundle("o1", &config);
    let (code, _, err) =
        host.run_to_files(&["run", "-d", "--bundle", b.to_str().unwrap(), "o1"], "o1");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    let hog = std::thread::spawn({
        let host_root = host.root.clone();
        move || {
            std::thread::sleep(Duration::from_secs(2));
            std::process::Command::new(env!("CARGO_BIN_EXE_runvm"))
                .env_remove("RUNVM_CONFIG")
                .arg("--root")
                .arg(host_root)
                .args([
                    "exec",
                    "o1",
                    "sh",
                    "-c",
                    "x=$(head -c 300m /dev/zero | tr '\\0' a)",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
        }
    });
    let events = stream_events(&host, &["events", "--interval", "1s", "o1"], |e| {
        e.iter().any(|e| e["type"] == "oom")
    });
    let status = hog.join().unwrap();
    assert!(!status.success(), "the hog was not killed");
    let oom = events
        .iter()
        .find(|e| e["type"] == "oom")
        .unwrap_or_else(|| panic!("no oom event in {events:?}"));
    assert_eq!(oom, &json!({"type": "oom", "id": "o1"}));
    assert_eq!(host.state("o1")["status"], "running");
    let del = host.run(&["delete", "--force", "o1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}

#[test]
fn run_keep_version_and_logs_in_both_formats() {
    let host = Host::new();
    // runc's three version lines.
    let out = host.run(&["--version"]);
    let version = text(&out.stdout);
    let lines: Vec<&str> = version.lines().collect();
    assert_eq!(lines.len(), 3, "{version}");
    assert!(lines[0].starts_with("runvm version "), "{version}");
    assert!(
        lines[1].starts_with("commit: ") && lines[1].len() > 8,
        "{version}"
    );
    assert_eq!(lines[2], "spec: 1.0.2");
    assert_eq!(text(&host.run(&["-v"]).stdout), version);
    assert_eq!(text(&host.run(&["version"]).stdout), version);

    // run --keep: the exit code is the container's, and the container stays, stopped.
    let log = host.dir.path().join("run.log");
    let b = host.bundle("k1", &spec(&["sh", "-c", "exit 7"]));
    let args = [
        "--debug",
        "--log",
        log.to_str().unwrap(),
        "--log-format",
        "json",
        "run",
        "--keep",
        "--bundle",
        b.to_str().unwrap(),
        "k1",
    ];
    let out = host.run(&args);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let st = host.state("k1");
    assert_eq!(
        (st["status"].as_str(), st["pid"].as_u64()),
        (Some("stopped"), Some(0))
    );
    // --debug into --log as JSON lines.
    let logged = std::fs::read_to_string(&log).unwrap();
    let entries: Vec<Value> = logged
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    assert!(entries.iter().any(|e| e["level"] == "debug"), "{logged}");
    assert!(entries
        .iter()
        .all(|e| e["msg"].is_string() && e["time"].is_string()));

    // An error goes to the log (JSON) and to stderr.
    let err_log = host.dir.path().join("err.log");
    let args = [
        "--log",
        err_log.to_str().unwrap(),
        "--log-format",
        "json",
        "state",
        "nope",
    ];
    assert_fails(&host.run(&args), "container \"nope\" does not exist");
    let line: Value =
        serde_json::from_str(std::fs::read_to_string(&err_log).unwrap().trim()).unwrap();
    assert_eq!(line["level"], "error");
    assert!(
        line["msg"].as_str().unwrap().contains("does not exist"),
        "{line}"
    );

    // --debug on stderr (a pipe) and into --log as text: logrus lines, never colour codes.
    let out = host.run(&["--debug", "state", "k1"]);
    assert!(out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("level=debug"), "{stderr}");
    assert!(stderr.lines().all(|l| l.starts_with("time=\"")), "{stderr}");
    assert!(!stderr.contains('\x1b'), "{stderr:?}");
    let text_log = host.dir.path().join("text.log");
    let out = host.run(&[
        "--debug",
        "--log",
        text_log.to_str().unwrap(),
        "state",
        "k1",
    ]);
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));
    let logged = std::fs::read_to_string(&text_log).unwrap();
    assert!(
        logged
            .lines()
            .all(|l| l.starts_with("time=\"") && l.contains(" level=") && l.contains(" msg=")),
        "{logged}"
    );
    assert!(!logged.contains('\x1b'));
    // A warning written to a pipe: no colour codes either.
    let out = host.run(&["--log-level", "info", "delete", "--force", "k1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains('\x1b'),
        "{:?}",
        text(&out.stderr)
    );
    host.assert_nothing_left();
}
