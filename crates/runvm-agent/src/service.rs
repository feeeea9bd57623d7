//! The agent API implementation. Methods not written here answer ttrpc `UNIMPLEMENTED` (the
//! protocol crate makes that the generated default).

use std::sync::Arc;

use async_trait::async_trait;
use runvm_protocol::agent::{self, check_response::ServingStatus};
use runvm_protocol::agent_ttrpc;
use tokio::sync::Notify;
use ttrpc::r#async::TtrpcContext;

use crate::container::streams::StreamRegistry;
use crate::container::Containers;
use crate::error::{AgentError, Result};
use crate::hotplug::Onlined;
use crate::network;
use crate::reaper::Reaper;

/// Guest-side boot timeline, microseconds of CLOCK_BOOTTIME.
#[derive(Debug, Clone, Copy)]
pub struct BootTimes {
    pub init_entered_us: u64,
    pub modules_loaded_us: u64,
    pub agent_listening_us: u64,
}

/// What the service asks of the guest: its containers and their processes, and onlining
/// hot-plugged vCPUs and memory. The agent's backend is [`Containers`] (libcontainer, the
/// reaper, the cgroup files, sysfs); the fuzz targets serve the agent over a fake one. Every
/// request reaches the backend as decoded, unvalidated: validating is the backend's job.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// CreateContainer.
    async fn create(&self, req: agent::CreateContainerRequest) -> Result<()>;
    /// StartContainer.
    async fn start(&self, id: String) -> Result<()>;
    /// RemoveContainer.
    async fn remove(&self, id: String, timeout_secs: u32) -> Result<()>;
    /// PauseContainer (`pause`) or ResumeContainer.
    async fn pause(&self, id: String, pause: bool) -> Result<()>;
    /// UpdateContainer.
    async fn update(&self, req: agent::UpdateContainerRequest) -> Result<()>;
    /// StatsContainer.
    async fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse>;
    /// ListProcesses.
    fn list_processes(&self, id: &str) -> Result<agent::ListProcessesResponse>;
    /// ExecProcess.
    async fn exec(&self, req: agent::ExecProcessRequest) -> Result<()>;
    /// SignalProcess.
    fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()>;
    /// WaitProcess.
    async fn wait(&self, req: &agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse>;
    /// TtyWinResize.
    fn resize(&self, req: &agent::TtyWinResizeRequest) -> Result<()>;
    /// GetOOMEvent: the next container OOM-killed; `None` once no more can come.
    async fn next_oom_event(&self) -> Option<String>;
    /// OnlineCPUMem: brings `cpus` vCPUs online (waiting at most `wait`), then the memory.
    async fn online_cpu_mem(&self, cpus: u32, wait: std::time::Duration) -> Result<Onlined>;
    /// The containers' ids and cgroup folders, for GetGuestMetrics (none by default).
    fn container_cgroups(&self) -> Vec<(String, std::path::PathBuf)> {
        Vec::new()
    }
}

#[async_trait]
impl Backend for Arc<Containers> {
    async fn create(&self, req: agent::CreateContainerRequest) -> Result<()> {
        Containers::create(self, req).await
    }
    async fn start(&self, id: String) -> Result<()> {
        Containers::start(self, id).await
    }
    async fn remove(&self, id: String, timeout_secs: u32) -> Result<()> {
        Containers::remove(self, id, timeout_secs).await
    }
    async fn pause(&self, id: String, pause: bool) -> Result<()> {
        Containers::pause(self, id, pause).await
    }
    async fn update(&self, req: agent::UpdateContainerRequest) -> Result<()> {
        Containers::update(self, req).await
    }
    async fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        Containers::stats(self, id).await
    }
    fn list_processes(&self, id: &str) -> Result<agent::ListProcessesResponse> {
        Containers::list_processes(self, id)
    }
    async fn exec(&self, req: agent::ExecProcessRequest) -> Result<()> {
        Containers::exec(self, req).await
    }
    fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        Containers::signal(self, req)
    }
    async fn wait(&self, req: &agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse> {
        Containers::wait(self, req).await
    }
    fn resize(&self, req: &agent::TtyWinResizeRequest) -> Result<()> {
        Containers::resize(self, req)
    }
    async fn next_oom_event(&self) -> Option<String> {
        Containers::next_oom_event(self).await
    }
    async fn online_cpu_mem(&self, cpus: u32, wait: std::time::Duration) -> Result<Onlined> {
        tokio::task::spawn_blocking(move || crate::hotplug::online_cpu_mem(cpus, wait))
            .await
            .map_err(|e| AgentError::internal(format!("onlining CPUs and memory: {e}")))
            .and_then(|r| r)
    }
    fn container_cgroups(&self) -> Vec<(String, std::path::PathBuf)> {
        Containers::cgroups(self)
    }
}

