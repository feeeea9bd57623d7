//! The OCI spec and process objects the host sends: parsed, checked (errors name the bad value)
//! and adjusted for the guest before libcontainer sees them.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Process, Spec};

use crate::error::{AgentError, Result};

/// The annotation by which the host asks a pod's container to join namespaces of its pod
/// sandbox container: `SANDBOX_CONTAINER_ID:TYPE,...`.
pub use runvm_protocol::POD_NAMESPACES_ANNOTATION as POD_NAMESPACES;

/// The namespace type of `name` (an OCI namespace type), for the namespaces a container may
/// join of another container in this VM (a pod's containers share `ipc`, `uts` and `pid`;
/// command-line containers also `network` and `cgroup`), with its name under `/proc/PID/ns/`.
pub fn joinable_namespace(name: &str) -> Option<(LinuxNamespaceType, &'static str)> {
    match name {
        "ipc" => Some((LinuxNamespaceType::Ipc, "ipc")),
        "uts" => Some((LinuxNamespaceType::Uts, "uts")),
        "pid" => Some((LinuxNamespaceType::Pid, "pid")),
        "network" => Some((LinuxNamespaceType::Network, "net")),
        "cgroup" => Some((LinuxNamespaceType::Cgroup, "cgroup")),
        _ => None,
    }
}

/// The cgroup (under the cgroup2 root) holding one cgroup per container.
pub const CGROUP_PARENT: &str = "/runvm";

/// The cgroup of container `id`, relative to the cgroup2 root.
pub fn cgroup_path(id: &str) -> PathBuf {
    Path::new(CGROUP_PARENT).join(id)
}

/// Whether the container gets a network namespace of its own (a `network` entry without a
/// path), in which the agent brings `lo` up as runc does.
pub fn new_network_namespace(spec: &Spec) -> bool {
    spec.linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| {
            nss.iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Network && ns.path().is_none())
        })
}

fn has_dot_dot(path: &Path) -> bool {
    path.components().any(|c| c == Component::ParentDir)
}

/// Parses and checks a container's spec, and adjusts it for the guest:
/// - the cgroup is always `/runvm/<id>` (a host cgroups path means nothing in the guest);
/// - a network namespace with a path (a host path, which the host should have stripped) is
///   dropped, so the container joins the VM's network namespace; one without a path (a new
///   namespace) is kept;
/// - `process.terminal` follows the stdio the host asked for.
pub fn parse_spec(json: &[u8], id: &str, terminal: bool) -> Result<Spec> {
    let mut spec: Spec = serde_json::from_slice(json).map_err(|e| {
        AgentError::invalid(format!(
            "oci_spec_json of container {id:?} is not a valid OCI runtime spec: {e}"
        ))
    })?;
    let process = spec.process_mut().as_mut().ok_or_else(|| {
        AgentError::invalid(format!("the spec of container {id:?} has no process"))
    })?;
    check_process(process, &format!("the spec of container {id:?}"))?;
    process.set_terminal(Some(terminal));

    let root = spec
        .root()
        .as_ref()
        .ok_or_else(|| AgentError::invalid(format!("the spec of container {id:?} has no root")))?;
    let rootfs = root.path();
    if !rootfs.is_absolute() || has_dot_dot(rootfs) {
        return Err(AgentError::invalid(format!(
            "root.path {} of container {id:?} must be an absolute guest path without \"..\"",
            rootfs.display()
        )));
    }
    let linux = spec.linux_mut().as_mut().ok_or_else(|| {
        AgentError::invalid(format!("the spec of container {id:?} has no linux section"))
    })?;
    linux.set_cgroups_path(Some(cgroup_path(id)));
    if let Some(namespaces) = linux.namespaces_mut() {
        namespaces.retain(|ns| {
            let host_net = ns.typ() == LinuxNamespaceType::Network && ns.path().is_some();
            if host_net {
                tracing::warn!(container = id, path = ?ns.path(),
                    "dropping a network namespace path: the container joins the VM's network");
            }
            !host_net
        });
    }
    Ok(spec)
}

/// Parses and checks the process of an exec.
pub fn parse_process(json: &[u8], id: &str, exec_id: &str, terminal: bool) -> Result<Process> {
    let mut process: Process = serde_json::from_slice(json).map_err(|e| {
        AgentError::invalid(format!(
            "oci_process_json of exec {exec_id:?} in container {id:?} is not a valid OCI \
             process: {e}"
        ))
    })?;
    check_process(
        &process,
        &format!("the process of exec {exec_id:?} in container {id:?}"),
    )?;
    process.set_terminal(Some(terminal));
    Ok(process)
}

