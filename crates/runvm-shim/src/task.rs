//! The containerd task API (v2) over the sandbox library.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::{
    CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
    CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
    PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
    StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
    UpdateTaskRequest, WaitRequest, WaitResponse,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc;
use containerd_shim::protos::types::task::{ProcessInfo, Status};
use containerd_shim::{Task, TtrpcContext};
use runvm_sandbox::sandbox::ExecRequest;
use runvm_sandbox::state::StdioRecord;
use runvm_sandbox::ContainerId;
use tracing::Instrument;

use crate::error::{Result, ShimError};
use crate::events::timestamp;
use crate::process::{Proc, Stdio};
use crate::service::Inner;

/// The task service containerd talks to.
#[derive(Debug, Clone)]
pub struct TaskService {
    pub(crate) inner: Arc<Inner>,
}

/// Parses a container id from a request.
pub(crate) fn container_id(id: &str) -> Result<ContainerId> {
    ContainerId::parse(id).map_err(|e| ShimError::InvalidArgument(format!("task id: {e}")))
}

fn json_of(
    any: &MessageField<containerd_shim::protos::protobuf::well_known_types::any::Any>,
    what: &str,
) -> Result<serde_json::Value> {
    let any = any
        .as_ref()
        .ok_or_else(|| ShimError::InvalidArgument(format!("the request has no {what}")))?;
    serde_json::from_slice(&any.value).map_err(|e| {
        ShimError::InvalidArgument(format!("{what} ({}) is not JSON: {e}", any.type_url))
    })
}

fn stdio_record(s: &Stdio) -> StdioRecord {
    let some = |v: &str| (!v.is_empty()).then(|| v.to_string());
    StdioRecord {
        stdin: some(&s.stdin),
        stdout: some(&s.stdout),
        stderr: some(&s.stderr),
    }
}