/// The agent's service state, over its [`Backend`].
#[derive(Debug)]
pub struct Agent<B: Backend = Arc<Containers>> {
    boot: BootTimes,
    shutdown: Arc<Notify>,
    backend: B,
}

impl Agent {
    /// Must be called inside the tokio runtime (it starts the OOM monitor).
    /// `streams`: where the stdio listener parks the host's streams for new processes.
    pub fn new(
        boot: BootTimes,
        shutdown: Arc<Notify>,
        reaper: Arc<Reaper>,
        streams: Arc<StreamRegistry>,
    ) -> Self {
        tokio::spawn(async {
            if let Err(e) = network::loopback_up().await {
                tracing::warn!(error = %e, "cannot bring the loopback device up");
            }
        });
        Agent::with_backend(boot, shutdown, Containers::new(reaper, streams))
    }
}

impl<B: Backend> Agent<B> {
    /// The service over `backend` (the fuzz targets' fake); `new` gives the agent's.
    pub fn with_backend(boot: BootTimes, shutdown: Arc<Notify>, backend: B) -> Self {
        Agent {
            boot,
            shutdown,
            backend,
        }
    }
}

/// Logs a failed RPC and turns the error into a ttrpc status.
fn answer<T>(method: &str, id: &str, result: Result<T>) -> ttrpc::Result<T> {
    result.map_err(|e| {
        tracing::warn!(method, container = id, code = ?e.code, error = %e.message, "request failed");
        e.into()
    })
}

/// `uname -r`.
fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// (MemTotal, MemAvailable) in bytes from a /proc/meminfo text.
pub(crate) fn parse_meminfo(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib * 1024)
            .unwrap_or(0)
    };
    (field("MemTotal:"), field("MemAvailable:"))
}

/// The sysfs memory block size (hex text), 0 if absent.
fn parse_block_size(text: &str) -> u64 {
    u64::from_str_radix(text.trim().trim_start_matches("0x"), 16).unwrap_or(0)
}

