//! The OCI bundle on the host, turned into the spec the guest agent runs.
//!
//! The host validates `config.json` (with the JSON path of any problem), resolves the rootfs and
//! the bind-mount sources, and rewrites every host path to where the guest sees it through the
//! sandbox's virtio-fs share. Host hooks stay on the host; a network namespace path is the
//! VM's (dropped from the guest spec); any other namespace path is refused, except the ones a
//! CRI pod's container gets to join its sandbox container's namespaces in the pod's VM.

use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use super::tmpfs::{guest_tmpfs, GuestTmpfs};
use crate::regular_file::{read_regular_file_to_string, FileError};

/// Where the guest mounts the sandbox's shared folder.
pub const GUEST_SHARED_DIR: &str = "/run/runvm/shared";

/// The largest `config.json` accepted, bytes (2 MiB). Specs are a few KiB, tens with many
/// mounts and variables; the spec travels to the agent in one ttrpc message, whose limit is
/// 4 MiB, so a spec much larger could not be sent anyway.
pub const MAX_CONFIG_JSON_BYTES: u64 = 2 << 20;

/// Errors in a bundle.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The bundle path is unusable.
    #[error("bundle {}: {reason}", path.display())]
    Bundle {
        /// The bundle path given.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// config.json cannot be read, is not a regular file, or is larger than
    /// [`MAX_CONFIG_JSON_BYTES`].
    #[error(transparent)]
    Read(#[from] FileError),
    /// config.json is not valid JSON or not a valid OCI spec.
    #[error("{}: {json_path}: {message}", file.display())]
    Invalid {
        /// The file.
        file: PathBuf,
        /// JSON path of the problem (`process.args`, `mounts[2].source`, `.` for the whole).
        json_path: String,
        /// What is wrong.
        message: String,
    },
}

/// A host path the guest must see, bind-mounted into the shared folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareBind {
    /// The host path.
    pub source: PathBuf,
    /// Where it goes, relative to the sandbox's shared folder.
    pub target: PathBuf,
    /// Mounted read-only on the host side too.
    pub readonly: bool,
    /// The bind asks for `private` or `rprivate` propagation: the copy in the shared folder is
    /// made private (mounts made later under the source do not reach the guest); otherwise it
    /// is a slave of the source (they do, when the source is a shared mount).
    pub private: bool,
}

/// A bundle ready for the guest.
#[derive(Debug, Clone, PartialEq)]
pub struct PreparedSpec {
    /// The spec as the guest must see it.
    pub guest_spec: Value,
    /// The spec as given (stored with the container).
    pub host_spec: Value,
    /// The rootfs first, then each bind-mount source shared through virtio-fs.
    pub binds: Vec<ShareBind>,
    /// The bind mounts whose source is the pod's `/dev/shm` or a memory-backed emptyDir: a
    /// tmpfs in the guest instead (see [`super::tmpfs`]).
    pub tmpfs: Vec<GuestTmpfs>,
    /// Whether `process.terminal` is set.
    pub terminal: bool,
    /// The hooks the host runs (`createContainer` and `startContainer` stay in the guest spec,
    /// for libcontainer to run in the container's namespaces).
    pub hooks: super::hooks::HostHooks,
    /// The runvm container whose namespaces this one joins, named by a namespace path that
    /// the resolver given to [`prepare_resolving`] recognised (`/proc/PID/ns/TYPE` of that
    /// container's pid): the container must be created in that container's VM.
    pub member_of: Option<String>,
    /// The network namespace path is that container's (joined in the guest), not a host one.
    pub network_joined: bool,
}

/// Tells which runvm container, if any, a namespace path given in a spec belongs to (the
/// command line's: `/proc/PID/ns/TYPE` where PID is a container's pid, as `state` prints it).
pub type NamespaceOwner<'a> = &'a dyn Fn(&Path) -> Option<String>;

/// The namespace types a container may join of another container in the same VM, with the
/// name of each under `/proc/PID/ns/`.
pub const JOINABLE_NAMESPACES: [(&str, &str); 5] = [
    ("ipc", "ipc"),
    ("uts", "uts"),
    ("pid", "pid"),
    ("network", "net"),
    ("cgroup", "cgroup"),
];

