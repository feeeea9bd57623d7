//! The sandbox VM in its pod's host cgroup (Kata's `sandbox_cgroup_only`).
//!
//! QEMU, virtiofsd, vhost-device-vsock and the CLI's stand-ins go into the host cgroup named
//! by the sandbox container's `linux.cgroupsPath`, with the spec's `linux.resources` written
//! there as runc writes them (through youki's `libcgroups`), the memory limit raised by
//! `runtime.vm_memory_overhead_mib` (the VM's own memory: QEMU, its helpers, the guest kernel
//! and agent). So kubelet accounts and limits the pod's VM as it would the pod's processes.
//!
//! Paths, on cgroup v1 (each hierarchy), hybrid (the v1 hierarchies) and v2 alike:
//! - cgroupfs, absolute (`/kubepods/besteffort/pod<uid>/<id>`) or relative (`runvm/<id>`):
//!   both under the hierarchy's root (as youki does; runc takes a relative path under its own
//!   cgroup). A `.` or `..` component, or the root itself, is refused.
//! - systemd's `slice:prefix:name` (`kubepods-besteffort-pod<uid>.slice:cri-containerd:<id>`):
//!   converted to the path systemd gives that unit, the slice expanded into its parents
//!   (`/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
//!   cri-containerd-<id>.scope`), and made directly in cgroupfs: runvm does not ask systemd
//!   for a scope over D-Bus, so it works on hosts without systemd as well.
//!
//! The record (`sandbox.json`'s `host_cgroup`) keeps the path, so any process can remove it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use libcgroups::common::{CgroupManager, CgroupSetup, ControllerOpt};
use oci_spec::runtime::{
    LinuxCpuBuilder, LinuxMemoryBuilder, LinuxPidsBuilder, LinuxResources, LinuxResourcesBuilder,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where the cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The valid forms of `linux.cgroupsPath`, for messages.
const VALID_PATHS: &str = "valid: a cgroupfs path (absolute, e.g. /kubepods/besteffort/pod1/c1, \
    or relative to the cgroup root) without `.` or `..` components, or systemd's \
    slice:prefix:name (e.g. kubepods-besteffort-pod1.slice:cri-containerd:c1)";

/// A host cgroup problem.
#[derive(Debug, thiserror::Error)]
pub enum HostCgroupError {
    /// `linux.cgroupsPath` is not a usable cgroup path.
    #[error("linux.cgroupsPath {given:?} is invalid: {reason}; {VALID_PATHS}")]
    InvalidPath {
        /// The value as given.
        given: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A `linux.resources` value cannot be written to a cgroup.
    #[error("linux.resources.{field} = {value} is invalid; valid: {valid}")]
    InvalidResource {
        /// The field, e.g. `memory.limit`.
        field: &'static str,
        /// The value as given.
        value: String,
        /// What is valid.
        valid: &'static str,
    },
    /// `linux.resources` does not parse.
    #[error("linux.resources is invalid: {0}")]
    Resources(String),
    /// The cgroup could not be made, written or removed.
    #[error("host cgroup {}: cannot {action}: {reason}", path.display())]
    Io {
        /// The cgroup (or file) acted on.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The cause.
        reason: String,
    },
}

type Result<T> = std::result::Result<T, HostCgroupError>;

/// A host cgroup as a sandbox's spec asks for it: validated, not made yet.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCgroupRequest {
    /// Where it is: the spec's path as given and the cgroupfs path it names.
    pub record: HostCgroupRecord,
    /// What is written there: the spec's resources, memory limit raised by the VM overhead.
    pub resources: LinuxResources,
}

/// A host cgroup as recorded in `sandbox.json`: enough for any process to remove it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCgroupRecord {
    /// The spec's `linux.cgroupsPath`, as given.
    pub given: String,
    /// The cgroupfs path it names, absolute under each hierarchy's root.
    pub path: PathBuf,
}

