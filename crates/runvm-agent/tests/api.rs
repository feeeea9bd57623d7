//! The agent's API served on a unix socket by the real binary (not PID 1: no mounts, no
//! modules, exit instead of power-off).

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use runvm_protocol::agent;
use runvm_protocol::agent_ttrpc::AgentServiceClient;

struct AgentProcess {
    child: Child,
    _dir: tempfile::TempDir,
    address: String,
}

impl AgentProcess {
    fn start() -> AgentProcess {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("agent.sock");
        let address = format!("unix://{}", sock.display());
        let child = Command::new(env!("CARGO_BIN_EXE_runvm-agent"))
            .args(["--listen", &address])
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(
                Instant::now() < deadline,
                "agent did not listen on {address}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        AgentProcess {
            child,
            _dir: dir,
            address,
        }
    }

    async fn client(&self) -> AgentServiceClient {
        AgentServiceClient::new(self.connect().await)
    }

    /// A connection, once the agent accepts them (its socket file exists from `bind`, before
    /// `listen`: a connection may be refused for a moment).
    async fn connect(&self) -> ttrpc::r#async::Client {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ttrpc::r#async::Client::connect(&self.address).await {
                Ok(c) => return c,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "cannot connect to the agent at {}: {e}",
                    self.address
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl AgentProcess {
    /// Waits up to 5 s for the agent to exit, successfully, after `cause`.
    fn assert_exits_cleanly(&mut self, cause: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {cause}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(5_000_000_000)
}

#[tokio::test]
async fn health_version_and_details_answer() {
    let agent = AgentProcess::start();
    let c = agent.client().await;
    let health = c.check(ctx(), &agent::CheckRequest::new()).await.unwrap();
    assert_eq!(
        health.status.enum_value().unwrap(),
        agent::check_response::ServingStatus::SERVING
    );
    let v = c
        .version(ctx(), &agent::VersionRequest::new())
        .await
        .unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.api_version, runvm_protocol::API_VERSION);
    let uname = Command::new("uname").arg("-r").output().unwrap();
    assert_eq!(
        v.kernel_release,
        String::from_utf8_lossy(&uname.stdout).trim()
    );
    let d = c
        .get_guest_details(ctx(), &agent::GuestDetailsRequest::new())
        .await
        .unwrap();
    assert!(d.cpu_count >= 1);
    assert!(d.mem_total_bytes > d.mem_available_bytes && d.mem_available_bytes > 0);
    assert!(d.boot_times.agent_listening_us >= d.boot_times.init_entered_us);
}

#[tokio::test]
async fn guest_metrics_report_this_hosts_memory_cpu_and_load() {
    let agent = AgentProcess::start();
    let c = agent.client().await;
    let m = c
        .get_guest_metrics(ctx(), &agent::GuestMetricsRequest::new())
        .await
        .unwrap();
    assert!(m.mem_total_bytes > m.mem_available_bytes && m.mem_available_bytes > 0);
    assert!(m.cpu.user_ns > 0 && m.cpu.idle_ns > 0, "{:?}", m.cpu);
    assert!(m.load1 >= 0.0 && m.load15.is_finite());
    // No container was created; the host's interfaces show, loopback left out.
    assert!(m.containers.is_empty());
    assert!(m.network.iter().all(|n| n.name != "lo"));
}

/// Every RPC of the API is implemented now; the network ones refuse bad input by name before
/// touching any interface (this agent runs on the test host, not in a VM).
#[tokio::test]
async fn network_rpcs_refuse_bad_input_by_name() {
    let agent = AgentProcess::start();
    let c = agent.client().await;
    let (code, msg) = status_of(
        c.update_interface(ctx(), &agent::UpdateInterfaceRequest::new())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("MAC address"), "{msg}");
}

fn status_of(err: ttrpc::Error) -> (ttrpc::Code, String) {
    match err {
        ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

/// Requests that fail validation never touch the host (no container is made outside a VM).
#[tokio::test]
async fn container_rpcs_check_their_input() {
    let agent = AgentProcess::start();
    let c = agent.client().await;
    let create = |id: &str, spec: &[u8]| agent::CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec.to_vec(),
        ..Default::default()
    };
    let (code, msg) = status_of(
        c.create_container(ctx(), &create("a/b", b"{}"))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("invalid container id \"a/b\""), "{msg}");
    let (code, msg) = status_of(
        c.create_container(ctx(), &create("c1", b""))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("not a valid OCI runtime spec"), "{msg}");

    let wait = agent::WaitProcessRequest {
        container_id: "nosuch".into(),
        ..Default::default()
    };
    let (code, msg) = status_of(c.wait_process(ctx(), &wait).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::NOT_FOUND);
    assert!(msg.contains("\"nosuch\""), "{msg}");
    let resize = agent::TtyWinResizeRequest {
        container_id: "..".into(),
        ..Default::default()
    };
    let (code, _) = status_of(c.tty_win_resize(ctx(), &resize).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    let exec = agent::ExecProcessRequest {
        container_id: "nosuch".into(),
        exec_id: "".into(),
        ..Default::default()
    };
    let (code, msg) = status_of(c.exec_process(ctx(), &exec).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT);
    assert!(msg.contains("invalid exec id"), "{msg}");
}

/// Stdio travels only on the host's streams: a create or an exec asking for stdio without a
/// stream token is refused by name before anything is made (here before the spec is read, and
/// before the container is looked up).
#[tokio::test]
async fn stdio_without_a_stream_token_is_refused() {
    let agent = AgentProcess::start();
    let c = agent.client().await;
    let stdio = |stdin, stdout, stderr| {
        protobuf::MessageField::some(agent::StdioConfig {
            stdin,
            stdout,
            stderr,
            ..Default::default()
        })
    };
    let create = agent::CreateContainerRequest {
        container_id: "c1".into(),
        stdio: stdio(false, true, true),
        ..Default::default()
    };
    let (code, msg) = status_of(c.create_container(ctx(), &create).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("stdout, stderr") && msg.contains("stream token"),
        "{msg}"
    );
    let exec = agent::ExecProcessRequest {
        container_id: "nosuch".into(),
        exec_id: "e1".into(),
        stdio: stdio(true, false, false),
        ..Default::default()
    };
    let (code, msg) = status_of(c.exec_process(ctx(), &exec).await.unwrap_err());
    assert_eq!(code, ttrpc::Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.contains("stdin") && msg.contains("stream token"),
        "{msg}"
    );
}

/// The per-chunk stdio calls an older host made (ReadStdout, WriteStdin, ...) are gone: they
/// answer UNIMPLEMENTED, never a fake success.
#[tokio::test]
async fn the_removed_stdio_calls_answer_unimplemented() {
    let agent = AgentProcess::start();
    let client = agent.connect().await;
    for method in ["ReadStdout", "ReadStderr", "WriteStdin", "CloseStdin"] {
        let req = ttrpc::Request {
            service: "runvm.agent.v1.AgentService".into(),
            method: method.into(),
            timeout_nano: 5_000_000_000,
            ..Default::default()
        };
        let err = client.request(req).await.unwrap_err();
        let (code, msg) = status_of(err);
        assert_eq!(code, ttrpc::Code::UNIMPLEMENTED, "{method}: {msg}");
    }
}

#[tokio::test]
async fn shutdown_answers_then_the_agent_exits() {
    let mut agent = AgentProcess::start();
    let c = agent.client().await;
    c.shutdown(ctx(), &agent::ShutdownRequest::new())
        .await
        .unwrap();
    agent.assert_exits_cleanly("Shutdown");
}

#[test]
fn outside_pid1_without_listen_address_it_refuses_to_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_runvm-agent"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen unix:///PATH"), "{err}");
}

