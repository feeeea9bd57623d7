//! Load: many callers on one container, a container flooding its stdout, many containers
//! starting at once. Each answer must be right and nothing may be left.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{run_detached, spec, text, Host};

#[test]
fn twenty_execs_and_twenty_states_at_once_on_one_container_all_answer() {
    let host = Host::new();
    run_detached(&host, "busy", &["sh", "-c", "echo up; exec sleep 600"]);
    let execs: Vec<_> = (0..20)
        .map(|n| {
            let child = host
                .cmd(&[
                    "exec",
                    "busy",
                    "sh",
                    "-c",
                    &format!("echo exec-{n}; exit {n}"),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            (n, child)
        })
        .collect();
    let states: Vec<_> = (0..20)
        .map(|_| {
            host.cmd(&["state", "busy"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in states {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "state: {}", text(&out.stderr));
        let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(st["status"], "running");
    }
    for (n, child) in execs {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(n),
            "exec {n}: {}",
            text(&out.stderr)
        );
        assert_eq!(text(&out.stdout), format!("exec-{n}\n"));
    }
    let del = host.run(&["delete", "--force", "busy"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}

/// The peak resident memory (VmHWM) of `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

#[test]
fn a_container_flooding_stdout_is_killed_promptly_and_its_relay_stays_bounded() {
    let host = Host::new();
    let b = host.bundle("flood", &spec(&["sh", "-c", "exec yes flooding-the-relay"]));
    // The stand-in relays to /dev/null: the flood crosses the VM boundary at full speed.
    let status = host
        .cmd(&["run", "-d", "--bundle", b.to_str().unwrap(), "flood"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let standin = host.state("flood")["pid"].as_u64().unwrap() as u32;
    let mut peak = 0;
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        peak = peak.max(peak_rss_kib(standin).unwrap_or(0));
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(peak > 0, "the stand-in is gone");
    assert!(
        peak < 64 * 1024,
        "the relaying stand-in grew to {peak} KiB under a flood"
    );
    let asked = Instant::now();
    let kill = host.run(&["kill", "flood", "KILL"]);
    assert!(kill.status.success(), "{}", text(&kill.stderr));
    host.wait_status("flood", "stopped");
    let took = asked.elapsed();
    // The bound is 2 s on an idle machine; CI runs other tests beside this one.
    assert!(
        took < Duration::from_secs(5),
        "kill took {took:?} to stop a flooding container"
    );
    eprintln!("kill under a 10 s stdout flood took effect in {took:?}; relay peak {peak} KiB");
    let del = host.run(&["delete", "--force", "flood"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}

/// 16 `runvm run -d` at once with the default configuration: all succeed (boots queue for the
/// host's boot slots instead of failing on a deadline). Ignored by default (about a minute and
/// 8 GiB of guest memory under TCG on 2 cores): `cargo test -p runvm --test load -- --ignored`.
#[test]
#[ignore]
fn sixteen_detached_runs_at_once_all_succeed() {
    let host = Host::new();
    let b = host.bundle("many", &spec(&["sh", "-c", "echo up; exec sleep 600"]));
    let started = Instant::now();
    let children: Vec<_> = (0..16)
        .map(|n| {
            let id = format!("m{n}");
            // To a file: the stand-in keeps runvm's stderr open after runvm exits.
            let err = host.dir.path().join(format!("{id}.err"));
            let child = host
                .cmd(&["run", "-d", "--bundle", b.to_str().unwrap(), &id])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err).unwrap())
                .spawn()
                .unwrap();
            (id, child, err)
        })
        .collect();
    let mut failed = Vec::new();
    for (id, mut child, err) in children {
        let status = child.wait().unwrap();
        if !status.success() {
            let err = std::fs::read_to_string(err).unwrap_or_default();
            failed.push(format!("{id}: {err}"));
        }
    }
    eprintln!("16 run -d at once: all done in {:?}", started.elapsed());
    for n in 0..16 {
        let id = format!("m{n}");
        if failed.iter().all(|f| !f.starts_with(&format!("{id}:"))) {
            assert_eq!(host.state(&id)["status"], "running", "{id}");
        }
        let _ = host.run(&["delete", "--force", &id]);
    }
    assert!(failed.is_empty(), "failed: {failed:#?}");
    host.assert_nothing_left();
}
