//! The shim's state: the pod's sandbox (one VM), its containers and their processes, and the
//! background work (exit waiters, the VM monitor, OOM events).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use containerd_shim::ExitSignal;
use runvm_sandbox::agent::Agent;
use runvm_sandbox::config::Config;
use runvm_sandbox::sandbox::{SandboxProvider, VmFailure};
use runvm_sandbox::state::unix_now_ns;
use runvm_sandbox::Sandbox;
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;

use crate::error::{Result, ShimError};
use crate::events::Events;
use crate::process::{Exit, Proc};

/// How often the VM is checked.
const MONITOR_INTERVAL: Duration = Duration::from_secs(1);
/// Failed agent checks in a row after which the VM counts as dead.
const SILENT_CHECKS: u32 = 3;
/// How long the shim stays up after its VM died, for containerd to collect the exits.
const EXIT_GRACE: Duration = Duration::from_secs(5);

/// The signal that ends the shim daemon.
#[derive(Clone)]
pub struct ShimExit(pub Arc<ExitSignal>);

impl std::fmt::Debug for ShimExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShimExit")
    }
}

/// One container of the pod.
#[derive(Debug)]
pub struct Ctr {
    /// Its bundle.
    pub bundle: PathBuf,
    /// The shim mounted containerd's rootfs mounts on `bundle/rootfs`.
    pub rootfs_mounted: bool,
    /// Its processes by exec id ("" = init).
    pub procs: HashMap<String, Proc>,
}

/// The task service's shared state.
#[derive(Debug)]
pub struct Inner {
    /// runvm's configuration.
    pub config: Config,
    /// Why the configuration could not be loaded (creating containers is refused then).
    pub config_error: Option<String>,
    /// Where sandboxes come from (QEMU: the VM factory or a cold boot; a mock in unit tests).
    pub provider: Arc<dyn SandboxProvider>,
    /// Events to containerd.
    pub events: Events,
    /// Set to end the shim.
    pub exit: ShimExit,
    /// The pod's sandbox, once created.
    pub sandbox: Mutex<Option<Sandbox>>,
    /// The containers.
    pub containers: StdMutex<HashMap<String, Ctr>>,
    /// QEMU's pid: the pid containerd sees for every process of the pod.
    pub vm_pid: AtomicU32,
    /// The monitor and the OOM listener.
    pub background: StdMutex<Vec<JoinHandle<()>>>,
    /// The sandbox's teardown, running behind the answer to the Delete that ended it; the
    /// shim exits only after it.
    pub teardown: StdMutex<Option<JoinHandle<()>>>,
    /// The span of the pod's start, from the first container's Create to the end of its
    /// Start (`task::pod_start`): the root of their trace when containerd sends none.
    pub pod_start: StdMutex<Option<(String, tracing::Span)>>,
}

impl Inner {
    /// The state of a shim without containers yet, its sandboxes from `provider`.
    pub fn new(
        config: Config,
        config_error: Option<String>,
        provider: Arc<dyn SandboxProvider>,
        events: Events,
        exit: ShimExit,
    ) -> Inner {
        Inner {
            config,
            config_error,
            provider,
            events,
            exit,
            sandbox: Mutex::new(None),
            containers: StdMutex::new(HashMap::new()),
            vm_pid: AtomicU32::new(0),
            background: StdMutex::new(Vec::new()),
            teardown: StdMutex::new(None),
            pod_start: StdMutex::new(None),
        }
    }

    /// The containers, locked (never held across an await).
    pub fn ctrs(&self) -> std::sync::MutexGuard<'_, HashMap<String, Ctr>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pid reported for processes.
    pub fn pid(&self) -> u32 {
        self.vm_pid.load(Ordering::Relaxed)
    }