#[test]
fn sigterm_stops_the_agent_cleanly() {
    let mut agent = AgentProcess::start();
    let pid = agent.child.id().to_string();
    let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    assert!(status.success());
    agent.assert_exits_cleanly("SIGTERM");
}

/// A call carrying the host's W3C trace context is served in a span whose parent is the host's;
/// `ReadTelemetry` gives it (an OTLP request) with the agent's log records; a call without one
/// records no span.
#[tokio::test]
async fn a_traced_call_gives_a_guest_span_under_the_hosts_and_logs_come_with_it() {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    let agent = AgentProcess::start();
    let c = agent.client().await;
    let read = |wait_ms| agent::ReadTelemetryRequest {
        wait_ms,
        log_level: "info".into(),
        ..Default::default()
    };
    // The agent's start-up records are there; an untraced call adds no span.
    c.version(ctx(), &agent::VersionRequest::new())
        .await
        .unwrap();
    let first = c.read_telemetry(ctx(), &read(0)).await.unwrap();
    assert!(
        first
            .records
            .iter()
            .any(|r| r.message.contains("runvm-agent listening") && r.level == "info"),
        "{:?}",
        first.records
    );
    assert!(first.spans.is_empty(), "an untraced call recorded a span");

    let parent_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_span = "00f067aa0ba902b7";
    let mut traced = ctx();
    traced.add(
        "traceparent".into(),
        format!("00-{parent_trace}-{parent_span}-01"),
    );
    c.version(traced, &agent::VersionRequest::new())
        .await
        .unwrap();
    let mut spans = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let batch = c.read_telemetry(ctx(), &read(100)).await.unwrap();
        if !batch.spans.is_empty() {
            let req = ExportTraceServiceRequest::decode(batch.spans.as_slice()).unwrap();
            for rs in req.resource_spans {
                for ss in rs.scope_spans {
                    spans.extend(ss.spans);
                }
            }
            break;
        }
    }
    let span = spans
        .iter()
        .find(|s| s.name == "Version")
        .unwrap_or_else(|| panic!("no Version span: {spans:?}"));
    assert_eq!(hex(&span.trace_id), parent_trace);
    assert_eq!(hex(&span.parent_span_id), parent_span);

    // A bad level is refused by name.
    let bad = agent::ReadTelemetryRequest {
        log_level: "loud".into(),
        ..Default::default()
    };
    let err = c.read_telemetry(ctx(), &bad).await.unwrap_err().to_string();
    assert!(
        err.contains("loud") && err.contains("valid: error, warn"),
        "{err}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
