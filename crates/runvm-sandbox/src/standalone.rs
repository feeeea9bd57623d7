//! One sandbox per container, for runc-style callers (the `runvm` command line).
//!
//! A standalone container has a sandbox (VM) of the same id. runc's callers wait on the
//! container's `pid` and signal it, so each container has a *stand-in*: a host process that
//! relays its stdio and signals to the agent and exits with its exit code
//! ([`crate::standin`]). The stand-in's pid and start time are kept in `ROOT/ID/standin.json`
//! (a file of this module, next to `sandbox.json`), so that [`state`] can report the pid and
//! tell a dead stand-in (or a dead VM) from a live container.
//!
//! A container whose spec names another container's namespaces (`/proc/PID/ns/TYPE`, PID
//! being that container's pid as [`state`] reports it) is made in that container's VM, a
//! *member* of its sandbox: `ROOT/joined~ID` (a symlink to the sandbox id; `~` is never in an
//! id, so the store never takes it for a sandbox) leads from its id to its sandbox, and its
//! stand-in is recorded in its container folder. A VM lives while any container in it has
//! not stopped: the last init stand-in to see its process exit stops it.
//!
//! Errors carry runc's messages, which callers such as containerd's runc shim match on
//! (`does not exist`, `container not running`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use runvm_hypervisor::qemu::proc_start_time;
use serde::{Deserialize, Serialize};

use crate::agent::StdioSpec;
use crate::config::Config;
use crate::container::spec::Bundle;
use crate::error::SandboxError;
use crate::id::{ContainerId, SandboxId};
use crate::process::Streams;
use crate::sandbox::{
    open_sandbox, NewContainer, NewSandbox, QemuProvider, Sandbox, SandboxProvider,
};
use crate::state::{State, StdioRecord};
use crate::store::Store;

/// The file holding the stand-in's pid and start time, in the sandbox folder.
pub const STANDIN_FILE: &str = "standin.json";

/// The OCI runtime spec version runvm reports.
pub const OCI_VERSION: &str = "1.0.2";

/// Errors of standalone containers, with runc's messages.
#[derive(Debug, thiserror::Error)]
pub enum StandaloneError {
    /// No such container.
    #[error("container {0:?} does not exist")]
    NotExist(String),
    /// The id is taken.
    #[error("container with id exists: {0}")]
    Exists(String),
    /// `delete` without force on a live container.
    #[error("cannot delete container {id} that is not stopped: {status}")]
    NotStopped {
        /// The container.
        id: String,
        /// Its OCI status.
        status: &'static str,
    },
    /// `start` on a running or paused container.
    #[error("cannot start an already running container")]
    AlreadyRunning,
    /// `start` on a stopped container.
    #[error("cannot start a container that has stopped")]
    StartStopped,
    /// The operation needs a running container.
    #[error("container not running")]
    NotRunning,
    /// `resume` on a container that is not paused.
    #[error("container not paused")]
    NotPaused,
    /// `exec` in a stopped container.
    #[error("cannot exec in a stopped state")]
    ExecStopped,
    /// The container's state cannot be used (torn, garbage or newer-version records, or a
    /// creation that was interrupted).
    #[error("container {id} is unusable: {reason}; remove it with `runvm delete --force {id}`")]
    Unusable {
        /// The container.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `delete` of a container whose VM holds other containers (that joined its namespaces).
    #[error(
        "cannot delete container {id}: containers {} run in its VM (they joined its \
         namespaces); delete them first, or use --force to remove them all",
        members.join(", ")
    )]
    HasMembers {
        /// The container.
        id: String,
        /// The containers in its VM.
        members: Vec<String>,
    },
    /// A namespace path names a container that cannot be joined.
    #[error("cannot join the namespaces of container {owner}: {reason}")]
    CannotJoin {
        /// The container named.
        owner: String,
        /// Why.
        reason: String,
    },
    /// The sandbox library failed.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// A file could not be read or written.
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
}

/// A host process known by pid and start time (so a recycled pid is not mistaken for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostProcess {
    /// Its pid.
    pub pid: u32,
    /// Its start time, clock ticks since boot.
    pub start_time: u64,
}

impl HostProcess {
    /// Process `pid` as it is now; `None` if there is none.
    pub fn of(pid: u32) -> Option<HostProcess> {
        proc_start_time(pid).map(|(start_time, _)| HostProcess { pid, start_time })
    }

