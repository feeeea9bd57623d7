//! Container lifecycle: create, start, pause, resume, update, remove.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use libcgroups::common::{CgroupManager, ControllerOpt};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use oci_spec::runtime::{LinuxResources, Spec};
use runvm_protocol::agent;

use super::helper::{self, Request};
use super::process::{new_stdio, receive_tty, Process};
use super::{
    blocking, detached, spec, stdio, Container, Containers, Status, BUNDLES, CGROUP_ROOT,
    STATE_ROOT,
};
use crate::error::{validate_id, AgentError, Result};

/// How long processes may take to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(10);

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> AgentError {
    move |e| AgentError::internal(format!("{what}: {e}"))
}

impl Containers {
    /// CreateContainer: mounts the storages, creates the container with its init waiting for
    /// StartContainer.
    pub async fn create(self: &Arc<Self>, req: agent::CreateContainerRequest) -> Result<()> {
        let me = Arc::clone(self);
        detached("CreateContainer", async move { me.create_inner(req).await }).await
    }

    async fn create_inner(self: Arc<Self>, req: agent::CreateContainerRequest) -> Result<()> {
        let id = req.container_id.clone();
        validate_id("container id", &id)?;
        let cfg = req.stdio.clone().unwrap_or_default();
        super::streams::check_config(&cfg)?;
        let spec = spec::parse_spec(&req.oci_spec_json, &id, cfg.terminal)?;
        let spec = self.join_pod_namespaces(spec, &id)?;
        let agent = std::env::current_exe()
            .map_err(|e| AgentError::internal(format!("the agent's own path: {e}")))?;
        let spec = super::hook_root::create_hooks_from_rootfs(spec, &agent);
        let reservation = self.reserve(&id)?;
        let me = Arc::clone(&self);
        let (sid, storages) = (id.clone(), req.storages.clone());
        let held = blocking("mounting storages", move || {
            me.storages.acquire(&sid, &storages)
        })
        .await?;
        let bundle = Path::new(BUNDLES).join(&id);
        match self
            .create_with(&id, spec, &cfg, &bundle, held.clone())
            .await
        {
            Ok(container) => {
                tracing::info!(container = %id, pid = container.init.pid, "container created");
                reservation.fill(Arc::new(container));
                Ok(())
            }
            Err(e) => {
                tracing::warn!(container = %id, error = %e, "create failed");
                self.storages.release(&id, &held);
                let _ = std::fs::remove_dir_all(&bundle);
                Err(e)
            }
        }
    }

    /// A container joins the namespaces its spec's [`spec::POD_NAMESPACES`] annotation names,
    /// those of another container's init in this VM (`CONTAINER:ipc,uts,pid`): a pod's
    /// sandbox container, or the container a command-line container named by its pid.
    fn join_pod_namespaces(&self, mut spec: Spec, id: &str) -> Result<Spec> {
        let Some(value) = spec
            .annotations()
            .as_ref()
            .and_then(|a| a.get(spec::POD_NAMESPACES))
            .cloned()
        else {
            return Ok(spec);
        };
        let (sandbox, types) = value.split_once(':').ok_or_else(|| {
            AgentError::invalid(format!(
                "annotation {}={value:?} of container {id:?}: expected SANDBOX:TYPE,TYPE",
                spec::POD_NAMESPACES
            ))
        })?;
        let init = self
            .get(sandbox)
            .map_err(|e| {
                AgentError::not_found(format!(
                    "container {id:?} joins the namespaces of its pod sandbox container: {e}"
                ))
            })?
            .init
            .pid;
        let namespaces = spec
            .linux_mut()
            .as_mut()
            .and_then(|l| l.namespaces_mut().as_mut());
        let Some(namespaces) = namespaces else {
            return Ok(spec);
        };
        for name in types.split(',').filter(|t| !t.is_empty()) {
            let (typ, proc_name) = spec::joinable_namespace(name).ok_or_else(|| {
                AgentError::invalid(format!(
                    "annotation {}={value:?} of container {id:?}: namespace {name:?} cannot \
                     be shared; valid: ipc, uts, pid, network, cgroup",
                    spec::POD_NAMESPACES
                ))
            })?;
            for ns in namespaces.iter_mut().filter(|ns| ns.typ() == typ) {
                ns.set_path(Some(PathBuf::from(format!("/proc/{init}/ns/{proc_name}"))));
            }
        }
        tracing::debug!(
            container = id,
            sandbox,
            types,
            "joining the pod's namespaces"
        );
        Ok(spec)
    }

