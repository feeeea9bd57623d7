//! The shim binary's lifecycle: `start` (spawn or reuse the pod's shim daemon), `delete`
//! (clean up after a dead shim), and the daemon's task service.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::api::DeleteResponse;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{spawn, Config as ShimConfig, ExitSignal, Flags, Shim, StartOpts};
use runvm_sandbox::config::Config;
use runvm_sandbox::sandbox::{purge, QemuProvider, SandboxProvider};
use runvm_sandbox::state::unix_now_ns;
use runvm_sandbox::store::Store;
use runvm_sandbox::{ContainerId, SandboxError, SandboxId};

use crate::events::{timestamp, Events};
use crate::pod;
use crate::service::{unmount_rootfs, Inner, ShimExit};
use crate::task::TaskService;

/// The runtime id containerd knows runvm by.
pub const RUNTIME_ID: &str = "io.containerd.runvm.v2";

/// The exit status reported for a task whose shim died (SIGKILL).
const DEAD_SHIM_STATUS: u32 = 128 + 9;

/// The containerd-shim `Shim` for runvm.
#[derive(Debug)]
pub struct RunvmShim {
    id: String,
    namespace: String,
    bundle: PathBuf,
    exit: ShimExit,
}

/// The shim configuration containerd-shim runs with: no reaper (the sandbox library waits for
/// QEMU and its helpers itself), no logger (the shim logs with `tracing`).
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_setup_logger: true,
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

/// runvm's configuration (`$RUNVM_CONFIG`, else `/etc/runvm/config.toml`, else defaults).
pub fn load_config() -> Result<Config, String> {
    Config::load(None).map_err(|e| format!("runvm configuration: {e}"))
}

/// The sandbox a container of `bundle` lives in (its own id when the spec cannot be read).
pub fn sandbox_of(id: &str, bundle: &Path) -> String {
    match pod::bundle_annotations(bundle) {
        Ok(a) => pod::placement(id, &a).sandbox_id(id).to_string(),
        Err(_) => id.to_string(),
    }
}

#[async_trait]
impl Shim for RunvmShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        RunvmShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            bundle,
            exit: ShimExit(Arc::new(ExitSignal::default())),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // Containers of one pod share one shim (and so one VM): the socket is derived from
        // the pod's sandbox id, and a second daemon for it finds the first one's socket.
        let grouping = sandbox_of(&opts.id, &self.bundle);
        tracing::info!(container = %opts.id, sandbox = %grouping, "shim start");
        let address = spawn(opts, &grouping, Vec::new()).await?;
        containerd_shim::util::write_str_to_file(self.bundle.join("address"), &address).await?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<DeleteResponse> {
        tracing::info!(container = %self.id, "shim delete: cleaning up after the shim");
        if let Err(e) = cleanup(&self.id, &self.bundle).await {
            tracing::warn!(container = %self.id, error = %e, "cleanup after the shim");
        }
        Ok(DeleteResponse {
            pid: 0,
            exit_status: DEAD_SHIM_STATUS,
            exited_at: MessageField::some(timestamp(unix_now_ns())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.0.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        crate::relay_guest_logs();
        let (config, config_error) = match crate::config() {
            Ok(c) => (c, None),
            Err(e) => {
                tracing::error!(error = %e, "the shim cannot create containers");
                (Config::default(), Some(e))
            }
        };
        TaskService {
            inner: Arc::new(Inner::new(
                config,
                config_error,
                Arc::new(QemuProvider),
                Events::spawn(publisher, self.namespace.clone()),
                self.exit.clone(),
            )),
        }
    }
}

/// After a dead shim: the container goes from its sandbox; a sandbox container takes its VM
/// (QEMU, helpers, mounts, files) with it. Nothing there is fine.
async fn cleanup(id: &str, bundle: &Path) -> Result<(), SandboxError> {
    unmount_rootfs(bundle);
    let config = match load_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "using the default configuration for the cleanup");
            Config::default()
        }
    };
    runvm_sandbox::store::check_root(&config.runtime.root)?;
    let sandbox = sandbox_of(id, bundle);
    let sid = SandboxId::parse(&sandbox)?;
    if sandbox == id {
        // containerd gives `shim delete` a few seconds: no grace, the VM goes at once, in
        // whatever state the dead shim left it (mid-boot, torn records: purge trusts none).
        // A shim still tearing the VM down behind its last answer (containerd calls this as
        // soon as that shim's connection closes) finishes the work itself: waiting for it
        // here would put the power-off back on StopPodSandbox's path. Its records stay until
        // it is done, for a later `delete --force` should it die meanwhile.
        let store = Store::new(config.runtime.root.clone());
        if store.teardown_in_progress(&sid) {
            tracing::info!(sandbox = %sid, "the sandbox's shim is tearing it down");
            return Ok(());
        }
        return match purge(&store, &sid, &config).await {
            Ok(report) => {
                if let Some(reason) = report.unreadable {
                    tracing::warn!(sandbox = %sid, %reason, "removed a sandbox whose state was unusable");
                }
                Ok(())
            }
            Err(e) if e.is_not_found() => Ok(()),
            Err(e) => Err(e),
        };
    }
    let mut sb = match QemuProvider.open(&config, &sid) {
        Ok(sb) => sb,
        Err(e) if e.is_not_found() => return Ok(()),
        Err(e) => return Err(e),
    };
    let cid = ContainerId::parse(id)?;
    let result = match sb.delete_container(&cid, true).await {
        Err(e) if e.is_not_found() => Ok(()),
        other => other,
    };
    sb.detach();
    result
}
