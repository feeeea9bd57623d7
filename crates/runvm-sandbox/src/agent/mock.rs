//! A scriptable in-memory agent for unit tests.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runvm_hypervisor::AgentAddress;
use runvm_protocol::frame;
use runvm_protocol::stdio::{Header, TOKEN_LEN};
use tokio::io::AsyncWriteExt;

use super::{
    Agent, AgentConnector, AgentError, AgentVersion, ContainerStats, ContainerUsage,
    CreateContainer, ExitStatus, GuestDetails, GuestLogLevel, GuestMetrics, GuestProcess,
    GuestTelemetry, Interface, Neighbor, OnlinedCpuMem, ProcessRef, Route, RpcCode, StdioSpec,
    TelemetryRequest,
};

/// A simulated guest process: its scripted output and exit, and what it was sent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MockProcess {
    /// Output sent on its stdout stream, then the stream's end.
    pub stdout: Vec<u8>,
    /// Output sent on its stderr stream, then the stream's end.
    pub stderr: Vec<u8>,
    /// The exit code `wait_process` reports (default 0).
    pub exit_code: i32,
    /// What arrived on its stdin stream.
    pub stdin: Vec<u8>,
    /// Whether its stdin stream ended.
    pub stdin_closed: bool,
    /// Signals received.
    pub signals: Vec<i32>,
    /// Window size set last.
    pub tty_size: Option<(u32, u32)>,
    /// Whether the process was started.
    pub started: bool,
    /// Runs until it is signalled (`wait_process` answers then, with 128 + the signal);
    /// else it exits as soon as it is waited for.
    pub until_signalled: bool,
}

/// A simulated container.
#[derive(Debug, Clone, PartialEq)]
pub struct MockContainer {
    /// The create request.
    pub request: CreateContainer,
    /// Started.
    pub started: bool,
    /// Paused.
    pub paused: bool,
}

/// What the mock agent saw and how it behaves; shared between the connector, its agents and
/// the test.
#[derive(Debug)]
pub struct MockAgentState {
    /// Connection attempts that fail before one succeeds (a guest still booting).
    pub refuse_connects: u32,
    /// Never accept a connection (an agent that never comes up).
    pub never_answer: bool,
    /// The version reported.
    pub version: AgentVersion,
    /// Requests received, in order.
    pub calls: Vec<String>,
    /// Connection attempts made.
    pub connects: u32,
    /// Containers that exist in the simulated guest.
    pub containers: BTreeMap<String, MockContainer>,
    /// Processes, scripted in advance or created by start/exec.
    pub processes: BTreeMap<ProcessRef, MockProcess>,
    /// When set, the next `create_container` fails with this code and message.
    pub fail_create: Option<(RpcCode, String)>,
    /// The guest's interfaces (set by `update_interface`, by MAC).
    pub interfaces: Vec<Interface>,
    /// The guest's routes (set by `update_routes`).
    pub routes: Vec<Route>,
    /// Neighbours added.
    pub neighbors: Vec<Neighbor>,
    /// When set, the next network change fails with this code and message (nothing changes).
    pub fail_network: Option<(RpcCode, String)>,
    /// The CPUs `online_cpu_mem` was last asked to have online.
    pub online_cpus: u32,
    /// The guest's ends of stdio streams opened and not yet joined to a process, by token and
    /// stream (0 stdin, 1 stdout, 2 stderr).
    pub stdio_streams: BTreeMap<([u8; TOKEN_LEN], u8), std::os::unix::net::UnixStream>,
    /// Containers whose OOM kill `oom_event` reports next, in order (it waits while empty).
    pub oom_kills: std::collections::VecDeque<String>,
    /// What the guest queued for the host (`read_telemetry` takes it; it does not wait).
    pub telemetry: GuestTelemetry,
    /// The level the host last asked the guest to queue from.
    pub telemetry_level: Option<GuestLogLevel>,
}

