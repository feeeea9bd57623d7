//! Per-sandbox configuration and boot size, from the sandbox's annotations.
//!
//! - `io.runvm.config.<key>` ([`CONFIG_ANNOTATION_PREFIX`]) sets configuration key `<key>`
//!   (as `section.key`) for this sandbox only, if a pattern of `runtime.enable_annotations`
//!   allows it. Any other such annotation is refused, naming it. The value is read as the TOML
//!   key would be (a string key takes the text as is, a number or a boolean is parsed) and the
//!   result is checked by [`Config::validate`]. Annotations are written by whoever writes the
//!   pod: untrusted input. `runtime.*` (the state root, the allowlist itself) can never be set.
//! - containerd's CRI sandbox sizing annotations ([`CRI_SANDBOX_CPU_PERIOD`] and the others;
//!   containerd 1.6 and later, when kubelet 1.23 or later sends the pod's resources) add the
//!   pod's CPU limit, rounded up, and memory limit to the base `hypervisor.vcpus` and
//!   `hypervisor.memory_mib`, as Kata's `calculateSandboxCPUs`/`calculateSandboxMemory` do.
//!
//! The VM boots at that size, bounded by `hypervisor.max_vcpus` and `hypervisor.max_memory_mib`.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{Config, ConfigError};

/// The prefix of annotations that set a configuration key: `io.runvm.config.hypervisor.vcpus`.
pub const CONFIG_ANNOTATION_PREFIX: &str = "io.runvm.config.";

/// The default `runtime.enable_annotations`: the sizes only.
pub const DEFAULT_ENABLE_ANNOTATIONS: &[&str] = &["hypervisor.vcpus", "hypervisor.memory_mib"];

/// containerd's CRI annotation: the pod's CPU period, µs.
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// containerd's CRI annotation: the pod's CPU quota per period, µs (0 or -1: no limit).
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
/// containerd's CRI annotation: the pod's CPU shares (a weight: not used for sizing).
pub const CRI_SANDBOX_CPU_SHARES: &str = "io.kubernetes.cri.sandbox-cpu-shares";
/// containerd's CRI annotation: the pod's memory limit, bytes (0: no limit).
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

/// Configuration sections no pattern can open to annotations.
const NEVER_ALLOWED: &[&str] = &["runtime."];

const MIB: u64 = 1 << 20;

/// Errors reading a sandbox's configuration annotations or sizing it.
#[derive(Debug, thiserror::Error)]
pub enum PodConfigError {
    /// An `io.runvm.config.*` annotation that `runtime.enable_annotations` does not allow.
    #[error("annotation {annotation}={value:?} is not allowed: runtime.enable_annotations allows {allowed}")]
    NotAllowed {
        /// The annotation.
        annotation: String,
        /// Its value.
        value: String,
        /// The allowed patterns, or why none applies.
        allowed: String,
    },
    /// An allowed annotation whose value the key does not take.
    #[error("annotation {annotation}={value:?}: {reason}")]
    Invalid {
        /// The annotation.
        annotation: String,
        /// Its value.
        value: String,
        /// What is wrong and what would be valid.
        reason: String,
    },
    /// The size asked for is past the configured maximum.
    #[error(
        "{requested} {unit} asked for ({from}) is past {key} = {max}; valid: at most {max} {unit}"
    )]
    TooLarge {
        /// What was asked for, in `unit`.
        requested: u64,
        /// `vCPUs` or `MiB`.
        unit: &'static str,
        /// Where the request comes from.
        from: String,
        /// The bounding key.
        key: &'static str,
        /// Its resolved value.
        max: u64,
    },
}

/// Whether `pattern` is a well-formed `runtime.enable_annotations` entry.
pub fn valid_pattern(pattern: &str) -> bool {
    !pattern.is_empty()
        && pattern
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_.*".contains(&b))
}

