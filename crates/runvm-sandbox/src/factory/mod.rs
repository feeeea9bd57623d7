//! The VM factory: VMs booted before anyone asks, handed to sandboxes as they are created.
//!
//! `runvm factory init` runs a long-lived process (the *daemon*, [`daemon::serve`]) that keeps
//! `factory.cache` VMs booted with their agent answering, and hands them out over a unix socket
//! ([`client::take`]); `runvm create` and the shim take one when the factory is configured and
//! boot their own when it is empty, down or made from another configuration (the sandbox's
//! timeline says which).
//!
//! # Layout (under the state root `ROOT`)
//! - `ROOT/~factory/daemon.lock`: held (`flock`) by the daemon while it runs; holds its pid.
//! - `ROOT/~factory/factory.sock`: the daemon's socket (JSON lines, [`Request`]/[`Reply`]).
//! - `ROOT/~factory/factory.log`: the daemon's log when `factory init` started it.
//! - `ROOT/~factory/vms/ID/`: a store of the pool's VMs, each a sandbox record of its own.
//! - `ROOT/.vmhome~ID/{vm,shared}`: each pool VM's run folder and shared folder. They stay
//!   where they are when a sandbox adopts the VM: the sandbox records the VM's id
//!   (`SandboxRecord::factory_vm`) and removes the folder with itself.
//!
//! # Ownership
//! A pool VM belongs to exactly one owner at every instant, decided on disk:
//! - the sandbox whose record names it (`factory_vm`), once that record is saved;
//! - the pool otherwise, as long as its pool record exists.
//!
//! The hand-over: the daemon marks the pool record *handed to* the sandbox
//! ([`HANDED_TO_ANNOTATION`]) and replies; the sandbox saves its record naming the VM and says
//! so ([`Request::Adopted`]); the daemon then drops its pool record. A crash anywhere leaves a
//! pool record that [`sweep`] resolves by that rule: handed to a sandbox whose record names the
//! VM, the record is dropped and the VM left to its sandbox; otherwise the VM is ended.

pub mod client;
pub mod daemon;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::Digest;

use crate::config::Config;
use crate::error::SandboxError;
use crate::id::SandboxId;
use crate::state::SandboxRecord;
use crate::store::{Store, StoreError};

/// The factory's folder in the state root (`~` is never in an id: never taken for a sandbox).
pub const FACTORY_DIR: &str = "~factory";
/// The daemon's lock file.
pub const LOCK_FILE: &str = "daemon.lock";
/// The daemon's socket.
pub const SOCKET_FILE: &str = "factory.sock";
/// The daemon's log file.
pub const LOG_FILE: &str = "factory.log";
/// The pool's store.
pub const VMS_DIR: &str = "vms";
/// The annotation of a pool record naming the configuration key its VM was made from.
pub const KEY_ANNOTATION: &str = "io.runvm.factory.key";
/// The annotation of a pool record naming the sandbox it was handed to.
pub const HANDED_TO_ANNOTATION: &str = "io.runvm.factory.handed-to";

/// Errors of the factory's commands and daemon.
#[derive(Debug, thiserror::Error)]
pub enum FactoryError {
    /// `factory.cache` is 0.
    #[error("the factory is not configured: factory.cache = 0 in {config}; set `[factory] cache = N` (1 to 64) to keep N VMs booted")]
    NotConfigured {
        /// The configuration file, or "the built-in defaults".
        config: String,
    },
    /// Another daemon serves this root.
    #[error("a factory already runs for {} (pid {pid}); `runvm factory status` shows it, `runvm factory destroy` stops it", root.display())]
    Running {
        /// The state root.
        root: PathBuf,
        /// Its pid (0 when unknown).
        pid: u32,
    },
    /// A file or socket operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done.
        action: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered something unexpected, or not in time.
    #[error("the factory at {} {problem}", socket.display())]
    Protocol {
        /// The socket.
        socket: PathBuf,
        /// What went wrong.
        problem: String,
    },
    /// The daemon did not get its pool ready in time, or died while starting.
    #[error("the factory did not start: {reason}; its log is {}", log.display())]
    NotStarted {
        /// Why.
        reason: String,
        /// The daemon's log.
        log: PathBuf,
    },
    /// A sandbox operation on a pool VM failed.
    #[error(transparent)]
    Sandbox(#[from] Box<SandboxError>),
    /// The pool's store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<SandboxError> for FactoryError {
    fn from(e: SandboxError) -> Self {
        FactoryError::Sandbox(Box::new(e))
    }
}

/// One request to the daemon (one JSON line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Request {
    /// What the pool holds.
    Status,
    /// Hand a VM made from configuration `key` to sandbox `sandbox`.
    Take {
        /// The sandbox that will own it.
        sandbox: SandboxId,
        /// [`vm_key`] of the sandbox's configuration.
        key: String,
    },
    /// After a [`Reply::Vm`]: the sandbox's record names the VM now.
    Adopted,
    /// Stop: end the pool's VMs and exit.
    Stop,
}

