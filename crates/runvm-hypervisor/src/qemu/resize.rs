//! Resizing a running QEMU VM: vCPUs hot-added with `device_add` into the free slots of
//! `-smp N,maxcpus=M`, memory through the virtio-mem device's `requested-size`.
//!
//! Hot-added vCPUs are not removed: QEMU 7.2 under TCG aborts (`malloc(): unsorted double
//! linked list corrupted`) when a vCPU is unplugged with `device_del`, and it has died on
//! `device_add` too. So under TCG the VM has all its vCPUs from boot, the kernel brings up only
//! the boot count (`maxcpus=`), and resizing is the guest onlining or offlining them
//! ([`crate::VmConfig::cpus_by_onlining`]); hot-add is for KVM. Memory shrinks: the guest
//! unplugs the blocks it can empty, in the background.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use super::cmdline::VIRTIO_MEM_ID;
use super::{Qemu, State};
use crate::{HypervisorError, Result, VmSize};

const MIB: u64 = 1 << 20;

/// How long a resize waits for the guest to plug added memory before it returns anyway (the
/// guest goes on plugging).
pub const PLUG_TIMEOUT: Duration = Duration::from_secs(30);

/// Checks `target` against the VM's boot size and maxima; the error names the bound.
pub(crate) fn check_target(boot: VmSize, max: VmSize, target: VmSize) -> Result<()> {
    let refuse = |reason: String| {
        Err(HypervisorError::Resize {
            vcpus: target.vcpus,
            memory_mib: target.memory_mib,
            reason,
        })
    };
    if target.vcpus > max.vcpus {
        return refuse(format!(
            "{} vCPUs is past the VM's maximum of {} (maxcpus)",
            target.vcpus, max.vcpus
        ));
    }
    if target.memory_mib > max.memory_mib {
        return refuse(format!(
            "{} MiB is past the VM's maximum of {} MiB (maxmem)",
            target.memory_mib, max.memory_mib
        ));
    }
    if target.vcpus < boot.vcpus || target.memory_mib < boot.memory_mib {
        return refuse(format!(
            "below the boot size of {} vCPUs and {} MiB",
            boot.vcpus, boot.memory_mib
        ));
    }
    Ok(())
}

/// The virtio-mem device's requested size for a VM of `target_mib` MiB booted with `boot_mib`:
/// the difference rounded up to the device's 2 MiB blocks, within the device's size.
pub(crate) fn requested_mib(boot_mib: u32, target_mib: u32, device_mib: u32) -> u32 {
    let extra = target_mib.saturating_sub(boot_mib);
    extra.saturating_add(extra & 1).min(device_mib)
}

impl Qemu {
    pub(super) async fn resize_vm(&mut self, target: VmSize) -> Result<VmSize> {
        self.require("resize", &[State::Running])?;
        let (config, _) = self.prepared()?;
        let boot = VmSize {
            vcpus: config.vcpus,
            memory_mib: config.memory_mib,
        };
        let max = config.max_size();
        check_target(boot, max, target)?;
        let current = config.size();
        let device_mib = config.hotplug_memory_mib();
        let old_mib = config.hotplugged.memory_mib;
        let new_mib = requested_mib(boot.memory_mib, target.memory_mib, device_mib);
        if config.cpus_by_onlining() {
            // The vCPUs are there: the guest onlines or offlines them (the agent).
            let onlined = target.vcpus - boot.vcpus;
            if let Some(config) = self.config.as_mut() {
                config.hotplugged.onlined_cpus = onlined;
            }
        } else if target.vcpus > current.vcpus {
            self.add_cpus(target.vcpus - current.vcpus).await?;
        } else if target.vcpus < current.vcpus {
            tracing::debug!(
                current = current.vcpus,
                target = target.vcpus,
                "hot-added vCPUs are kept (QEMU 7.2 cannot unplug them under TCG)"
            );
        }
        if new_mib != old_mib {
            let path = format!("/machine/peripheral/{VIRTIO_MEM_ID}");
            let qmp = self.qmp().await?;
            qmp.qom_set(&path, "requested-size", json!(u64::from(new_mib) * MIB))
                .await?;
            if let Some(config) = self.config.as_mut() {
                config.hotplugged.memory_mib = new_mib;
            }
            if new_mib > old_mib {
                self.wait_plugged(&path, u64::from(new_mib) * MIB).await?;
            }
        }
        let (config, _) = self.prepared()?;
        Ok(config.size())
    }