pub use runvm_protocol::POD_NAMESPACES_ANNOTATION;

fn invalid(file: &Path, json_path: &str, message: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        file: file.to_path_buf(),
        json_path: json_path.to_string(),
        message: message.into(),
    }
}

/// An OCI bundle read and validated once, for one container: every later step (the VM's
/// network namespace, annotations, the terminal, the guest spec, the hooks) uses this value, so
/// what was validated is what is used, whatever happens to `config.json` meanwhile.
#[derive(Debug, Clone, PartialEq)]
pub struct Bundle {
    /// The bundle folder (absolute).
    pub path: PathBuf,
    /// The spec as given (validated).
    pub spec: Value,
    /// The spec prepared for the guest.
    pub prepared: PreparedSpec,
    /// The spec's annotations (string values).
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The host network namespace the spec names (`linux.namespaces[type=network].path`),
    /// unless that path is another runvm container's (see [`PreparedSpec::member_of`]).
    pub netns: Option<PathBuf>,
}

impl Bundle {
    /// Reads `BUNDLE/config.json` once and checks and prepares it for container
    /// `container_id`; no namespace path is another container's.
    pub fn load(path: &Path, container_id: &str) -> Result<Bundle, SpecError> {
        Bundle::load_resolving(path, container_id, &|_| None)
    }

    /// [`Bundle::load`], with `owner` telling which namespace paths are other runvm
    /// containers' (whose namespaces this container then joins, in their VM).
    pub fn load_resolving(
        path: &Path,
        container_id: &str,
        owner: NamespaceOwner<'_>,
    ) -> Result<Bundle, SpecError> {
        let spec = load(path)?;
        let prepared = prepare_resolving(path, &spec, container_id, owner)?;
        let annotations = spec
            .get("annotations")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Bundle {
            path: path.to_path_buf(),
            netns: network_namespace(&spec).filter(|_| !prepared.network_joined),
            annotations,
            prepared,
            spec,
        })
    }

    /// Whether the container's process has a terminal.
    pub fn terminal(&self) -> bool {
        self.prepared.terminal
    }
}

/// The path of the spec's network namespace (`linux.namespaces[type=network].path`), where
/// containerd and CNI put the pod's devices; the VM joins it.
pub fn network_namespace(spec: &Value) -> Option<PathBuf> {
    spec.pointer("/linux/namespaces")?
        .as_array()?
        .iter()
        .find(|ns| ns.get("type").and_then(|t| t.as_str()) == Some("network"))?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(Into::into)
}

/// Reads and checks `BUNDLE/config.json`: a regular file of at most [`MAX_CONFIG_JSON_BYTES`].
pub fn load(bundle: &Path) -> Result<Value, SpecError> {
    if !bundle.is_absolute() {
        return Err(SpecError::Bundle {
            path: bundle.to_path_buf(),
            reason: "is not an absolute path".into(),
        });
    }
    if !bundle.is_dir() {
        return Err(SpecError::Bundle {
            path: bundle.to_path_buf(),
            reason: "does not exist or is not a folder".into(),
        });
    }
    let file = bundle.join("config.json");
    // Read once, with a cap, refusing anything but a regular file: what is read is what is
    // checked and used.
    let text = read_regular_file_to_string(&file, MAX_CONFIG_JSON_BYTES)?;
    parse(&file, &text)
}

/// Parses spec text, naming the JSON path of a problem.
pub fn parse(file: &Path, text: &str) -> Result<Value, SpecError> {
    let value: Value = serde_json::from_str(text).map_err(|e| {
        invalid(
            file,
            ".",
            format!(
                "not valid JSON (line {}, column {}): {e}",
                e.line(),
                e.column()
            ),
        )
    })?;
    let mut track = serde_path_to_error::Track::new();
    let de = serde_path_to_error::Deserializer::new(&value, &mut track);
    let typed: Result<oci_spec::runtime::Spec, _> = serde::Deserialize::deserialize(de);
    if let Err(e) = typed {
        return Err(invalid(file, &track.path().to_string(), e.to_string()));
    }
    Ok(value)
}