impl TaskService {
    async fn do_start(&self, req: &StartRequest) -> Result<u32> {
        let inner = &self.inner;
        let cid = container_id(&req.id)?;
        let pid = inner.pid();
        if req.exec_id.is_empty() {
            inner.with_proc(&req.id, "", |p| {
                if p.started {
                    return Err(ShimError::FailedPrecondition(format!(
                        "container {} was started already",
                        req.id
                    )));
                }
                Ok(())
            })?;
            let process = {
                let mut sb = inner.sandbox().await?;
                sb.start_container(&cid)
                    .await
                    .map_err(ShimError::sandbox(format!("starting container {}", req.id)))?;
                sb.process(&cid, "", None)
                    .await
                    .map_err(ShimError::sandbox("connecting to the agent"))?
            };
            inner.with_proc(&req.id, "", |p| {
                p.started = true;
                Ok(())
            })?;
            inner.spawn_waiter(process, req.id.clone(), String::new());
            inner.events.start(&req.id, pid);
            return Ok(pid);
        }
        let (spec, stdio) = inner.with_proc(&req.id, &req.exec_id, |p| {
            if p.started {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} of container {} was started already",
                    req.exec_id, req.id
                )));
            }
            Ok((p.spec.clone().unwrap_or_default(), p.stdio.clone()))
        })?;
        let (process, streams) = {
            let mut sb = inner.sandbox().await?;
            let mut stdio_spec = runvm_sandbox::agent::StdioSpec {
                stdin: !stdio.stdin.is_empty(),
                stdout: !stdio.stdout.is_empty(),
                stderr: !stdio.stderr.is_empty() && !stdio.terminal,
                terminal: stdio.terminal,
                stream_token: None,
            };
            let context = format!("starting exec {} in container {}", req.exec_id, req.id);
            let streams = sb
                .open_streams(&mut stdio_spec)
                .await
                .map_err(ShimError::sandbox(context.clone()))?;
            let exec = ExecRequest {
                exec_id: req.exec_id.clone(),
                process: spec,
                stdio: stdio_spec,
                stdio_paths: stdio_record(&stdio),
            };
            sb.exec(&cid, exec)
                .await
                .map_err(ShimError::sandbox(context))?;
            let process = sb
                .process(&cid, &req.exec_id, None)
                .await
                .map_err(ShimError::sandbox("connecting to the agent"))?;
            (process, streams)
        };
        inner.with_proc(&req.id, &req.exec_id, |p| {
            p.started = true;
            p.start_io(&req.id, streams);
            Ok(())
        })?;
        inner.spawn_waiter(process, req.id.clone(), req.exec_id.clone());
        inner.events.exec_started(&req.id, &req.exec_id, pid);
        Ok(pid)
    }

    fn do_state(&self, req: &StateRequest) -> Result<StateResponse> {
        let ctrs = self.inner.ctrs();
        let ctr = ctrs
            .get(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {:?} not found", req.id)))?;
        let p = ctr.procs.get(&req.exec_id).ok_or_else(|| {
            ShimError::NotFound(format!(
                "process {:?} of container {:?} not found",
                req.exec_id, req.id
            ))
        })?;
        let exit = p.exited();
        let status = match (exit, p.started, p.paused) {
            (Some(_), _, _) => Status::STOPPED,
            (None, false, _) => Status::CREATED,
            (None, true, true) => Status::PAUSED,
            (None, true, false) => Status::RUNNING,
        };
        Ok(StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: ctr.bundle.display().to_string(),
            pid: self.inner.pid(),
            status: status.into(),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or(0),
            exited_at: exit
                .map(|e| MessageField::some(timestamp(e.at_ns)))
                .unwrap_or_default(),
            ..Default::default()
        })
    }

    async fn do_delete(&self, req: &DeleteRequest) -> Result<DeleteResponse> {
        let inner = &self.inner;
        let pid = inner.pid();
        if !req.exec_id.is_empty() {
            let mut ctrs = inner.ctrs();
            let ctr = ctrs
                .get_mut(&req.id)
                .ok_or_else(|| ShimError::NotFound(format!("container {:?} not found", req.id)))?;
            let p = ctr.procs.get(&req.exec_id).ok_or_else(|| {
                ShimError::NotFound(format!(
                    "exec {:?} of container {:?} not found",
                    req.exec_id, req.id
                ))
            })?;
            if p.started && p.exited().is_none() {
                return Err(ShimError::FailedPrecondition(format!(
                    "exec {} of container {} is still running; kill it first",
                    req.exec_id, req.id
                )));
            }
            let mut p = ctr
                .procs
                .remove(&req.exec_id)
                .unwrap_or_else(|| Proc::new(Stdio::default(), None));
            p.abort_io();
            let exit = p.exited();
            return Ok(DeleteResponse {
                pid,
                exit_status: exit.map(|e| e.status).unwrap_or(0),
                exited_at: MessageField::some(timestamp(exit.map(|e| e.at_ns).unwrap_or(0))),
                ..Default::default()
            });
        }
        let cid = container_id(&req.id)?;
        let exit = inner.with_proc(&req.id, "", |p| {
            if p.started && p.exited().is_none() {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is still running; kill it first",
                    req.id
                )));
            }
            Ok(p.exited())
        })?;
        {
            let mut guard = inner.sandbox.lock().await;
            if let Some(sb) = guard.take_if(|sb| sb.id().as_str() == req.id) {
                // The pod's sandbox container (or a standalone one): its exit is recorded and
                // the VM goes with it. The answer does not wait for the power-off: once the
                // workload is gone, the VM, its helpers, mounts and records go behind it (the
                // teardown mark makes `shim delete` leave them to this shim; a crash in
                // between leaves the records for `delete --force` to purge).
                inner.stop_background();
                inner.tear_down(sb).await?;
            } else if let Some(sb) = guard.as_mut() {
                match sb.delete_container(&cid, true).await {
                    Ok(()) => {}
                    Err(e) if e.is_not_found() => {}
                    Err(e) => {
                        return Err(ShimError::Sandbox {
                            context: format!("deleting container {}", req.id),
                            source: Box::new(e),
                        })
                    }
                }
            }
        }
        let ctr = inner.ctrs().remove(&req.id);
        if let Some(mut ctr) = ctr {
            for p in ctr.procs.values_mut() {
                p.abort_io();
            }
            if ctr.rootfs_mounted {
                crate::service::unmount_rootfs(&ctr.bundle);
            }
        }
        let status = exit.map(|e| e.status).unwrap_or(0);
        let at = exit
            .map(|e| e.at_ns)
            .unwrap_or_else(runvm_sandbox::state::unix_now_ns);
        inner.events.delete(&req.id, pid, status, at);
        Ok(DeleteResponse {
            pid,
            exit_status: status,
            exited_at: MessageField::some(timestamp(at)),
            ..Default::default()
        })
    }

    fn do_exec(&self, req: &ExecProcessRequest) -> Result<()> {
        container_id(&req.exec_id)
            .map_err(|e| ShimError::InvalidArgument(format!("exec id {:?}: {e}", req.exec_id)))?;
        let spec = json_of(&req.spec, "process spec")?;
        let mut ctrs = self.inner.ctrs();
        let ctr = ctrs
            .get_mut(&req.id)
            .ok_or_else(|| ShimError::NotFound(format!("container {:?} not found", req.id)))?;
        if ctr.procs.contains_key(&req.exec_id) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {:?} of container {:?} exists already",
                req.exec_id, req.id
            )));
        }
        match ctr.procs.get("") {
            Some(init) if init.started && init.exited().is_none() => {}
            _ => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} is not running; exec needs a running container",
                    req.id
                )))
            }
        }
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        ctr.procs
            .insert(req.exec_id.clone(), Proc::new(stdio, Some(spec)));
        drop(ctrs);
        self.inner.events.exec_added(&req.id, &req.exec_id);
        Ok(())
    }

    async fn do_kill(&self, req: &KillRequest) -> Result<()> {
        let cid = container_id(&req.id)?;
        let exited = self.inner.with_proc(&req.id, &req.exec_id, |p| {
            Ok(p.exited().is_some() || !p.started && !req.exec_id.is_empty())
        })?;
        if exited && !req.all {
            return Err(ShimError::NotFound(format!(
                "process {:?} of container {}: process already finished",
                req.exec_id, req.id
            )));
        }
        let signal = i32::try_from(req.signal).map_err(|_| {
            ShimError::InvalidArgument(format!("signal {} is out of range", req.signal))
        })?;
        let mut sb = self.inner.sandbox().await?;
        match sb.signal(&cid, &req.exec_id, signal, req.all).await {
            Ok(()) => Ok(()),
            // Its exit is recorded but not yet seen here: as runc's shim, "already finished"
            // (containerd's stop paths ignore NotFound).
            Err(runvm_sandbox::SandboxError::WrongState {
                state: runvm_sandbox::state::State::Stopped,
                ..
            }) => Err(ShimError::NotFound(format!(
                "process {:?} of container {}: process already finished",
                req.exec_id, req.id
            ))),
            Err(e) => Err(ShimError::sandbox(format!(
                "sending signal {} to container {}",
                req.signal, req.id
            ))(e)),
        }
    }

    async fn set_paused(&self, id: &str, pause: bool) -> Result<()> {
        let cid = container_id(id)?;
        {
            let mut sb = self.inner.sandbox().await?;
            if pause {
                sb.pause_container(&cid).await
            } else {
                sb.resume_container(&cid).await
            }
            .map_err(ShimError::sandbox(format!(
                "{} container {id}",
                if pause { "pausing" } else { "resuming" }
            )))?;
        }
        self.inner.with_proc(id, "", |p| {
            p.paused = pause;
            Ok(())
        })?;
        if pause {
            self.inner.events.paused(id);
        } else {
            self.inner.events.resumed(id);
        }
        Ok(())
    }

    async fn do_pids(&self, req: &PidsRequest) -> Result<PidsResponse> {
        let cid = container_id(&req.id)?;
        let mut sb = self.inner.sandbox().await?;
        let procs = sb
            .processes(&cid)
            .await
            .map_err(ShimError::sandbox(format!(
                "listing the processes of {}",
                req.id
            )))?;
        Ok(PidsResponse {
            processes: procs
                .into_iter()
                .map(|p| ProcessInfo {
                    pid: u32::try_from(p.pid).unwrap_or(0),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn do_resize(&self, req: &ResizePtyRequest) -> Result<()> {
        let terminal = self
            .inner
            .with_proc(&req.id, &req.exec_id, |p| Ok(p.stdio.terminal))?;
        if !terminal {
            return Err(ShimError::FailedPrecondition(format!(
                "process {:?} of container {} has no terminal",
                req.exec_id, req.id
            )));
        }
        let cid = container_id(&req.id)?;
        let process = self
            .inner
            .sandbox()
            .await?
            .process(&cid, &req.exec_id, None)
            .await
            .map_err(ShimError::sandbox("connecting to the agent"))?;
        process
            .resize(req.height, req.width)
            .await
            .map_err(|e| ShimError::Sandbox {
                context: format!("resizing the terminal of {}", req.id),
                source: Box::new(e.into()),
            })
    }

    async fn do_close_io(&self, req: &CloseIORequest) -> Result<()> {
        if !req.stdin {
            return Ok(());
        }
        let task = self.inner.with_proc(&req.id, &req.exec_id, |p| {
            p.close_stdin();
            Ok(p.stdin_task.take())
        })?;
        if let Some(mut task) = task {
            // The relay sends what it read, then the end of stdin; give it a moment.
            let wait = std::time::Duration::from_secs(1);
            if tokio::time::timeout(wait, &mut task).await.is_err() {
                tracing::debug!(container = %req.id, "the stdin relay did not end in time");
                task.abort();
            }
        }
        Ok(())
    }

    async fn do_update(&self, req: &UpdateTaskRequest) -> Result<()> {
        let cid = container_id(&req.id)?;
        let resources = json_of(&req.resources, "resources")?;
        let mut sb = self.inner.sandbox().await?;
        sb.update_resources(&cid, &resources)
            .await
            .map_err(ShimError::sandbox(format!(
                "updating the resources of {}",
                req.id
            )))
    }

    async fn do_stats(&self, req: &StatsRequest) -> Result<StatsResponse> {
        let cid = container_id(&req.id)?;
        let stats = {
            let mut sb = self.inner.sandbox().await?;
            sb.stats(&cid).await.map_err(ShimError::sandbox(format!(
                "reading the statistics of {}",
                req.id
            )))?
        };
        let any = containerd_shim::util::convert_to_any(Box::new(crate::pod::metrics(&stats)))
            .map_err(|e| ShimError::InvalidArgument(format!("encoding the metrics: {e}")))?;
        Ok(StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }

    async fn do_wait(&self, req: &WaitRequest) -> Result<WaitResponse> {
        let mut rx = self
            .inner
            .with_proc(&req.id, &req.exec_id, |p| Ok(p.exit.subscribe()))?;
        let exit = rx
            .wait_for(|e| e.is_some())
            .await
            .map_err(|_| {
                ShimError::NotFound(format!(
                    "process {:?} of container {} was deleted while waited for",
                    req.exec_id, req.id
                ))
            })?
            .unwrap_or(crate::process::Exit {
                status: 255,
                at_ns: 0,
            });
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: MessageField::some(timestamp(exit.at_ns)),
            ..Default::default()
        })
    }
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _: &TtrpcContext, req: StateRequest) -> ttrpc::Result<StateResponse> {
        Ok(self.do_state(&req)?)
    }

    async fn create(
        &self,
        ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> ttrpc::Result<CreateTaskResponse> {
        // The pod's first container (its sandbox container, or a lone `ctr run`'s) opens the
        // pod's start: its Create and Start are one trace.
        let first = self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty();
        let pod = first.then(|| {
            let pod = tracing::info_span!(
                parent: None,
                "pod",
                otel.name = "shim pod start",
                sandbox = %req.id
            );
            runvm_telemetry::set_parent_from_metadata(&pod, &ctx.metadata);
            *self
                .inner
                .pod_start
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some((req.id.clone(), pod.clone()));
            pod
        });
        let span = request_span(ctx, "shim Create", &req.id, "", pod.as_ref());
        let created = self.inner.create(&req).instrument(span).await;
        if created.is_err() {
            self.end_pod_start(&req.id);
        }
        let pid = created?;
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, ctx: &TtrpcContext, req: StartRequest) -> ttrpc::Result<StartResponse> {
        let pod = req
            .exec_id
            .is_empty()
            .then(|| self.pod_start_of(&req.id))
            .flatten();
        let span = request_span(ctx, "shim Start", &req.id, &req.exec_id, pod.as_ref());
        let started = self.do_start(&req).instrument(span).await;
        if req.exec_id.is_empty() {
            self.end_pod_start(&req.id);
        }
        let pid = started?;
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        ctx: &TtrpcContext,
        req: DeleteRequest,
    ) -> ttrpc::Result<DeleteResponse> {
        if req.exec_id.is_empty() {
            // Deleted without a start: the pod's start ends here.
            self.end_pod_start(&req.id);
        }
        let span = request_span(ctx, "shim Delete", &req.id, &req.exec_id, None);
        Ok(self.do_delete(&req).instrument(span).await?)
    }

    async fn pids(&self, _: &TtrpcContext, req: PidsRequest) -> ttrpc::Result<PidsResponse> {
        Ok(self.do_pids(&req).await?)
    }

    async fn pause(&self, _: &TtrpcContext, req: PauseRequest) -> ttrpc::Result<Empty> {
        self.set_paused(&req.id, true).await?;
        Ok(Empty::new())
    }

    async fn resume(&self, _: &TtrpcContext, req: ResumeRequest) -> ttrpc::Result<Empty> {
        self.set_paused(&req.id, false).await?;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        req: CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        Err(ShimError::Unimplemented(format!(
            "checkpoint of container {}: runvm does not checkpoint VMs yet",
            req.id
        ))
        .into())
    }

    async fn kill(&self, ctx: &TtrpcContext, req: KillRequest) -> ttrpc::Result<Empty> {
        let span = request_span(ctx, "shim Kill", &req.id, &req.exec_id, None);
        self.do_kill(&req).instrument(span).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, ctx: &TtrpcContext, req: ExecProcessRequest) -> ttrpc::Result<Empty> {
        let span = request_span(ctx, "shim Exec", &req.id, &req.exec_id, None);
        span.in_scope(|| self.do_exec(&req))?;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.do_resize(&req).await?;
        Ok(Empty::new())
    }

    async fn close_io(&self, _: &TtrpcContext, req: CloseIORequest) -> ttrpc::Result<Empty> {
        self.do_close_io(&req).await?;
        Ok(Empty::new())
    }

    async fn update(&self, _: &TtrpcContext, req: UpdateTaskRequest) -> ttrpc::Result<Empty> {
        self.do_update(&req).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _: &TtrpcContext, req: WaitRequest) -> ttrpc::Result<WaitResponse> {
        Ok(self.do_wait(&req).await?)
    }

    async fn stats(&self, _: &TtrpcContext, req: StatsRequest) -> ttrpc::Result<StatsResponse> {
        Ok(self.do_stats(&req).await?)
    }

    async fn connect(
        &self,
        _: &TtrpcContext,
        _req: ConnectRequest,
    ) -> ttrpc::Result<ConnectResponse> {
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid: self.inner.pid(),
            ..Default::default()
        })
    }

    async fn shutdown(&self, _: &TtrpcContext, _req: ShutdownRequest) -> ttrpc::Result<Empty> {
        if self.inner.ctrs().is_empty() {
            tracing::info!("no container left; the shim exits once the VM is gone");
            let inner = Arc::clone(&self.inner);
            tokio::spawn(async move {
                inner.finish_teardown().await;
                inner.exit.0.signal();
            });
        }
        Ok(Empty::new())
    }
}

impl TaskService {
    /// The pod's start span, while container `id` (the pod's first) has not started.
    fn pod_start_of(&self, id: &str) -> Option<tracing::Span> {
        let pod = self
            .inner
            .pod_start
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        pod.as_ref()
            .filter(|(cid, _)| cid == id)
            .map(|(_, span)| span.clone())
    }

    /// Ends the pod's start span (its first container started, or could not be created).
    fn end_pod_start(&self, id: &str) {
        let mut pod = self
            .inner
            .pod_start
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if pod.as_ref().is_some_and(|(cid, _)| cid == id) {
            *pod = None;
        }
    }
}

/// The span of one task request, named `name`, under `parent` (the pod's start) if given; its
/// parent is containerd's span instead when the request's metadata carries a W3C `traceparent`
/// (containerd with tracing on), so a pod's requests join containerd's trace.
fn request_span(
    ctx: &TtrpcContext,
    name: &'static str,
    id: &str,
    exec_id: &str,
    parent: Option<&tracing::Span>,
) -> tracing::Span {
    let parent = parent.map_or_else(|| tracing::Span::current().id(), tracing::Span::id);
    let span = tracing::info_span!(
        parent: parent,
        "task",
        otel.name = name,
        otel.kind = "server",
        container = %id,
        exec = %exec_id
    );
    runvm_telemetry::set_parent_from_metadata(&span, &ctx.metadata);
    span
}

/// Where a bundle's rootfs is.
pub(crate) fn rootfs_of(bundle: &str) -> PathBuf {
    PathBuf::from(bundle).join("rootfs")
}

#[cfg(test)]
#[path = "task_tests.rs"]
mod tests;