    async fn create_with(
        &self,
        id: &str,
        spec: Spec,
        cfg: &agent::StdioConfig,
        bundle: &Path,
        held: Vec<PathBuf>,
    ) -> Result<Container> {
        let (checked, sid) = (spec.clone(), id.to_string());
        blocking("checking the rootfs", move || {
            spec::check_rootfs(&checked, &sid)
        })
        .await?;
        let size = spec
            .process()
            .as_ref()
            .and_then(|p| p.console_size())
            .map(|b| (b.height() as u16, b.width() as u16));
        // Leftovers of an earlier container with this id (the agent restarted or a removal
        // failed) would make libcontainer refuse: clear them.
        if Path::new(STATE_ROOT).join(id).exists() {
            tracing::warn!(container = id, "removing stale libcontainer state");
            self.delete_state(id).await;
        }
        std::fs::create_dir_all(bundle).map_err(io_error(format!(
            "cannot create the bundle {}",
            bundle.display()
        )))?;
        let json = serde_json::to_vec(&spec)
            .map_err(|e| AgentError::internal(format!("cannot encode the spec: {e}")))?;
        let config = bundle.join("config.json");
        std::fs::write(&config, json)
            .map_err(io_error(format!("cannot write {}", config.display())))?;

        let claimed = self.claim_streams(cfg).await?;
        let (child_stdio, io, console) = new_stdio(cfg)?;
        let request = Request::Create {
            id: id.to_string(),
            root: PathBuf::from(STATE_ROOT),
            bundle: bundle.to_path_buf(),
            console_socket: console.as_ref().map(|s| s.path().to_path_buf()),
        };
        let since = Instant::now();
        let created = helper::run(&self.reaper, &request, child_stdio)
            .await
            .map_err(|e| e.context(format!("cannot create container {id:?}")))
            .and_then(|pid| {
                pid.ok_or_else(|| AgentError::internal("the helper reported no pid for the init"))
            });
        let pid = match created {
            Ok(pid) => pid,
            Err(e) => {
                // libcontainer may have left its state folder and cgroup behind.
                if Path::new(STATE_ROOT).join(id).exists() {
                    self.delete_state(id).await;
                }
                return Err(e);
            }
        };
        let exit = self.reaper.watch(pid, since);
        if let Some(r) = spec.linux().as_ref().and_then(|l| l.resources().as_ref()) {
            let path = spec::cgroup_path(id);
            let relative = path.strip_prefix("/").unwrap_or(Path::new(id));
            fix_io_weight(&Path::new(CGROUP_ROOT).join(relative), r);
        }
        if spec::new_network_namespace(&spec) {
            let netns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Err(e) = crate::network::loopback_up_in(netns).await {
                self.delete_state(id).await;
                return Err(e.context(format!("container {id:?}")));
            }
        }
        let io = match (io, console) {
            (Some(io), _) => io,
            (None, Some(socket)) => match receive_tty(socket, cfg.stdin, size).await {
                Ok(io) => io,
                Err(e) => {
                    self.delete_state(id).await;
                    return Err(e.context(format!("container {id:?}")));
                }
            },
            (None, None) => return Err(AgentError::internal("no stdio for the init")),
        };
        let init = Process::new(String::new(), pid, exit, io);
        let container = Container::new(id.to_string(), bundle.to_path_buf(), init, held);
        if let Some(claimed) = claimed {
            super::streams::attach(&container.init, claimed);
        }
        Ok(container)
    }

