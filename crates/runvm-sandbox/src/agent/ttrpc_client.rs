//! The agent over ttrpc: vsock (AF_VSOCK) or hybrid vsock (a unix socket and a one-line
//! handshake, as vhost-device-vsock and Firecracker/Cloud Hypervisor offer).

use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::AgentAddress;
use runvm_protocol::agent;
use runvm_protocol::agent_ttrpc::AgentServiceClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::Instrument;
use ttrpc::r#async::transport::Socket;

use super::convert;
use super::network;
use super::{
    Agent, AgentConnector, AgentError, AgentVersion, ContainerStats, CreateContainer, ExitStatus,
    GuestBootTimes, GuestDetails, GuestProcess, GuestTelemetry, Interface, Neighbor, OnlinedCpuMem,
    ProcessRef, Route, RpcCode, StdioSpec, TelemetryRequest,
};

/// Longest text field accepted from the agent (versions, names).
const MAX_TEXT: usize = 256;
/// Longest error message from the agent passed on.
const MAX_MESSAGE: usize = 1024;

/// Opens [`TtrpcAgent`]s.
#[derive(Debug, Clone)]
pub struct TtrpcConnector {
    request_timeout: Duration,
}

impl TtrpcConnector {
    /// Each request of the agents it opens may take up to `request_timeout`.
    pub fn new(request_timeout: Duration) -> Self {
        TtrpcConnector { request_timeout }
    }
}

#[async_trait]
impl AgentConnector for TtrpcConnector {
    async fn connect(
        &self,
        address: &AgentAddress,
        timeout: Duration,
    ) -> Result<Box<dyn Agent>, AgentError> {
        let agent = TtrpcAgent::connect(address, timeout, self.request_timeout).await?;
        Ok(Box::new(agent))
    }
}

/// A connected agent.
pub struct TtrpcAgent {
    client: AgentServiceClient,
    request_timeout: Duration,
    /// Where the agent is, for the stdio streams (`None` over a given stream: none can be
    /// opened).
    address: Option<AgentAddress>,
}

impl std::fmt::Debug for TtrpcAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TtrpcAgent")
            .field("request_timeout", &self.request_timeout)
            .finish_non_exhaustive()
    }
}

/// A byte stream to a guest vsock port: a unix socket (hybrid vsock) or an AF_VSOCK socket.
pub trait VsockIo: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sync> VsockIo for T {}

/// Opens a byte stream to the guest port of `address` (with hybrid vsock: the unix socket and
/// the `CONNECT` handshake, whose answer is read byte by byte and bounded).
pub async fn open_vsock_stream(address: &AgentAddress) -> Result<Box<dyn VsockIo>, String> {
    match address {
        AgentAddress::HybridVsock { uds_path, port } => {
            let mut stream = tokio::net::UnixStream::connect(uds_path)
                .await
                .map_err(|e| e.to_string())?;
            hybrid_handshake(&mut stream, *port).await?;
            Ok(Box::new(stream))
        }
        AgentAddress::Vsock { cid, port } => {
            let stream =
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                    .await
                    .map_err(|e| e.to_string())?;
            Ok(Box::new(stream))
        }
    }
}

/// Opens a stream to the guest port `port` of the agent at `address` as a plain socket (the
/// hybrid vsock handshake done), for the stdio streams a stand-in inherits.
pub async fn open_vsock_fd(
    address: &AgentAddress,
    port: u32,
) -> Result<std::os::fd::OwnedFd, String> {
    match address {
        AgentAddress::HybridVsock { uds_path, .. } => {
            let mut stream = tokio::net::UnixStream::connect(uds_path)
                .await
                .map_err(|e| e.to_string())?;
            hybrid_handshake(&mut stream, port).await?;
            let std = stream.into_std().map_err(|e| e.to_string())?;
            Ok(std.into())
        }
        AgentAddress::Vsock { cid, .. } => {
            let stream = tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, port))
                .await
                .map_err(|e| e.to_string())?;
            let raw = std::os::fd::IntoRawFd::into_raw_fd(stream);
            // SAFETY: `into_raw_fd` gave up ownership of this open socket to us.
            Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(raw) })
        }
    }
}

