//! Containers of a sandbox: create from an OCI bundle, start, exec, signal, wait, pause,
//! stats, update, delete. Each change is persisted under the sandbox's exclusive lock.

use std::path::PathBuf;

use serde_json::Value;

use super::resize::Change;
use super::{Sandbox, LOCK_TIMEOUT};
use crate::agent::{
    ContainerStats, CreateContainer, ExitStatus, GuestProcess, ProcessRef, RpcCode, StdioSpec,
    Storage,
};
use crate::container::hooks::{self, Stage};
use crate::container::share;
use crate::container::spec::{Bundle, GUEST_SHARED_DIR};
use crate::error::SandboxError;
use crate::id::ContainerId;
use crate::state::{unix_now_ns, ContainerRecord, ProcessRecord, State, StdioRecord};

/// What a new container is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct NewContainer {
    /// Its id.
    pub id: ContainerId,
    /// The OCI bundle, read and checked once ([`Bundle::load`]).
    pub bundle: Bundle,
    /// Which stdio streams of the init process the caller attaches.
    pub stdio: StdioSpec,
    /// Where the caller's streams are (fifo paths, URIs), kept for other processes.
    pub stdio_paths: StdioRecord,
    /// Annotations (for containerd: from the spec).
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// What an exec'd process is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecRequest {
    /// Its exec id (same rules as container ids).
    pub exec_id: String,
    /// The OCI `process` object.
    pub process: Value,
    /// Which stdio streams the caller attaches.
    pub stdio: StdioSpec,
    /// Where the caller's streams are.
    pub stdio_paths: StdioRecord,
}

/// A container's state as `runvm state` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerStatus {
    /// The id.
    pub id: ContainerId,
    /// The lifecycle state.
    pub state: State,
    /// The OCI bundle.
    pub bundle: PathBuf,
    /// The init process's exit status, once it exited.
    pub exit_status: Option<i32>,
    /// Annotations.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// Creation time, ns since the Unix epoch.
    pub created_at: u64,
}

fn exec_id_ok(exec_id: &str) -> Result<(), SandboxError> {
    ContainerId::parse(exec_id).map(|_| ()).map_err(Into::into)
}

impl Sandbox {
    fn container_what(id: &ContainerId) -> String {
        format!("container {id}")
    }

    /// Reads container `id`'s record.
    pub fn container(&self, id: &ContainerId) -> Result<ContainerRecord, SandboxError> {
        Ok(self.store.load_container(&self.record.id, id)?)
    }

    /// Container `id`'s state.
    pub fn container_status(&self, id: &ContainerId) -> Result<ContainerStatus, SandboxError> {
        let c = self.container(id)?;
        Ok(ContainerStatus {
            state: c.state,
            bundle: c.bundle,
            exit_status: c.init.exit_status,
            annotations: c.annotations,
            created_at: c.created_at,
            id: c.id,
        })
    }

    /// The sandbox's containers, in creation order.
    pub fn containers(&mut self) -> Result<Vec<ContainerId>, SandboxError> {
        self.reload()?;
        Ok(self.record.containers.clone())
    }

    /// Runs `change` on container `id`'s freshest record under the exclusive lock, saves it.
    fn update_container<T>(
        &mut self,
        id: &ContainerId,
        change: impl FnOnce(&mut ContainerRecord) -> Result<T, SandboxError>,
    ) -> Result<T, SandboxError> {
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        let mut record = self.store.load_container(&self.record.id, id)?;
        let out = change(&mut record)?;
        self.store.save_container(&lock, &record)?;
        Ok(out)
    }

    fn container_transition(&mut self, id: &ContainerId, to: State) -> Result<(), SandboxError> {
        self.update_container(id, |c| {
            c.transition(to).map_err(|source| SandboxError::Transition {
                what: Sandbox::container_what(&c.id),
                source,
            })
        })
    }