#[async_trait]
impl<B: Backend> agent_ttrpc::AgentService for Agent<B> {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CheckRequest,
    ) -> ttrpc::Result<agent::CheckResponse> {
        Ok(agent::CheckResponse {
            status: ServingStatus::SERVING.into(),
            ..Default::default()
        })
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::VersionRequest,
    ) -> ttrpc::Result<agent::VersionResponse> {
        Ok(agent::VersionResponse {
            agent_version: env!("CARGO_PKG_VERSION").to_string(),
            kernel_release: kernel_release(),
            api_version: runvm_protocol::API_VERSION,
            ..Default::default()
        })
    }

    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GuestDetailsRequest,
    ) -> ttrpc::Result<agent::GuestDetailsResponse> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let (total, available) = parse_meminfo(&meminfo);
        let block = std::fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
            .map(|t| parse_block_size(&t))
            .unwrap_or(0);
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        Ok(agent::GuestDetailsResponse {
            mem_block_size_bytes: block,
            cpu_count: cpus,
            mem_total_bytes: total,
            mem_available_bytes: available,
            boot_times: protobuf::MessageField::some(agent::BootTimes {
                init_entered_us: self.boot.init_entered_us,
                modules_loaded_us: self.boot.modules_loaded_us,
                agent_listening_us: self.boot.agent_listening_us,
                now_us: crate::init::boottime_us(),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    async fn get_guest_metrics(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GuestMetricsRequest,
    ) -> ttrpc::Result<agent::GuestMetricsResponse> {
        // Read here, not on the blocking pool: /proc and cgroup files answer from kernel
        // memory without waiting, and a scrape every 15 s would find the pool's idle thread
        // gone (10 s keep-alive) and start a new one each time.
        let containers = self.backend.container_cgroups();
        Ok(crate::metrics::read(
            std::path::Path::new("/proc"),
            std::path::Path::new("/sys/class/net"),
            &containers,
        ))
    }

    async fn read_telemetry(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadTelemetryRequest,
    ) -> ttrpc::Result<agent::TelemetryBatch> {
        let batch = crate::telemetry::read(&req).await;
        answer("ReadTelemetry", "", batch)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ShutdownRequest,
    ) -> ttrpc::Result<agent::Empty> {
        tracing::info!("shutdown requested by the host");
        // notify_one stores a permit, so the main task sees it even if not waiting yet.
        self.shutdown.notify_one();
        Ok(agent::Empty::new())
    }

    async fn set_guest_time(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetGuestTimeRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let set = if req.nsec >= 1_000_000_000 || req.sec < 0 {
            Err(crate::error::AgentError::invalid(format!(
                "{}.{:09} is no time; valid: seconds >= 0 and nanoseconds below 1000000000",
                req.sec, req.nsec
            )))
        } else {
            let ts = nix::sys::time::TimeSpec::new(req.sec, i64::from(req.nsec));
            nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts)
                .map_err(|e| crate::error::AgentError::internal(format!("clock_settime: {e}")))
        };
        answer("SetGuestTime", "", set)?;
        tracing::debug!(sec = req.sec, "wall clock set by the host");
        Ok(agent::Empty::new())
    }

    async fn online_cpu_mem(
        &self,
        _ctx: &TtrpcContext,
        req: agent::OnlineCPUMemRequest,
    ) -> ttrpc::Result<agent::OnlineCPUMemResponse> {
        let wait = std::time::Duration::from_millis(u64::from(req.timeout_ms));
        let done = self.backend.online_cpu_mem(req.cpus, wait).await;
        let done = answer("OnlineCPUMem", "", done)?;
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Ok(agent::OnlineCPUMemResponse {
            online_cpus: done.online_cpus,
            onlined_memory_blocks: done.memory_blocks,
            mem_total_bytes: parse_meminfo(&meminfo).0,
            ..Default::default()
        })
    }

    // --- containers ---------------------------------------------------------------------

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let id = req.container_id.clone();
        let r = self.backend.create(req).await;
        answer("CreateContainer", &id, r.map(|()| agent::Empty::new()))
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self.backend.start(req.container_id.clone()).await;
        answer(
            "StartContainer",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self
            .backend
            .remove(req.container_id.clone(), req.timeout_secs)
            .await;
        answer(
            "RemoveContainer",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self.backend.pause(req.container_id.clone(), true).await;
        answer(
            "PauseContainer",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self.backend.pause(req.container_id.clone(), false).await;
        answer(
            "ResumeContainer",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let id = req.container_id.clone();
        let r = self.backend.update(req).await;
        answer("UpdateContainer", &id, r.map(|()| agent::Empty::new()))
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        let r = self.backend.stats(&req.container_id).await;
        answer("StatsContainer", &req.container_id, r)
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ListProcessesRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        let r = self.backend.list_processes(&req.container_id);
        answer("ListProcesses", &req.container_id, r)
    }

    // --- processes ----------------------------------------------------------------------

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let id = req.container_id.clone();
        let r = self.backend.exec(req).await;
        answer("ExecProcess", &id, r.map(|()| agent::Empty::new()))
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self.backend.signal(&req);
        answer(
            "SignalProcess",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        let r = self.backend.wait(&req).await;
        answer("WaitProcess", &req.container_id, r)
    }

    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: agent::TtyWinResizeRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let r = self.backend.resize(&req);
        answer(
            "TtyWinResize",
            &req.container_id,
            r.map(|()| agent::Empty::new()),
        )
    }

    // --- events -------------------------------------------------------------------------

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetOOMEventRequest,
    ) -> ttrpc::Result<agent::OOMEvent> {
        match self.backend.next_oom_event().await {
            Some(container_id) => Ok(agent::OOMEvent {
                container_id,
                ..Default::default()
            }),
            None => Err(AgentError::internal("the OOM monitor stopped").into()),
        }
    }

    // --- network ------------------------------------------------------------------------

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<agent::Interface> {
        let wanted = req.interface.into_option().unwrap_or_default();
        let r = network::update_interface(&wanted).await;
        answer("UpdateInterface", &wanted.name, r)
    }

    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListInterfacesRequest,
    ) -> ttrpc::Result<agent::Interfaces> {
        answer("ListInterfaces", "", network::list_interfaces().await)
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        let wanted = req.routes.into_option().unwrap_or_default();
        answer("UpdateRoutes", "", network::update_routes(&wanted).await)
    }

    async fn list_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        answer("ListRoutes", "", network::list_routes().await)
    }

    async fn add_arp_neighbors(
        &self,
        _ctx: &TtrpcContext,
        req: agent::AddARPNeighborsRequest,
    ) -> ttrpc::Result<agent::Empty> {
        let wanted = req.neighbors.into_option().unwrap_or_default();
        let r = network::add_neighbors(&wanted).await;
        answer("AddARPNeighbors", "", r.map(|()| agent::Empty::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_fields_parse_to_bytes() {
        let text = "MemTotal:         500000 kB\nMemFree: 1 kB\nMemAvailable:     400000 kB\n";
        assert_eq!(parse_meminfo(text), (500_000 * 1024, 400_000 * 1024));
        assert_eq!(parse_meminfo(""), (0, 0));
    }

    #[test]
    fn block_size_is_hex() {
        assert_eq!(parse_block_size("8000000\n"), 0x800_0000);
        assert_eq!(parse_block_size("garbage"), 0);
    }
}