/// The hybrid vsock `CONNECT` handshake; its answer is read byte by byte (what follows the
/// newline is the guest's) and bounded.
async fn hybrid_handshake(stream: &mut tokio::net::UnixStream, port: u32) -> Result<(), String> {
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        let n = stream.read(&mut byte).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(
                "closed during the vsock handshake (nothing listens on the port yet)".into(),
            );
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > 32 {
            return Err("vsock handshake answer is too long".into());
        }
    }
    let line = String::from_utf8_lossy(&line);
    if !line.starts_with("OK ") {
        return Err(format!(
            "vsock handshake answered {line:?}, expected \"OK <port>\""
        ));
    }
    Ok(())
}

/// How `address` reads in messages.
pub(crate) fn describe(address: &AgentAddress) -> String {
    match address {
        AgentAddress::HybridVsock { uds_path, port } => {
            format!("hybrid vsock {} port {port}", uds_path.display())
        }
        AgentAddress::Vsock { cid, port } => format!("vsock cid {cid} port {port}"),
    }
}

fn bounded(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A text field from the guest: bounded and printable, or the reply is refused.
fn checked_text(method: &'static str, field: &str, value: String) -> Result<String, AgentError> {
    if value.len() > MAX_TEXT || value.chars().any(char::is_control) {
        return Err(AgentError::InvalidReply {
            method,
            reason: format!(
                "{field} is {} bytes or holds control characters (limit {MAX_TEXT} printable bytes)",
                value.len()
            ),
        });
    }
    Ok(value)
}

impl TtrpcAgent {
    /// Connects to `address` within `timeout`; each later request may take `request_timeout`.
    pub async fn connect(
        address: &AgentAddress,
        timeout: Duration,
        request_timeout: Duration,
    ) -> Result<TtrpcAgent, AgentError> {
        let stream = tokio::time::timeout(timeout, open_vsock_stream(address))
            .await
            .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))
            .and_then(|r| r)
            .map_err(|reason| AgentError::Connect {
                address: describe(address),
                reason,
            })?;
        let mut agent = TtrpcAgent::from_stream(stream, request_timeout);
        agent.address = Some(address.clone());
        Ok(agent)
    }

    /// An agent over a byte stream already open to it (one end of a socket pair, for tests and
    /// the fuzz targets); each request may take `request_timeout`.
    pub fn from_stream(stream: impl VsockIo + 'static, request_timeout: Duration) -> TtrpcAgent {
        let client = ttrpc::r#async::Client::new(Socket::new(stream));
        TtrpcAgent {
            client: AgentServiceClient::new(client),
            request_timeout,
            address: None,
        }
    }

    async fn call<T, F, Fut>(&self, method: &'static str, request: F) -> Result<T, AgentError>
    where
        F: FnOnce(ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        self.call_within(method, self.request_timeout, request)
            .await
    }

    /// How long a call that starts processes in the guest (CreateContainer, ExecProcess) may
    /// take: the guest starts them one after another, so a start waits for those asked
    /// before it (twenty execs at once on a one-vCPU guest under TCG take about 10 s).
    fn spawn_timeout(&self) -> Duration {
        self.request_timeout * SPAWN_TIMEOUT_FACTOR
    }

    /// One call of `method`, within `timeout`: `request` is given the ttrpc context (that
    /// timeout, and the trace context of the call's span when traces are exported).
    async fn call_within<T, F, Fut>(
        &self,
        method: &'static str,
        timeout: Duration,
        request: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        self.call_in_span(call_span(method), method, timeout, request)
            .await
    }

    /// [`TtrpcAgent::call_within`] in `span` (none: not traced).
    async fn call_in_span<T, F, Fut>(
        &self,
        span: tracing::Span,
        method: &'static str,
        timeout: Duration,
        request: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let context = traced_context(
            &span,
            ttrpc::context::with_timeout(i64::try_from(timeout.as_nanos()).unwrap_or(i64::MAX)),
        );
        // The client enforces the context's timeout too; this bounds the whole call regardless.
        let result = tokio::time::timeout(timeout + Duration::from_millis(100), request(context))
            .instrument(span)
            .await
            .map_err(|_| AgentError::Timeout { method, timeout })?;
        result.map_err(|e| map_error(method, timeout, e))
    }

    /// A call that waits for the guest (wait, read, OOM): no request timeout.
    async fn call_unbounded<T, F, Fut>(
        &self,
        method: &'static str,
        request: F,
    ) -> Result<T, AgentError>
    where
        F: FnOnce(ttrpc::context::Context) -> Fut,
        Fut: std::future::Future<Output = ttrpc::Result<T>>,
    {
        let span = call_span(method);
        let context = traced_context(&span, ttrpc::context::with_timeout(0));
        request(context)
            .instrument(span)
            .await
            .map_err(|e| map_error(method, self.request_timeout, e))
    }
}