    /// Creates a container from its bundle: the spec is checked, the rootfs and bind-mount
    /// sources are shared into the VM, the agent creates it (state `ready`, init waiting for
    /// start). On error nothing is stored, mounted or left in the guest.
    #[tracing::instrument(name = "sandbox.create_container", skip_all, fields(sandbox = %self.record.id, container = %new.id))]
    pub async fn create_container(
        &mut self,
        new: NewContainer,
    ) -> Result<ContainerStatus, SandboxError> {
        self.reload()?;
        if !matches!(self.record.state, State::Ready | State::Running) {
            return Err(self.wrong_state("create a container", " (it must be ready or running)"));
        }
        let Bundle {
            path: bundle_path,
            spec: host_spec,
            prepared,
            ..
        } = new.bundle;
        let agent = self.agent().await?;
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        match self.store.load_container(&self.record.id, &new.id) {
            Ok(_) => {
                return Err(SandboxError::Store(
                    crate::store::StoreError::ContainerExists {
                        sandbox: self.record.id.clone(),
                        id: new.id.clone(),
                        path: self.store.container_dir(&self.record.id, &new.id),
                    },
                ))
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(e.into()),
        }
        // The VM grows to the base plus every container's limits before the container exists;
        // a need past the maxima is refused here, with nothing changed.
        let workload = crate::sizing::spec_workload(&host_spec);
        let resized = match self.plan_size(Change::Set(&new.id, workload))? {
            Some(target) => {
                if let Err(e) = self.apply_size(&lock, target).await {
                    self.resize_best_effort(&lock).await;
                    return Err(e);
                }
                true
            }
            None => false,
        };
        let shared = self.shared_dir()?.to_path_buf();
        let mounts = match share::mount_binds(&shared, &prepared.binds) {
            Ok(m) => m,
            Err(e) => {
                if resized {
                    self.resize_best_effort(&lock).await;
                }
                return Err(e.into());
            }
        };
        let request = CreateContainer {
            container_id: new.id.to_string(),
            sandbox_id: self.record.id.to_string(),
            spec: prepared.guest_spec.clone(),
            storages: std::iter::once(Storage {
                source: super::SHARED_FS_TAG.into(),
                fstype: "virtiofs".into(),
                options: Vec::new(),
                mount_point: GUEST_SHARED_DIR.into(),
            })
            // The pod's /dev/shm and memory-backed emptyDirs: a tmpfs in the guest, made by
            // the first container naming it, kept by the agent while the VM lives.
            .chain(prepared.tmpfs.iter().map(|t| Storage {
                source: "tmpfs".into(),
                fstype: "tmpfs".into(),
                options: t.options.clone(),
                mount_point: t.mount_point.clone(),
            }))
            .collect(),
            stdio: StdioSpec {
                terminal: new.stdio.terminal || prepared.terminal,
                ..new.stdio
            },
        };
        if let Err(e) = agent.create_container(request).await {
            share::unmount_all(&mounts);
            if resized {
                self.resize_best_effort(&lock).await;
            }
            return Err(e.into());
        }
        // createRuntime and prestart: the VM, the network and the container exist, its process
        // has not started. A failure undoes the container.
        let (pid, netns) = self.hook_context(&host_spec);
        let state = hooks::state_json(
            Stage::CreateRuntime,
            new.id.as_str(),
            pid,
            &bundle_path,
            &new.annotations,
        );
        for stage in [Stage::CreateRuntime, Stage::Prestart] {
            if let Err(e) =
                hooks::run(stage, prepared.hooks.of(stage), &state, netns.as_deref()).await
            {
                let _ = agent.remove_container(new.id.as_str(), 0).await;
                share::unmount_all(&mounts);
                if resized {
                    self.resize_best_effort(&lock).await;
                }
                return Err(e.into());
            }
        }
        let mut record = ContainerRecord::new(
            new.id.clone(),
            self.record.id.clone(),
            bundle_path,
            prepared.binds[0].source.clone(),
            host_spec,
        );
        record.annotations = new.annotations;
        record.mounts = mounts.clone();
        record.init = ProcessRecord {
            stdio: new.stdio_paths,
            terminal: new.stdio.terminal || prepared.terminal,
            ..Default::default()
        };
        let stored = self.store.create_container(&lock, &record).and_then(|()| {
            let mut sandbox = self.store.load_sandbox(&self.record.id)?;
            sandbox.containers.push(new.id.clone());
            sandbox.mark(&format!("container-created:{}", new.id));
            self.store.save_sandbox(&lock, &sandbox)?;
            Ok(sandbox)
        });
        match stored {
            Ok(sandbox) => self.record = sandbox,
            Err(e) => {
                let _ = agent.remove_container(new.id.as_str(), 0).await;
                share::unmount_all(&mounts);
                let _ = self.store.remove_container(&lock, &new.id);
                if resized {
                    self.resize_best_effort(&lock).await;
                }
                return Err(e.into());
            }
        }
        drop(lock);
        self.container_status(&new.id)
    }

    /// Starts a created container (ready to running); a ready sandbox becomes running.
    #[tracing::instrument(name = "sandbox.start_container", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn start_container(&mut self, id: &ContainerId) -> Result<(), SandboxError> {
        let c = self.container(id)?;
        if c.state != State::Ready {
            return Err(SandboxError::Transition {
                what: Sandbox::container_what(id),
                source: crate::state::InvalidTransition {
                    from: c.state,
                    to: State::Running,
                },
            });
        }
        let agent = self.agent().await?;
        agent.start_container(id.as_str()).await?;
        self.container_transition(id, State::Running)?;
        self.run_warn_hooks(Stage::Poststart, &c).await;
        self.update(|r| {
            r.mark(&format!("process-started:{id}"));
            if r.state == State::Ready {
                r.state = State::Running;
                r.mark("running");
            }
            Ok(())
        })?;
        Ok(())
    }