impl Default for MockAgentState {
    fn default() -> Self {
        MockAgentState {
            refuse_connects: 0,
            never_answer: false,
            version: AgentVersion {
                agent_version: "0.0.0-mock".into(),
                kernel_release: "6.1.0-mock".into(),
                api_version: runvm_protocol::API_VERSION,
            },
            calls: Vec::new(),
            connects: 0,
            containers: BTreeMap::new(),
            processes: BTreeMap::new(),
            fail_create: None,
            interfaces: Vec::new(),
            routes: Vec::new(),
            neighbors: Vec::new(),
            fail_network: None,
            online_cpus: 0,
            telemetry: GuestTelemetry::default(),
            telemetry_level: None,
            stdio_streams: BTreeMap::new(),
            oom_kills: Default::default(),
        }
    }
}

/// Connects to [`MockAgent`]s sharing one [`MockAgentState`].
#[derive(Debug, Default, Clone)]
pub struct MockAgentConnector {
    state: Arc<Mutex<MockAgentState>>,
}

impl MockAgentConnector {
    /// A connector with default state.
    pub fn new() -> Self {
        Self::default()
    }
    /// The shared state, to script and inspect.
    pub fn state(&self) -> Arc<Mutex<MockAgentState>> {
        Arc::clone(&self.state)
    }
}

#[async_trait]
impl AgentConnector for MockAgentConnector {
    async fn connect(
        &self,
        address: &AgentAddress,
        _timeout: Duration,
    ) -> Result<Box<dyn Agent>, AgentError> {
        let mut s = self.state.lock().expect("mock agent lock");
        s.connects += 1;
        if s.never_answer || s.refuse_connects > 0 {
            s.refuse_connects = s.refuse_connects.saturating_sub(1);
            return Err(AgentError::Connect {
                address: format!("{address:?}"),
                reason: "connection refused (mock)".into(),
            });
        }
        Ok(Box::new(MockAgent {
            state: Arc::clone(&self.state),
        }))
    }
}

/// An agent answering from [`MockAgentState`].
#[derive(Debug)]
pub struct MockAgent {
    state: Arc<Mutex<MockAgentState>>,
}

fn rpc(method: &'static str, code: RpcCode, message: String) -> AgentError {
    AgentError::Rpc {
        method,
        code,
        message,
    }
}

impl MockAgentState {
    fn container(
        &mut self,
        method: &'static str,
        id: &str,
    ) -> Result<&mut MockContainer, AgentError> {
        self.containers.get_mut(id).ok_or_else(|| {
            rpc(
                method,
                RpcCode::NotFound,
                format!("container {id:?} not found"),
            )
        })
    }

    fn process(
        &mut self,
        method: &'static str,
        p: &ProcessRef,
    ) -> Result<&mut MockProcess, AgentError> {
        self.processes
            .get_mut(p)
            .filter(|proc| proc.started)
            .ok_or_else(|| rpc(method, RpcCode::NotFound, format!("process {p} not found")))
    }
}