    /// Deletes libcontainer's state of `id` (killing what runs), or at least its folder and
    /// cgroup. Errors are logged: this is cleanup.
    async fn delete_state(&self, id: &str) {
        let request = Request::Delete {
            id: id.to_string(),
            root: PathBuf::from(STATE_ROOT),
        };
        let result = match stdio::null_stdio() {
            Ok(null) => helper::run(&self.reaper, &request, null).await.map(|_| ()),
            Err(e) => Err(AgentError::internal(e.to_string())),
        };
        if let Err(e) = result {
            tracing::warn!(container = id, error = %e, "libcontainer delete failed; cleaning up by hand");
            let cgroup = Path::new(CGROUP_ROOT).join(
                spec::cgroup_path(id)
                    .strip_prefix("/")
                    .unwrap_or(Path::new(id)),
            );
            let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
            let _ = std::fs::remove_dir(&cgroup);
            let _ = std::fs::remove_dir_all(Path::new(STATE_ROOT).join(id));
        }
    }

    /// StartContainer.
    pub async fn start(self: &Arc<Self>, id: String) -> Result<()> {
        let me = Arc::clone(self);
        detached("StartContainer", async move {
            let c = me.get(&id)?;
            let _op = c.lock_op().await?;
            match c.status() {
                Status::Created => {}
                Status::Stopped => {
                    return Err(AgentError::precondition(format!(
                        "cannot start container {id:?}: its init has exited"
                    )))
                }
                s => {
                    return Err(AgentError::precondition(format!(
                        "cannot start container {id:?}: it is already {s}"
                    )))
                }
            }
            let request = Request::Start {
                id: id.clone(),
                root: PathBuf::from(STATE_ROOT),
            };
            let null = stdio::null_stdio()
                .map_err(|e| AgentError::internal(format!("cannot open /dev/null: {e}")))?;
            helper::run(&me.reaper, &request, null)
                .await
                .map_err(|e| e.context(format!("cannot start container {id:?}")))?;
            c.set_status(Status::Running);
            tracing::info!(container = %id, "container started");
            Ok(())
        })
        .await
    }

    /// PauseContainer (`pause`) and ResumeContainer: freeze or thaw the container's cgroup.
    pub async fn pause(self: &Arc<Self>, id: String, pause: bool) -> Result<()> {
        let me = Arc::clone(self);
        detached("PauseContainer", async move {
            let c = me.get(&id)?;
            let _op = c.lock_op().await?;
            let (wanted, next) = if pause {
                (Status::Running, Status::Paused)
            } else {
                (Status::Paused, Status::Running)
            };
            let status = c.status();
            if status != wanted {
                return Err(AgentError::precondition(format!(
                    "cannot {} container {id:?}: it is {status}",
                    if pause { "pause" } else { "resume" }
                )));
            }
            let dir = Path::new(STATE_ROOT).join(&id);
            let sid = id.clone();
            blocking("freezer", move || {
                let mut lc = libcontainer::container::Container::load(dir)
                    .map_err(|e| AgentError::internal(format!("container {sid:?}: {e}")))?;
                let r = if pause { lc.pause() } else { lc.resume() };
                r.map_err(|e| AgentError::internal(format!("container {sid:?}: {e}")))
            })
            .await?;
            c.set_status(next);
            tracing::info!(container = %id, status = %next, "freezer");
            Ok(())
        })
        .await
    }