    /// Hot-adds `count` vCPUs into the lowest free slots; each one added is recorded at once,
    /// so a failure part-way leaves the config true.
    async fn add_cpus(&mut self, count: u32) -> Result<()> {
        let qmp = self.qmp().await?;
        let mut free: Vec<_> = qmp
            .query_hotpluggable_cpus()
            .await?
            .into_iter()
            .filter(|slot| slot.qom_path.is_none())
            .collect();
        // QEMU lists the slots from the last; plug in order.
        free.reverse();
        if free.len() < count as usize {
            let (config, _) = self.prepared()?;
            return Err(HypervisorError::Resize {
                vcpus: config.size().vcpus + count,
                memory_mib: config.size().memory_mib,
                reason: format!("QEMU has {} free CPU slots, {count} are needed", free.len()),
            });
        }
        for slot in free.into_iter().take(count as usize) {
            let (config, _) = self.prepared()?;
            let id = format!("vcpu{}", config.size().vcpus);
            let mut device = slot.props.clone();
            device.insert("driver".into(), json!(slot.cpu_type));
            device.insert("id".into(), json!(id));
            self.qmp()
                .await?
                .device_add(serde_json::Value::Object(device))
                .await?;
            if let Some(config) = self.config.as_mut() {
                config.hotplugged.cpus.push(id);
            }
        }
        Ok(())
    }

    /// Waits up to [`PLUG_TIMEOUT`] for the virtio-mem device at `path` to hold `bytes`.
    async fn wait_plugged(&mut self, path: &str, bytes: u64) -> Result<()> {
        let deadline = Instant::now() + PLUG_TIMEOUT;
        loop {
            let size: u64 = self.qmp().await?.qom_get(path, "size").await?;
            if size >= bytes {
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    plugged_mib = size / MIB,
                    requested_mib = bytes / MIB,
                    "the guest has not plugged all the memory asked for yet"
                );
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: VmSize = VmSize {
        vcpus: 1,
        memory_mib: 512,
    };
    const MAX: VmSize = VmSize {
        vcpus: 4,
        memory_mib: 2560,
    };

    #[test]
    fn a_target_past_the_maxima_or_below_the_boot_size_is_refused_naming_the_bound() {
        let at = |vcpus, memory_mib| VmSize { vcpus, memory_mib };
        check_target(BOOT, MAX, at(4, 2560)).unwrap();
        let e = check_target(BOOT, MAX, at(5, 1024))
            .unwrap_err()
            .to_string();
        assert!(e.contains("5 vCPUs") && e.contains("maximum of 4"), "{e}");
        let e = check_target(BOOT, MAX, at(2, 2561))
            .unwrap_err()
            .to_string();
        assert!(e.contains("2561 MiB") && e.contains("2560 MiB"), "{e}");
        let e = check_target(BOOT, MAX, at(1, 256)).unwrap_err().to_string();
        assert!(e.contains("boot size"), "{e}");
    }

    #[test]
    fn the_requested_size_is_the_extra_rounded_up_to_2_mib_within_the_device() {
        assert_eq!(requested_mib(512, 512, 2048), 0);
        assert_eq!(requested_mib(512, 1536, 2048), 1024);
        assert_eq!(requested_mib(512, 769, 2048), 258);
        assert_eq!(requested_mib(512, 4096, 2048), 2048);
        assert_eq!(requested_mib(512, 256, 2048), 0);
    }
}