    /// Whether it still runs (not a zombie, same start time).
    pub fn alive(&self) -> bool {
        matches!(proc_start_time(self.pid), Some((t, false)) if t == self.start_time)
    }
}

/// A container's state as `runvm state` prints it (the OCI state, plus runc's extra fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OciState {
    /// The OCI runtime spec version.
    pub oci_version: String,
    /// The container id.
    pub id: String,
    /// `created`, `running`, `paused` or `stopped`.
    pub status: &'static str,
    /// The stand-in's pid (0 once stopped).
    pub pid: u32,
    /// The bundle.
    pub bundle: PathBuf,
    /// The root file system on the host.
    pub rootfs: PathBuf,
    /// Creation time, RFC 3339.
    pub created: String,
    /// The spec's annotations.
    pub annotations: BTreeMap<String, String>,
    /// The user owning the state.
    pub owner: String,
    /// Why the state is `unknown` (`list` only: the entry's records cannot be used).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// The prefix of a member's link to its sandbox, in the state root (see the module's doc).
pub const MEMBER_LINK_PREFIX: &str = "joined~";

fn member_link(config: &Config, id: &ContainerId) -> PathBuf {
    config
        .runtime
        .root
        .join(format!("{MEMBER_LINK_PREFIX}{}", id.as_str()))
}

/// The sandbox of container `id`: its own (same id), or, for a container that joined another
/// one's namespaces, that container's.
pub fn sandbox_of(config: &Config, id: &ContainerId) -> Result<SandboxId, StandaloneError> {
    let own = || Ok(SandboxId::parse(id.as_str()).map_err(SandboxError::from)?);
    match std::fs::read_link(member_link(config, id)) {
        Ok(target) => match target.to_str().map(SandboxId::parse) {
            Some(Ok(sid)) => Ok(sid),
            _ => Err(StandaloneError::Unusable {
                id: id.to_string(),
                reason: format!(
                    "its link {} names no sandbox ({})",
                    member_link(config, id).display(),
                    target.display()
                ),
            }),
        },
        Err(_) => own(),
    }
}

fn not_found_as(id: &ContainerId, e: SandboxError) -> StandaloneError {
    if e.is_not_found() {
        StandaloneError::NotExist(id.to_string())
    } else {
        StandaloneError::Sandbox(e)
    }
}

pub use crate::container::spec::network_namespace;

/// Reads and checks bundle `bundle` for container `id`, once, without booting anything: the
/// value [`create`] takes. A namespace path `/proc/PID/ns/TYPE` where PID is another
/// container's pid (as [`state`] reports it) makes the container a member of that container's
/// sandbox.
pub fn check_bundle(
    config: &Config,
    bundle: &Path,
    id: &ContainerId,
) -> Result<Bundle, StandaloneError> {
    let owner = |path: &Path| container_of_namespace(config, path).map(|c| c.to_string());
    Ok(Bundle::load_resolving(bundle, id.as_str(), &owner).map_err(SandboxError::from)?)
}

/// The container whose init's stand-in is PID in namespace path `/proc/PID/ns/NAME`, if any.
fn container_of_namespace(config: &Config, path: &Path) -> Option<ContainerId> {
    let mut parts = path.strip_prefix("/proc").ok()?.components();
    let pid: u32 = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    if parts.next()?.as_os_str() != "ns" || parts.next().is_none() || parts.next().is_some() {
        return None;
    }
    let store = Store::new(config.runtime.root.clone());
    for sid in store.list_sandboxes().ok()? {
        let Ok(record) = store.load_sandbox(&sid) else {
            continue;
        };
        for cid in &record.containers {
            let Some(p) = standin_in(config, &sid, cid) else {
                continue;
            };
            if p.pid == pid && p.alive() && is_standin_of(pid, cid) {
                return Some(cid.clone());
            }
        }
    }
    None
}

/// Creates container `id` from `bundle` (read and checked once by [`check_bundle`]) in a new
/// sandbox of the same id: the VM boots and the container is created (OCI `created`), its
/// stdio attached for a stand-in. On error nothing is left.
pub async fn create(
    config: &Config,
    id: &ContainerId,
    bundle: Bundle,
) -> Result<(Sandbox, Streams), StandaloneError> {
    create_with(&QemuProvider, config, id, bundle).await
}

