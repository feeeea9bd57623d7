//! The monitor against fakes: sandbox records in a temporary state root, a fake `/proc`, and
//! agents that answer (the mock) or not, by address.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::{Accelerator, AgentAddress, SavedProcess, VmConfig, VsockBackend};
use runvm_sandbox::agent::{Agent, AgentConnector, AgentError, MockAgentConnector};
use runvm_sandbox::config::Config;
use runvm_sandbox::state::{SandboxRecord, State};
use runvm_sandbox::store::Store;
use runvm_sandbox::SandboxId;

use crate::collect::{Sources, Stage};
use crate::exposition::Format;
use crate::procfs::ProcFs;
use crate::Monitor;

const MS: u64 = 1_000_000;

/// Answers through the mock for addresses whose socket is named `good`; never otherwise.
#[derive(Debug, Default)]
struct ByAddress {
    mock: MockAgentConnector,
}

#[async_trait]
impl AgentConnector for ByAddress {
    async fn connect(
        &self,
        address: &AgentAddress,
        timeout: Duration,
    ) -> Result<Box<dyn Agent>, AgentError> {
        match address {
            AgentAddress::HybridVsock { uds_path, .. } if uds_path.ends_with("good") => {
                self.mock.connect(address, timeout).await
            }
            _ => {
                // An agent that hangs: the monitor's timeout must end the wait.
                tokio::time::sleep(Duration::from_secs(60)).await;
                Err(AgentError::Connect {
                    address: format!("{address:?}"),
                    reason: "never".into(),
                })
            }
        }
    }
}

fn vm_config() -> VmConfig {
    VmConfig {
        vcpus: 1,
        memory_mib: 256,
        kernel: "/k".into(),
        initrd: "/i".into(),
        kernel_params: vec![],
        accelerator: Accelerator::Tcg,
        shared_dir: None,
        vsock: VsockBackend::VhostUser,
        run_dir: "/tmp/x".into(),
        netns: None,
        net_devices: Vec::new(),
        hotplug_ports: 0,
        vhost_net: false,
        tcg_tb_size_mib: 0,
        cgroup_procs: Vec::new(),
        max_vcpus: 0,
        max_memory_mib: 0,
        hotplugged: Default::default(),
    }
}

/// A fake process `pid` in the fake `/proc` at `proc`: 300 ticks of CPU, 7 threads, 100 MiB
/// PSS, started at tick 1000 + pid.
fn fake_process(proc: &Path, pid: u32) {
    let dir = proc.join(pid.to_string());
    std::fs::create_dir_all(dir.join("fd")).unwrap();
    let stat = format!(
        "{pid} (qemu-system-x86) S 1 1 1 0 -1 0 0 0 0 0 250 50 0 0 20 0 7 0 {} 0 0\n",
        1000 + pid
    );
    std::fs::write(dir.join("stat"), stat).unwrap();
    std::fs::write(
        dir.join("smaps_rollup"),
        "00-ff ---p 0 0:0 0 [rollup]\nRss: 204800 kB\nPss: 102400 kB\n",
    )
    .unwrap();
    std::fs::write(dir.join("statm"), "90000 51200 100 1 0 4000 0\n").unwrap();
    std::fs::write(dir.join("fd").join("0"), "").unwrap();
}

/// Sandbox `id` in `store`, running, with QEMU as `pid` and its agent at a socket named
/// `agent` (`good` answers).
fn sandbox(store: &Store, id: &str, pid: u32, agent: &str, pod: Option<&str>) {
    let mut record = SandboxRecord::new(
        SandboxId::parse(id).unwrap(),
        vm_config(),
        Config::default(),
    );
    record.state = State::Running;
    record.vm.processes = vec![SavedProcess {
        name: "qemu".into(),
        pid,
        start_time: u64::from(1000 + pid),
    }];
    record.agent_address = Some(AgentAddress::HybridVsock {
        uds_path: PathBuf::from("/nowhere").join(id).join(agent),
        port: 1024,
    });
    let t0 = record.created_at;
    record.timeline = vec![
        ("created".into(), t0),
        ("helpers-started".into(), t0 + 50 * MS),
        ("agent-ready".into(), t0 + 1500 * MS),
    ];
    if let Some(pod) = pod {
        for (key, value) in [
            ("io.kubernetes.cri.sandbox-name", pod),
            ("io.kubernetes.cri.sandbox-namespace", "default"),
            ("io.kubernetes.cri.sandbox-uid", "u-1"),
        ] {
            record.annotations.insert(key.into(), value.into());
        }
    }
    drop(store.create_sandbox(&record).unwrap());
}

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    monitor: Monitor,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let proc = dir.path().join("proc");
    fake_process(&proc, 101);
    fake_process(&proc, 202);
    let store = Store::open(dir.path().join("state")).unwrap();
    sandbox(&store, "pod-a", 101, "good", Some("web-0"));
    sandbox(&store, "pod-b", 202, "bad", None);
    let monitor = Monitor::new(Sources {
        stores: vec![store.clone(), Store::new(dir.path().join("not-made-yet"))],
        procfs: ProcFs::new(proc),
        connector: Arc::new(ByAddress::default()),
        agent_timeout: Duration::from_millis(200),
        pss_max_age: Duration::ZERO,
    });
    Fixture {
        _dir: dir,
        store,
        monitor,
    }
}