/// The span of one agent call (its guest side is the agent's span of the same name, a child).
fn call_span(method: &'static str) -> tracing::Span {
    tracing::info_span!(
        "agent call",
        otel.name = method,
        otel.kind = "client",
        rpc.method = method
    )
}

/// `context` with the W3C trace context of `span` in its metadata, when traces are exported.
fn traced_context(
    span: &tracing::Span,
    mut context: ttrpc::context::Context,
) -> ttrpc::context::Context {
    if runvm_telemetry::enabled() && !span.is_none() {
        for (key, value) in span.in_scope(runvm_telemetry::inject_current) {
            context.add(key, value);
        }
    }
    context
}

/// [`TtrpcAgent::spawn_timeout`]: this many request timeouts.
const SPAWN_TIMEOUT_FACTOR: u32 = 4;

fn container_request(container_id: &str) -> agent::ContainerRequest {
    agent::ContainerRequest {
        container_id: container_id.to_string(),
        ..Default::default()
    }
}

fn encode(method: &'static str, value: &serde_json::Value) -> Result<Vec<u8>, AgentError> {
    serde_json::to_vec(value).map_err(|e| AgentError::Transport {
        method,
        reason: format!("cannot encode JSON: {e}"),
    })
}

fn map_error(method: &'static str, timeout: Duration, e: ttrpc::Error) -> AgentError {
    match e {
        ttrpc::Error::RpcStatus(status) => match rpc_code(status.code()) {
            RpcCode::DeadlineExceeded => AgentError::Timeout { method, timeout },
            code => AgentError::Rpc {
                method,
                code,
                message: bounded(status.message(), MAX_MESSAGE),
            },
        },
        other => AgentError::Transport {
            method,
            reason: bounded(&other.to_string(), MAX_MESSAGE),
        },
    }
}

/// The code of a failed ttrpc status. `OK` on a failure breaks the protocol: it is `Unknown`.
fn rpc_code(code: ttrpc::Code) -> RpcCode {
    use ttrpc::Code;
    match code {
        Code::OK | Code::UNKNOWN => RpcCode::Unknown,
        Code::CANCELLED => RpcCode::Cancelled,
        Code::INVALID_ARGUMENT => RpcCode::InvalidArgument,
        Code::DEADLINE_EXCEEDED => RpcCode::DeadlineExceeded,
        Code::NOT_FOUND => RpcCode::NotFound,
        Code::ALREADY_EXISTS => RpcCode::AlreadyExists,
        Code::PERMISSION_DENIED => RpcCode::PermissionDenied,
        Code::RESOURCE_EXHAUSTED => RpcCode::ResourceExhausted,
        Code::FAILED_PRECONDITION => RpcCode::FailedPrecondition,
        Code::ABORTED => RpcCode::Aborted,
        Code::OUT_OF_RANGE => RpcCode::OutOfRange,
        Code::UNIMPLEMENTED => RpcCode::Unimplemented,
        Code::INTERNAL => RpcCode::Internal,
        Code::UNAVAILABLE => RpcCode::Unavailable,
        Code::DATA_LOSS => RpcCode::DataLoss,
        Code::UNAUTHENTICATED => RpcCode::Unauthenticated,
    }
}