fn has_dotdot(p: &Path) -> bool {
    p.components().any(|c| c == Component::ParentDir)
}

/// Checks `spec` of the bundle and rewrites it for container `container_id`; no namespace
/// path is another container's.
pub fn prepare(bundle: &Path, spec: &Value, container_id: &str) -> Result<PreparedSpec, SpecError> {
    prepare_resolving(bundle, spec, container_id, &|_| None)
}

/// [`prepare`], with `owner` telling which namespace paths are other runvm containers'.
pub fn prepare_resolving(
    bundle: &Path,
    spec: &Value,
    container_id: &str,
    owner: NamespaceOwner<'_>,
) -> Result<PreparedSpec, SpecError> {
    let file = bundle.join("config.json");
    let mut guest = spec.clone();
    let process = spec
        .get("process")
        .filter(|p| p.is_object())
        .ok_or_else(|| {
            invalid(
                &file,
                "process",
                "missing: a container needs a process to run",
            )
        })?;
    let args = process.get("args").and_then(Value::as_array);
    if args.is_none_or(|a| a.is_empty()) {
        return Err(invalid(
            &file,
            "process.args",
            "must name the program to run",
        ));
    }
    if let Some(cwd) = process.get("cwd").and_then(Value::as_str) {
        if !cwd.starts_with('/') {
            return Err(invalid(
                &file,
                "process.cwd",
                format!("{cwd:?} is not an absolute path"),
            ));
        }
    }
    super::seccomp::check(&file, spec)?;
    let terminal = process
        .get("terminal")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let root = spec
        .pointer("/root/path")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(&file, "root.path", "missing: the container needs a rootfs"))?;
    let root_path = bundle.join(root);
    if has_dotdot(Path::new(root)) {
        return Err(invalid(
            &file,
            "root.path",
            format!("{root:?} holds \"..\""),
        ));
    }
    if !root_path.is_dir() {
        return Err(invalid(
            &file,
            "root.path",
            format!(
                "rootfs {} does not exist or is not a folder",
                root_path.display()
            ),
        ));
    }
    let share = PathBuf::from(container_id);
    let guest_share = Path::new(GUEST_SHARED_DIR).join(container_id);
    // The rootfs is shared writable even when `root.readonly` is set: as with runc, missing
    // mount points (e.g. CRI's /etc/resolv.conf on a pause image) are made in it first, and
    // the guest runtime then remounts it read-only for the container (the guest spec keeps
    // `root.readonly`).
    let mut binds = vec![ShareBind {
        source: root_path,
        target: share.join("rootfs"),
        readonly: false,
        private: false,
    }];
    guest["root"]["path"] = Value::from(guest_share.join("rootfs").display().to_string());

    let mut tmpfs: Vec<GuestTmpfs> = Vec::new();
    let mountinfo = std::fs::read_to_string("/proc/thread-self/mountinfo").unwrap_or_default();
    if let Some(mounts) = guest.get_mut("mounts").and_then(Value::as_array_mut) {
        for (i, m) in mounts.iter_mut().enumerate() {
            let options: Vec<String> = m
                .get("options")
                .and_then(Value::as_array)
                .map(|o| {
                    o.iter()
                        .filter_map(Value::as_str)
                        .map(String::from)
                        .collect()
                })
                .unwrap_or_default();
            let options: Vec<&str> = options.iter().map(String::as_str).collect();
            let is_bind = m.get("type").and_then(Value::as_str) == Some("bind")
                || options.iter().any(|o| *o == "bind" || *o == "rbind");
            if !is_bind {
                continue;
            }
            let readonly = options.contains(&"ro");
            let source = m.get("source").and_then(Value::as_str).ok_or_else(|| {
                invalid(
                    &file,
                    &format!("mounts[{i}].source"),
                    "a bind mount needs a source",
                )
            })?;
            let host_source = bundle.join(source);
            if !host_source.exists() {
                return Err(invalid(
                    &file,
                    &format!("mounts[{i}].source"),
                    format!("bind-mount source {} does not exist", host_source.display()),
                ));
            }
            if readonly && !options.contains(&"rro") {
                // Read-only all the way down: the volume's submounts too, in the guest (the
                // host's copy is made read-only recursively as well, see `share`).
                if let Some(o) = m.get_mut("options").and_then(Value::as_array_mut) {
                    o.push(Value::from("rro"));
                }
            }
            let destination = m
                .get("destination")
                .and_then(Value::as_str)
                .unwrap_or_default();
            if let Some(t) = guest_tmpfs(destination, &host_source, &mountinfo) {
                m["source"] = Value::from(t.mount_point.clone());
                if !tmpfs.iter().any(|known| known.mount_point == t.mount_point) {
                    tmpfs.push(t);
                }
                continue;
            }
            let name = format!(
                "{i}-{}",
                host_source
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "root".into())
            );
            binds.push(ShareBind {
                source: host_source,
                target: share.join("mounts").join(&name),
                readonly,
                private: options.iter().any(|o| *o == "private" || *o == "rprivate"),
            });
            m["source"] = Value::from(guest_share.join("mounts").join(&name).display().to_string());
        }
    }

    // A container of a CRI pod: the namespace paths it is given name its pod sandbox
    // container's (on the host they all lead to the pod's VM).
    let pod_sandbox = spec
        .pointer("/annotations/io.kubernetes.cri.container-type")
        .and_then(Value::as_str)
        .filter(|t| *t == "container")
        .and_then(|_| spec.pointer("/annotations/io.kubernetes.cri.sandbox-id"))
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty() && *s != container_id)
        .map(str::to_string);
    let joined = namespaces_to_join(&file, spec, pod_sandbox.is_some(), owner)?;
    if let Some(linux) = guest.get_mut("linux").and_then(Value::as_object_mut) {
        if let Some(namespaces) = linux.get_mut("namespaces").and_then(Value::as_array_mut) {
            // A namespace path names a host namespace; the guest cannot join it. A host
            // network namespace entry goes entirely (the container shares the VM's network,
            // which is the pod's); a pod's container joins its sandbox container's IPC, UTS
            // and PID namespaces in the guest, as it would on the host, and a container that
            // names another runvm container's namespaces joins them in that container's VM
            // (the agent resolves them, see `POD_NAMESPACES_ANNOTATION`). Any other path was
            // refused above.
            namespaces.retain(|ns| {
                !(ns.get("type").and_then(Value::as_str) == Some("network")
                    && ns.get("path").is_some()
                    && !joined.network())
            });
            for ns in namespaces.iter_mut() {
                if let Some(obj) = ns.as_object_mut() {
                    obj.remove("path");
                }
            }
        }
        linux.insert(
            "cgroupsPath".into(),
            Value::from(format!("/runvm/{container_id}")),
        );
    }
    let join_target = pod_sandbox.as_ref().or(joined.member_of.as_ref());
    if let (Some(sandbox), false) = (join_target, joined.types.is_empty()) {
        if let Some(obj) = guest.as_object_mut() {
            let annotations = obj
                .entry("annotations")
                .or_insert_with(|| Value::Object(Default::default()));
            if let Some(annotations) = annotations.as_object_mut() {
                annotations.insert(
                    POD_NAMESPACES_ANNOTATION.into(),
                    Value::from(format!("{sandbox}:{}", joined.types.join(","))),
                );
            }
        }
    }
    let hooks = super::hooks::host_hooks(spec)
        .map_err(|(json_path, message)| invalid(&file, &json_path, message))?;
    if let Some(obj) = guest.as_object_mut() {
        // The host runs createRuntime, prestart, poststart and poststop; the guest only the
        // hooks that run in the container's namespaces.
        if let Some(Value::Object(all)) = obj.remove("hooks") {
            let guest_hooks: serde_json::Map<String, Value> = all
                .into_iter()
                .filter(|(k, _)| k == "createContainer" || k == "startContainer")
                .collect();
            if !guest_hooks.is_empty() {
                obj.insert("hooks".into(), Value::Object(guest_hooks));
            }
        }
    }
    Ok(PreparedSpec {
        guest_spec: guest,
        host_spec: spec.clone(),
        binds,
        tmpfs,
        terminal,
        hooks,
        network_joined: joined.network(),
        member_of: joined.member_of,
    })
}