/// The value of the series whose line starts with `series` (name and labels as printed).
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_scrape_shows_each_sandbox_with_pod_labels_host_cost_and_guest_view() {
    let f = fixture();
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    let a = r#"sandbox_id="pod-a",pod_name="web-0",pod_namespace="default",pod_uid="u-1""#;
    let qemu_a = format!(r#"{{{a},process="qemu"}}"#);
    assert_eq!(
        value(&text, &format!("runvm_sandbox_process_pss_bytes{qemu_a}")),
        Some(104_857_600.0),
        "{text}"
    );
    assert_eq!(
        value(&text, &format!("runvm_sandbox_process_threads{qemu_a}")),
        Some(7.0)
    );
    assert!(
        value(
            &text,
            &format!("runvm_sandbox_process_cpu_seconds_total{qemu_a}")
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"runvm_sandbox_state{{{a},state="running"}}"#)
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &text,
            &format!(r#"runvm_sandbox_state{{{a},state="paused"}}"#)
        ),
        Some(0.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_guest_memory_total_bytes{{{a}}}")),
        Some(536_870_912.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_sandbox_agent_up{{{a}}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_sandbox_boot_seconds{{{a}}}")),
        Some(1.5)
    );
    // The sandbox without CRI annotations has only its id; its agent hung and was skipped.
    let b = r#"sandbox_id="pod-b""#;
    assert_eq!(
        value(
            &text,
            &format!(r#"runvm_sandbox_process_pss_bytes{{{b},process="qemu"}}"#)
        ),
        Some(104_857_600.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_sandbox_agent_up{{{b}}}")),
        Some(0.0)
    );
    assert!(!text.contains(&format!("runvm_guest_memory_total_bytes{{{b}}}")));
    assert_eq!(
        value(&text, r#"runvm_monitor_scrape_errors_total{stage="agent"}"#),
        Some(1.0)
    );
    assert_eq!(value(&text, "runvm_monitor_sandboxes"), Some(2.0));
    assert_eq!(value(&text, "runvm_monitor_agent_connections"), Some(1.0));
    // One agent answered: its latency, per sandbox and in the histogram.
    assert!(value(
        &text,
        &format!("runvm_sandbox_agent_request_seconds{{{a}}}")
    )
    .is_some());
    assert!(!text.contains(&format!("runvm_sandbox_agent_request_seconds{{{b}}}")));
    assert_eq!(
        value(
            &text,
            r#"runvm_agent_request_duration_seconds_count{method="GetGuestMetrics"}"#
        ),
        Some(1.0)
    );
    // Both boots were observed once, phase by phase.
    assert_eq!(value(&text, "runvm_boot_duration_seconds_count"), Some(2.0));
    assert_eq!(
        value(
            &text,
            r#"runvm_boot_phase_duration_seconds_count{phase="agent-ready"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        value(&text, "runvm_monitor_scrape_duration_seconds_count"),
        Some(1.0)
    );
}

#[tokio::test]
async fn boots_are_observed_once_and_a_deleted_sandboxs_series_disappear() {
    let f = fixture();
    f.monitor.scrape(Format::Prometheus).await.unwrap();
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    assert_eq!(value(&text, "runvm_boot_duration_seconds_count"), Some(2.0));
    assert_eq!(
        value(&text, r#"runvm_monitor_scrape_errors_total{stage="agent"}"#),
        Some(2.0)
    );
    let id = SandboxId::parse("pod-a").unwrap();
    let lock = f.store.lock_exclusive(&id).unwrap();
    f.store.remove_sandbox(lock).unwrap();
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    assert!(!text.contains("pod-a"), "{text}");
    assert!(text.contains(r#"sandbox_id="pod-b""#));
    assert_eq!(value(&text, "runvm_monitor_sandboxes"), Some(1.0));
    // The histograms keep what they observed; the closed connection is gone.
    assert_eq!(value(&text, "runvm_boot_duration_seconds_count"), Some(2.0));
    assert_eq!(value(&text, "runvm_monitor_agent_connections"), Some(0.0));
    assert_eq!(
        value(&text, "runvm_monitor_scrape_duration_seconds_count"),
        Some(3.0)
    );
}

#[tokio::test]
async fn a_stopped_sandbox_shows_its_state_but_no_process_or_agent() {
    let f = fixture();
    let id = SandboxId::parse("pod-b").unwrap();
    let lock = f.store.lock_exclusive(&id).unwrap();
    let mut record = f.store.load_sandbox(&id).unwrap();
    record.state = State::Stopped;
    f.store.save_sandbox(&lock, &record).unwrap();
    drop(lock);
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    let b = r#"sandbox_id="pod-b""#;
    assert_eq!(
        value(
            &text,
            &format!(r#"runvm_sandbox_state{{{b},state="stopped"}}"#)
        ),
        Some(1.0)
    );
    assert!(!text.contains(&format!(r#"runvm_sandbox_process_pss_bytes{{{b}"#)));
    assert!(!text.contains(&format!("runvm_sandbox_agent_up{{{b}}}")));
    assert_eq!(
        value(&text, r#"runvm_monitor_scrape_errors_total{stage="agent"}"#),
        None
    );
}

#[tokio::test]
async fn openmetrics_is_served_when_asked_for() {
    let f = fixture();
    let text = f.monitor.scrape(Format::OpenMetrics).await.unwrap();
    assert!(text.ends_with("# EOF\n"), "{text}");
    assert!(text.contains("# TYPE runvm_sandbox_process_cpu_seconds counter"));
    assert_eq!(
        Format::from_accept(Some(
            "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
        )),
        Format::OpenMetrics
    );
    assert_eq!(Format::from_accept(Some("*/*")), Format::Prometheus);
    assert_eq!(Format::from_accept(None), Format::Prometheus);
}

#[tokio::test]
async fn the_exposition_passes_promtool_when_it_is_installed() {
    let Ok(promtool) = which("promtool") else {
        eprintln!("promtool not installed: skipped (Debian package prometheus)");
        return;
    };
    let f = fixture();
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    let mut child = std::process::Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which(program: &str) -> Result<PathBuf, ()> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .ok_or(())
}

#[tokio::test]
async fn the_server_answers_metrics_and_refuses_other_paths_and_methods() {
    let f = Arc::new(fixture());
    let listener = crate::server::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let monitor = Arc::new(Monitor::new(Sources {
        stores: vec![f.store.clone()],
        procfs: ProcFs::new(f._dir.path().join("proc")),
        connector: Arc::new(ByAddress::default()),
        agent_timeout: Duration::from_millis(100),
        pss_max_age: Duration::from_secs(60),
    }));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::server::serve(listener, monitor, async {
        let _ = stopped.await;
    }));
    let get = |request: &'static str| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    let metrics = get("GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("content-type: text/plain; version=0.0.4"),
        "{metrics}"
    );
    assert!(metrics.contains(r#"runvm_sandbox_state{sandbox_id="pod-b",state="running"} 1"#));
    let missing = get("GET /nothing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await;
    assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
    let post =
        get("POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await;
    assert!(
        post.starts_with("HTTP/1.1 405") && post.contains("allow: GET, HEAD"),
        "{post}"
    );
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn stages_have_stable_label_values() {
    assert_eq!(
        [Stage::Record, Stage::Process, Stage::Agent, Stage::Factory].map(Stage::as_str),
        ["record", "process", "agent", "factory"]
    );
}

#[tokio::test]
async fn a_roots_factory_shows_its_pool_and_a_silent_one_is_down() {
    use runvm_sandbox::factory::{factory_dir, socket_path, FactoryStatus, Reply};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let f = fixture();
    let root = f.store.root().to_path_buf();
    // No factory folder: no factory series at all.
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    assert!(!text.contains("runvm_factory_up{"), "{text}");
    // A folder without a daemon: down.
    std::fs::create_dir_all(factory_dir(&root)).unwrap();
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    let at = format!(r#"{{root="{}"}}"#, root.display());
    assert_eq!(value(&text, &format!("runvm_factory_up{at}")), Some(0.0));
    assert_eq!(value(&text, &format!("runvm_factory_vms_ready{at}")), None);
    // A daemon answering its status, as the factory's protocol has it (one JSON line each way).
    let listener = tokio::net::UnixListener::bind(socket_path(&root)).unwrap();
    let status = FactoryStatus {
        running: true,
        cache: 3,
        ready: 2,
        booting: true,
        hits: 7,
        misses: 1,
        last_boot_ms: Some(1500),
        ..FactoryStatus::default()
    };
    let daemon = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let mut stream = BufReader::new(stream);
        let mut request = String::new();
        stream.read_line(&mut request).await.unwrap();
        assert!(request.contains("status"), "{request}");
        let mut reply = serde_json::to_string(&Reply::Status(Box::new(status))).unwrap();
        reply.push('\n');
        stream.get_mut().write_all(reply.as_bytes()).await.unwrap();
    });
    let text = f.monitor.scrape(Format::Prometheus).await.unwrap();
    daemon.await.unwrap();
    assert_eq!(value(&text, &format!("runvm_factory_up{at}")), Some(1.0));
    assert_eq!(
        value(&text, &format!("runvm_factory_vms_configured{at}")),
        Some(3.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_factory_vms_ready{at}")),
        Some(2.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_factory_vm_booting{at}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_factory_handouts_total{at}")),
        Some(7.0)
    );
    assert_eq!(
        value(&text, &format!("runvm_factory_last_boot_seconds{at}")),
        Some(1.5)
    );
    assert_eq!(
        value(&text, &format!("runvm_factory_last_refill_seconds{at}")),
        None
    );
}
