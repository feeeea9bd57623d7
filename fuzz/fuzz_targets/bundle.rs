//! Bundle loading and preparation: `config.json` text through `spec::parse` (JSON, then the
//! typed OCI spec with the path of a problem) and `prepare_resolving` (rootfs, bind mounts,
//! namespace paths, hooks, seccomp, the guest spec), then the pod configuration its annotations
//! ask for (`pod_config`), as `runvm create` and the shim's sandbox creation do.
#![no_main]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use runvm_sandbox::config::Config;
use runvm_sandbox::container::spec;
use runvm_sandbox::pod_config::{pod_config, HostCapacity};

/// A bundle folder with a rootfs and a bind-mount source, made once per process.
fn bundle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = runvm_fuzz::scratch_dir("bundle");
        for sub in ["rootfs/bin", "volume", "data"] {
            std::fs::create_dir_all(dir.join(sub)).expect("make the fuzz bundle");
        }
        std::fs::write(dir.join("data/file"), "x").expect("make the fuzz bundle");
        dir
    })
}

/// The command line's resolver in miniature: pid 42's namespaces are container `a`'s, 43's `b`'s.
fn owner(path: &Path) -> Option<String> {
    let s = path.to_str()?;
    if s.starts_with("/proc/42/ns/") {
        Some("a".into())
    } else if s.starts_with("/proc/43/ns/") {
        Some("b".into())
    } else {
        None
    }
}

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("bundle"), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = bundle();
    let file = dir.join("config.json");
    let Ok(value) = spec::parse(&file, text) else {
        return;
    };
    let Ok(prepared) = spec::prepare_resolving(dir, &value, "c1", &owner) else {
        return;
    };
    // What the guest is given stays inside the share and names no host path.
    assert!(prepared.binds.iter().all(|b| b.target.starts_with("c1")));
    let _ = spec::network_namespace(&value);
    let annotations: BTreeMap<String, String> = value
        .get("annotations")
        .and_then(|a| a.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| v.as_str().map(|v| (k.clone(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let mut config = Config::default();
    config.runtime.enable_annotations = vec!["hypervisor.*".into(), "agent.*".into()];
    let host = HostCapacity {
        cpus: 2,
        memory_mib: 24 * 1024,
    };
    if let Ok((effective, _size)) = pod_config(&config, &annotations, host) {
        effective.validate().expect("pod_config returns a validated configuration");
    }
});