/// Whether `key` matches `pattern`, where `*` matches any run of characters (dots too).
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    let (p, k) = (pattern.as_bytes(), key.as_bytes());
    // Greedy wildcard matching with backtracking to the last `*`.
    let (mut pi, mut ki) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ki < k.len() {
        if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ki));
            pi += 1;
        } else if pi < p.len() && p[pi] == k[ki] {
            pi += 1;
            ki += 1;
        } else if let Some((sp, sk)) = star {
            pi = sp + 1;
            ki = sk + 1;
            star = Some((sp, sk + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&b| b == b'*')
}

/// `config` with the sandbox's allowed `io.runvm.config.*` annotations applied and validated;
/// the first annotation not allowed, or not valid, is refused by name.
pub fn apply_config_annotations(
    config: &Config,
    annotations: &BTreeMap<String, String>,
) -> Result<Config, PodConfigError> {
    let settings: Vec<(&String, &str, &String)> = annotations
        .iter()
        .filter_map(|(name, value)| {
            name.strip_prefix(CONFIG_ANNOTATION_PREFIX)
                .map(|key| (name, key, value))
        })
        .collect();
    if settings.is_empty() {
        return Ok(config.clone());
    }
    let allowed = &config.runtime.enable_annotations;
    for (name, key, value) in &settings {
        let never = NEVER_ALLOWED.iter().any(|s| key.starts_with(s));
        if never || !allowed.iter().any(|p| pattern_matches(p, key)) {
            let allowed = if never {
                format!(
                    "{}; runtime.* can never be set by an annotation",
                    describe(allowed)
                )
            } else {
                describe(allowed)
            };
            return Err(PodConfigError::NotAllowed {
                annotation: name.to_string(),
                value: value.to_string(),
                allowed,
            });
        }
    }
    let mut tree = toml::Value::try_from(config).map_err(|e| PodConfigError::Invalid {
        annotation: settings[0].0.clone(),
        value: settings[0].2.clone(),
        reason: format!("cannot render the configuration: {e}"),
    })?;
    for (name, key, value) in &settings {
        let invalid = |reason: String| PodConfigError::Invalid {
            annotation: name.to_string(),
            value: value.to_string(),
            reason,
        };
        let slot = key
            .split_once('.')
            .filter(|(_, field)| !field.contains('.'))
            .and_then(|(section, field)| tree.get_mut(section)?.get_mut(field))
            .ok_or_else(|| invalid(format!("{key} is not a configuration key")))?;
        *slot = typed_value(slot, value).map_err(|why| invalid(format!("{key}: {why}")))?;
        // Deserialized after each one, so a value of the wrong type is named.
        Config::deserialize(tree.clone()).map_err(|e| invalid(e.to_string().replace('\n', " ")))?;
    }
    let mut out = Config::deserialize(tree).map_err(|e| PodConfigError::Invalid {
        annotation: settings[0].0.clone(),
        value: settings[0].2.clone(),
        reason: e.to_string(),
    })?;
    out.source = config.source.clone();
    out.validate().map_err(|e| {
        // Name the annotation that set the key, if one did.
        let (annotation, value, reason) = match &e {
            ConfigError::Invalid { key, valid, .. } => {
                let by = settings.iter().find(|(_, k, _)| k == key);
                match by {
                    Some((name, _, value)) => (
                        name.to_string(),
                        value.to_string(),
                        format!("{key}: {valid}"),
                    ),
                    None => (settings[0].0.clone(), settings[0].2.clone(), e.to_string()),
                }
            }
            _ => (settings[0].0.clone(), settings[0].2.clone(), e.to_string()),
        };
        PodConfigError::Invalid {
            annotation,
            value,
            reason,
        }
    })?;
    Ok(out)
}

fn describe(patterns: &[String]) -> String {
    if patterns.is_empty() {
        "none".into()
    } else {
        patterns
            .iter()
            .map(|p| format!("{p:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `text` read as a value of the type `current` has, as TOML would take it.
fn typed_value(current: &toml::Value, text: &str) -> Result<toml::Value, String> {
    Ok(match current {
        toml::Value::String(_) => toml::Value::String(text.to_string()),
        toml::Value::Integer(_) => toml::Value::Integer(
            text.trim()
                .parse::<i64>()
                .map_err(|_| "valid: an integer".to_string())?,
        ),
        toml::Value::Boolean(_) => toml::Value::Boolean(
            text.trim()
                .parse::<bool>()
                .map_err(|_| "valid: true or false".to_string())?,
        ),
        _ => {
            // Arrays and the rest: the TOML value syntax, one value and nothing else.
            let table: toml::Table = toml::from_str(&format!("v = {text}"))
                .map_err(|_| "valid: a TOML value of the key's type".to_string())?;
            match (table.len(), table.get("v")) {
                (1, Some(v)) => v.clone(),
                _ => return Err("valid: a single TOML value".into()),
            }
        }
    })
}

/// The host's capacity, which `max_vcpus = 0` and `max_memory_mib = 0` stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    /// CPUs.
    pub cpus: u32,
    /// RAM, MiB.
    pub memory_mib: u64,
}

impl HostCapacity {
    /// This host's CPU count and `MemTotal`.
    pub fn detect() -> HostCapacity {
        let cpus = std::thread::available_parallelism()
            .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
                let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
                Some(kib / 1024)
            })
            .unwrap_or(1_048_576);
        HostCapacity { cpus, memory_mib }
    }
}

/// The size a sandbox VM boots at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
}

/// What containerd's CRI sandbox annotations ask for on top of the base.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Workload {
    /// ceil(quota / period); 0 without a CPU limit.
    pub vcpus: u64,
    /// The memory limit, MiB rounded up; 0 without a limit.
    pub memory_mib: u64,
}