impl MockAgent {
    /// Plays the guest's side of a started process's stdio streams: its scripted stdout and
    /// stderr as frames then the end frame; what arrives on stdin into `stdin`, and
    /// `stdin_closed` at its end frame.
    fn play(&self, process: ProcessRef, token: [u8; TOKEN_LEN]) {
        let (ends, out, err) = {
            let mut s = self.state.lock().expect("mock agent lock");
            let ends: Vec<Option<std::os::unix::net::UnixStream>> = (0u8..3)
                .map(|k| s.stdio_streams.remove(&(token, k)))
                .collect();
            let p = s.processes.entry(process.clone()).or_default();
            (ends, p.stdout.clone(), p.stderr.clone())
        };
        let tokio_stream = |s: std::os::unix::net::UnixStream| {
            s.set_nonblocking(true)
                .and_then(|()| tokio::net::UnixStream::from_std(s))
                .expect("mock stream")
        };
        let mut ends = ends.into_iter();
        let (stdin, stdout, stderr) = (
            ends.next().flatten(),
            ends.next().flatten(),
            ends.next().flatten(),
        );
        for (end, data) in [(stdout, out), (stderr, err)] {
            if let Some(end) = end {
                let mut end = tokio_stream(end);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; frame::PREFIX + 4096];
                    for chunk in data.chunks(4096) {
                        buf[frame::PREFIX..frame::PREFIX + chunk.len()].copy_from_slice(chunk);
                        if frame::write_frame(&mut end, &mut buf, chunk.len())
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    let _ = frame::write_frame(&mut end, &mut buf, 0).await;
                    let _ = end.flush().await;
                    // Held until the host closes, as the agent does.
                    let mut rest = [0u8; 16];
                    while matches!(tokio::io::AsyncReadExt::read(&mut end, &mut rest).await, Ok(n) if n > 0)
                    {
                    }
                });
            }
        }
        if let Some(end) = stdin {
            let mut end = tokio_stream(end);
            let state = Arc::clone(&self.state);
            tokio::spawn(async move {
                let mut buf = vec![0u8; runvm_protocol::stdio::MAX_FRAME];
                while let Ok(Some(n)) = frame::read_frame(&mut end, &mut buf).await {
                    let mut s = state.lock().expect("mock agent lock");
                    s.processes
                        .entry(process.clone())
                        .or_default()
                        .stdin
                        .extend_from_slice(&buf[..n]);
                }
                state
                    .lock()
                    .expect("mock agent lock")
                    .processes
                    .entry(process)
                    .or_default()
                    .stdin_closed = true;
            });
        }
    }

    fn record(&self, call: &str) -> std::sync::MutexGuard<'_, MockAgentState> {
        let mut s = self.state.lock().expect("mock agent lock");
        s.calls.push(call.to_string());
        s
    }
}

fn network_failure(s: &mut MockAgentState, method: &'static str) -> Result<(), AgentError> {
    match s.fail_network.take() {
        Some((code, message)) => Err(rpc(method, code, message)),
        None => Ok(()),
    }
}

#[async_trait]
impl Agent for MockAgent {
    async fn update_interface(&self, interface: &Interface) -> Result<Interface, AgentError> {
        let mut s = self.record(&format!("update_interface {}", interface.name));
        network_failure(&mut s, "UpdateInterface")?;
        s.interfaces.retain(|i| i.mac != interface.mac);
        s.interfaces.push(interface.clone());
        Ok(interface.clone())
    }

    async fn list_interfaces(&self) -> Result<Vec<Interface>, AgentError> {
        Ok(self.record("list_interfaces").interfaces.clone())
    }

    async fn update_routes(&self, routes: &[Route]) -> Result<Vec<Route>, AgentError> {
        let mut s = self.record("update_routes");
        network_failure(&mut s, "UpdateRoutes")?;
        s.routes = routes.to_vec();
        Ok(s.routes.clone())
    }

    async fn list_routes(&self) -> Result<Vec<Route>, AgentError> {
        Ok(self.record("list_routes").routes.clone())
    }

    async fn add_neighbors(&self, neighbors: &[Neighbor]) -> Result<(), AgentError> {
        let mut s = self.record("add_neighbors");
        network_failure(&mut s, "AddARPNeighbors")?;
        s.neighbors.extend(neighbors.iter().cloned());
        Ok(())
    }

    async fn check(&self) -> Result<(), AgentError> {
        drop(self.record("check"));
        Ok(())
    }

    async fn version(&self) -> Result<AgentVersion, AgentError> {
        Ok(self.record("version").version.clone())
    }

    async fn read_telemetry(
        &self,
        request: TelemetryRequest,
    ) -> Result<GuestTelemetry, AgentError> {
        let mut s = self.record("read_telemetry");
        s.telemetry_level = Some(request.level);
        let mut batch = std::mem::take(&mut s.telemetry);
        batch.records.retain(|r| r.level <= request.level);
        let rest = batch
            .records
            .split_off(batch.records.len().min(request.max_records as usize));
        s.telemetry.records = rest;
        Ok(batch)
    }