/// The cgroupfs path `given` (a `linux.cgroupsPath`) names, absolute under the hierarchy's
/// root; refused by name when it would leave the root, is the root, or is a malformed
/// systemd form (see the module documentation).
pub fn cgroupfs_path(given: &str) -> Result<PathBuf> {
    let invalid = |reason: &str| HostCgroupError::InvalidPath {
        given: given.to_string(),
        reason: reason.to_string(),
    };
    if given.contains(['\0', '\n']) {
        return Err(invalid("it holds a NUL or newline"));
    }
    let path = if !given.starts_with('/') && given.contains(':') {
        systemd_path(given).map_err(|r| invalid(&r))?
    } else {
        given.to_string()
    };
    let mut clean = PathBuf::from("/");
    // Split by hand: `Path::components` drops inner `.` silently.
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(invalid(
                "a `.` or `..` component (a path must stay under the cgroup root)",
            ));
        }
        clean.push(part);
    }
    if clean == Path::new("/") {
        return Err(invalid("it names the root cgroup itself"));
    }
    Ok(clean)
}

/// systemd's `slice:prefix:name` as the path systemd gives the unit (runc's and libcgroups'
/// layout): `a-b.slice:p:n` is `/a.slice/a-b.slice/p-n.scope`; an empty slice is
/// `system.slice` (runc's default); a name ending in `.slice` is that slice itself.
fn systemd_path(given: &str) -> std::result::Result<String, String> {
    let parts: Vec<&str> = given.split(':').collect();
    let [slice, prefix, name] = parts[..] else {
        return Err(format!(
            "a systemd path has three `:`-separated parts, this has {}",
            parts.len()
        ));
    };
    if name.is_empty() {
        return Err("the systemd unit name (third part) is empty".into());
    }
    for (what, part) in [("slice", slice), ("prefix", prefix), ("name", name)] {
        if part.contains('/') || part == "." || part == ".." {
            return Err(format!(
                "the systemd {what} {part:?} holds `/` or is `.`/`..`"
            ));
        }
    }
    let slice = if slice.is_empty() {
        "system.slice"
    } else {
        slice
    };
    let mut path = expand_slice(slice)?;
    if name.ends_with(".slice") {
        // A slice named as the unit: it lives under its parents too, not under `slice`.
        return expand_slice(name);
    }
    let unit = if prefix.is_empty() {
        format!("{name}.scope")
    } else {
        format!("{prefix}-{name}.scope")
    };
    path.push('/');
    path.push_str(&unit);
    Ok(path)
}

