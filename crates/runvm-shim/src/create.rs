//! Create: the container's rootfs, its VM (a new one, or its pod's), the container in it,
//! its stdio relays.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use containerd_shim::api::CreateTaskRequest;
use runvm_sandbox::agent::StdioSpec;
use runvm_sandbox::container::spec::Bundle;
use runvm_sandbox::sandbox::{NewContainer, NewSandbox};
use runvm_sandbox::SandboxId;

use crate::error::{Result, ShimError};
use crate::pod::{self, Placement};
use crate::process::{Proc, Stdio};
use crate::service::{unmount_rootfs, Ctr, Inner};
use crate::task::{container_id, rootfs_of};

impl Inner {
    /// Creates the task; returns the pid containerd sees.
    pub async fn create(self: &Arc<Self>, req: &CreateTaskRequest) -> Result<u32> {
        let cid = container_id(&req.id)?;
        if let Some(e) = &self.config_error {
            return Err(ShimError::FailedPrecondition(e.clone()));
        }
        if !req.checkpoint.is_empty() {
            return Err(ShimError::Unimplemented(format!(
                "container {}: restoring from a checkpoint is not supported",
                req.id
            )));
        }
        let bundle = PathBuf::from(&req.bundle);
        if !bundle.is_absolute() {
            return Err(ShimError::InvalidArgument(format!(
                "bundle {:?} of container {} is not an absolute path",
                req.bundle, req.id
            )));
        }
        if !req.rootfs.is_empty() {
            // The mount point of the rootfs the shim mounts later: the bundle check wants it.
            let target = rootfs_of(&req.bundle);
            std::fs::create_dir_all(&target)
                .map_err(ShimError::io(format!("creating {}", target.display())))?;
        }
        // config.json is read and checked once; the value goes on to the VM and the container.
        let loaded = Bundle::load(&bundle, cid.as_str()).map_err(|e| ShimError::Sandbox {
            context: format!("reading the bundle of container {}", req.id),
            source: Box::new(e.into()),
        })?;
        let placement = pod::placement(&req.id, &loaded.annotations);
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        {
            let mut ctrs = self.ctrs();
            if ctrs.contains_key(&req.id) {
                return Err(ShimError::AlreadyExists(format!(
                    "container {} exists already",
                    req.id
                )));
            }
            ctrs.insert(
                req.id.clone(),
                Ctr {
                    bundle: bundle.clone(),
                    rootfs_mounted: false,
                    procs: [(String::new(), Proc::new(stdio.clone(), None))].into(),
                },
            );
        }
        let made = self
            .create_in_vm(req, cid, &placement, loaded, &stdio)
            .await;
        if let Err(e) = made {
            if let Some(ctr) = self.ctrs().remove(&req.id) {
                if ctr.rootfs_mounted {
                    unmount_rootfs(&ctr.bundle);
                }
            }
            return Err(e);
        }
        let pid = self.pid();
        self.events.create(
            &req.id,
            &req.bundle,
            [&req.stdin, &req.stdout, &req.stderr],
            req.terminal,
            pid,
        );
        Ok(pid)
    }

