//! `runvm monitor` with real VMs: two sandboxes seen by promtool and by a real Prometheus
//! (Debian's `prometheus` package: `promtool` and `prometheus`), one deleted; and bad listen
//! addresses. Two boots in all.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{assert_fails, run_detached, text, Host};

/// A child process killed when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Deletes (`--force`) its sandboxes when the test ends, however it ends.
struct Deleted<'a> {
    host: &'a Host,
    ids: Vec<&'static str>,
}

impl Drop for Deleted<'_> {
    fn drop(&mut self) {
        for id in &self.ids {
            let _ = self.host.run(&["delete", "--force", id]);
        }
    }
}

/// `runvm monitor --listen 127.0.0.1:0` over the host's root; its address from its first line.
fn start_monitor(host: &Host) -> (Killed, SocketAddr) {
    let mut child = host
        .cmd(&[
            "monitor",
            "--listen",
            "127.0.0.1:0",
            "--agent-timeout-ms",
            "5000",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    let address = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, address)
}

/// The status line and body of `GET path` (HTTP/1.0: the server closes after the answer);
/// `None` when nothing listens yet.
fn try_get(address: SocketAddr, path: &str) -> Option<(String, String)> {
    let mut s = TcpStream::connect(address).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(60))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").ok()?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    Some((
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    ))
}

/// The body of `GET path`, which must answer 200.
fn get(address: SocketAddr, path: &str) -> String {
    let (status, body) = try_get(address, path).expect("the server answers");
    assert!(status.contains(" 200 "), "{status}: {body}");
    body
}

/// The value of the series starting with `series` (name and labels as printed).
fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

fn promtool_check(exposition: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; make setup installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A Prometheus with its own configuration and data folder under `dir`, scraping `target`
/// every second.
fn start_prometheus(dir: &Path, target: SocketAddr) -> (Killed, SocketAddr) {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n\
             scrape_configs:\n  - job_name: runvm\n    static_configs:\n      \
             - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let address: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("prometheus-data").display()
        ))
        .arg(format!("--web.listen-address={address}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("prometheus (Debian package prometheus; make setup installs it)");
    (Killed(child), address)
}

/// Percent-encodes a query parameter.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until Prometheus answers `query` with at least one series; returns the first's value.
fn wait_for_series(prometheus: SocketAddr, query: &str, log: &Path) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(90);
    let path = format!("/api/v1/query?query={}", encode(query));
    loop {
        // Prometheus answers 503 until it is ready.
        let answer = try_get(prometheus, &path).filter(|(status, _)| status.contains(" 200 "));
        if let Some((_, answer)) = answer {
            let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
            assert_eq!(json["status"], "success", "{json}");
            if let Some(v) = json["data"]["result"][0]["value"][1].as_str() {
                return v.parse().unwrap();
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus has no {query}; its log: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn two_sandboxes_reach_promtool_and_prometheus_and_a_deleted_ones_series_go() {
    let host = Host::new();
    let sandboxes = Deleted {
        host: &host,
        ids: vec!["mon-a", "mon-b"],
    };
    run_detached(&host, "mon-a", &["sleep", "600"]);
    run_detached(&host, "mon-b", &["sleep", "600"]);
    let (monitor, address) = start_monitor(&host);

    let exposition = get(address, "/metrics");
    for id in ["mon-a", "mon-b"] {
        let pss = value(
            &exposition,
            &format!(r#"runvm_sandbox_process_pss_bytes{{sandbox_id="{id}",process="qemu"}}"#),
        );
        assert!(pss.unwrap_or(0.0) > 1e6, "{id}: {exposition}");
        for process in ["virtiofsd", "vhost-device-vsock"] {
            let series = format!(
                r#"runvm_sandbox_process_open_fds{{sandbox_id="{id}",process="{process}"}}"#
            );
            // vhost-device-vsock is absent where the kernel's vhost-vsock serves instead.
            if process == "virtiofsd" || exposition.contains(&series) {
                assert!(value(&exposition, &series).unwrap_or(0.0) > 0.0, "{series}");
            }
        }
        let running = format!(r#"runvm_sandbox_state{{sandbox_id="{id}",state="running"}}"#);
        assert_eq!(value(&exposition, &running), Some(1.0), "{exposition}");
        // The guest's view, through the agent.
        let up = format!(r#"runvm_sandbox_agent_up{{sandbox_id="{id}"}}"#);
        assert_eq!(value(&exposition, &up), Some(1.0), "{exposition}");
        let total = format!(r#"runvm_guest_memory_total_bytes{{sandbox_id="{id}"}}"#);
        assert!(
            value(&exposition, &total).unwrap_or(0.0) > 1e7,
            "{exposition}"
        );
        let container = format!(
            r#"runvm_guest_container_memory_bytes{{sandbox_id="{id}",container_id="{id}"}}"#
        );
        assert!(
            value(&exposition, &container).unwrap_or(0.0) > 0.0,
            "{exposition}"
        );
    }
    // The guest kernel's fallback devices are down: no series of theirs.
    for down in ["tunl0", "sit0", "dummy0", "bond0"] {
        assert!(
            !exposition.contains(&format!(r#"interface="{down}""#)),
            "{exposition}"
        );
    }
    assert_eq!(
        value(&exposition, "runvm_boot_duration_seconds_count"),
        Some(2.0)
    );
    promtool_check(&exposition);

    let (prometheus_process, prometheus) = start_prometheus(host.dir.path(), address);
    let pss = wait_for_series(
        prometheus,
        r#"runvm_sandbox_process_pss_bytes{sandbox_id="mon-a",process="qemu"}"#,
        &host.dir.path().join("prometheus.log"),
    );
    assert!(pss > 1e6, "{pss}");

    assert!(host.run(&["kill", "mon-b", "KILL"]).status.success());
    let deleted = host.run(&["delete", "--force", "mon-b"]);
    assert!(deleted.status.success(), "{}", text(&deleted.stderr));
    let exposition = get(address, "/metrics");
    assert!(
        !exposition.contains(r#"sandbox_id="mon-b""#),
        "{exposition}"
    );
    assert!(exposition.contains(r#"sandbox_id="mon-a""#));
    assert_eq!(value(&exposition, "runvm_monitor_sandboxes"), Some(1.0));

    assert!(host.run(&["kill", "mon-a", "KILL"]).status.success());
    assert!(host.run(&["delete", "--force", "mon-a"]).status.success());
    drop(prometheus_process);
    drop(monitor);
    drop(sandboxes);
    host.assert_nothing_left();
}

#[test]
fn a_listen_address_in_use_or_malformed_is_refused_by_name() {
    let host = Host::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let out = host.run(&["monitor", "--listen", &address]);
    assert_fails(
        &out,
        &format!("cannot listen on {address}: the address is in use"),
    );
    let out = host.run(&["monitor", "--listen", "localhost"]);
    assert_fails(&out, "invalid listen address \"localhost\": no port");
    assert_fails(
        &out,
        "expected IP:PORT, [IPv6]:PORT, localhost:PORT or :PORT",
    );
    let out = host.run(&["monitor", "--listen", "example.org:9464"]);
    assert_fails(&out, "the host is not an IP address");
}