/// The daemon's answer (one JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    /// To [`Request::Status`].
    Status(Box<FactoryStatus>),
    /// To [`Request::Take`]: the VM, as its pool record describes it.
    Vm {
        /// The pool VM's id.
        id: SandboxId,
        /// Its pool record (VM processes, agent address, configuration).
        record: Box<SandboxRecord>,
    },
    /// To [`Request::Take`]: no VM; the sandbox boots its own.
    Miss {
        /// Why (`empty`, `stale`, `another-configuration`, ...).
        reason: String,
    },
    /// Done.
    Ok,
}

/// What `runvm factory status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactoryStatus {
    /// Whether a daemon serves the root.
    pub running: bool,
    /// The daemon's pid.
    pub pid: Option<u32>,
    /// VMs the daemon keeps ready (`factory.cache`).
    pub cache: u32,
    /// VMs ready now.
    pub ready: u32,
    /// Whether a VM is booting now.
    pub booting: bool,
    /// VMs handed out.
    pub hits: u64,
    /// Requests answered without a VM.
    pub misses: u64,
    /// Pool boots that failed.
    pub boot_failures: u64,
    /// Time of the last pool boot, ms.
    pub last_boot_ms: Option<u64>,
    /// Time from a hand-out until the pool was full again, ms (the last refill).
    pub last_refill_ms: Option<u64>,
    /// What the pool's VMs are made from.
    pub source: FactorySource,
    /// Pool records on disk (without a daemon: what `factory destroy` would clean).
    pub records: u32,
}

/// What a pool's VMs are made from: when any of it changes, they are not handed out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FactorySource {
    /// [`vm_key`].
    pub key: String,
    /// The guest kernel.
    pub kernel: PathBuf,
    /// The guest initramfs.
    pub initrd: PathBuf,
    /// The QEMU binary.
    pub qemu: PathBuf,
}

/// The factory's folder under `root`.
pub fn factory_dir(root: &Path) -> PathBuf {
    root.join(FACTORY_DIR)
}

/// The daemon's socket under `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    factory_dir(root).join(SOCKET_FILE)
}

/// The pool's store under `root`.
pub fn pool_store(root: &Path) -> Store {
    Store::new(factory_dir(root).join(VMS_DIR))
}

/// What the VMs of `config` are made from, with a key that changes whenever a VM made from it
/// would differ: the hypervisor, guest and agent sections, and the size and modification time
/// of the kernel, the initramfs and QEMU (a rebuilt guest image or an upgraded QEMU).
pub fn source(config: &Config) -> FactorySource {
    let qemu = crate::config::resolve_program(&config.hypervisor.qemu)
        .unwrap_or_else(|| PathBuf::from(&config.hypervisor.qemu));
    let mut hash = sha2::Sha256::new();
    let sections = serde_json::json!({
        "hypervisor": config.hypervisor,
        "guest": config.guest,
        "agent": config.agent,
    });
    hash.update(sections.to_string().as_bytes());
    for file in [&config.guest.kernel, &config.guest.initrd, &qemu] {
        hash.update(file.as_os_str().as_encoded_bytes());
        if let Ok(meta) = std::fs::metadata(file) {
            use std::os::unix::fs::MetadataExt;
            hash.update(meta.len().to_le_bytes());
            hash.update(meta.mtime().to_le_bytes());
            hash.update(meta.mtime_nsec().to_le_bytes());
        }
    }
    let key: String = hash.finalize()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    FactorySource {
        key,
        kernel: config.guest.kernel.clone(),
        initrd: config.guest.initrd.clone(),
        qemu,
    }
}

/// [`source`]'s key.
pub fn vm_key(config: &Config) -> String {
    source(config).key
}

/// Who owns a pool VM, by the rule in the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// The pool: end it when the pool lets go.
    Pool,
    /// The sandbox whose record names it.
    Sandbox(SandboxId),
    /// Cannot tell yet (the sandbox's record is locked past the timeout, or unreadable):
    /// leave it for the next sweep.
    Unknown(String),
}

/// Who owns pool VM `vm`, handed to `handed_to` (if it was), with sandboxes in `store`.
/// Waits for the sandbox's lock (its creator may be saving the record that names the VM).
pub fn owner(store: &Store, vm: &SandboxId, handed_to: Option<&str>) -> Owner {
    // The VM folder's owner file (written before the sandbox's record names the VM) stands in
    // for a pool record that cannot be read.
    let marked = adopter(store, vm);
    let Some(sandbox) = handed_to.and_then(|s| SandboxId::parse(s).ok()).or(marked) else {
        return Owner::Pool;
    };
    let record = store
        .lock_shared_timeout(&sandbox, crate::sandbox::LOCK_TIMEOUT)
        .and_then(|_lock| store.load_sandbox(&sandbox));
    match record {
        Ok(r) if r.factory_vm.as_ref() == Some(vm) => Owner::Sandbox(sandbox),
        Ok(_) | Err(StoreError::SandboxNotFound { .. }) => Owner::Pool,
        Err(e) => Owner::Unknown(crate::ErrorChain(&e).to_string()),
    }
}

/// The file in a VM's folder naming the sandbox adopting it.
pub const OWNER_FILE: &str = "owner";