/// As [`create`], the sandbox made (or, for a container joining another's namespaces,
/// opened) by `provider`.
pub async fn create_with(
    provider: &dyn SandboxProvider,
    config: &Config,
    id: &ContainerId,
    bundle: Bundle,
) -> Result<(Sandbox, Streams), StandaloneError> {
    if std::fs::symlink_metadata(member_link(config, id)).is_ok() {
        return Err(StandaloneError::Exists(id.to_string()));
    }
    if let Some(owner) = bundle.prepared.member_of.clone() {
        return create_member(provider, config, id, &owner, bundle).await;
    }
    let sid = SandboxId::parse(id.as_str()).map_err(SandboxError::from)?;
    if Store::new(config.runtime.root.clone())
        .load_sandbox(&sid)
        .is_ok()
    {
        return Err(StandaloneError::Exists(id.to_string()));
    }
    // The VM is this container's: in its host cgroup, booted with its limits.
    let request = NewSandbox {
        config,
        id: sid,
        annotations: bundle.annotations.clone(),
        netns: bundle.netns.clone(),
        spec: Some(&bundle.spec),
    };
    let (mut sb, _) = provider.create(request).await.map_err(|e| match e {
        SandboxError::AlreadyExists { .. } => StandaloneError::Exists(id.to_string()),
        e => e.into(),
    })?;
    match create_attached(&mut sb, id, bundle).await {
        Ok(streams) => Ok((sb, streams)),
        Err(e) => {
            abort(sb).await;
            Err(e.into())
        }
    }
}

/// Creates container `id` in the sandbox of container `owner`, whose namespaces it joins (the
/// agent joins them in the guest). Refused when `owner` has stopped, or when the spec names a
/// host network namespace other than the one its VM runs in. On error nothing is left.
async fn create_member(
    provider: &dyn SandboxProvider,
    config: &Config,
    id: &ContainerId,
    owner: &str,
    bundle: Bundle,
) -> Result<(Sandbox, Streams), StandaloneError> {
    let cannot = |reason: String| StandaloneError::CannotJoin {
        owner: owner.to_string(),
        reason,
    };
    let owner_id = ContainerId::parse(owner).map_err(SandboxError::from)?;
    let st = state(config, &owner_id)?;
    if !matches!(st.status, "created" | "running" | "paused") {
        return Err(cannot(format!(
            "it is {} (a container can join the namespaces of a created, running or paused \
             one)",
            st.status
        )));
    }
    let sid = sandbox_of(config, &owner_id)?;
    let mut sb = provider
        .open(config, &sid)
        .map_err(|e| not_found_as(&owner_id, e))?;
    if let Some(wanted) = &bundle.netns {
        let vm_netns = sb.record().network.as_ref().map(|n| n.netns.clone());
        if !vm_netns.as_deref().is_some_and(|ns| same_file(ns, wanted)) {
            return Err(cannot(format!(
                "the spec asks for network namespace {}, and its VM runs in {} (leave the \
                 network namespace's path out, or give that one)",
                wanted.display(),
                vm_netns
                    .map(|n| n.display().to_string())
                    .unwrap_or_else(|| "the host's".into())
            )));
        }
    }
    // The link to the sandbox first (made at once or not at all, never over anything): the id
    // is then taken, and `delete --force` finds whatever follows.
    let link = member_link(config, id);
    if let Err(e) = std::os::unix::fs::symlink(sid.as_str(), &link) {
        return Err(match e.kind() {
            std::io::ErrorKind::AlreadyExists => StandaloneError::Exists(id.to_string()),
            _ => StandaloneError::Io {
                action: "create",
                path: link,
                source: e,
            },
        });
    }
    // A sandbox of the same id appearing meanwhile takes the id first.
    if std::fs::symlink_metadata(config.runtime.root.join(id.as_str())).is_ok() {
        let _ = std::fs::remove_file(&link);
        return Err(StandaloneError::Exists(id.to_string()));
    }
    match create_attached(&mut sb, id, bundle).await {
        Ok(streams) => Ok((sb, streams)),
        Err(e) => {
            let _ = std::fs::remove_file(&link);
            sb.detach();
            Err(e.into())
        }
    }
}

/// Creates container `id` of `bundle` in `sb`, its stdio attached to new streams for a
/// stand-in to relay (returned).
async fn create_attached(
    sb: &mut Sandbox,
    id: &ContainerId,
    bundle: Bundle,
) -> Result<Streams, SandboxError> {
    let terminal = bundle.terminal();
    let mut stdio = StdioSpec::attached(terminal);
    let streams = sb.open_streams(&mut stdio).await?;
    sb.create_container(NewContainer {
        id: id.clone(),
        annotations: bundle.annotations.clone(),
        bundle,
        stdio,
        stdio_paths: StdioRecord::default(),
    })
    .await?;
    Ok(streams)
}

