//! Removing a sandbox whatever state it was left in: `delete --force` and the shim's cleanup.
//!
//! A creator killed at any instant leaves a sandbox folder with a record that may lack the
//! VM's processes, lack its containers, or not parse at all. [`purge`] trusts none of it
//! blindly and still removes everything:
//! - the VM's processes: those recorded (signalled only when pid, start time and program all
//!   match) and those found running with a socket in the sandbox's VM run folder (a process
//!   spawned an instant before its creator died, not yet recorded);
//! - the pod network runvm made (from a readable record);
//! - the VM's host cgroup (from a readable record; its processes killed);
//! - every mount under the sandbox folder (from the mount table, not from the record);
//! - the folder and the VM run folder (paths computed from the root and the id).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use runvm_hypervisor::qemu::{find_by_argument, proc_exe, proc_start_time};

use super::LOCK_TIMEOUT;
use crate::config::Config;
use crate::error::SandboxError;
use crate::id::SandboxId;
use crate::state::SandboxRecord;
use crate::store::{vm_run_dir, Store, StoreError};

/// How long purge waits for killed processes to go.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// What [`purge`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PurgeReport {
    /// Why the record could not be used, if it could not (it was removed all the same).
    pub unreadable: Option<String>,
    /// The processes killed, as "name pid".
    pub killed: Vec<String>,
    /// The mount points unmounted.
    pub unmounted: Vec<PathBuf>,
}

/// A process to end, checked against what it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Victim {
    name: String,
    pid: u32,
    start_time: u64,
}