#[async_trait]
impl Agent for TtrpcAgent {
    async fn check(&self) -> Result<(), AgentError> {
        let req = agent::CheckRequest::new();
        let resp = self.call("Check", |c| self.client.check(c, &req)).await?;
        match resp.status.enum_value() {
            Ok(agent::check_response::ServingStatus::SERVING) => Ok(()),
            other => Err(AgentError::InvalidReply {
                method: "Check",
                reason: format!("agent is not serving ({other:?})"),
            }),
        }
    }

    async fn version(&self) -> Result<AgentVersion, AgentError> {
        let req = agent::VersionRequest::new();
        let resp = self
            .call("Version", |c| self.client.version(c, &req))
            .await?;
        Ok(AgentVersion {
            agent_version: checked_text("Version", "agent_version", resp.agent_version)?,
            kernel_release: checked_text("Version", "kernel_release", resp.kernel_release)?,
            api_version: resp.api_version,
        })
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        let req = agent::GuestDetailsRequest::new();
        let resp = self
            .call("GetGuestDetails", |c| {
                self.client.get_guest_details(c, &req)
            })
            .await?;
        let boot = resp.boot_times.into_option().unwrap_or_default();
        Ok(GuestDetails {
            mem_block_size_bytes: resp.mem_block_size_bytes,
            cpu_count: resp.cpu_count,
            mem_total_bytes: resp.mem_total_bytes,
            mem_available_bytes: resp.mem_available_bytes,
            boot_times: GuestBootTimes {
                init_entered_us: boot.init_entered_us,
                modules_loaded_us: boot.modules_loaded_us,
                agent_listening_us: boot.agent_listening_us,
                now_us: boot.now_us,
            },
        })
    }

    async fn online_cpu_mem(&self, cpus: u32, wait: Duration) -> Result<OnlinedCpuMem, AgentError> {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let req = agent::OnlineCPUMemRequest {
            cpus,
            timeout_ms: wait_ms,
            ..Default::default()
        };
        // The agent may wait `wait` for the CPUs to appear: the request may take that long.
        let resp = self
            .call_within("OnlineCPUMem", self.request_timeout + wait, |c| {
                self.client.online_cpu_mem(c, &req)
            })
            .await?;
        Ok(OnlinedCpuMem {
            online_cpus: resp.online_cpus,
            onlined_memory_blocks: resp.onlined_memory_blocks,
            mem_total_bytes: resp.mem_total_bytes,
        })
    }

    async fn set_guest_time(&self, now: std::time::SystemTime) -> Result<(), AgentError> {
        let since = now
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let req = agent::SetGuestTimeRequest {
            sec: i64::try_from(since.as_secs()).unwrap_or(i64::MAX),
            nsec: since.subsec_nanos(),
            ..Default::default()
        };
        self.call("SetGuestTime", |c| self.client.set_guest_time(c, &req))
            .await
            .map(|_| ())
    }

    async fn guest_metrics(&self) -> Result<super::GuestMetrics, AgentError> {
        let req = agent::GuestMetricsRequest::new();
        let resp = self
            .call("GetGuestMetrics", |c| {
                self.client.get_guest_metrics(c, &req)
            })
            .await?;
        super::guest_metrics::from_reply(resp)
    }

    async fn shutdown(&self) -> Result<(), AgentError> {
        let req = agent::ShutdownRequest::new();
        self.call("Shutdown", |c| self.client.shutdown(c, &req))
            .await
            .map(|_| ())
    }