/// Whether `a` and `b` are the same file (a namespace named by two paths).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => a == b,
    }
}

/// Undoes a [`create`] whose caller failed afterwards: a container of its own sandbox takes
/// the sandbox (VM) with it; a member only itself. Problems are only logged.
pub async fn abort_container(config: &Config, mut sb: Sandbox, id: &ContainerId) {
    if sb.id().as_str() == id.as_str() {
        return abort(sb).await;
    }
    if let Err(e) = sb.delete_container(id, true).await {
        tracing::warn!(container = %id, error = %e, "removing the container after a failed create");
    }
    let _ = std::fs::remove_file(member_link(config, id));
    sb.detach();
}

/// Stops and removes a sandbox whose creation failed half-way; problems are only logged.
pub async fn abort(mut sb: Sandbox) {
    if let Err(e) = sb.stop().await {
        tracing::warn!(error = %e, "stopping the sandbox after a failed create");
    }
    if let Err(e) = sb.delete(true).await {
        tracing::warn!(error = %e, "removing the sandbox after a failed create");
    }
}

/// Where the stand-in of container `id` in sandbox `sid` is recorded: the sandbox folder for
/// the container owning it, its container folder for a member.
fn standin_path(config: &Config, sid: &SandboxId, id: &ContainerId) -> PathBuf {
    let store = Store::new(config.runtime.root.clone());
    if sid.as_str() == id.as_str() {
        store.sandbox_dir(sid).join(STANDIN_FILE)
    } else {
        store.container_dir(sid, id).join(STANDIN_FILE)
    }
}

/// Records the stand-in of container `id` (written atomically).
pub fn set_standin(
    config: &Config,
    id: &ContainerId,
    process: HostProcess,
) -> Result<(), StandaloneError> {
    let path = standin_path(config, &sandbox_of(config, id)?, id);
    let tmp = path.with_extension("tmp");
    let io = |action| {
        let path = path.clone();
        move |source| StandaloneError::Io {
            action,
            path,
            source,
        }
    };
    let text = serde_json::to_vec(&process).unwrap_or_default();
    std::fs::write(&tmp, text).map_err(io("write"))?;
    std::fs::rename(&tmp, &path).map_err(io("rename into place"))
}

/// The stand-in of container `id`, if one was recorded.
pub fn standin(config: &Config, id: &ContainerId) -> Option<HostProcess> {
    standin_in(config, &sandbox_of(config, id).ok()?, id)
}