/// The file names of the programs a sandbox's VM runs, from its configuration.
fn program_names(config: &Config) -> Vec<String> {
    let h = &config.hypervisor;
    [&h.qemu, &h.virtiofsd, &h.vhost_device_vsock]
        .into_iter()
        .filter_map(|p| {
            Path::new(p)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .collect()
}

/// Whether `pid` runs one of `programs` (by file name) and started at `start_time`.
fn is_vm_process(pid: u32, start_time: u64, programs: &[String]) -> bool {
    let Some((start, zombie)) = proc_start_time(pid) else {
        return false;
    };
    if zombie || start != start_time {
        return false;
    }
    proc_exe(pid)
        .and_then(|exe| exe.file_name().map(|n| n.to_string_lossy().into_owned()))
        .is_some_and(|name| programs.contains(&name))
}

/// Whether `path` lies strictly under `root` (no `..`, compared component-wise).
pub(crate) fn lies_under(path: &Path, root: &Path) -> bool {
    use std::path::Component;
    path.starts_with(root)
        && path != root
        && !path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
}

/// The VM processes of sandbox `id` to end: those in `record` that are still what was recorded,
/// and those running with an argument in its VM run folder (the one runvm computes, and the
/// recorded one when it lies under the root).
fn victims(
    root: &Path,
    id: &SandboxId,
    record: Option<&SandboxRecord>,
    programs: &[String],
) -> Vec<Victim> {
    let mut out: Vec<Victim> = Vec::new();
    if let Some(record) = record {
        for p in &record.vm.processes {
            if is_vm_process(p.pid, p.start_time, programs) {
                out.push(Victim {
                    name: p.name.clone(),
                    pid: p.pid,
                    start_time: p.start_time,
                });
            } else {
                tracing::debug!(pid = p.pid, name = %p.name, "recorded process is gone or is another process now");
            }
        }
    }
    let mut dirs = vec![vm_run_dir(root, id)];
    if let Some(recorded) = record.map(|r| r.vm.config.run_dir.clone()) {
        if lies_under(&recorded, root) && !dirs.contains(&recorded) {
            dirs.push(recorded);
        } else if !dirs.contains(&recorded) {
            tracing::warn!(run_dir = %recorded.display(), root = %root.display(), "the record names a VM run folder outside the state root; ignoring it");
        }
    }
    for dir in dirs {
        let needle = format!("{}/", dir.display());
        for found in find_by_argument(&needle) {
            if out.iter().any(|v| v.pid == found.pid) {
                continue;
            }
            if is_vm_process(found.pid, found.start_time, programs) {
                let name = found
                    .exe
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                out.push(Victim {
                    name,
                    pid: found.pid,
                    start_time: found.start_time,
                });
            }
        }
    }
    out
}

/// Sends SIGKILL to each victim still the process it was, then waits (bounded) for them to go.
async fn kill_all(victims: &[Victim]) {
    for v in victims {
        let Ok(pid) = i32::try_from(v.pid) else {
            continue;
        };
        // Checked again right before the signal: still the same process (start time).
        if matches!(proc_start_time(v.pid), Some((t, false)) if t == v.start_time) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    let deadline = Instant::now() + KILL_WAIT;
    while Instant::now() < deadline {
        let alive = victims
            .iter()
            .any(|v| matches!(proc_start_time(v.pid), Some((t, false)) if t == v.start_time));
        if !alive {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::warn!("some VM processes did not exit within 5 s of SIGKILL");
}

/// Unmounts everything at or under `dir`, deepest first; returns what was mounted.
fn unmount_under(store: &Store, id: &SandboxId) -> Vec<PathBuf> {
    unmount_paths(store.mounts_of(id))
}

/// Ends factory VM `vm`'s folder in `store`'s root (`ROOT/.vmhome~ID`, see
/// [`crate::factory`]) and whatever runs from it: processes with an argument in it (QEMU and
/// its helpers, matched by program as in [`purge`]) are killed, mounts under it unmounted, the
/// folder removed. For a VM no record names any more, or a pool VM being ended.
pub async fn purge_vm_home(
    store: &Store,
    vm: &SandboxId,
    config: &Config,
) -> Result<PurgeReport, SandboxError> {
    let home = store.vm_home(vm);
    let programs = program_names(config);
    let needle = format!("{}/", home.display());
    let victims: Vec<Victim> = find_by_argument(&needle)
        .into_iter()
        .filter(|found| is_vm_process(found.pid, found.start_time, &programs))
        .map(|found| Victim {
            name: found
                .exe
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pid: found.pid,
            start_time: found.start_time,
        })
        .collect();
    kill_all(&victims).await;
    let unmounted = unmount_paths(store.mounts_of_vm_home(vm));
    store.remove_vm_home(vm)?;
    Ok(PurgeReport {
        unreadable: None,
        killed: victims
            .iter()
            .map(|v| format!("{} {}", v.name, v.pid))
            .collect(),
        unmounted,
    })
}

/// Unmounts `mounts`, deepest first; returns them.
fn unmount_paths(mut mounts: Vec<PathBuf>) -> Vec<PathBuf> {
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    for m in &mounts {
        match nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => tracing::warn!(mount = %m.display(), error = %e, "cannot unmount"),
        }
    }
    mounts
}

/// Runs container `c`'s poststop hooks (failures are warnings); the state names no process.
async fn poststop(c: &crate::state::ContainerRecord, sandbox: Option<&SandboxRecord>) {
    use crate::container::hooks::{self, Stage};
    let Ok(all) = hooks::host_hooks(&c.spec) else {
        return;
    };
    if all.poststop.is_empty() {
        return;
    }
    let netns = sandbox
        .and_then(|s| s.network.as_ref())
        .map(|n| n.netns.clone())
        .or_else(|| crate::container::spec::network_namespace(&c.spec));
    let state = hooks::state_json(Stage::Poststop, c.id.as_str(), 0, &c.bundle, &c.annotations);
    hooks::run_warn(Stage::Poststop, &all.poststop, &state, netns.as_deref()).await;
}

/// Removes sandbox `id` under `store` whatever state it is in: its VM's processes are killed,
/// its pod network, mounts, folder and VM run folder removed. `config` names the programs to
/// look for when the record is unreadable. Errors only when the sandbox does not exist, when a
/// live process holds its lock past the lock timeout, or when something could not be removed.
#[tracing::instrument(skip_all, fields(sandbox = %id))]
pub async fn purge(
    store: &Store,
    id: &SandboxId,
    config: &Config,
) -> Result<PurgeReport, SandboxError> {
    let dir = store.sandbox_dir(id);
    if std::fs::symlink_metadata(&dir).is_err() {
        // No folder: perhaps a run folder and processes of a creation that never published.
        let stray = victims(store.root(), id, None, &program_names(config));
        if stray.is_empty() {
            return Err(StoreError::SandboxNotFound {
                id: id.clone(),
                root: store.root().to_path_buf(),
            }
            .into());
        }
        kill_all(&stray).await;
        let run_dir = vm_run_dir(store.root(), id);
        let _ = std::fs::remove_dir_all(&run_dir);
        return Ok(PurgeReport {
            killed: stray
                .iter()
                .map(|v| format!("{} {}", v.name, v.pid))
                .collect(),
            ..PurgeReport::default()
        });
    }
    let lock = match store.lock_exclusive_timeout(id, LOCK_TIMEOUT) {
        Ok(lock) => Some(lock),
        // A folder without a lock file (made by hand, or torn): nobody can hold it.
        Err(StoreError::SandboxNotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let mut report = PurgeReport::default();
    let record = match store.load_sandbox(id) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(error = %e, "the sandbox's record is unusable; removing it anyway");
            report.unreadable = Some(crate::ErrorChain(&e).to_string());
            None
        }
    };
    let mut programs = program_names(config);
    if let Some(r) = &record {
        programs.extend(program_names(&r.config));
    }
    let victims = victims(store.root(), id, record.as_ref(), &programs);
    kill_all(&victims).await;
    report.killed = victims
        .iter()
        .map(|v| format!("{} {}", v.name, v.pid))
        .collect();
    if let Some(net) = record.as_ref().and_then(|r| r.network.as_ref()) {
        if let Some(rule) = &net.port_forward {
            if let Err(e) = crate::network::portfwd::remove_rule(&net.netns, rule).await {
                tracing::warn!(error = %e, "removing the port-forward rule");
            }
        }
        if !net.endpoints.is_empty() {
            if let Err(e) = crate::network::teardown(&net.netns, &net.endpoints).await {
                tracing::warn!(error = %e, "removing the pod network");
            }
        }
    }
    if let Some(cgroup) = record.as_ref().and_then(|r| r.host_cgroup.as_ref()) {
        // Kills whatever is still in it (a stand-in, a helper spawned unrecorded).
        crate::host_cgroup::remove(cgroup)?;
    }
    report.unmounted = unmount_under(store, id);
    if let Some(vm) = record.as_ref().and_then(|r| r.factory_vm.as_ref()) {
        // The adopted factory VM's folder (its processes were among the victims above).
        report
            .unmounted
            .extend(unmount_paths(store.mounts_of_vm_home(vm)));
        store.remove_vm_home(vm)?;
    } else if record.is_none() {
        // An unreadable record may have named a factory VM: its folder names the sandbox.
        for vm in store.vm_homes().unwrap_or_default() {
            if crate::factory::adopter(store, &vm).as_ref() == Some(id) {
                let ended = purge_vm_home(store, &vm, config).await?;
                report.killed.extend(ended.killed);
                report.unmounted.extend(ended.unmounted);
            }
        }
    }
    // Read before the records go: their poststop hooks run once the container is gone.
    let containers: Vec<_> = record
        .iter()
        .flat_map(|r| r.containers.iter())
        .filter_map(|c| store.load_container(id, c).ok())
        .collect();
    store.remove_sandbox_forced(id, lock)?;
    for c in &containers {
        poststop(c, record.as_ref()).await;
    }
    tracing::info!(killed = ?report.killed, unmounted = report.unmounted.len(), "sandbox purged");
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_the_root_only() {
        let root = Path::new("/run/runvm");
        assert!(lies_under(Path::new("/run/runvm/x/vm"), root));
        assert!(!lies_under(Path::new("/run/runvm"), root));
        assert!(!lies_under(Path::new("/run/runvm/../etc"), root));
        assert!(!lies_under(Path::new("/run/runvmx/vm"), root));
        assert!(!lies_under(Path::new("/etc"), root));
    }

    #[test]
    fn a_recorded_pid_of_another_program_is_no_victim() {
        // This test process is neither QEMU nor a helper: never a victim, whatever a record says.
        let me = std::process::id();
        let (start, _) = proc_start_time(me).unwrap();
        let programs = program_names(&Config::default());
        assert!(!is_vm_process(me, start, &programs));
        let own = proc_exe(me)
            .and_then(|e| e.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap();
        assert!(is_vm_process(me, start, std::slice::from_ref(&own)));
        assert!(
            !is_vm_process(me, start + 1, &[own]),
            "start time must match"
        );
    }
}