    /// UpdateContainer: applies OCI `linux.resources` to the container's cgroup.
    pub async fn update(self: &Arc<Self>, req: agent::UpdateContainerRequest) -> Result<()> {
        let me = Arc::clone(self);
        detached("UpdateContainer", async move {
            let id = req.container_id.clone();
            let c = me.get(&id)?;
            let json = req
                .resources
                .as_ref()
                .map(|r| r.oci_resources_json.clone())
                .unwrap_or_default();
            let resources: LinuxResources = serde_json::from_slice(&json).map_err(|e| {
                AgentError::invalid(format!(
                    "oci_resources_json for container {id:?} is not valid OCI linux.resources: {e}"
                ))
            })?;
            let _op = c.lock_op().await?;
            let sid = id.clone();
            let dir = c.cgroup_dir.clone();
            blocking("UpdateContainer", move || {
                let resources = with_current_memory_limit(resources, &dir, &sid)?;
                let manager = libcgroups::v2::manager::Manager::new(
                    PathBuf::from(CGROUP_ROOT),
                    spec::cgroup_path(&sid),
                )
                .map_err(|e| AgentError::internal(format!("cgroup of {sid:?}: {e}")))?;
                manager
                    .apply(&ControllerOpt {
                        resources: &resources,
                        disable_oom_killer: false,
                        oom_score_adj: None,
                        freezer_state: None,
                    })
                    .map_err(|e| {
                        AgentError::invalid(format!(
                            "cannot apply the resources to container {sid:?}: {}",
                            error_chain(&e)
                        ))
                    })?;
                fix_io_weight(&dir, &resources);
                Ok(())
            })
            .await?;
            tracing::info!(container = %id, "resources updated");
            Ok(())
        })
        .await
    }

    /// RemoveContainer: SIGTERM (if `timeout_secs` > 0, waiting that long), SIGKILL, then
    /// deletes the container's state, cgroup, bundle and storage holds.
    pub async fn remove(self: &Arc<Self>, id: String, timeout_secs: u32) -> Result<()> {
        let me = Arc::clone(self);
        detached("RemoveContainer", async move {
            let c = me.get(&id)?;
            let _op = c.lock_op().await?;
            me.stop_processes(&c, Duration::from_secs(u64::from(timeout_secs)))
                .await;
            me.oom.check(&c);
            me.delete_state(&id).await;
            me.storages.release(&id, &c.storages);
            let _ = std::fs::remove_dir_all(&c.bundle);
            c.removed.store(true, Ordering::Release);
            me.map().remove(&id);
            tracing::info!(container = %id, "container removed");
            Ok(())
        })
        .await
    }

    /// Ends every process of the container: SIGTERM and a grace period, then SIGKILL.
    async fn stop_processes(&self, c: &Container, grace: Duration) {
        if c.status() == Status::Paused {
            // A frozen process cannot handle SIGTERM; SIGKILL works either way.
            let _ = std::fs::write(c.cgroup_dir.join("cgroup.freeze"), "0");
        }
        if !grace.is_zero() && c.init.exited().is_none() {
            for pid in c.pids() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
            let _ = tokio::time::timeout(grace, c.init.wait()).await;
        }
        let deadline = Instant::now() + KILL_WAIT;
        loop {
            let pids = c.pids();
            if pids.is_empty() && c.init.exited().is_some() {
                break;
            }
            if std::fs::write(c.cgroup_dir.join("cgroup.kill"), "1").is_err() {
                for pid in &pids {
                    let _ = kill(Pid::from_raw(*pid), Signal::SIGKILL);
                }
            }
            if c.init.exited().is_none() {
                // The init may be outside the cgroup if creating failed half way.
                let _ = kill(Pid::from_raw(c.init.pid), Signal::SIGKILL);
            }
            if Instant::now() > deadline {
                tracing::warn!(container = %c.id, ?pids, "processes still there after SIGKILL");
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), c.init.wait()).await;
        }
    }
}