fn standin_in(config: &Config, sid: &SandboxId, id: &ContainerId) -> Option<HostProcess> {
    use std::io::Read;
    // A pid and a start time: a few dozen bytes; anything larger is not ours.
    let mut text = Vec::new();
    std::fs::File::open(standin_path(config, sid, id))
        .ok()?
        .take(4096)
        .read_to_end(&mut text)
        .ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether a live process holds sandbox `sid`'s lock exclusively (its creator, mid-boot).
fn being_changed(store: &Store, sid: &SandboxId) -> bool {
    matches!(
        store.try_lock_shared(sid),
        Err(crate::store::StoreError::LockBusy { .. })
    )
}

/// The OCI state of container `id`, from its records, as runc reports it:
/// - `creating` while its creator is still booting the VM;
/// - `stopped` once its VM (QEMU) is gone or its stand-in (the process callers wait on) is;
///   the death of a helper alone does not stop it: the stand-in's watcher ends the VM then;
/// - an error ([`StandaloneError::Unusable`]) naming what is wrong when its records cannot be
///   read, or its creation was interrupted: `delete --force` removes it.
pub fn state(config: &Config, id: &ContainerId) -> Result<OciState, StandaloneError> {
    let store = Store::new(config.runtime.root.clone());
    let sid = sandbox_of(config, id)?;
    let unusable = |reason: String| StandaloneError::Unusable {
        id: id.to_string(),
        reason,
    };
    if std::fs::symlink_metadata(store.sandbox_dir(&sid)).is_err() {
        return Err(StandaloneError::NotExist(id.to_string()));
    }
    let sandbox = match store.load_sandbox(&sid) {
        Ok(s) => s,
        Err(e)
            if e.is_not_found() && std::fs::symlink_metadata(store.sandbox_dir(&sid)).is_err() =>
        {
            return Err(StandaloneError::NotExist(id.to_string()))
        }
        Err(e) => return Err(unusable(crate::ErrorChain(&e).to_string())),
    };
    let c = match store.load_container(&sid, id) {
        Ok(c) => c,
        Err(e) if e.is_not_found() => {
            if being_changed(&store, &sid) {
                return Ok(OciState {
                    oci_version: OCI_VERSION.into(),
                    id: id.to_string(),
                    status: "creating",
                    pid: 0,
                    bundle: PathBuf::new(),
                    rootfs: PathBuf::new(),
                    created: rfc3339(sandbox.created_at),
                    annotations: sandbox.annotations,
                    owner: owner(&store.sandbox_dir(&sid)),
                    reason: None,
                });
            }
            return Err(unusable(
                "its creation was interrupted (the process creating it died before the \
                 container was made)"
                    .into(),
            ));
        }
        Err(e) => return Err(unusable(crate::ErrorChain(&e).to_string())),
    };
    let standin = standin_in(config, &sid, id);
    let qemu_alive = sandbox
        .vm
        .processes
        .iter()
        .filter(|p| p.name == "qemu")
        .any(|p| {
            HostProcess {
                pid: p.pid,
                start_time: p.start_time,
            }
            .alive()
        });
    let standin_alive = standin.is_none_or(|p| p.alive());
    let state = if c.state != State::Stopped && (!qemu_alive || !standin_alive) {
        State::Stopped
    } else {
        c.state
    };
    let pid = match (state, standin) {
        (State::Stopped, _) | (_, None) => 0,
        (_, Some(p)) => p.pid,
    };
    Ok(OciState {
        oci_version: OCI_VERSION.into(),
        id: id.to_string(),
        status: state.oci_status(),
        pid,
        bundle: c.bundle,
        rootfs: c.rootfs,
        created: rfc3339(c.created_at),
        annotations: c.annotations,
        owner: owner(&store.sandbox_dir(&sid)),
        reason: None,
    })
}

/// The states of every standalone container under the root: each sandbox's own container,
/// then the containers that joined it, then any member whose creation was cut short. An entry
/// whose records cannot be used is listed with status `unknown` and the reason, never hidden.
pub fn list(config: &Config) -> Result<Vec<OciState>, StandaloneError> {
    let store = Store::new(config.runtime.root.clone());
    let sids = store.list_sandboxes().map_err(SandboxError::from)?;
    let mut ids: Vec<ContainerId> = Vec::new();
    for sid in &sids {
        let Ok(id) = ContainerId::parse(sid.as_str()) else {
            continue;
        };
        let members = store
            .load_sandbox(sid)
            .map(|r| r.containers)
            .unwrap_or_default();
        ids.push(id.clone());
        ids.extend(members.into_iter().filter(|c| *c != id));
    }
    for id in member_links(config) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }
    let mut out = Vec::new();
    for id in &ids {
        match state(config, id) {
            Ok(st) => out.push(st),
            // Removed meanwhile.
            Err(StandaloneError::NotExist(_)) => {}
            Err(e) => {
                let reason = match e {
                    StandaloneError::Unusable { reason, .. } => reason,
                    other => crate::ErrorChain(&other).to_string(),
                };
                let dir = sandbox_of(config, id)
                    .map(|sid| store.sandbox_dir(&sid))
                    .unwrap_or_else(|_| config.runtime.root.clone());
                out.push(OciState {
                    oci_version: OCI_VERSION.into(),
                    id: id.to_string(),
                    status: "unknown",
                    pid: 0,
                    bundle: PathBuf::new(),
                    rootfs: PathBuf::new(),
                    created: String::new(),
                    annotations: BTreeMap::new(),
                    owner: owner(&dir),
                    reason: Some(reason),
                });
            }
        }
    }
    Ok(out)
}

/// The containers with a member link in the state root.
fn member_links(config: &Config) -> Vec<ContainerId> {
    let Ok(entries) = std::fs::read_dir(&config.runtime.root) else {
        return Vec::new();
    };
    let mut ids: Vec<ContainerId> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let id = name.to_str()?.strip_prefix(MEMBER_LINK_PREFIX)?;
            ContainerId::parse(id).ok()
        })
        .collect();
    ids.sort();
    ids
}