    async fn create_in_vm(
        self: &Arc<Self>,
        req: &CreateTaskRequest,
        cid: runvm_sandbox::ContainerId,
        placement: &Placement,
        bundle: Bundle,
        stdio: &Stdio,
    ) -> Result<()> {
        let annotations = bundle.annotations.clone();
        if !req.rootfs.is_empty() {
            let target = rootfs_of(&req.bundle);
            std::fs::create_dir_all(&target)
                .map_err(ShimError::io(format!("creating {}", target.display())))?;
            for m in &req.rootfs {
                containerd_shim::util::mount_rootfs(m, &target)
                    .await
                    .map_err(|e| ShimError::Io {
                        what: format!("mounting the rootfs of {} on {}", req.id, target.display()),
                        source: std::io::Error::other(e.to_string()),
                    })?;
                if let Some(c) = self.ctrs().get_mut(&req.id) {
                    c.rootfs_mounted = true;
                }
            }
        }
        let mut guard = self.sandbox.lock().await;
        let own = *placement == Placement::OwnVm;
        match (&*guard, placement) {
            (Some(sb), Placement::OwnVm) => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} asks for its own VM, but this shim already runs sandbox {}",
                    req.id,
                    sb.id()
                )))
            }
            (None, Placement::OwnVm) => {
                let sid = SandboxId::parse(&req.id)
                    .map_err(|e| ShimError::InvalidArgument(format!("sandbox id: {e}")))?;
                // The pod's network namespace, as CNI set it up: the VM joins it.
                let netns = bundle.netns.clone();
                tracing::info!(sandbox = %sid, netns = ?netns, "booting the sandbox VM");
                // The VM goes into the pod's host cgroup (the sandbox container's cgroupsPath);
                // a pod's sandbox container has no limits (the pod's size comes from
                // containerd's sizing annotations), a container with its own VM boots with its.
                let request = NewSandbox {
                    config: &self.config,
                    id: sid,
                    annotations: annotations.clone(),
                    netns,
                    spec: Some(&bundle.spec),
                };
                // From the VM factory or booted cold: the provider decides.
                let context = format!("creating the VM of container {}", req.id);
                let (mut sb, report) = self
                    .provider
                    .create(request)
                    .await
                    .map_err(ShimError::sandbox(context))?;
                tracing::info!(sandbox = %sb.id(), accelerator = ?report.accelerator, "sandbox VM ready");
                if let Some(q) = sb.pids().iter().find(|p| p.name == "qemu") {
                    self.vm_pid.store(q.pid, Ordering::Relaxed);
                }
                match sb.agent().await {
                    Ok(agent) => self.spawn_background(agent),
                    Err(e) => tracing::warn!(error = %e, "no agent for the monitor"),
                }
                self.spawn_port_forward(&mut sb).await;
                *guard = Some(sb);
            }
            (Some(sb), Placement::Pod(pod)) if sb.id().as_str() == pod => {}
            (Some(sb), Placement::Pod(pod)) => {
                return Err(ShimError::FailedPrecondition(format!(
                    "container {} belongs to pod {pod}, but this shim runs sandbox {}",
                    req.id,
                    sb.id()
                )))
            }
            (None, Placement::Pod(pod)) => {
                return Err(ShimError::NotFound(format!(
                    "container {}: its pod sandbox {pod} is not running in this shim",
                    req.id
                )))
            }
        }
        let Some(sb) = guard.as_mut() else {
            return Err(ShimError::FailedPrecondition(
                "the sandbox VM went away".into(),
            ));
        };
        let mut spec = StdioSpec {
            stdin: !stdio.stdin.is_empty(),
            stdout: !stdio.stdout.is_empty(),
            stderr: !stdio.stderr.is_empty() && !stdio.terminal,
            terminal: stdio.terminal,
            stream_token: None,
        };
        let opened = sb.open_streams(&mut spec).await;
        let new = NewContainer {
            id: cid,
            bundle,
            stdio: spec,
            stdio_paths: runvm_sandbox::state::StdioRecord {
                stdin: (!stdio.stdin.is_empty()).then(|| stdio.stdin.clone()),
                stdout: (!stdio.stdout.is_empty()).then(|| stdio.stdout.clone()),
                stderr: (!stdio.stderr.is_empty()).then(|| stdio.stderr.clone()),
            },
            annotations,
        };
        let created = match opened {
            Ok(streams) => sb.create_container(new).await.map(|_| streams),
            Err(e) => Err(e),
        };
        let streams = match created {
            Ok(streams) => streams,
            Err(e) => {
                if own {
                    self.stop_background();
                    if let Err(d) = sb.delete(true).await {
                        tracing::warn!(error = %d, "removing the VM after a failed create");
                    }
                    *guard = None;
                }
                return Err(ShimError::Sandbox {
                    context: format!("creating container {}", req.id),
                    source: Box::new(e),
                });
            }
        };
        drop(guard);
        self.with_proc(&req.id, "", |p| {
            p.start_io(&req.id, streams);
            Ok(())
        })
    }
}

impl Inner {
    /// Serves `kubectl port-forward` for the pod (containerd dials `localhost:PORT` in the
    /// pod's network namespace; runvm_sandbox::portfwd carries it into the VM) until the
    /// sandbox goes (`stop_background`). Without it the pod still runs: a failure is logged.
    async fn spawn_port_forward(self: &Arc<Self>, sb: &mut runvm_sandbox::Sandbox) {
        match sb.start_port_forward().await {
            Ok(Some(forwarder)) => {
                let task = tokio::spawn(forwarder.serve());
                self.background
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(task);
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(
                sandbox = %sb.id(),
                error = %runvm_sandbox::ErrorChain(&e),
                "no port forwarding for the pod"
            ),
        }
    }
}
