//! One sandbox per container, for runc-style callers (the `runvm` command line).
//!
//! A standalone container has a sandbox (VM) of the same id. runc's callers wait on the
//! container's `pid` and signal it, so each container has a *stand-in*: a host process that
//! relays its stdio and signals to the agent and exits with its exit code
//! ([`crate::standin`]). The stand-in's pid and start time are kept in `ROOT/ID/standin.json`
//! (a file of this module, next to `sandbox.json`), so that [`state`] can report the pid and
//! tell a dead stand-in (or a dead VM) from a live container.
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
use crate::sandbox::{create_qemu_sandbox_for, open_sandbox, NewContainer, Sandbox};
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

fn sandbox_id(id: &ContainerId) -> Result<SandboxId, StandaloneError> {
    Ok(SandboxId::parse(id.as_str()).map_err(SandboxError::from)?)
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
/// value [`create`] takes.
pub fn check_bundle(bundle: &Path, id: &ContainerId) -> Result<Bundle, StandaloneError> {
    Ok(Bundle::load(bundle, id.as_str()).map_err(SandboxError::from)?)
}

/// Creates container `id` from `bundle` (read and checked once by [`check_bundle`]) in a new
/// sandbox of the same id: the VM boots and the container is created (OCI `created`), its
/// stdio attached for a stand-in. On error nothing is left.
pub async fn create(
    config: &Config,
    id: &ContainerId,
    bundle: Bundle,
) -> Result<Sandbox, StandaloneError> {
    let sid = sandbox_id(id)?;
    if Store::new(config.runtime.root.clone())
        .load_sandbox(&sid)
        .is_ok()
    {
        return Err(StandaloneError::Exists(id.to_string()));
    }
    let annotations = bundle.annotations.clone();
    // The VM is this container's: it boots with the container's limits.
    let first = crate::sizing::spec_workload(&bundle.spec);
    let (mut sb, _) = create_qemu_sandbox_for(
        config,
        sid,
        annotations.clone(),
        bundle.netns.clone(),
        first,
    )
    .await
    .map_err(|e| match e {
        SandboxError::AlreadyExists { .. } => StandaloneError::Exists(id.to_string()),
        e => e.into(),
    })?;
    let terminal = bundle.terminal();
    let made = sb
        .create_container(NewContainer {
            id: id.clone(),
            bundle,
            stdio: StdioSpec::attached(terminal),
            stdio_paths: StdioRecord::default(),
            annotations,
        })
        .await;
    match made {
        Ok(_) => Ok(sb),
        Err(e) => {
            abort(sb).await;
            Err(e.into())
        }
    }
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

fn standin_path(config: &Config, id: &ContainerId) -> PathBuf {
    config.runtime.root.join(id.as_str()).join(STANDIN_FILE)
}

/// Records the stand-in of container `id` (written atomically).
pub fn set_standin(
    config: &Config,
    id: &ContainerId,
    process: HostProcess,
) -> Result<(), StandaloneError> {
    let path = standin_path(config, id);
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
    use std::io::Read;
    // A pid and a start time: a few dozen bytes; anything larger is not ours.
    let mut text = Vec::new();
    std::fs::File::open(standin_path(config, id))
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
    let sid = sandbox_id(id)?;
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
    let standin = standin(config, id);
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

/// The states of every standalone container under the root, by id. An entry whose records
/// cannot be used is listed with status `unknown` and the reason, never hidden.
pub fn list(config: &Config) -> Result<Vec<OciState>, StandaloneError> {
    let store = Store::new(config.runtime.root.clone());
    let ids = store.list_sandboxes().map_err(SandboxError::from)?;
    let mut out = Vec::new();
    for sid in &ids {
        let Ok(id) = ContainerId::parse(sid.as_str()) else {
            continue;
        };
        match state(config, &id) {
            Ok(st) => out.push(st),
            // Removed meanwhile.
            Err(StandaloneError::NotExist(_)) => {}
            Err(e) => {
                let reason = match e {
                    StandaloneError::Unusable { reason, .. } => reason,
                    other => crate::ErrorChain(&other).to_string(),
                };
                out.push(OciState {
                    oci_version: OCI_VERSION.into(),
                    id: id.to_string(),
                    status: "unknown",
                    pid: 0,
                    bundle: PathBuf::new(),
                    rootfs: PathBuf::new(),
                    created: String::new(),
                    annotations: BTreeMap::new(),
                    owner: owner(&store.sandbox_dir(sid)),
                    reason: Some(reason),
                });
            }
        }
    }
    Ok(out)
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
    let st = state(config, id)?;
    let sb = open_sandbox(config, &sandbox_id(id)?).map_err(|e| not_found_as(id, e))?;
    Ok((Attached::new(sb), st))
}

/// Removes container `id` and its sandbox: refused unless stopped, or `force`, which removes
/// whatever is there (see [`force_delete`]). The stand-in is killed, the VM stopped, every
/// file removed.
pub async fn delete(config: &Config, id: &ContainerId, force: bool) -> Result<(), StandaloneError> {
    if force {
        return force_delete(config, id).await;
    }
    let (sb, st) = open(config, id)?;
    if st.status != "stopped" {
        return Err(StandaloneError::NotStopped {
            id: id.to_string(),
            status: st.status,
        });
    }
    let mut sb = sb.into_inner();
    kill_standin(config, id);
    if let Err(e) = sb.stop().await {
        tracing::warn!(error = %e, "stopping the sandbox before delete");
    }
    sb.delete(true).await.map_err(|e| not_found_as(id, e))
}

/// Removes container `id` whatever state it is in, as `delete --force`: its stand-in and its
/// VM's processes are killed (each checked to be what the records say), its pod network,
/// mounts and files removed, also when its records are torn, unreadable or from a newer
/// runvm, or its creation was interrupted at any point ([`crate::sandbox::purge`]).
pub async fn force_delete(config: &Config, id: &ContainerId) -> Result<(), StandaloneError> {
    let sid = sandbox_id(id)?;
    // The stand-in first: it would otherwise notice the VM's death and race the removal.
    kill_standin(config, id);
    let store = Store::new(config.runtime.root.clone());
    match crate::sandbox::purge(&store, &sid, config).await {
        Ok(report) => {
            if let Some(reason) = report.unreadable {
                tracing::warn!(container = %id, %reason, "removed a container whose state was unusable");
            }
            Ok(())
        }
        Err(e) => Err(not_found_as(id, e)),
    }
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