/// The containers that joined sandbox `sid`, by their links (also when its record is gone).
fn members_linked_to(config: &Config, sid: &SandboxId) -> Vec<ContainerId> {
    member_links(config)
        .into_iter()
        .filter(|id| {
            std::fs::read_link(member_link(config, id)).is_ok_and(|t| t == Path::new(sid.as_str()))
        })
        .collect()
}

/// A sandbox driven by this process but owned by none: let go of (detached, never stopped)
/// when dropped, so that an early return cannot take a container's VM down with it.
#[derive(Debug)]
pub struct Attached(Option<Sandbox>);

impl Attached {
    /// Wraps `sandbox`.
    pub fn new(sandbox: Sandbox) -> Attached {
        Attached(Some(sandbox))
    }

    /// The sandbox itself, for an operation that ends it (stop, delete).
    pub fn into_inner(mut self) -> Sandbox {
        self.0
            .take()
            .expect("an Attached holds its sandbox until dropped")
    }
}

impl std::ops::Deref for Attached {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        self.0
            .as_ref()
            .expect("an Attached holds its sandbox until dropped")
    }
}

impl std::ops::DerefMut for Attached {
    fn deref_mut(&mut self) -> &mut Sandbox {
        self.0
            .as_mut()
            .expect("an Attached holds its sandbox until dropped")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Some(sb) = self.0.take() {
            sb.detach();
        }
    }
}

/// Opens the sandbox of container `id` with its current OCI state.
pub fn open(config: &Config, id: &ContainerId) -> Result<(Attached, OciState), StandaloneError> {
    open_with(&QemuProvider, config, id)
}

/// As [`open`], the sandbox opened by `provider`.
pub fn open_with(
    provider: &dyn SandboxProvider,
    config: &Config,
    id: &ContainerId,
) -> Result<(Attached, OciState), StandaloneError> {
    let st = state(config, id)?;
    let sb = provider
        .open(config, &sandbox_of(config, id)?)
        .map_err(|e| not_found_as(id, e))?;
    Ok((Attached::new(sb), st))
}

/// Removes container `id` and its sandbox: refused unless stopped, or `force`, which removes
/// whatever is there (see [`force_delete`]). The stand-in is killed, the VM stopped, every
/// file removed. A container that joined another's VM leaves the VM to the others; a
/// container whose VM others joined is refused while they exist (unless `force`).
pub async fn delete(config: &Config, id: &ContainerId, force: bool) -> Result<(), StandaloneError> {
    if force {
        return force_delete(config, id).await;
    }
    // The stand-in of a container that exited may still be stopping its VM (after it
    // reported the exit): the VM is gone once that ends.
    let sid = sandbox_of(config, id)?;
    let store = Store::new(config.runtime.root.clone());
    if let Err(e) = store.wait_teardown(&sid, TEARDOWN_WAIT) {
        tracing::warn!(sandbox = %sid, error = %e, "the VM's teardown did not end; deleting it here");
    }
    let (sb, st) = open(config, id)?;
    if st.status != "stopped" {
        return Err(StandaloneError::NotStopped {
            id: id.to_string(),
            status: st.status,
        });
    }
    let mut sb = sb.into_inner();
    if sb.id().as_str() != id.as_str() {
        kill_standin(config, id);
        let removed = sb.delete_container(id, false).await;
        sb.detach();
        removed.map_err(|e| not_found_as(id, e))?;
        return remove_member_link(config, id);
    }
    let members: Vec<String> = sb
        .record()
        .containers
        .iter()
        .filter(|c| c.as_str() != id.as_str())
        .map(ToString::to_string)
        .collect();
    if !members.is_empty() {
        sb.detach();
        return Err(StandaloneError::HasMembers {
            id: id.to_string(),
            members,
        });
    }
    kill_standin(config, id);
    if let Err(e) = sb.stop().await {
        tracing::warn!(error = %e, "stopping the sandbox before delete");
    }
    sb.delete(true).await.map_err(|e| not_found_as(id, e))
}

fn remove_member_link(config: &Config, id: &ContainerId) -> Result<(), StandaloneError> {
    let link = member_link(config, id);
    match std::fs::remove_file(&link) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(StandaloneError::Io {
            action: "remove",
            path: link,
            source,
        }),
    }
}

