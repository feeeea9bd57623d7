//! A fake container backend for the agent's service: containers and processes in a map, no
//! libcontainer, no cgroups, no sysfs. Ids and stdio configs (a stream token for any stdio
//! stream) are checked as the real backend checks them; no stream is ever claimed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use runvm_agent::container::streams::check_config;
use runvm_agent::error::{validate_id, AgentError, Result};
use runvm_agent::hotplug::{Onlined, MAX_WAIT};
use runvm_agent::service::Backend;
use runvm_protocol::agent;

/// The most containers the fake keeps (a flood of creates is refused, as memory would be).
const MAX_CONTAINERS: usize = 64;

/// A container: its state and exec'd processes.
#[derive(Debug, Default)]
struct Container {
    started: bool,
    paused: bool,
    execs: BTreeSet<String>,
}

/// The fake backend; its clones share the containers. [`FakeBackend::reset`] forgets them all
/// (between two inputs).
#[derive(Debug, Default, Clone)]
pub struct FakeBackend {
    containers: Arc<Mutex<BTreeMap<String, Container>>>,
}

impl FakeBackend {
    /// Forgets every container.
    pub fn reset(&self) {
        self.map().clear();
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Container>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, id: &str, f: impl FnOnce(&mut Container) -> Result<T>) -> Result<T> {
        validate_id("container id", id)?;
        match self.map().get_mut(id) {
            Some(c) => f(c),
            None => Err(AgentError::not_found(format!("container {id:?} not found"))),
        }
    }

    fn process<T>(&self, id: &str, exec_id: &str, f: impl FnOnce() -> T) -> Result<T> {
        if !exec_id.is_empty() {
            validate_id("exec id", exec_id)?;
        }
        self.with(id, |c| {
            if exec_id.is_empty() || c.execs.contains(exec_id) {
                Ok(f())
            } else {
                Err(AgentError::not_found(format!(
                    "process {exec_id:?} not found"
                )))
            }
        })
    }
}

fn json_object(what: &str, bytes: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(AgentError::invalid(format!("{what} is not a JSON object"))),
        Err(e) => Err(AgentError::invalid(format!("{what}: {e}"))),
    }
}

#[async_trait]
impl Backend for FakeBackend {
    async fn create(&self, req: agent::CreateContainerRequest) -> Result<()> {
        validate_id("container id", &req.container_id)?;
        check_config(&req.stdio.clone().unwrap_or_default())?;
        json_object("the OCI spec", &req.oci_spec_json)?;
        let mut map = self.map();
        if map.len() >= MAX_CONTAINERS {
            return Err(AgentError::precondition("too many containers"));
        }
        if map.contains_key(&req.container_id) {
            return Err(AgentError::exists(format!(
                "container {:?} already exists",
                req.container_id
            )));
        }
        map.insert(req.container_id, Container::default());
        Ok(())
    }
    async fn start(&self, id: String) -> Result<()> {
        self.with(&id, |c| {
            if c.started {
                return Err(AgentError::precondition("already started"));
            }
            c.started = true;
            Ok(())
        })
    }
    async fn remove(&self, id: String, _timeout_secs: u32) -> Result<()> {
        self.with(&id, |_| Ok(()))?;
        self.map().remove(&id);
        Ok(())
    }
    async fn pause(&self, id: String, pause: bool) -> Result<()> {
        self.with(&id, |c| {
            if !c.started || c.paused == pause {
                return Err(AgentError::precondition("not in a state for that"));
            }
            c.paused = pause;
            Ok(())
        })
    }
    async fn update(&self, req: agent::UpdateContainerRequest) -> Result<()> {
        let resources = req.resources.into_option().unwrap_or_default();
        self.with(&req.container_id, |_| Ok(()))?;
        json_object("the resources", &resources.oci_resources_json).map(drop)
    }
    async fn stats(&self, id: &str) -> Result<agent::StatsContainerResponse> {
        self.with(id, |_| Ok(agent::StatsContainerResponse::default()))
    }
    fn list_processes(&self, id: &str) -> Result<agent::ListProcessesResponse> {
        self.with(id, |c| {
            Ok(agent::ListProcessesResponse {
                processes: c
                    .execs
                    .iter()
                    .enumerate()
                    .map(|(i, e)| agent::ProcessInfo {
                        pid: i32::try_from(i).unwrap_or(0) + 2,
                        cmd: e.clone(),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        })
    }
    async fn exec(&self, req: agent::ExecProcessRequest) -> Result<()> {
        validate_id("exec id", &req.exec_id)?;
        check_config(&req.stdio.clone().unwrap_or_default())?;
        json_object("the OCI process", &req.oci_process_json)?;
        self.with(&req.container_id, |c| {
            if !c.started {
                return Err(AgentError::precondition("not started"));
            }
            if !c.execs.insert(req.exec_id.clone()) {
                return Err(AgentError::exists("exec id taken"));
            }
            Ok(())
        })
    }
    fn signal(&self, req: &agent::SignalProcessRequest) -> Result<()> {
        if req.signal == 0 || req.signal > 64 {
            return Err(AgentError::invalid(format!("signal {}", req.signal)));
        }
        self.process(&req.container_id, &req.exec_id, || ())
    }
    async fn wait(&self, req: &agent::WaitProcessRequest) -> Result<agent::WaitProcessResponse> {
        self.process(&req.container_id, &req.exec_id, || {
            agent::WaitProcessResponse {
                status: 0,
                exited_at_unix_ns: 1,
                ..Default::default()
            }
        })
    }
    fn resize(&self, req: &agent::TtyWinResizeRequest) -> Result<()> {
        if req.rows > u32::from(u16::MAX) || req.cols > u32::from(u16::MAX) {
            return Err(AgentError::invalid("window size out of range"));
        }
        self.process(&req.container_id, &req.exec_id, || ())
    }
    async fn next_oom_event(&self) -> Option<String> {
        None
    }
    async fn online_cpu_mem(&self, cpus: u32, wait: Duration) -> Result<Onlined> {
        if wait > MAX_WAIT {
            return Err(AgentError::invalid("timeout out of range"));
        }
        Ok(Onlined {
            online_cpus: cpus,
            memory_blocks: 0,
        })
    }
}