    async fn guest_metrics(&self) -> Result<GuestMetrics, AgentError> {
        let s = self.record("guest_metrics");
        // A 512 MiB guest, half of it free, each container using 1 MiB and 1 ms of CPU.
        Ok(GuestMetrics {
            mem_total_bytes: 512 << 20,
            mem_available_bytes: 256 << 20,
            containers: s
                .containers
                .keys()
                .map(|id| ContainerUsage {
                    container_id: id.clone(),
                    memory_bytes: 1 << 20,
                    cpu_usage_ns: 1_000_000,
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn guest_details(&self) -> Result<GuestDetails, AgentError> {
        drop(self.record("guest_details"));
        Ok(GuestDetails {
            cpu_count: 1,
            mem_total_bytes: 512 << 20,
            // A guest that ran init at 0.8 s and answers at 1.5 s of its clock.
            boot_times: crate::agent::GuestBootTimes {
                init_entered_us: 800_000,
                modules_loaded_us: 900_000,
                agent_listening_us: 1_000_000,
                now_us: 1_500_000,
            },
            ..Default::default()
        })
    }

    async fn set_guest_time(&self, _now: std::time::SystemTime) -> Result<(), AgentError> {
        drop(self.record("set_guest_time"));
        Ok(())
    }

    async fn online_cpu_mem(
        &self,
        cpus: u32,
        _wait: Duration,
    ) -> Result<OnlinedCpuMem, AgentError> {
        let mut s = self.record(&format!("online_cpu_mem {cpus}"));
        s.online_cpus = cpus;
        Ok(OnlinedCpuMem {
            online_cpus: cpus,
            ..Default::default()
        })
    }

    async fn shutdown(&self) -> Result<(), AgentError> {
        drop(self.record("shutdown"));
        Ok(())
    }

    async fn create_container(&self, request: CreateContainer) -> Result<(), AgentError> {
        let mut s = self.record("create_container");
        if let Some((code, message)) = s.fail_create.take() {
            return Err(AgentError::Rpc {
                method: "CreateContainer",
                code,
                message,
            });
        }
        if s.containers.contains_key(&request.container_id) {
            return Err(rpc(
                "CreateContainer",
                RpcCode::AlreadyExists,
                format!("container {:?} exists", request.container_id),
            ));
        }
        let init = ProcessRef::init(request.container_id.clone());
        s.processes.entry(init).or_default();
        s.containers.insert(
            request.container_id.clone(),
            MockContainer {
                request,
                started: false,
                paused: false,
            },
        );
        Ok(())
    }

    async fn start_container(&self, container_id: &str) -> Result<(), AgentError> {
        let mut s = self.record("start_container");
        let c = s.container("StartContainer", container_id)?;
        if c.started {
            return Err(rpc(
                "StartContainer",
                RpcCode::FailedPrecondition,
                "already started".into(),
            ));
        }
        c.started = true;
        let token = c.request.stdio.stream_token;
        let init = ProcessRef::init(container_id);
        s.processes.entry(init.clone()).or_default().started = true;
        if let Some(token) = token {
            drop(s);
            self.play(init, token);
        }
        Ok(())
    }

    async fn remove_container(&self, container_id: &str, _timeout: u32) -> Result<(), AgentError> {
        let mut s = self.record("remove_container");
        s.container("RemoveContainer", container_id)?;
        s.containers.remove(container_id);
        s.processes.retain(|p, _| p.container_id != container_id);
        Ok(())
    }

    async fn pause_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.record("pause_container")
            .container("PauseContainer", container_id)?
            .paused = true;
        Ok(())
    }

    async fn resume_container(&self, container_id: &str) -> Result<(), AgentError> {
        self.record("resume_container")
            .container("ResumeContainer", container_id)?
            .paused = false;
        Ok(())
    }

    async fn update_container(
        &self,
        container_id: &str,
        _resources: &serde_json::Value,
    ) -> Result<(), AgentError> {
        self.record("update_container")
            .container("UpdateContainer", container_id)?;
        Ok(())
    }

    async fn stats_container(&self, container_id: &str) -> Result<ContainerStats, AgentError> {
        self.record("stats_container")
            .container("StatsContainer", container_id)?;
        let mut stats = ContainerStats::default();
        stats.cpu.usage_total_ns = 1_000_000;
        stats.memory.usage_bytes = 1 << 20;
        stats.pids_current = 1;
        Ok(stats)
    }

    async fn list_processes(&self, container_id: &str) -> Result<Vec<GuestProcess>, AgentError> {
        let mut s = self.record("list_processes");
        s.container("ListProcesses", container_id)?;
        Ok(s.processes
            .iter()
            .filter(|(p, proc)| p.container_id == container_id && proc.started)
            .enumerate()
            .map(|(i, (p, _))| GuestProcess {
                pid: i as i32 + 1,
                cmd: if p.exec_id.is_empty() {
                    "init".into()
                } else {
                    p.exec_id.clone()
                },
                ..Default::default()
            })
            .collect())
    }

    async fn exec_process(
        &self,
        process: &ProcessRef,
        _spec: &serde_json::Value,
        stdio: StdioSpec,
    ) -> Result<(), AgentError> {
        let mut s = self.record("exec_process");
        if !s.container("ExecProcess", &process.container_id)?.started {
            return Err(rpc(
                "ExecProcess",
                RpcCode::FailedPrecondition,
                format!("container {:?} is not running", process.container_id),
            ));
        }
        if s.processes.get(process).is_some_and(|p| p.started) {
            return Err(rpc(
                "ExecProcess",
                RpcCode::AlreadyExists,
                format!("{process} exists"),
            ));
        }
        s.processes.entry(process.clone()).or_default().started = true;
        if let Some(token) = stdio.stream_token {
            drop(s);
            self.play(process.clone(), token);
        }
        Ok(())
    }

    async fn signal_process(
        &self,
        process: &ProcessRef,
        signal: i32,
        _all: bool,
    ) -> Result<(), AgentError> {
        self.record("signal_process")
            .process("SignalProcess", process)?
            .signals
            .push(signal);
        Ok(())
    }

    async fn wait_process(&self, process: &ProcessRef) -> Result<ExitStatus, AgentError> {
        drop(self.record("wait_process"));
        loop {
            let running = {
                let mut s = self.state.lock().expect("mock agent lock");
                let p = s.process("WaitProcess", process)?;
                p.until_signalled && p.signals.is_empty()
            };
            if !running {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut s = self.state.lock().expect("mock agent lock");
        let p = s.process("WaitProcess", process)?;
        let code = match p.signals.last() {
            Some(sig) => 128 + sig,
            None => p.exit_code,
        };
        Ok(ExitStatus {
            code,
            exited_at_unix_ns: 1,
        })
    }

    async fn resize_tty(
        &self,
        process: &ProcessRef,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        self.record("resize_tty")
            .process("TtyWinResize", process)?
            .tty_size = Some((rows, cols));
        Ok(())
    }

    async fn open_stdio(&self, header: Header) -> Result<std::os::fd::OwnedFd, AgentError> {
        let mut s = self.record("open_stdio");
        let (host, guest) =
            std::os::unix::net::UnixStream::pair().map_err(|e| AgentError::Transport {
                method: "stdio stream",
                reason: e.to_string(),
            })?;
        s.stdio_streams
            .insert((header.token, header.kind as u8), guest);
        Ok(host.into())
    }

    async fn oom_event(&self) -> Result<String, AgentError> {
        drop(self.record("oom_event"));
        // Waits, like an agent with no event, until a test scripts an OOM kill.
        loop {
            let next = self
                .state
                .lock()
                .expect("mock agent lock")
                .oom_kills
                .pop_front();
            if let Some(container) = next {
                return Ok(container);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