/// `a-b-c.slice` as `/a.slice/a-b.slice/a-b-c.slice` (systemd's `ExpandSlice`); `-.slice`
/// is the root slice.
fn expand_slice(slice: &str) -> std::result::Result<String, String> {
    let Some(stem) = slice.strip_suffix(".slice") else {
        return Err(format!(
            "the systemd slice {slice:?} does not end in `.slice`"
        ));
    };
    if stem == "-" {
        return Ok(String::new());
    }
    if stem.is_empty() || stem.starts_with('-') || stem.ends_with('-') || stem.contains("--") {
        return Err(format!(
            "the systemd slice {slice:?} is malformed (an empty, leading, trailing or doubled `-`)"
        ));
    }
    let mut path = String::new();
    let mut prefix = String::new();
    for (i, part) in stem.split('-').enumerate() {
        if i > 0 {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push('/');
        path.push_str(&prefix);
        path.push_str(".slice");
    }
    Ok(path)
}

/// The resources written to the host cgroup: the spec's memory limit (and swap) raised by
/// `overhead_mib`, CPU shares, quota, period and cpuset, and the pids limit; each value
/// checked (zero or a negative other than -1, "no limit", is refused by name).
pub fn host_resources(spec: Option<&LinuxResources>, overhead_mib: u32) -> Result<LinuxResources> {
    let overhead = i64::from(overhead_mib) * 1024 * 1024;
    let bad = |field, value: i64, valid| HostCgroupError::InvalidResource {
        field,
        value: value.to_string(),
        valid,
    };
    let raise = |v: i64| {
        if v == -1 {
            -1
        } else {
            v.saturating_add(overhead)
        }
    };
    let mut out = LinuxResourcesBuilder::default();
    let Some(spec) = spec else {
        return build(out);
    };
    if let Some(memory) = spec.memory() {
        let mut m = LinuxMemoryBuilder::default();
        if let Some(limit) = memory.limit() {
            if limit != -1 && limit <= 0 {
                return Err(bad(
                    "memory.limit",
                    limit,
                    "a positive byte count, or -1 (no limit)",
                ));
            }
            m = m.limit(raise(limit));
        }
        if let Some(swap) = memory.swap() {
            if swap != -1 && swap <= 0 {
                return Err(bad(
                    "memory.swap",
                    swap,
                    "a positive byte count, or -1 (no limit)",
                ));
            }
            m = m.swap(raise(swap));
        }
        out = out.memory(
            m.build()
                .map_err(|e| HostCgroupError::Resources(e.to_string()))?,
        );
    }
    if let Some(cpu) = spec.cpu() {
        let mut c = LinuxCpuBuilder::default();
        if let Some(shares) = cpu.shares() {
            if !(2..=262_144).contains(&shares) {
                return Err(bad("cpu.shares", shares as i64, "2 to 262144"));
            }
            c = c.shares(shares);
        }
        if let Some(quota) = cpu.quota() {
            if quota != -1 && quota < 1000 {
                return Err(bad(
                    "cpu.quota",
                    quota,
                    "1000 or more (µs per period), or -1 (no limit)",
                ));
            }
            c = c.quota(quota);
        }
        if let Some(period) = cpu.period() {
            if !(1000..=1_000_000).contains(&period) {
                return Err(bad("cpu.period", period as i64, "1000 to 1000000 (µs)"));
            }
            c = c.period(period);
        }
        if let Some(cpus) = cpu.cpus() {
            c = c.cpus(cpus.clone());
        }
        if let Some(mems) = cpu.mems() {
            c = c.mems(mems.clone());
        }
        out = out.cpu(
            c.build()
                .map_err(|e| HostCgroupError::Resources(e.to_string()))?,
        );
    }
    if let Some(pids) = spec.pids() {
        let limit = pids.limit();
        if limit != -1 && limit <= 0 {
            return Err(bad(
                "pids.limit",
                limit,
                "a positive count, or -1 (no limit)",
            ));
        }
        out = out.pids(
            LinuxPidsBuilder::default()
                .limit(limit)
                .build()
                .map_err(|e| HostCgroupError::Resources(e.to_string()))?,
        );
    }
    build(out)
}

fn build(builder: LinuxResourcesBuilder) -> Result<LinuxResources> {
    builder
        .build()
        .map_err(|e| HostCgroupError::Resources(e.to_string()))
}

/// The host cgroup a sandbox's OCI `spec` asks for (`None` without a `linux.cgroupsPath`),
/// checked: nothing is made.
pub fn request_from_spec(spec: &Value, overhead_mib: u32) -> Result<Option<HostCgroupRequest>> {
    let linux = spec.get("linux");
    let given = match linux.and_then(|l| l.get("cgroupsPath")) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) if s.is_empty() => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(HostCgroupError::InvalidPath {
                given: other.to_string(),
                reason: "not a string".into(),
            })
        }
    };
    let path = cgroupfs_path(&given)?;
    let resources = match linux.and_then(|l| l.get("resources")) {
        None | Some(Value::Null) => None,
        Some(r) => Some(
            serde_json::from_value::<LinuxResources>(r.clone())
                .map_err(|e| HostCgroupError::Resources(e.to_string()))?,
        ),
    };
    Ok(Some(HostCgroupRequest {
        record: HostCgroupRecord { given, path },
        resources: host_resources(resources.as_ref(), overhead_mib)?,
    }))
}

/// The host cgroup `record` with new `resources` (a `linux.resources` object, as `update`
/// takes it; only what it names is written), checked: nothing is written yet ([`apply`]).
pub fn update_request(
    record: &HostCgroupRecord,
    resources: &Value,
    overhead_mib: u32,
) -> Result<HostCgroupRequest> {
    let spec = serde_json::from_value::<LinuxResources>(resources.clone())
        .map_err(|e| HostCgroupError::Resources(e.to_string()))?;
    Ok(HostCgroupRequest {
        record: record.clone(),
        resources: host_resources(Some(&spec), overhead_mib)?,
    })
}