/// The pod's workload from containerd's CRI sandbox sizing annotations (absent: none). A value
/// that is not a whole number, or a negative memory limit, is refused by name.
pub fn cri_workload(annotations: &BTreeMap<String, String>) -> Result<Workload, PodConfigError> {
    let number = |name: &str| -> Result<i64, PodConfigError> {
        match annotations.get(name) {
            None => Ok(0),
            Some(v) => v
                .trim()
                .parse::<i64>()
                .map_err(|_| PodConfigError::Invalid {
                    annotation: name.into(),
                    value: v.clone(),
                    reason: "valid: a whole number".into(),
                }),
        }
    };
    let (period, quota, memory) = (
        number(CRI_SANDBOX_CPU_PERIOD)?,
        number(CRI_SANDBOX_CPU_QUOTA)?,
        number(CRI_SANDBOX_MEMORY)?,
    );
    if memory < 0 {
        return Err(PodConfigError::Invalid {
            annotation: CRI_SANDBOX_MEMORY.into(),
            value: memory.to_string(),
            reason: "valid: 0 (no limit) or a size in bytes".into(),
        });
    }
    // quota 0 or -1 (or no period): no CPU limit, nothing added (as Kata).
    let vcpus = match (u64::try_from(quota), u64::try_from(period)) {
        (Ok(q), Ok(p)) if q > 0 && p > 0 => q.div_ceil(p),
        _ => 0,
    };
    Ok(Workload {
        vcpus,
        memory_mib: (memory as u64).div_ceil(MIB),
    })
}

/// The boot size of a sandbox: `config`'s base (after [`apply_config_annotations`]) plus the
/// CRI workload, bounded by `hypervisor.max_vcpus` and `hypervisor.max_memory_mib` (0: the
/// host's capacity, or the base of `configured`, the operator's own file, if larger).
pub fn boot_size(
    configured: &Config,
    config: &Config,
    annotations: &BTreeMap<String, String>,
    host: HostCapacity,
) -> Result<BootSize, PodConfigError> {
    let work = cri_workload(annotations)?;
    let h = &config.hypervisor;
    let from = |base_key: &str, base: u32, extra: u64, extra_from: &str| {
        let by = format!("{CONFIG_ANNOTATION_PREFIX}{base_key}");
        let base_from = if annotations.contains_key(&by) {
            format!("{base_key} = {base} by annotation {by}")
        } else {
            format!("{base_key} = {base}")
        };
        if extra > 0 {
            format!("{base_from}, plus {extra} by {extra_from}")
        } else {
            base_from
        }
    };
    let vcpus = u64::from(h.vcpus) + work.vcpus;
    let (max_vcpus, max_memory) = max_size(configured, config, host);
    if vcpus > u64::from(max_vcpus) {
        return Err(PodConfigError::TooLarge {
            requested: vcpus,
            unit: "vCPUs",
            from: from(
                "hypervisor.vcpus",
                h.vcpus,
                work.vcpus,
                &format!("{CRI_SANDBOX_CPU_QUOTA}/{CRI_SANDBOX_CPU_PERIOD}"),
            ),
            key: "hypervisor.max_vcpus",
            max: u64::from(max_vcpus),
        });
    }
    let memory = u64::from(h.memory_mib) + work.memory_mib;
    if memory > max_memory {
        return Err(PodConfigError::TooLarge {
            requested: memory,
            unit: "MiB",
            from: from(
                "hypervisor.memory_mib",
                h.memory_mib,
                work.memory_mib,
                CRI_SANDBOX_MEMORY,
            ),
            key: "hypervisor.max_memory_mib",
            max: max_memory,
        });
    }
    // Both fit in u32: bounded by maxima that are u32 (or the host's RAM, checked above).
    Ok(BootSize {
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        memory_mib: u32::try_from(memory).unwrap_or(u32::MAX),
    })
}

/// The most vCPUs and MiB a sandbox VM may have: `hypervisor.max_vcpus` and
/// `hypervisor.max_memory_mib` of `config`, where 0 stands for the host's capacity (or the
/// base of `configured`, the operator's own file, if larger).
pub fn max_size(configured: &Config, config: &Config, host: HostCapacity) -> (u32, u64) {
    let h = &config.hypervisor;
    let vcpus = match h.max_vcpus {
        0 => host.cpus.max(configured.hypervisor.vcpus),
        n => n,
    };
    let memory = match h.max_memory_mib {
        0 => host
            .memory_mib
            .max(u64::from(configured.hypervisor.memory_mib)),
        n => u64::from(n),
    };
    (vcpus, memory)
}

/// A sandbox's effective configuration and boot size from its annotations: the one entry point
/// of sandbox creation.
pub fn pod_config(
    config: &Config,
    annotations: &BTreeMap<String, String>,
    host: HostCapacity,
) -> Result<(Config, BootSize), PodConfigError> {
    let effective = apply_config_annotations(config, annotations)?;
    let size = boot_size(config, &effective, annotations, host)?;
    Ok((effective, size))
}

#[cfg(test)]
#[path = "pod_config_tests.rs"]
mod tests;