fn check_process(process: &Process, what: &str) -> Result<()> {
    let args = process.args().as_deref().unwrap_or_default();
    if args.is_empty() || args[0].is_empty() {
        return Err(AgentError::invalid(format!(
            "{what}: process.args is empty"
        )));
    }
    if !process.cwd().is_absolute() {
        return Err(AgentError::invalid(format!(
            "{what}: process.cwd {:?} is not an absolute path",
            process.cwd()
        )));
    }
    Ok(())
}

/// Checks a parsed spec against the guest's file system (storages mounted): the rootfs is a
/// folder, and the process's cwd exists in it (unless a mount of the spec provides it).
pub fn check_rootfs(spec: &Spec, id: &str) -> Result<()> {
    let Some(root) = spec.root().as_ref() else {
        return Err(AgentError::invalid(format!(
            "the spec of container {id:?} has no root"
        )));
    };
    let rootfs = root.path();
    match std::fs::metadata(rootfs) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(AgentError::invalid(format!(
                "rootfs {} of container {id:?} is not a directory",
                rootfs.display()
            )))
        }
        Err(e) => {
            return Err(AgentError::invalid(format!(
                "rootfs {} of container {id:?} does not exist in the guest ({e}); is the \
                 storage holding it listed in the request?",
                rootfs.display()
            )))
        }
    }
    if let Some(process) = spec.process() {
        let cwd = process.cwd();
        if !under_a_mount(spec, cwd) {
            let found = resolve_in_root(rootfs, cwd).and_then(std::fs::metadata);
            if !found.map(|m| m.is_dir()).unwrap_or(false) {
                return Err(AgentError::invalid(format!(
                    "process.cwd {} of container {id:?} is not a directory in its rootfs {}",
                    cwd.display(),
                    rootfs.display()
                )));
            }
        }
    }
    Ok(())
}

/// Whether `path` (in the container) is at or under a mount destination of the spec.
fn under_a_mount(spec: &Spec, path: &Path) -> bool {
    spec.mounts()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|m| path.starts_with(m.destination()))
}

/// The host path of `path` inside the tree `root`, following symlinks as the container would
/// see them (an absolute link target restarts at `root`; `..` never climbs above it).
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    let mut pending: VecDeque<OsString> = VecDeque::new();
    push_front(&mut pending, path);
    let mut resolved = PathBuf::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == "." || part.is_empty() {
            continue;
        }
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let on_host = root.join(&candidate);
        let meta = std::fs::symlink_metadata(&on_host)?;
        if meta.file_type().is_symlink() {
            links += 1;
            if links > 40 {
                return Err(io::Error::from_raw_os_error(libc::ELOOP));
            }
            let target = std::fs::read_link(&on_host)?;
            if target.is_absolute() {
                resolved = PathBuf::new();
            }
            push_front(&mut pending, &target);
        } else {
            resolved = candidate;
        }
    }
    Ok(root.join(resolved))
}