/// The host's cgroup layout.
fn setup() -> Result<CgroupSetup> {
    quiet(libcgroups::common::get_cgroup_setup).map_err(|e| HostCgroupError::Io {
        path: CGROUP_ROOT.into(),
        action: "detect the cgroup setup (v1, hybrid or v2)",
        reason: e.to_string(),
    })
}

/// Runs `f` with libcgroups' own logging silenced (it warns about every v1 controller the
/// host lacks); its errors still come back as values.
fn quiet<T>(f: impl FnOnce() -> T) -> T {
    tracing::subscriber::with_default(tracing::subscriber::NoSubscriber::default(), f)
}

/// The cgroup's folder in each hierarchy (one on v2; one per mounted controller hierarchy on
/// v1 and hybrid, co-mounted controllers sharing one).
pub fn cgroup_dirs(path: &Path) -> Result<Vec<PathBuf>> {
    let relative = path.strip_prefix("/").unwrap_or(path);
    let mut dirs: Vec<PathBuf> = match setup()? {
        CgroupSetup::Unified => vec![Path::new(CGROUP_ROOT).join(relative)],
        CgroupSetup::Legacy | CgroupSetup::Hybrid => {
            quiet(libcgroups::v1::util::list_supported_mount_points)
                .map_err(|e| HostCgroupError::Io {
                    path: CGROUP_ROOT.into(),
                    action: "list the cgroup v1 hierarchies",
                    reason: e.to_string(),
                })?
                .into_values()
                .map(|mount| mount.join(relative))
                .collect()
        }
    };
    dirs.sort();
    dirs.dedup();
    Ok(dirs)
}

/// The `cgroup.procs` files the VM's processes write themselves to.
pub fn procs_files(path: &Path) -> Result<Vec<PathBuf>> {
    Ok(cgroup_dirs(path)?
        .into_iter()
        .map(|d| d.join("cgroup.procs"))
        .collect())
}

/// Makes the cgroup and writes its resources. On error whatever was made is removed again.
pub fn create(request: &HostCgroupRequest) -> Result<()> {
    // Refused before anything is made, so the undo below never touches another's cgroup.
    refuse_in_use(&request.record.path)?;
    let made = make_dirs(&request.record.path).and_then(|()| apply(request));
    if let Err(e) = made {
        if let Err(rm) = remove(&request.record) {
            tracing::warn!(error = %rm, "removing a half-made host cgroup");
        }
        return Err(e);
    }
    tracing::debug!(path = %request.record.path.display(), "host cgroup made");
    Ok(())
}

/// An existing cgroup is taken over only when empty: its processes would be killed with it.
fn refuse_in_use(path: &Path) -> Result<()> {
    for dir in cgroup_dirs(path)? {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if !procs.trim().is_empty() {
            return Err(HostCgroupError::Io {
                path: dir,
                action: "take it over",
                reason: format!(
                    "it exists with processes in it ({})",
                    procs.split_whitespace().collect::<Vec<_>>().join(" ")
                ),
            });
        }
    }
    Ok(())
}

fn make_dirs(path: &Path) -> Result<()> {
    let setup = setup()?;
    let relative = path.strip_prefix("/").unwrap_or(path);
    if let CgroupSetup::Unified = setup {
        // Controllers enabled on the way down, as libcgroups does for a new cgroup; a parent
        // that refuses (processes in it) leaves that controller off, and a limit needing it
        // then fails when written.
        let root = Path::new(CGROUP_ROOT);
        let available =
            std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        let mut dir = root.to_path_buf();
        for component in relative.components() {
            for c in available.split_whitespace() {
                let _ = std::fs::write(dir.join("cgroup.subtree_control"), format!("+{c}"));
            }
            dir.push(component);
            mkdir(&dir)?;
        }
        return Ok(());
    }
    for dir in cgroup_dirs(path)? {
        let mount = dir
            .ancestors()
            .nth(relative.components().count())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.clone());
        let cpuset = mount.join("cpuset.cpus").exists();
        let mut current = mount;
        for component in relative.components() {
            let parent = current.clone();
            current.push(component);
            mkdir(&current)?;
            if cpuset {
                // A new v1 cpuset is empty, and nothing can join an empty one: inherit.
                for file in ["cpuset.cpus", "cpuset.mems"] {
                    inherit(&parent, &current, file)?;
                }
            }
        }
    }
    Ok(())
}