    /// Records that container `id`'s init process wrote its first output at `at_ns` (ns since
    /// the Unix epoch), for the timeline; the first such report counts.
    pub fn note_first_output(&mut self, id: &ContainerId, at_ns: u64) -> Result<(), SandboxError> {
        let phase = format!("first-output:{id}");
        self.update(|r| {
            if !r.timeline.iter().any(|(p, _)| *p == phase) {
                r.timeline.push((phase, at_ns));
            }
            Ok(())
        })
    }

    /// Runs another process in a created or running container (runc allows both; a paused
    /// one's new process would freeze before the guest can report it started).
    #[tracing::instrument(name = "sandbox.exec", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn exec(&mut self, id: &ContainerId, req: ExecRequest) -> Result<(), SandboxError> {
        exec_id_ok(&req.exec_id)?;
        let c = self.container(id)?;
        if !matches!(c.state, State::Running | State::Ready) {
            return Err(SandboxError::WrongState {
                what: Sandbox::container_what(id),
                state: c.state,
                operation: "exec a process",
                hint: " (only a created or running container takes new processes)",
            });
        }
        if c.execs.contains_key(&req.exec_id) {
            return Err(SandboxError::ProcessExists {
                container: id.to_string(),
                exec_id: req.exec_id,
            });
        }
        let agent = self.agent().await?;
        let process = ProcessRef::exec(id.as_str(), req.exec_id.clone());
        agent
            .exec_process(&process, &req.process, req.stdio)
            .await?;
        self.update_container(id, |c| {
            c.execs.insert(
                req.exec_id.clone(),
                ProcessRecord {
                    exec_id: req.exec_id.clone(),
                    stdio: req.stdio_paths,
                    terminal: req.stdio.terminal,
                    ..Default::default()
                },
            );
            Ok(())
        })
    }

    fn process_ref(&self, id: &ContainerId, exec_id: &str) -> Result<ProcessRef, SandboxError> {
        let c = self.container(id)?;
        if !exec_id.is_empty() && !c.execs.contains_key(exec_id) {
            return Err(SandboxError::ProcessNotFound {
                container: id.to_string(),
                exec_id: exec_id.to_string(),
            });
        }
        Ok(ProcessRef::exec(id.as_str(), exec_id))
    }

    /// Sends `signal` to a process of the container (the init for an empty `exec_id`), or with
    /// `all` to every process of it.
    #[tracing::instrument(name = "sandbox.signal", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn signal(
        &mut self,
        id: &ContainerId,
        exec_id: &str,
        signal: i32,
        all: bool,
    ) -> Result<(), SandboxError> {
        let process = self.process_ref(id, exec_id)?;
        let c = self.container(id)?;
        if !matches!(c.state, State::Running | State::Paused | State::Ready) {
            return Err(SandboxError::WrongState {
                what: Sandbox::container_what(id),
                state: c.state,
                operation: "signal it",
                hint: " (its processes have exited)",
            });
        }
        self.agent()
            .await?
            .signal_process(&process, signal, all)
            .await?;
        Ok(())
    }

    /// Waits for a process to exit; the exit of the init process stops the container. An
    /// exit already recorded is returned at once.
    pub async fn wait(
        &mut self,
        id: &ContainerId,
        exec_id: &str,
    ) -> Result<ExitStatus, SandboxError> {
        let process = self.process_ref(id, exec_id)?;
        let c = self.container(id)?;
        let known = if exec_id.is_empty() {
            &c.init
        } else {
            &c.execs[exec_id]
        };
        if let (Some(code), Some(at)) = (known.exit_status, known.exited_at) {
            return Ok(ExitStatus {
                code,
                exited_at_unix_ns: at as i64,
            });
        }
        let status = self.agent().await?.wait_process(&process).await?;
        self.record_exit(id, exec_id, status)?;
        Ok(status)
    }

    /// Records a process's exit (as [`Sandbox::wait`] does) for a caller that waited on the
    /// agent itself, without holding the sandbox; the init's exit stops the container.
    pub fn record_exit(
        &mut self,
        id: &ContainerId,
        exec_id: &str,
        status: ExitStatus,
    ) -> Result<(), SandboxError> {
        record_exit_in(&self.store, &self.record.id, id, exec_id, status)
    }

    /// A handle on process `exec_id` ("" for the init) of container `id`, which records its
    /// exit in the container's record; `streams`: its stdio streams, if it relays them.
    pub async fn process(
        &mut self,
        id: &ContainerId,
        exec_id: &str,
        streams: Option<crate::process::Streams>,
    ) -> Result<crate::process::Process, SandboxError> {
        let process = self.process_ref(id, exec_id)?;
        let agent = self.agent().await?;
        let exits = crate::process::ExitRecorder {
            store: self.store.clone(),
            sandbox: self.record.id.clone(),
            container: id.clone(),
        };
        Ok(crate::process::Process::new(
            agent,
            process,
            Some(exits),
            streams,
        ))
    }

    /// Opens the stdio streams `stdio` asks for and puts their token in it: the process
    /// created or exec'd with that `stdio` is joined to them.
    pub async fn open_streams(
        &mut self,
        stdio: &mut StdioSpec,
    ) -> Result<crate::process::Streams, SandboxError> {
        let agent = self.agent().await?;
        Ok(crate::process::Streams::open(&*agent, stdio).await?)
    }

    /// Freezes a running container.
    #[tracing::instrument(name = "sandbox.pause_container", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn pause_container(&mut self, id: &ContainerId) -> Result<(), SandboxError> {
        self.container(id)?
            .state
            .transition(State::Paused)
            .map_err(|source| SandboxError::Transition {
                what: Sandbox::container_what(id),
                source,
            })?;
        self.agent().await?.pause_container(id.as_str()).await?;
        self.container_transition(id, State::Paused)
    }

    /// Thaws a paused container.
    #[tracing::instrument(name = "sandbox.resume_container", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn resume_container(&mut self, id: &ContainerId) -> Result<(), SandboxError> {
        let state = self.container(id)?.state;
        if state != State::Paused {
            return Err(SandboxError::WrongState {
                what: Sandbox::container_what(id),
                state,
                operation: "resume it",
                hint: " (only a paused container resumes)",
            });
        }
        self.agent().await?.resume_container(id.as_str()).await?;
        self.container_transition(id, State::Running)
    }

    /// Resource usage of a container.
    pub async fn stats(&mut self, id: &ContainerId) -> Result<ContainerStats, SandboxError> {
        self.container(id)?;
        Ok(self.agent().await?.stats_container(id.as_str()).await?)
    }

    /// Applies OCI `linux.resources` to a container (only what `resources` names changes), and
    /// resizes the VM to the sandbox's new needs: grown before the container's limits are
    /// raised, shrunk after they are lowered. A need past the VM's maxima is refused by name,
    /// with the VM and the container unchanged.
    #[tracing::instrument(name = "sandbox.update_container", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn update_resources(
        &mut self,
        id: &ContainerId,
        resources: &Value,
    ) -> Result<(), SandboxError> {
        self.reload()?;
        let agent = self.agent().await?;
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        let mut c = self.store.load_container(&self.record.id, id)?;
        let merged = crate::sizing::merge_resources(&c.spec["linux"]["resources"], resources);
        let workload = crate::sizing::resources_workload(&merged);
        let target = self.plan_size(Change::Set(id, workload))?;
        let current = self.vm_size();
        let grows =
            target.is_some_and(|t| t.vcpus > current.vcpus || t.memory_mib > current.memory_mib);
        if let (Some(t), true) = (target, grows) {
            self.apply_size(&lock, t).await?;
        }
        if let Err(e) = agent.update_container(id.as_str(), resources).await {
            if grows {
                self.resize_best_effort(&lock).await;
            }
            return Err(e.into());
        }
        if c.spec.is_object() {
            if !c.spec["linux"].is_object() {
                c.spec["linux"] = Value::Object(Default::default());
            }
            c.spec["linux"]["resources"] = merged;
            self.store.save_container(&lock, &c)?;
        }
        if let (Some(t), false) = (target, grows) {
            self.apply_size(&lock, t).await?;
        }
        Ok(())
    }

    /// The processes of a container.
    pub async fn processes(&mut self, id: &ContainerId) -> Result<Vec<GuestProcess>, SandboxError> {
        self.container(id)?;
        Ok(self.agent().await?.list_processes(id.as_str()).await?)
    }

    /// Removes a container: refused while it runs or is paused unless `force` (which kills its
    /// processes). Its guest state, mounts and record go.
    #[tracing::instrument(name = "sandbox.delete_container", skip_all, fields(sandbox = %self.record.id, container = %id))]
    pub async fn delete_container(
        &mut self,
        id: &ContainerId,
        force: bool,
    ) -> Result<(), SandboxError> {
        let c = self.container(id)?;
        if matches!(c.state, State::Running | State::Paused) && !force {
            return Err(SandboxError::WrongState {
                what: Sandbox::container_what(id),
                state: c.state,
                operation: "delete it",
                hint: " (stop it first, or force)",
            });
        }
        self.reload()?;
        if self.record.state != State::Stopped {
            let agent = self.agent().await?;
            match agent.remove_container(id.as_str(), 0).await {
                Ok(()) => {}
                Err(e) if e.rpc_code() == Some(RpcCode::NotFound) => {}
                Err(e) => return Err(e.into()),
            }
        }
        share::unmount_all(&c.mounts);
        let lock = self
            .store
            .lock_exclusive_timeout(&self.record.id, LOCK_TIMEOUT)?;
        self.store.remove_container(&lock, id)?;
        let mut sandbox = self.store.load_sandbox(&self.record.id)?;
        sandbox.containers.retain(|c| c != id);
        self.store.save_sandbox(&lock, &sandbox)?;
        self.record = sandbox;
        // The VM gives back what the container's limits took, where the devices allow.
        self.resize_best_effort(&lock).await;
        drop(lock);
        self.run_warn_hooks(Stage::Poststop, &c).await;
        Ok(())
    }

    /// What hooks are told of the container's host side: QEMU's pid (the VM is the container's
    /// process on the host) and the network namespace to run in (the pod's, or the spec's).
    fn hook_context(&self, spec: &Value) -> (u32, Option<PathBuf>) {
        let pid = self
            .record
            .vm
            .processes
            .iter()
            .find(|p| p.name == "qemu")
            .map(|p| p.pid)
            .unwrap_or(0);
        let netns = self
            .record
            .network
            .as_ref()
            .map(|n| n.netns.clone())
            .or_else(|| crate::container::spec::network_namespace(spec));
        (pid, netns)
    }

    /// Runs container `c`'s hooks of `stage` (poststart, poststop), failures being warnings.
    pub(super) async fn run_warn_hooks(&self, stage: Stage, c: &ContainerRecord) {
        let hooks = match hooks::host_hooks(&c.spec) {
            Ok(h) => h,
            Err((at, why)) => {
                tracing::warn!(container = %c.id, at, why, "unusable hooks");
                return;
            }
        };
        if hooks.of(stage).is_empty() {
            return;
        }
        let (pid, netns) = self.hook_context(&c.spec);
        let state = hooks::state_json(stage, c.id.as_str(), pid, &c.bundle, &c.annotations);
        hooks::run_warn(stage, hooks.of(stage), &state, netns.as_deref()).await;
    }

    /// Moves every container in state `from` to `to` (sandbox pause and resume).
    pub(super) fn set_running_containers(
        &mut self,
        from: State,
        to: State,
    ) -> Result<(), SandboxError> {
        for id in self.record.containers.clone() {
            self.update_container(&id, |c| {
                if c.state == from {
                    c.state = to;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Marks every container stopped; processes without an exit status get `lost`.
    pub(super) fn mark_all_stopped(&mut self, lost: Option<i32>) -> Result<(), SandboxError> {
        let now = unix_now_ns();
        for id in self.record.containers.clone() {
            self.update_container(&id, |c| {
                c.state = State::Stopped;
                if let Some(code) = lost {
                    for p in std::iter::once(&mut c.init).chain(c.execs.values_mut()) {
                        if p.exit_status.is_none() {
                            p.exit_status = Some(code);
                            p.exited_at = Some(now);
                        }
                    }
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Unmounts every container's shares (the VM is gone or going).
    pub(super) fn unshare_all(&mut self) -> Result<(), SandboxError> {
        for id in self.record.containers.clone() {
            let c = self.container(&id)?;
            share::unmount_all(&c.mounts);
        }
        Ok(())
    }
}

/// Records a process's exit in its container's record (under the sandbox's lock); the init's
/// exit stops the container.
pub(crate) fn record_exit_in(
    store: &crate::store::Store,
    sandbox: &crate::id::SandboxId,
    id: &ContainerId,
    exec_id: &str,
    status: ExitStatus,
) -> Result<(), SandboxError> {
    let lock = store.lock_exclusive_timeout(sandbox, LOCK_TIMEOUT)?;
    let mut c = store.load_container(sandbox, id)?;
    let p = if exec_id.is_empty() {
        &mut c.init
    } else {
        c.execs.entry(exec_id.to_string()).or_default()
    };
    p.exit_status = Some(status.code);
    p.exited_at = Some(u64::try_from(status.exited_at_unix_ns).unwrap_or_else(|_| unix_now_ns()));
    if exec_id.is_empty() && c.state != State::Stopped {
        c.state = State::Stopped;
    }
    store.save_container(&lock, &c)?;
    Ok(())
}