/// Puts the components of `path` (as names, `..` and `.`) before those pending.
fn push_front(pending: &mut VecDeque<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some("..".into()),
            Component::CurDir | Component::RootDir | Component::Prefix(_) => None,
        })
        .collect();
    for p in parts.into_iter().rev() {
        pending.push_front(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ttrpc::Code;

    fn spec_json(extra: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
        let mut v = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "user": {"uid": 0, "gid": 0},
                "args": ["sh"],
                "env": ["PATH=/bin"],
                "cwd": "/"
            },
            "root": {"path": "/run/runvm/shared/c1/rootfs"},
            "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {
                "cgroupsPath": "/kubepods/whatever",
                "namespaces": [
                    {"type": "pid"},
                    {"type": "network", "path": "/proc/1234/ns/net"},
                    {"type": "mount"}
                ]
            }
        });
        extra(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    fn invalid(result: Result<impl std::fmt::Debug>) -> String {
        let err = result.unwrap_err();
        assert_eq!(err.code, Code::INVALID_ARGUMENT, "{err}");
        err.message
    }

    #[test]
    fn a_good_spec_is_adjusted_for_the_guest() {
        let spec = parse_spec(&spec_json(|_| {}), "c1", true).unwrap();
        let linux = spec.linux().as_ref().unwrap();
        assert_eq!(
            linux.cgroups_path().as_deref(),
            Some(Path::new("/runvm/c1"))
        );
        let types: Vec<_> = linux
            .namespaces()
            .as_ref()
            .unwrap()
            .iter()
            .map(|n| n.typ())
            .collect();
        assert_eq!(types, [LinuxNamespaceType::Pid, LinuxNamespaceType::Mount]);
        assert_eq!(spec.process().as_ref().unwrap().terminal(), Some(true));
    }

    #[test]
    fn a_new_network_namespace_is_kept() {
        let json =
            spec_json(|v| v["linux"]["namespaces"][1] = serde_json::json!({"type": "network"}));
        let spec = parse_spec(&json, "c1", false).unwrap();
        let n = spec
            .linux()
            .as_ref()
            .unwrap()
            .namespaces()
            .as_ref()
            .unwrap()
            .len();
        assert_eq!(n, 3);
        assert!(new_network_namespace(&spec));
    }

    #[test]
    fn only_a_network_namespace_without_a_path_is_a_new_one() {
        // The host's namespace path is dropped: the container shares the VM's network.
        let shared = parse_spec(&spec_json(|_| {}), "c1", false).unwrap();
        assert!(!new_network_namespace(&shared));
        let none = spec_json(|v| v["linux"]["namespaces"] = serde_json::json!([{"type": "pid"}]));
        assert!(!new_network_namespace(
            &parse_spec(&none, "c1", false).unwrap()
        ));
    }

    #[test]
    fn bad_specs_are_invalid_arguments_naming_the_value() {
        let m = invalid(parse_spec(b"{not json", "c1", false));
        assert!(m.contains("not a valid OCI runtime spec"), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| {
                v.as_object_mut().unwrap().remove("process");
            }),
            "c1",
            false,
        ));
        assert!(m.contains("has no process"), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| v["process"]["args"] = serde_json::json!([])),
            "c1",
            false,
        ));
        assert!(m.contains("process.args is empty"), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| v["process"]["cwd"] = "work".into()),
            "c1",
            false,
        ));
        assert!(m.contains("\"work\" is not an absolute path"), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| v["root"]["path"] = "rootfs".into()),
            "c1",
            false,
        ));
        assert!(m.contains("root.path rootfs"), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| v["root"]["path"] = "/run/runvm/shared/../../etc".into()),
            "c1",
            false,
        ));
        assert!(m.contains("without \"..\""), "{m}");
        let m = invalid(parse_spec(
            &spec_json(|v| {
                v.as_object_mut().unwrap().remove("linux");
            }),
            "c1",
            false,
        ));
        assert!(m.contains("no linux section"), "{m}");
    }

    #[test]
    fn exec_process_is_checked() {
        let ok = br#"{"user":{"uid":0,"gid":0},"args":["echo","hi"],"cwd":"/"}"#;
        let p = parse_process(ok, "c1", "e1", false).unwrap();
        assert_eq!(p.terminal(), Some(false));
        let m = invalid(parse_process(br#"{"args":["x"]}"#, "c1", "e1", false));
        assert!(m.contains("exec \"e1\""), "{m}");
        let m = invalid(parse_process(
            br#"{"user":{"uid":0,"gid":0},"args":[],"cwd":"/"}"#,
            "c1",
            "e1",
            false,
        ));
        assert!(m.contains("process.args is empty"), "{m}");
    }

    #[test]
    fn rootfs_and_cwd_are_checked_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir_all(rootfs.join("home/app")).unwrap();
        let with = |root: &Path, cwd: &str| {
            let root = root.display().to_string();
            let cwd = cwd.to_string();
            parse_spec(
                &spec_json(move |v| {
                    v["root"]["path"] = root.into();
                    v["process"]["cwd"] = cwd.into();
                }),
                "c1",
                false,
            )
            .unwrap()
        };
        check_rootfs(&with(&rootfs, "/home/app"), "c1").unwrap();
        // Under a mount destination: provided at run time, not checked.
        check_rootfs(&with(&rootfs, "/proc/self"), "c1").unwrap();
        let m = invalid(check_rootfs(&with(&rootfs, "/nonexistent"), "c1"));
        assert!(m.contains("process.cwd /nonexistent"), "{m}");
        let missing = dir.path().join("missing");
        let m = invalid(check_rootfs(&with(&missing, "/"), "c1"));
        assert!(m.contains(&format!("rootfs {}", missing.display())), "{m}");
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/busybox"), b"").unwrap();
        std::os::unix::fs::symlink("/bin/busybox", root.join("bin/sh")).unwrap();
        std::os::unix::fs::symlink("../../../../bin", root.join("escape")).unwrap();
        std::os::unix::fs::symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, Path::new("/bin/sh")).unwrap(),
            root.join("bin/busybox")
        );
        assert_eq!(
            resolve_in_root(root, Path::new("/escape/busybox")).unwrap(),
            root.join("bin/busybox")
        );
        assert!(resolve_in_root(root, Path::new("/loop")).is_err());
        assert!(resolve_in_root(root, Path::new("/bin/nothing")).is_err());
    }
}
