//! Which VM a container goes to (one VM per pod), and containerd's metrics type.

use std::collections::BTreeMap;
use std::path::Path;

use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::MessageField;
use runvm_sandbox::agent::ContainerStats;

use crate::error::{Result, ShimError};

/// CRI annotation: `sandbox` for a pod's sandbox container, `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
/// CRI annotation: the id of the pod's sandbox container.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// Where a container runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Its own VM, named after it: a standalone container or a pod's sandbox container.
    OwnVm,
    /// The VM of the pod whose sandbox container has this id.
    Pod(String),
}

impl Placement {
    /// The sandbox id the container lives in.
    pub fn sandbox_id<'a>(&'a self, container_id: &'a str) -> &'a str {
        match self {
            Placement::OwnVm => container_id,
            Placement::Pod(sandbox) => sandbox,
        }
    }
}

/// Decides from the CRI annotations.
pub fn placement(container_id: &str, annotations: &BTreeMap<String, String>) -> Placement {
    match (
        annotations.get(CONTAINER_TYPE).map(String::as_str),
        annotations.get(SANDBOX_ID),
    ) {
        (Some("container"), Some(sandbox)) if sandbox != container_id && !sandbox.is_empty() => {
            Placement::Pod(sandbox.clone())
        }
        _ => Placement::OwnVm,
    }
}

/// The annotations of the bundle's `config.json` (empty when it has none).
pub fn bundle_annotations(bundle: &Path) -> Result<BTreeMap<String, String>> {
    let file = bundle.join("config.json");
    // A regular file under the bundle cap, read once (a FIFO or /dev/zero is refused).
    let text = runvm_sandbox::regular_file::read_regular_file(
        &file,
        runvm_sandbox::container::spec::MAX_CONFIG_JSON_BYTES,
    )
    .map_err(|e| ShimError::InvalidArgument(format!("cannot read the OCI spec: {e}")))?;
    let spec: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
        ShimError::InvalidArgument(format!("the OCI spec {} is not JSON: {e}", file.display()))
    })?;
    let mut out = BTreeMap::new();
    if let Some(map) = spec.get("annotations").and_then(|a| a.as_object()) {
        for (k, v) in map {
            if let Some(v) = v.as_str() {
                out.insert(k.clone(), v.to_string());
            }
        }
    }
    Ok(out)
}

/// The guest's cgroup v2 statistics as containerd's `io.containerd.cgroups.v2.Metrics`.
pub fn metrics(stats: &ContainerStats) -> Metrics {
    let cpu = &stats.cpu;
    let mem = &stats.memory;
    Metrics {
        cpu: MessageField::some(CPUStat {
            usage_usec: cpu.usage_total_ns / 1000,
            user_usec: cpu.usage_user_ns / 1000,
            system_usec: cpu.usage_kernel_ns / 1000,
            nr_throttled: cpu.throttled_periods,
            throttled_usec: cpu.throttled_time_ns / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: mem.usage_bytes,
            max_usage: mem.max_usage_bytes,
            usage_limit: mem.limit_bytes,
            file: mem.cache_bytes,
            ..Default::default()
        }),
        pids: MessageField::some(PidsStat {
            current: stats.pids_current,
            limit: stats.pids_limit,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn one_vm_per_pod() {
        assert_eq!(placement("c1", &ann(&[])), Placement::OwnVm);
        let sandbox = ann(&[(CONTAINER_TYPE, "sandbox"), (SANDBOX_ID, "p1")]);
        assert_eq!(placement("p1", &sandbox), Placement::OwnVm);
        let member = ann(&[(CONTAINER_TYPE, "container"), (SANDBOX_ID, "p1")]);
        assert_eq!(placement("c2", &member), Placement::Pod("p1".into()));
        assert_eq!(placement("c2", &member).sandbox_id("c2"), "p1");
        let orphan = ann(&[(CONTAINER_TYPE, "container")]);
        assert_eq!(placement("c3", &orphan), Placement::OwnVm);
    }

    #[test]
    fn bundle_without_spec_is_invalid_argument() {
        let dir = tempfile::tempdir().unwrap();
        let err = bundle_annotations(dir.path()).unwrap_err();
        assert!(matches!(err, ShimError::InvalidArgument(ref m) if m.contains("config.json")));
        std::fs::write(dir.path().join("config.json"), "{nope").unwrap();
        assert!(bundle_annotations(dir.path()).is_err());
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"annotations":{"a":"b"}}"#,
        )
        .unwrap();
        assert_eq!(bundle_annotations(dir.path()).unwrap(), ann(&[("a", "b")]));
    }

    #[test]
    fn metrics_are_in_microseconds() {
        let mut stats = ContainerStats::default();
        stats.cpu.usage_total_ns = 5_000;
        stats.memory.usage_bytes = 42;
        let m = metrics(&stats);
        assert_eq!(m.cpu.usage_usec, 5);
        assert_eq!(m.memory.usage, 42);
    }
}