fn mkdir(dir: &Path) -> Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(HostCgroupError::Io {
            path: dir.to_path_buf(),
            action: "create the folder",
            reason: e.to_string(),
        }),
    }
}

fn inherit(parent: &Path, child: &Path, file: &str) -> Result<()> {
    let io = |path: PathBuf, action| {
        move |e: std::io::Error| HostCgroupError::Io {
            path,
            action,
            reason: e.to_string(),
        }
    };
    let mine = std::fs::read_to_string(child.join(file))
        .map_err(io(child.join(file), "read the cpuset"))?;
    if !mine.trim().is_empty() {
        return Ok(());
    }
    let theirs = std::fs::read_to_string(parent.join(file))
        .map_err(io(parent.join(file), "read the parent's cpuset"))?;
    std::fs::write(child.join(file), theirs.trim())
        .map_err(io(child.join(file), "copy the parent's cpuset"))
}

/// Writes `request`'s resources to its cgroup, which exists.
pub fn apply(request: &HostCgroupRequest) -> Result<()> {
    let path = &request.record.path;
    let options = ControllerOpt {
        resources: &request.resources,
        disable_oom_killer: false,
        oom_score_adj: None,
        freezer_state: None,
    };
    let failed = |reason: String| HostCgroupError::Io {
        path: path.clone(),
        action: "write the resources",
        reason,
    };
    quiet(|| match setup()? {
        CgroupSetup::Unified => {
            let relative = path.strip_prefix("/").unwrap_or(path).to_path_buf();
            libcgroups::v2::manager::Manager::new(CGROUP_ROOT.into(), relative)
                .and_then(|m| m.apply(&options))
                .map_err(|e| failed(e.to_string()))
        }
        CgroupSetup::Legacy | CgroupSetup::Hybrid => libcgroups::v1::manager::Manager::new(path)
            .and_then(|m| m.apply(&options))
            .map_err(|e| failed(e.to_string())),
    })
}

/// Removes the cgroup in every hierarchy, killing any process still in it (none should be:
/// the VM is stopped first). A cgroup already gone is fine.
pub fn remove(record: &HostCgroupRecord) -> Result<()> {
    // A record is data from disk: only a path `cgroupfs_path` accepts is acted on.
    let path = cgroupfs_path(&record.path.to_string_lossy())?;
    let mut first_error = None;
    for dir in cgroup_dirs(&path)? {
        if let Err(e) = remove_dir(&dir) {
            tracing::warn!(error = %e, "removing a host cgroup");
            first_error.get_or_insert(e);
        }
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn remove_dir(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    let io = |action, e: std::io::Error| HostCgroupError::Io {
        path: dir.to_path_buf(),
        action,
        reason: e.to_string(),
    };
    // Only a leaf is runvm's: a record naming a parent (kubelet's pod cgroup) kills nothing.
    let children = std::fs::read_dir(dir)
        .map_err(|e| io("read the folder", e))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .count();
    if children > 0 {
        return Err(HostCgroupError::Io {
            path: dir.to_path_buf(),
            action: "remove it",
            reason: format!("it holds {children} child cgroup(s): not a VM's cgroup"),
        });
    }
    let mut last = None;
    // The kernel frees a cgroup only once its last process is reaped: retry a while.
    for attempt in 0..50u32 {
        if let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                // A zombie (a killed VM process its parent has not reaped yet) only needs time.
                let live = u32::try_from(pid)
                    .ok()
                    .and_then(runvm_hypervisor::qemu::proc_start_time)
                    .is_some_and(|(_, zombie)| !zombie);
                if attempt == 0 && live {
                    tracing::warn!(pid, dir = %dir.display(), "killing a process left in the host cgroup");
                }
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20 * u64::from(attempt.min(5) + 1)));
    }
    Err(io(
        "remove the folder",
        last.unwrap_or_else(|| std::io::Error::other("still busy")),
    ))
}

#[cfg(test)]
#[path = "host_cgroup_tests.rs"]
mod tests;