/// How long `delete` waits for a VM teardown in progress (an exited container's stand-in
/// stopping its VM) before doing it itself.
const TEARDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// The same for `delete --force`, which kills whatever is left anyway.
const FORCED_TEARDOWN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Removes container `id` whatever state it is in, as `delete --force`: its stand-in and its
/// VM's processes are killed (each checked to be what the records say), its pod network,
/// mounts and files removed, also when its records are torn, unreadable or from a newer
/// runvm, or its creation was interrupted at any point ([`crate::sandbox::purge`]). The
/// containers that joined its VM go with it; a container that joined another's VM goes alone.
pub async fn force_delete(config: &Config, id: &ContainerId) -> Result<(), StandaloneError> {
    let sid = sandbox_of(config, id)?;
    if sid.as_str() != id.as_str() {
        return force_delete_member(config, &sid, id).await;
    }
    let members = members_linked_to(config, &sid);
    // The stand-ins first: they would otherwise notice the VM's death and race the removal.
    for member in &members {
        kill_standin(config, member);
    }
    kill_standin(config, id);
    let store = Store::new(config.runtime.root.clone());
    if let Err(e) = store.wait_teardown(&sid, FORCED_TEARDOWN_WAIT) {
        tracing::debug!(sandbox = %sid, error = %e, "purging during a teardown");
    }
    let purged = crate::sandbox::purge(&store, &sid, config).await;
    for member in &members {
        remove_member_link(config, member)?;
    }
    match purged {
        Ok(report) => {
            if let Some(reason) = report.unreadable {
                tracing::warn!(container = %id, %reason, "removed a container whose state was unusable");
            }
            Ok(())
        }
        Err(e) => Err(not_found_as(id, e)),
    }
}

/// `delete --force` of a container in another container's VM: its processes there are
/// killed, its record and mounts removed, then its link; the VM stays for the others.
async fn force_delete_member(
    config: &Config,
    sid: &SandboxId,
    id: &ContainerId,
) -> Result<(), StandaloneError> {
    kill_standin(config, id);
    match open_sandbox(config, sid) {
        Ok(mut sb) => {
            let removed = sb.delete_container(id, true).await;
            sb.detach();
            match removed {
                Ok(()) => {}
                Err(e) if e.is_not_found() => {}
                Err(e) => return Err(e.into()),
            }
        }
        // The sandbox is gone (or unreadable: its own `delete --force` removes it all).
        Err(e) => {
            tracing::debug!(container = %id, error = %e, "no sandbox to remove the container from")
        }
    }
    remove_member_link(config, id)
}

/// Kills the stand-in of container `id` if it still runs: the recorded pid is signalled only
/// when its start time matches and it is a runvm stand-in for this container.
fn kill_standin(config: &Config, id: &ContainerId) {
    let Some(p) = standin(config, id).filter(HostProcess::alive) else {
        return;
    };
    if !is_standin_of(p.pid, id) {
        tracing::warn!(pid = p.pid, container = %id, "the recorded stand-in pid is another process now; not signalling it");
        return;
    }
    // SAFETY: kill(2) with a pid checked against its start time and command line just now; no
    // memory involved.
    unsafe { libc::kill(p.pid as libc::pid_t, libc::SIGKILL) };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while p.alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Whether process `pid` is a runvm stand-in (`__standin`) for container `id`.
fn is_standin_of(pid: u32, id: &ContainerId) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    args.contains(&b"__standin".as_slice()) && args.contains(&id.as_str().as_bytes())
}

/// `ns` (since the Unix epoch) as RFC 3339 in UTC with nanoseconds, as runc prints times.
pub fn rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let nanos = ns % 1_000_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The name of the user owning `path` (its uid as text when /etc/passwd does not name it).
fn owner(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata(path).map(|m| m.uid()).unwrap_or(0);
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() > 2 && f[2] == uid.to_string()).then(|| f[0].to_string())
        })
        .unwrap_or_else(|| uid.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_utc_with_nanoseconds() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_709_251_199_000_000_123),
            "2024-02-29T23:59:59.000000123Z"
        );
    }

    #[test]
    fn unknown_container_does_not_exist() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::default();
        config.runtime.root = dir.path().to_path_buf();
        let id = ContainerId::parse("nope").unwrap();
        let err = state(&config, &id).unwrap_err();
        assert_eq!(err.to_string(), "container \"nope\" does not exist");
    }

    #[test]
    fn a_dead_process_is_not_alive() {
        let me = HostProcess::of(std::process::id()).unwrap();
        assert!(me.alive());
        let other = HostProcess {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!other.alive());
    }
}