    async fn read_telemetry(
        &self,
        request: TelemetryRequest,
    ) -> Result<GuestTelemetry, AgentError> {
        let req = super::telemetry::request(&request);
        let timeout = self.request_timeout + Duration::from_millis(u64::from(req.wait_ms));
        // Not traced: reading the spans must not make more of them.
        let reply = self
            .call_in_span(tracing::Span::none(), "ReadTelemetry", timeout, |c| {
                self.client.read_telemetry(c, &req)
            })
            .await?;
        super::telemetry::from_reply(&request, reply)
    }

    async fn create_container(&self, request: CreateContainer) -> Result<(), AgentError> {
        let req = convert::create_request(&request)?;
        self.call_within("CreateContainer", self.spawn_timeout(), |c| {
            self.client.create_container(c, &req)
        })
        .await
        .map(|_| ())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = agent::StartContainerRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        self.call("StartContainer", |c| self.client.start_container(c, &req))
            .await
            .map(|_| ())
    }

    async fn remove_container(
        &self,
        container_id: &str,
        timeout_secs: u32,
    ) -> Result<(), AgentError> {
        let req = agent::RemoveContainerRequest {
            container_id: container_id.to_string(),
            timeout_secs,
            ..Default::default()
        };
        // Removal may wait `timeout_secs` for processes to exit, then up to 10 s for the kill:
        // allow for both.
        let timeout = self.request_timeout + Duration::from_secs(u64::from(timeout_secs) + 15);
        self.call_within("RemoveContainer", timeout, |c| {
            self.client.remove_container(c, &req)
        })
        .await
        .map(|_| ())
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        self.call("PauseContainer", |c| self.client.pause_container(c, &req))
            .await
            .map(|_| ())
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        let req = container_request(container_id);
        self.call("ResumeContainer", |c| self.client.resume_container(c, &req))
            .await
            .map(|_| ())
    }

    async fn update_container(
        &self,
        container_id: &str,
        resources: &serde_json::Value,
    ) -> Result<(), AgentError> {
        let req = agent::UpdateContainerRequest {
            container_id: container_id.to_string(),
            resources: protobuf::MessageField::some(agent::LinuxResources {
                oci_resources_json: encode("UpdateContainer", resources)?,
                ..Default::default()
            }),
            ..Default::default()
        };
        self.call("UpdateContainer", |c| self.client.update_container(c, &req))
            .await
            .map(|_| ())
    }

    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats, AgentError> {
        let req = container_request(container_id);
        let resp = self
            .call("StatsContainer", |c| self.client.stats_container(c, &req))
            .await?;
        convert::stats(resp)
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<GuestProcess>, AgentError> {
        let req = agent::ListProcessesRequest {
            container_id: container_id.to_string(),
            ..Default::default()
        };
        let resp = self
            .call("ListProcesses", |c| self.client.list_processes(c, &req))
            .await?;
        convert::processes(resp)
    }

    async fn exec_process(
        &self,
        process: &ProcessRef,
        spec: &serde_json::Value,
        stdio: StdioSpec,
    ) -> Result<(), AgentError> {
        let req = agent::ExecProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            oci_process_json: encode("ExecProcess", spec)?,
            stdio: convert::stdio(stdio),
            ..Default::default()
        };
        self.call_within("ExecProcess", self.spawn_timeout(), |c| {
            self.client.exec_process(c, &req)
        })
        .await
        .map(|_| ())
    }