    /// The sandbox, locked; `FailedPrecondition` when none runs.
    pub async fn sandbox(&self) -> Result<tokio::sync::MappedMutexGuard<'_, Sandbox>> {
        MutexGuard::try_map(self.sandbox.lock().await, |s| s.as_mut()).map_err(|_| {
            ShimError::FailedPrecondition(
                "this shim runs no sandbox VM (it was deleted or died)".into(),
            )
        })
    }

    /// Runs `f` on process `exec_id` of container `id`.
    pub fn with_proc<T>(
        &self,
        id: &str,
        exec_id: &str,
        f: impl FnOnce(&mut Proc) -> Result<T>,
    ) -> Result<T> {
        let mut ctrs = self.ctrs();
        let ctr = ctrs
            .get_mut(id)
            .ok_or_else(|| ShimError::NotFound(format!("container {id:?} not found")))?;
        let proc = ctr.procs.get_mut(exec_id).ok_or_else(|| {
            ShimError::NotFound(format!("process {exec_id:?} of container {id:?} not found"))
        })?;
        f(proc)
    }

    /// Records an exit and tells containerd, once per process.
    pub fn finish(&self, id: &str, exec_id: &str, exit: Exit) {
        let first = self
            .with_proc(id, exec_id, |p| {
                Ok(p.exit.send_if_modified(|e| {
                    if e.is_none() {
                        *e = Some(exit);
                        true
                    } else {
                        false
                    }
                }))
            })
            .unwrap_or(false);
        if first {
            tracing::info!(
                container = id,
                exec_id,
                status = exit.status,
                "process exited"
            );
            self.events
                .exit(id, exec_id, self.pid(), exit.status, exit.at_ns);
        }
    }

    /// Waits (in the background) for a started process, drains its output, records its exit.
    pub fn spawn_waiter(
        self: &Arc<Self>,
        process: runvm_sandbox::process::Process,
        id: String,
        exec_id: String,
    ) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            // The handle records the exit in the container's record.
            let exit = match process.wait().await {
                Ok(s) => Exit {
                    status: u32::try_from(s.code).unwrap_or(255),
                    at_ns: u64::try_from(s.exited_at_unix_ns).unwrap_or_else(|_| unix_now_ns()),
                },
                Err(e) => {
                    tracing::warn!(container = %id, exec_id, error = %e, "waiting for the process failed");
                    Exit {
                        status: 255,
                        at_ns: unix_now_ns(),
                    }
                }
            };
            if let Ok(drain) = inner.with_proc(&id, &exec_id, |p| Ok(p.drain_io())) {
                drain.await;
            }
            inner.finish(&id, &exec_id, exit);
        });
    }

    /// Starts the VM monitor and the OOM listener for the new sandbox.
    pub fn spawn_background(self: &Arc<Self>, agent: Arc<dyn Agent>) {
        let monitor = tokio::spawn(Arc::clone(self).monitor());
        let events = self.events.clone();
        let oom = tokio::spawn(async move {
            loop {
                match agent.oom_event().await {
                    Ok(id) => {
                        tracing::warn!(container = %id, "OOM kill in the guest");
                        events.oom(&id);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "OOM listener ends");
                        return;
                    }
                }
            }
        });
        let mut bg = self.background.lock().unwrap_or_else(|p| p.into_inner());
        bg.push(monitor);
        bg.push(oom);
    }

    /// Tears sandbox `sb` down in the background (see [`Inner::teardown`]): its VM stopped, its
    /// records, mounts and network removed. Its port-forward rule goes at once; the teardown
    /// is marked in its records first (if that fails, all is done before returning).
    pub async fn tear_down(&self, mut sb: Sandbox) -> Result<()> {
        // containerd may remove the pod's namespace as soon as it has the answer: what runvm
        // put in it goes first.
        if let Err(e) = sb.remove_port_forward_rule().await {
            tracing::warn!(sandbox = %sb.id(), error = %e, "removing the port-forward rule");
        }
        let mark = match sb.hold_teardown() {
            Ok(mark) => mark,
            Err(e) => {
                // Unmarked, it cannot go behind the answer: it goes before it.
                tracing::warn!(sandbox = %sb.id(), error = %e, "cannot mark the teardown; deleting the VM now");
                let id = sb.id().to_string();
                return sb
                    .delete(true)
                    .await
                    .map_err(ShimError::sandbox(format!("deleting the sandbox VM {id}")));
            }
        };
        let handle = tokio::spawn(async move {
            let _mark = mark;
            let id = sb.id().clone();
            if let Err(e) = sb.delete(true).await {
                tracing::error!(sandbox = %id, error = %e, "deleting the sandbox VM failed; ending it by force");
                if let Err(e) = sb.kill().await {
                    tracing::error!(sandbox = %id, error = %e, "cannot end the sandbox VM");
                }
            }
        });
        *self.teardown.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(())
    }

    /// Waits for the sandbox's teardown, if one runs.
    pub async fn finish_teardown(&self) {
        let handle = self
            .teardown
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = handle {
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "the sandbox teardown task failed");
            }
        }
    }

    /// Stops the monitor and the OOM listener.
    pub fn stop_background(&self) {
        for t in self
            .background
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
    }

    async fn monitor(self: Arc<Self>) {
        let mut silent = 0;
        loop {
            tokio::time::sleep(MONITOR_INTERVAL).await;
            let mut guard = self.sandbox.lock().await;
            let Some(sb) = guard.as_mut() else { return };
            let failure = match sb.health(MONITOR_INTERVAL * 2).await {
                Ok(()) => {
                    silent = 0;
                    continue;
                }
                Err(f @ VmFailure::VmExited(_)) => f,
                Err(f) => {
                    silent += 1;
                    if silent < SILENT_CHECKS {
                        continue;
                    }
                    f
                }
            };
            tracing::error!(sandbox = %sb.id(), %failure, "the sandbox VM died");
            if let Err(e) = sb.handle_vm_failure(&failure).await {
                tracing::warn!(error = %e, "cleaning up after the VM");
            }
            drop(guard);
            self.vm_died();
            tokio::time::sleep(EXIT_GRACE).await;
            self.exit.0.signal();
            return;
        }
    }

    /// Every started process that had not exited exits with 137: it died with the VM.
    fn vm_died(&self) {
        let running: Vec<(String, String)> = self
            .ctrs()
            .iter()
            .flat_map(|(id, c)| {
                c.procs
                    .iter()
                    .filter(|(_, p)| p.started && p.exited().is_none())
                    .map(move |(e, _)| (id.clone(), e.clone()))
            })
            .collect();
        let exit = Exit {
            status: runvm_sandbox::sandbox::KILLED_EXIT_STATUS.unsigned_abs(),
            at_ns: unix_now_ns(),
        };
        for (id, exec_id) in running {
            self.with_proc(&id, &exec_id, |p| {
                p.abort_io();
                Ok(())
            })
            .ok();
            self.finish(&id, &exec_id, exit);
        }
    }
}

/// Unmounts what the shim mounted on `bundle/rootfs`.
pub fn unmount_rootfs(bundle: &Path) {
    let target = bundle.join("rootfs");
    for _ in 0..8 {
        match nix::mount::umount2(&target, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) => continue,
            Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => return,
            Err(e) => {
                tracing::warn!(path = %target.display(), error = %e, "unmounting the rootfs");
                return;
            }
        }
    }
}
