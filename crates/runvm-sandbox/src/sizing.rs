//! The size a running sandbox VM needs, as Kata's `updateResources` computes it: the base
//! (`hypervisor.vcpus`, `hypervisor.memory_mib`) plus, over the sandbox's containers that are
//! not stopped, the sum of each one's CPU limit (`quota / period`, rounded up) and of its memory
//! limit. The VM is never made smaller than it booted (boot CPUs and boot RAM stay), and never
//! larger than its maxima (`hypervisor.max_vcpus`, `hypervisor.max_memory_mib`): a need past
//! them is refused by name.

use runvm_hypervisor::VmSize;
use serde_json::Value;

use crate::pod_config::{BootSize, PodConfigError, Workload};

const MIB: u64 = 1 << 20;

/// What a container's OCI `linux.resources` ask of the VM: ceil(quota / period) vCPUs (none
/// without a positive quota and period) and the memory limit in MiB, rounded up (none without a
/// positive limit).
pub fn resources_workload(resources: &Value) -> Workload {
    let number = |v: &Value| {
        v.as_i64()
            .or_else(|| v.as_u64().map(|u| i64::try_from(u).unwrap_or(i64::MAX)))
    };
    let cpu = &resources["cpu"];
    let vcpus = match (number(&cpu["quota"]), number(&cpu["period"])) {
        (Some(q), Some(p)) if q > 0 && p > 0 => (q as u64).div_ceil(p as u64),
        _ => 0,
    };
    let memory_mib = match number(&resources["memory"]["limit"]) {
        Some(limit) if limit > 0 => (limit as u64).div_ceil(MIB),
        _ => 0,
    };
    Workload { vcpus, memory_mib }
}

/// [`resources_workload`] of an OCI spec's `linux.resources`.
pub fn spec_workload(spec: &Value) -> Workload {
    resources_workload(&spec["linux"]["resources"])
}

/// `resources` with the CPU quota and period and the memory limit `update` sets put over
/// them (an update names only what changes: `runc update --cpu-quota`); the rest kept.
pub fn merge_resources(resources: &Value, update: &Value) -> Value {
    let mut out = if resources.is_object() {
        resources.clone()
    } else {
        Value::Object(Default::default())
    };
    for (section, keys) in [
        ("cpu", &["quota", "period", "shares", "cpus", "mems"][..]),
        ("memory", &["limit", "reservation", "swap"][..]),
    ] {
        for key in keys {
            let value = &update[section][key];
            if !value.is_null() {
                if !out[section].is_object() {
                    out[section] = Value::Object(Default::default());
                }
                out[section][key] = value.clone();
            }
        }
    }
    out
}

/// One container's share of the sandbox's needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerNeed {
    /// The container's id.
    pub id: String,
    /// What its limits ask for.
    pub workload: Workload,
}

/// What a sandbox needs: the base plus its containers' limits, and the size its VM should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs {
    /// vCPUs: base plus the containers' CPU limits.
    pub vcpus: u64,
    /// RAM, MiB: base plus the containers' memory limits.
    pub memory_mib: u64,
}

/// The base plus the containers' workloads.
pub fn needs(base: VmSize, containers: &[ContainerNeed]) -> Needs {
    Needs {
        vcpus: u64::from(base.vcpus) + containers.iter().map(|c| c.workload.vcpus).sum::<u64>(),
        memory_mib: u64::from(base.memory_mib)
            + containers
                .iter()
                .map(|c| c.workload.memory_mib)
                .sum::<u64>(),
    }
}

/// The size the VM should have for `needs`: at least its boot size, at most `max`; a need past
/// `max` is refused naming the value, where it comes from, and the bounding key.
pub fn target(
    base: VmSize,
    boot: VmSize,
    max: VmSize,
    containers: &[ContainerNeed],
) -> Result<VmSize, PodConfigError> {
    let n = needs(base, containers);
    let from = |what: &str, base_text: String, pick: fn(&Workload) -> u64| {
        let parts: Vec<String> = containers
            .iter()
            .filter(|c| pick(&c.workload) > 0)
            .map(|c| format!("{} {}", c.id, pick(&c.workload)))
            .collect();
        if parts.is_empty() {
            base_text
        } else {
            format!(
                "{base_text}, plus the {what} limits of containers: {}",
                parts.join(", ")
            )
        }
    };
    if n.vcpus > u64::from(max.vcpus) {
        return Err(PodConfigError::TooLarge {
            requested: n.vcpus,
            unit: "vCPUs",
            from: from("CPU", format!("hypervisor.vcpus = {}", base.vcpus), |w| {
                w.vcpus
            }),
            key: "hypervisor.max_vcpus",
            max: u64::from(max.vcpus),
        });
    }
    if n.memory_mib > u64::from(max.memory_mib) {
        return Err(PodConfigError::TooLarge {
            requested: n.memory_mib,
            unit: "MiB",
            from: from(
                "memory",
                format!("hypervisor.memory_mib = {}", base.memory_mib),
                |w| w.memory_mib,
            ),
            key: "hypervisor.max_memory_mib",
            max: u64::from(max.memory_mib),
        });
    }
    // Both fit in u32: bounded by `max` above.
    Ok(VmSize {
        vcpus: u32::try_from(n.vcpus).unwrap_or(u32::MAX).max(boot.vcpus),
        memory_mib: u32::try_from(n.memory_mib)
            .unwrap_or(u32::MAX)
            .max(boot.memory_mib),
    })
}