/// The namespaces a container joins in the guest, and whose.
#[derive(Debug, Default)]
struct Joined {
    /// Namespace types (`ipc`, `uts`, `pid`, and for another runvm container also `network`
    /// and `cgroup`).
    types: Vec<String>,
    /// The runvm container named by the paths (not a CRI pod's sandbox container).
    member_of: Option<String>,
}

impl Joined {
    /// Whether the network namespace is joined (another runvm container's).
    fn network(&self) -> bool {
        self.types.iter().any(|t| t == "network")
    }
}

/// The namespaces a container joins in the guest: a pod's container those of `ipc`, `uts`,
/// `pid` given by path (its pod sandbox container's); any container those given as
/// `/proc/PID/ns/TYPE` of another runvm container (`owner` tells), all of one container. Any
/// other namespace path than a host network namespace is refused, naming it: it names a host
/// namespace, which the guest cannot join.
fn namespaces_to_join(
    file: &Path,
    spec: &Value,
    pod_container: bool,
    owner: NamespaceOwner<'_>,
) -> Result<Joined, SpecError> {
    let mut joined = Joined::default();
    let namespaces = spec
        .pointer("/linux/namespaces")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (i, ns) in namespaces.iter().enumerate() {
        let typ = ns.get("type").and_then(Value::as_str).unwrap_or_default();
        let Some(path) = ns.get("path").and_then(Value::as_str) else {
            continue;
        };
        let at = format!("linux.namespaces[{i}].path");
        if pod_container && matches!(typ, "ipc" | "uts" | "pid") {
            joined.types.push(typ.to_string());
            continue;
        }
        if let Some(container) = owner(Path::new(path)) {
            let Some((_, proc_name)) = JOINABLE_NAMESPACES.iter().find(|(t, _)| *t == typ) else {
                return Err(invalid(
                    file,
                    &at,
                    format!(
                        "cannot join the {typ} namespace of container {container} ({path}): \
                         runvm joins another container's ipc, uts, pid, network and cgroup \
                         namespaces (in its VM); leave out the path for a new {typ} namespace"
                    ),
                ));
            };
            let named = Path::new(path).file_name().and_then(|n| n.to_str());
            if named != Some(proc_name) {
                return Err(invalid(
                    file,
                    &at,
                    format!(
                        "{path} is not a {typ} namespace (a {typ} namespace is \
                         /proc/PID/ns/{proc_name})"
                    ),
                ));
            }
            match &joined.member_of {
                Some(first) if *first != container => {
                    return Err(invalid(
                        file,
                        &at,
                        format!(
                            "{path} is a namespace of container {container}, another one of \
                             container {first}: a container joins the namespaces of one \
                             container (it runs in that container's VM)"
                        ),
                    ))
                }
                _ => joined.member_of = Some(container),
            }
            joined.types.push(typ.to_string());
            continue;
        }
        if typ == "network" {
            continue;
        }
        return Err(invalid(
            file,
            &at,
            format!(
                "cannot join the {typ} namespace at {path}: a runvm container runs in a VM, \
                 where host namespaces do not exist; only the network namespace may be given \
                 by path as a host namespace (the VM runs in it). To share namespaces with another runvm \
                 container, give /proc/PID/ns/TYPE with its pid as `runvm state` prints it \
                 (ipc, uts, pid, network, cgroup: the container is then made in that \
                 container's VM); only containers of a pod, through containerd-shim-runvm-v2, \
                 share ipc, uts and pid namespaces of the pod's sandbox container; leave out \
                 the path for a new {typ} namespace"
            ),
        ));
    }
    if pod_container && joined.member_of.is_some() {
        return Err(invalid(
            file,
            "linux.namespaces",
            "a container of a CRI pod joins its pod's namespaces only",
        ));
    }
    Ok(joined)
}

#[cfg(test)]
#[path = "spec_tests.rs"]
mod tests;