/// Names sandbox `sandbox` as the adopter of VM `vm` in the VM's folder, before the sandbox's
/// record names the VM: `delete --force` of a sandbox whose record cannot be read, and the
/// sweep, find the VM from it.
pub fn mark_adopter(store: &Store, vm: &SandboxId, sandbox: &SandboxId) -> std::io::Result<()> {
    let home = store.vm_home(vm);
    let tmp = home.join(format!(".{OWNER_FILE}.tmp"));
    std::fs::write(&tmp, sandbox.as_str())?;
    std::fs::rename(&tmp, home.join(OWNER_FILE))
}

/// The sandbox VM `vm`'s folder names as its adopter, if any.
pub fn adopter(store: &Store, vm: &SandboxId) -> Option<SandboxId> {
    let text = std::fs::read_to_string(store.vm_home(vm).join(OWNER_FILE)).ok()?;
    SandboxId::parse(text.trim()).ok()
}

/// What [`sweep`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SweepReport {
    /// Pool VMs ended (their processes killed, folders removed).
    pub ended: Vec<SandboxId>,
    /// Pool records dropped because a sandbox owns their VM.
    pub left_to_sandboxes: Vec<(SandboxId, SandboxId)>,
    /// VM folders no record names, removed with whatever ran in them.
    pub orphans: Vec<SandboxId>,
    /// Pool VMs left for later (owner unknown), with why.
    pub undecided: Vec<(SandboxId, String)>,
}

/// Resolves every pool record under `config.runtime.root` with no daemon running (the caller
/// holds the daemon lock): VMs the pool owns are ended, records of VMs a sandbox owns dropped,
/// and VM folders nobody names removed with any process running in them.
pub async fn sweep(config: &Config) -> Result<SweepReport, FactoryError> {
    let root = &config.runtime.root;
    let sandboxes = Store::new(root.clone());
    let pool = pool_store(root);
    let mut report = SweepReport::default();
    // Each VM on its own: one that cannot be ended does not keep the others running.
    let mut failed: Vec<String> = Vec::new();
    for vm in pool.list_sandboxes()? {
        let handed = pool
            .load_sandbox(&vm)
            .ok()
            .and_then(|r| r.annotations.get(HANDED_TO_ANNOTATION).cloned());
        let resolved = match owner(&sandboxes, &vm, handed.as_deref()) {
            Owner::Sandbox(sandbox) => pool
                .remove_sandbox_forced(&vm, pool.try_lock_exclusive(&vm).ok())
                .map_err(FactoryError::from)
                .map(|()| report.left_to_sandboxes.push((vm.clone(), sandbox))),
            Owner::Pool => end_pool_vm(&pool, &sandboxes, &vm, config)
                .await
                .map(|()| report.ended.push(vm.clone())),
            Owner::Unknown(why) => {
                report.undecided.push((vm.clone(), why));
                Ok(())
            }
        };
        if let Err(e) = resolved {
            tracing::warn!(vm = %vm, error = %crate::ErrorChain(&e), "resolving a pool VM");
            failed.push(format!("{vm}: {}", crate::ErrorChain(&e)));
            report
                .undecided
                .push((vm, crate::ErrorChain(&e).to_string()));
        }
    }
    let undecided: Vec<SandboxId> = report.undecided.iter().map(|(vm, _)| vm.clone()).collect();
    let ids = sandboxes.list_sandboxes()?;
    let mut named = Vec::new();
    let mut unreadable = false;
    for id in &ids {
        match sandboxes.load_sandbox(id) {
            Ok(r) => named.extend(r.factory_vm),
            // A record that cannot be read may name any VM: its folder's owner file decides.
            Err(_) => unreadable = true,
        }
    }
    for vm in sandboxes.vm_homes()? {
        if named.contains(&vm) || undecided.contains(&vm) {
            continue;
        }
        if let Some(sandbox) = adopter(&sandboxes, &vm) {
            if unreadable && ids.contains(&sandbox) {
                report.undecided.push((
                    vm,
                    format!("named by {sandbox}, whose record cannot be read"),
                ));
                continue;
            }
        }
        match crate::sandbox::purge_vm_home(&sandboxes, &vm, config).await {
            Ok(_) => report.orphans.push(vm),
            Err(e) => {
                failed.push(format!("{vm}: {}", crate::ErrorChain(&e)));
                report
                    .undecided
                    .push((vm, crate::ErrorChain(&e).to_string()));
            }
        }
    }
    if !failed.is_empty() {
        tracing::warn!(?failed, "some factory VMs could not be ended");
    }
    Ok(report)
}

/// Ends pool VM `vm`: its processes and record (`pool`), its folder (`sandboxes`' root).
async fn end_pool_vm(
    pool: &Store,
    sandboxes: &Store,
    vm: &SandboxId,
    config: &Config,
) -> Result<(), FactoryError> {
    match crate::sandbox::purge(pool, vm, config).await {
        Ok(_) => {}
        Err(e) if e.is_not_found() => {}
        Err(e) => return Err(e.into()),
    }
    crate::sandbox::purge_vm_home(sandboxes, vm, config).await?;
    Ok(())
}

#[cfg(test)]
mod tests;