    async fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        all: bool,
    ) -> Result<(), AgentError> {
        let signal = u32::try_from(signal).map_err(|_| AgentError::Transport {
            method: "SignalProcess",
            reason: format!("signal {signal} is negative"),
        })?;
        let req = agent::SignalProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        self.call("SignalProcess", |c| self.client.signal_process(c, &req))
            .await
            .map(|_| ())
    }

    async fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, AgentError> {
        let req = agent::WaitProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            ..Default::default()
        };
        let resp = self
            .call_unbounded("WaitProcess", |c| self.client.wait_process(c, &req))
            .await?;
        convert::exit_status(resp)
    }

    async fn resize_tty(
        &self,
        process: &ProcessRef,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        let req = agent::TtyWinResizeRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            rows,
            cols,
            ..Default::default()
        };
        self.call("TtyWinResize", |c| self.client.tty_win_resize(c, &req))
            .await
            .map(|_| ())
    }

    async fn open_stdio(
        &self,
        header: runvm_protocol::stdio::Header,
    ) -> Result<std::os::fd::OwnedFd, AgentError> {
        let method = "stdio stream";
        let address = self.address.as_ref().ok_or_else(|| AgentError::Transport {
            method,
            reason: "this agent connection has no address to open streams to".into(),
        })?;
        let port = runvm_protocol::stdio::STDIO_VSOCK_PORT;
        let opened = tokio::time::timeout(self.request_timeout, async {
            let fd = open_vsock_fd(address, port).await?;
            // The header is small: it fits in the new socket's buffer at once.
            let bytes = header.encode();
            match nix::unistd::write(&fd, &bytes) {
                Ok(n) if n == bytes.len() => Ok(fd),
                Ok(n) => Err(format!("only {n} bytes of the stream header were sent")),
                Err(e) => Err(format!("cannot send the stream header: {e}")),
            }
        })
        .await
        .map_err(|_| format!("no answer within {} ms", self.request_timeout.as_millis()))
        .and_then(|r| r);
        opened.map_err(|reason| AgentError::Connect {
            address: format!("{} (stdio port {port})", describe(address)),
            reason,
        })
    }

    async fn oom_event(&self) -> Result<String, AgentError> {
        let req = agent::GetOOMEventRequest::new();
        let resp = self
            .call_unbounded("GetOOMEvent", |c| self.client.get_oom_event(c, &req))
            .await?;
        convert::oom_container(resp)
    }

    async fn update_interface(&self, interface: &Interface) -> Result<Interface, AgentError> {
        let req = agent::UpdateInterfaceRequest {
            interface: protobuf::MessageField::some(network::to_pb_interface(interface)),
            ..Default::default()
        };
        let resp = self
            .call("UpdateInterface", |c| self.client.update_interface(c, &req))
            .await?;
        network::from_pb_interface("UpdateInterface", resp)
    }

    async fn list_interfaces(&self) -> Result<Vec<Interface>, AgentError> {
        let req = agent::ListInterfacesRequest::new();
        let resp = self
            .call("ListInterfaces", |c| self.client.list_interfaces(c, &req))
            .await?;
        network::from_pb_interfaces("ListInterfaces", resp.interfaces)
    }

    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>, AgentError> {
        let req = agent::UpdateRoutesRequest {
            routes: protobuf::MessageField::some(agent::Routes {
                routes: routes.iter().map(network::to_pb_route).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let resp = self
            .call("UpdateRoutes", |c| self.client.update_routes(c, &req))
            .await?;
        network::from_pb_routes("UpdateRoutes", resp.routes)
    }

    async fn list_routes(&self) -> Result<Vec<Route>, AgentError> {
        let req = agent::ListRoutesRequest::new();
        let resp = self
            .call("ListRoutes", |c| self.client.list_routes(c, &req))
            .await?;
        network::from_pb_routes("ListRoutes", resp.routes)
    }

    async fn add_neighbors(&self, neighbors: &[Neighbor]) -> Result<(), AgentError> {
        let req = agent::AddARPNeighborsRequest {
            neighbors: protobuf::MessageField::some(agent::ARPNeighbors {
                neighbors: neighbors.iter().map(network::to_pb_neighbor).collect(),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.call("AddARPNeighbors", |c| {
            self.client.add_arp_neighbors(c, &req)
        })
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_or_control_text_from_guest_is_rejected() {
        assert!(checked_text("Version", "v", "1.0".into()).is_ok());
        let err = checked_text("Version", "kernel_release", "x".repeat(300)).unwrap_err();
        assert!(
            err.to_string().contains("kernel_release is 300 bytes"),
            "{err}"
        );
        assert!(checked_text("Version", "v", "a\u{1b}[2J".into()).is_err());
    }

    #[test]
    fn ttrpc_codes_become_rpc_codes() {
        use ttrpc::Code;
        let table = [
            (Code::OK, RpcCode::Unknown),
            (Code::CANCELLED, RpcCode::Cancelled),
            (Code::UNKNOWN, RpcCode::Unknown),
            (Code::INVALID_ARGUMENT, RpcCode::InvalidArgument),
            (Code::DEADLINE_EXCEEDED, RpcCode::DeadlineExceeded),
            (Code::NOT_FOUND, RpcCode::NotFound),
            (Code::ALREADY_EXISTS, RpcCode::AlreadyExists),
            (Code::PERMISSION_DENIED, RpcCode::PermissionDenied),
            (Code::RESOURCE_EXHAUSTED, RpcCode::ResourceExhausted),
            (Code::FAILED_PRECONDITION, RpcCode::FailedPrecondition),
            (Code::ABORTED, RpcCode::Aborted),
            (Code::OUT_OF_RANGE, RpcCode::OutOfRange),
            (Code::UNIMPLEMENTED, RpcCode::Unimplemented),
            (Code::INTERNAL, RpcCode::Internal),
            (Code::UNAVAILABLE, RpcCode::Unavailable),
            (Code::DATA_LOSS, RpcCode::DataLoss),
            (Code::UNAUTHENTICATED, RpcCode::Unauthenticated),
        ];
        for (code, expected) in table {
            assert_eq!(rpc_code(code), expected, "{code:?}");
            if code != Code::OK {
                // The display name is the ttrpc name.
                assert_eq!(expected.to_string(), format!("{code:?}"));
            }
        }
    }

    #[test]
    fn failed_statuses_become_typed_agent_errors() {
        let t = Duration::from_secs(3);
        let status = |code, msg| ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg));
        let e = map_error(
            "RemoveContainer",
            t,
            status(ttrpc::Code::NOT_FOUND, "no c1"),
        );
        assert_eq!(e.rpc_code(), Some(RpcCode::NotFound));
        assert_eq!(
            e.to_string(),
            "agent request RemoveContainer failed: NOT_FOUND: no c1"
        );
        let e = map_error("Stats", t, status(ttrpc::Code::UNIMPLEMENTED, "later"));
        assert!(e.is_unimplemented());
        let e = map_error("Check", t, status(ttrpc::Code::DEADLINE_EXCEEDED, "slow"));
        assert!(
            matches!(
                e,
                AgentError::Timeout {
                    method: "Check",
                    ..
                }
            ),
            "{e:?}"
        );
        let e = map_error("Check", t, ttrpc::Error::LocalClosed);
        assert!(matches!(e, AgentError::Transport { .. }), "{e:?}");
        assert_eq!(e.rpc_code(), None);
    }

    #[test]
    fn long_messages_are_cut_on_a_char_boundary() {
        let s = "é".repeat(1000);
        let b = bounded(&s, 7);
        assert!(b.ends_with('…') && b.len() <= 7 + '…'.len_utf8());
    }

    #[tokio::test]
    async fn hybrid_handshake_refusal_is_a_connect_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.hv");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            // Like vhost-device-vsock when nothing listens in the guest: read, then close.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 64];
            let _ = s.read(&mut buf).await;
        });
        let addr = AgentAddress::HybridVsock {
            uds_path: path,
            port: 1024,
        };
        let err = TtrpcAgent::connect(&addr, Duration::from_secs(2), Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("hybrid vsock") && err.contains("handshake"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn hybrid_handshake_answer_other_than_ok_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vsock.hv");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"NOPE\n").await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        });
        let addr = AgentAddress::HybridVsock {
            uds_path: path,
            port: 1024,
        };
        let err = TtrpcAgent::connect(&addr, Duration::from_secs(2), Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"NOPE\""), "{err}");
    }
}