/// An error with its sources.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// runc's `blockIO.weight` (10 to 1000) as `io.weight` (1 to 10000) when the guest has no BFQ:
/// `1 + (w - 10) * 9999 / 990`. libcgroups 0.7 computes it in 16 bits, which overflows (500
/// became 51), so the right value is written over it. Errors are logged: libcgroups already
/// wrote the file once.
fn fix_io_weight(dir: &Path, resources: &LinuxResources) {
    let Some(weight) = resources.block_io().as_ref().and_then(|b| b.weight()) else {
        return;
    };
    if weight == 0 || dir.join("io.bfq.weight").exists() {
        return;
    }
    let value = io_weight(weight);
    if let Err(e) = std::fs::write(dir.join("io.weight"), value.to_string()) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot set io.weight");
    }
}

/// runc's `ConvertBlkIOToIOWeightValue`.
fn io_weight(blkio_weight: u16) -> u32 {
    1 + u32::from(blkio_weight.saturating_sub(10)) * 9999 / 990
}

#[cfg(test)]
mod io_weight_tests {
    use super::*;

    #[test]
    fn blkio_weights_scale_to_io_weights_as_runcs() {
        assert_eq!(io_weight(10), 1);
        assert_eq!(io_weight(500), 4950);
        assert_eq!(io_weight(1000), 10000);
    }
}

/// `resources` with the memory limit the cgroup at `dir` has now when they set the swap limit
/// alone (runc's `update --memory-swap` merges with the container's current limit; cgroup v2's
/// `memory.swap.max` is the swap beyond the memory limit, so the limit is needed to set it).
fn with_current_memory_limit(
    mut resources: LinuxResources,
    dir: &Path,
    id: &str,
) -> Result<LinuxResources> {
    let Some(memory) = *resources.memory() else {
        return Ok(resources);
    };
    if memory.swap().is_none() || memory.limit().is_some() {
        return Ok(resources);
    }
    let path = dir.join("memory.max");
    let current = std::fs::read_to_string(&path)
        .map_err(|e| AgentError::internal(format!("reading {}: {e}", path.display())))?;
    let limit = match current.trim() {
        "max" if memory.swap() == Some(-1) => -1,
        "max" => {
            return Err(AgentError::invalid(format!(
                "cannot set the swap limit of container {id:?} to {} bytes: it has no memory \
                 limit (memory.max is max); give the memory limit too",
                memory.swap().unwrap_or_default()
            )))
        }
        text => text
            .parse::<i64>()
            .map_err(|e| AgentError::internal(format!("{} holds {text:?}: {e}", path.display())))?,
    };
    let mut merged = memory;
    merged.set_limit(Some(limit));
    resources.set_memory(Some(merged));
    Ok(resources)
}

#[cfg(test)]
mod swap_tests {
    use super::*;

    fn resources(json: &str) -> LinuxResources {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn a_swap_limit_alone_takes_the_current_memory_limit() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "268435456\n").unwrap();
        let r = resources(r#"{"memory": {"swap": 536870912}}"#);
        let merged = with_current_memory_limit(r, dir.path(), "c1").unwrap();
        let memory = merged.memory().unwrap();
        assert_eq!(memory.limit(), Some(268435456));
        assert_eq!(memory.swap(), Some(536870912));
        // Given both, nothing is read.
        let r = resources(r#"{"memory": {"limit": 1, "swap": 2}}"#);
        let kept = with_current_memory_limit(r, Path::new("/nonexistent"), "c1").unwrap();
        assert_eq!(kept.memory().unwrap().limit(), Some(1));
    }

    #[test]
    fn a_swap_limit_without_any_memory_limit_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("memory.max"), "max\n").unwrap();
        let r = resources(r#"{"memory": {"swap": 536870912}}"#);
        let e = with_current_memory_limit(r, dir.path(), "c1").unwrap_err();
        assert!(e.to_string().contains("536870912 bytes"), "{e}");
        assert!(e.to_string().contains("no memory limit"), "{e}");
        // Unlimited swap with unlimited memory is fine.
        let r = resources(r#"{"memory": {"swap": -1}}"#);
        let merged = with_current_memory_limit(r, dir.path(), "c1").unwrap();
        assert_eq!(merged.memory().unwrap().limit(), Some(-1));
    }
}