/// `size` (the boot size from the configuration and the CRI pod annotations) plus the limits
/// of the container the VM is booted for (`runvm create`/`run`, a shim container with its own
/// VM), so that it needs no hot-plug right after boot; past the maxima it is refused by name.
pub fn boot_with_container(
    size: BootSize,
    container: Workload,
    max: (u32, u64),
) -> Result<BootSize, PodConfigError> {
    let vcpus = u64::from(size.vcpus) + container.vcpus;
    if vcpus > u64::from(max.0) {
        return Err(PodConfigError::TooLarge {
            requested: vcpus,
            unit: "vCPUs",
            from: format!(
                "a boot size of {} plus the container's CPU limit of {}",
                size.vcpus, container.vcpus
            ),
            key: "hypervisor.max_vcpus",
            max: u64::from(max.0),
        });
    }
    let memory = u64::from(size.memory_mib) + container.memory_mib;
    if memory > max.1 {
        return Err(PodConfigError::TooLarge {
            requested: memory,
            unit: "MiB",
            from: format!(
                "a boot size of {} MiB plus the container's memory limit of {} MiB",
                size.memory_mib, container.memory_mib
            ),
            key: "hypervisor.max_memory_mib",
            max: max.1,
        });
    }
    // Both fit in u32: bounded by maxima that are u32 (or the host's RAM).
    Ok(BootSize {
        vcpus: u32::try_from(vcpus).unwrap_or(u32::MAX),
        memory_mib: u32::try_from(memory).unwrap_or(u32::MAX),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const BASE: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 512,
    };
    const MAX: VmSize = VmSize {
        vcpus: 4,
        memory_mib: 4096,
    };

    fn need(id: &str, vcpus: u64, memory_mib: u64) -> ContainerNeed {
        ContainerNeed {
            id: id.into(),
            workload: Workload { vcpus, memory_mib },
        }
    }

    #[test]
    fn a_containers_limits_are_its_quota_over_period_rounded_up_and_its_memory_limit() {
        let w = resources_workload(&json!({
            "cpu": {"quota": 150000, "period": 100000, "shares": 1024},
            "memory": {"limit": (1u64 << 30) + 1}
        }));
        assert_eq!(
            w,
            Workload {
                vcpus: 2,
                memory_mib: 1025
            }
        );
        // No quota (or -1, or 0), no limit: nothing asked for.
        for r in [
            json!({}),
            json!({"cpu": {"quota": -1, "period": 100000}, "memory": {"limit": -1}}),
            json!({"cpu": {"quota": 0, "period": 100000}, "memory": {"limit": 0}}),
            json!({"cpu": {"quota": 50000, "period": 0}}),
        ] {
            assert_eq!(resources_workload(&r), Workload::default(), "{r}");
        }
        assert_eq!(
            spec_workload(
                &json!({"linux": {"resources": {"cpu": {"quota": 200000, "period": 100000}}}})
            ),
            Workload {
                vcpus: 2,
                memory_mib: 0
            }
        );
    }

    #[test]
    fn an_update_replaces_only_what_it_names() {
        let stored = json!({"cpu": {"quota": 200000, "period": 100000}, "memory": {"limit": 1073741824}, "pids": {"limit": 10}});
        let merged = merge_resources(&stored, &json!({"cpu": {"quota": 300000}}));
        assert_eq!(
            merged,
            json!({"cpu": {"quota": 300000, "period": 100000}, "memory": {"limit": 1073741824}, "pids": {"limit": 10}})
        );
        assert_eq!(
            merge_resources(&Value::Null, &json!({"memory": {"limit": 5}})),
            json!({"memory": {"limit": 5}})
        );
    }

    #[test]
    fn the_target_is_the_base_plus_the_sum_of_the_containers_never_below_the_boot_size() {
        let t = target(BASE, BASE, MAX, &[need("a", 2, 1024), need("b", 1, 256)]).unwrap();
        assert_eq!(
            t,
            VmSize {
                vcpus: 4,
                memory_mib: 1792
            }
        );
        // Booted bigger (the CRI pod's sizing annotations): the VM stays at its boot size.
        let boot = VmSize {
            vcpus: 2,
            memory_mib: 768,
        };
        assert_eq!(target(BASE, boot, MAX, &[]).unwrap(), boot);
        assert_eq!(
            target(BASE, boot, MAX, &[need("a", 2, 0)]).unwrap(),
            VmSize {
                vcpus: 3,
                memory_mib: 768
            }
        );
    }

    #[test]
    fn a_vm_booted_for_one_container_boots_with_its_limits_within_the_maxima() {
        let size = BootSize {
            vcpus: 1,
            memory_mib: 512,
        };
        let w = Workload {
            vcpus: 2,
            memory_mib: 1024,
        };
        assert_eq!(
            boot_with_container(size, w, (4, 2048)).unwrap(),
            BootSize {
                vcpus: 3,
                memory_mib: 1536
            }
        );
        let e = boot_with_container(size, w, (2, 2048))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("3 vCPUs asked for") && e.contains("hypervisor.max_vcpus = 2"),
            "{e}"
        );
        let e = boot_with_container(size, w, (4, 1024))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("memory limit of 1024 MiB")
                && e.contains("hypervisor.max_memory_mib = 1024"),
            "{e}"
        );
    }

    #[test]
    fn a_need_past_the_maximum_is_refused_naming_value_origin_and_key() {
        let e = target(BASE, BASE, MAX, &[need("a", 2, 0), need("big", 3, 0)])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("6 vCPUs asked for"), "{e}");
        assert!(e.contains("hypervisor.vcpus = 1"), "{e}");
        assert!(e.contains("a 2, big 3"), "{e}");
        assert!(e.contains("hypervisor.max_vcpus = 4"), "{e}");
        let e = target(BASE, BASE, MAX, &[need("a", 0, 4000)])
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("4512 MiB asked for"), "{e}");
        assert!(e.contains("hypervisor.max_memory_mib = 4096"), "{e}");
        assert!(!e.contains("CPU limits"), "{e}");
    }
}
