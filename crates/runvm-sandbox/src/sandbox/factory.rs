//! Building sandboxes on QEMU from the configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use runvm_hypervisor::qemu::{Qemu, QemuSettings};
use runvm_hypervisor::{Accelerator, HostCpu, Hypervisor, SharedDir, VmConfig, VsockBackend};

use super::{BootReport, Sandbox, SandboxSettings, VmParts, VmSource};
use crate::agent::TtrpcConnector;
use crate::config::{resolve_program, Config, VsockMode};
use crate::error::SandboxError;
use crate::host_cgroup;
use crate::id::SandboxId;
use crate::pod_config::{max_size, pod_config, HostCapacity};
use crate::state::State;
use crate::store::Store;

/// The virtio-fs tag of the sandbox's shared folder.
pub const SHARED_FS_TAG: &str = "runvm";

/// Resolves the configured binaries into QEMU backend settings.
pub fn qemu_settings(config: &Config) -> Result<QemuSettings, SandboxError> {
    let h = &config.hypervisor;
    let find = |key: &'static str, name: &str, hint: &'static str| {
        resolve_program(name).ok_or_else(|| SandboxError::MissingProgram {
            key,
            name: name.to_string(),
            hint,
        })
    };
    Ok(QemuSettings {
        qemu: find(
            "hypervisor.qemu",
            &h.qemu,
            "install it with `apt-get install qemu-system-x86` (or run scripts/setup.sh)",
        )?,
        virtiofsd: find(
            "hypervisor.virtiofsd",
            &h.virtiofsd,
            "build it with scripts/setup.sh (cargo install virtiofsd into /opt/runvm)",
        )?,
        vhost_device_vsock: match resolve_vsock(h.vsock) {
            VsockBackend::VhostUser => find(
                "hypervisor.vhost_device_vsock",
                &h.vhost_device_vsock,
                "build it with scripts/setup.sh (cargo install vhost-device-vsock into /opt/runvm)",
            )?,
            // Not run with the kernel's vhost-vsock; keep the configured name for messages.
            VsockBackend::Vhost { .. } => PathBuf::from(&h.vhost_device_vsock),
        },
        virtiofs_cache: h.virtiofs_cache,
        start_timeout: Duration::from_millis(h.start_timeout_ms),
        log_max_bytes: h.log_max_bytes,
        confinement: if h.confine {
            Some(runvm_hypervisor::qemu::jail::VmmUser::lookup(&h.user)?)
        } else {
            None
        },
    })
}

/// The vsock backend for `mode` on this host.
pub fn resolve_vsock(mode: VsockMode) -> VsockBackend {
    let vhost = || VsockBackend::Vhost {
        guest_cid: random_cid(),
    };
    match mode {
        VsockMode::Vhost => vhost(),
        VsockMode::VhostUser => VsockBackend::VhostUser,
        VsockMode::Auto if Path::new("/dev/vhost-vsock").exists() => vhost(),
        VsockMode::Auto => VsockBackend::VhostUser,
    }
}

/// A guest CID unlikely to collide with another VM's (3 and above; 0 to 2 are reserved).
fn random_cid() -> u32 {
    let mut buf = [0u8; 4];
    let random = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut buf))
        .map(|()| u32::from_ne_bytes(buf))
        .unwrap_or_else(|_| std::process::id().wrapping_mul(2_654_435_761));
    3 + random % (u32::MAX - 4)
}

/// Settings for sandbox `id` under the configured root, with the accelerator resolved on this
/// host.
pub fn sandbox_settings(config: &Config, id: &SandboxId) -> Result<SandboxSettings, SandboxError> {
    let accelerator = config
        .hypervisor
        .accelerator
        .resolve(&HostCpu::detect())
        .map_err(SandboxError::Hypervisor)?;
    let dir = config.runtime.root.join(id.as_str());
    Ok(SandboxSettings {
        vm: VmConfig {
            vcpus: config.hypervisor.vcpus,
            memory_mib: config.hypervisor.memory_mib,
            kernel: config.guest.kernel.clone(),
            initrd: config.guest.initrd.clone(),
            kernel_params: config.hypervisor.kernel_params.clone(),
            accelerator,
            shared_dir: Some(SharedDir {
                path: dir.join("shared"),
                tag: SHARED_FS_TAG.into(),
            }),
            vsock: resolve_vsock(config.hypervisor.vsock),
            run_dir: crate::store::vm_run_dir(&config.runtime.root, id),
            netns: None,
            net_devices: Vec::new(),
            hotplug_ports: 0,
            // vhost-net needs KVM's ioeventfds; under TCG QEMU does the work itself.
            vhost_net: accelerator == Accelerator::Kvm && Path::new("/dev/vhost-net").exists(),
            tcg_tb_size_mib: config.hypervisor.tcg_tb_size_mib,
            cgroup_procs: Vec::new(),
            // No hotplug unless the caller sets maxima (`create_qemu_sandbox_in` does).
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplugged: Default::default(),
        },
        boot_timeout: config.agent.boot_timeout(),
        stop_timeout: Duration::from_millis(config.hypervisor.stop_timeout_ms),
        ready_signal: true,
        netns: None,
        network_model: config.network.model,
        host_cgroup: None,
    })
}

/// Creates sandbox `id` on QEMU as configured and boots it.
pub async fn create_qemu_sandbox(
    config: &Config,
    id: SandboxId,
    annotations: BTreeMap<String, String>,
) -> Result<(Sandbox, BootReport), SandboxError> {
    create_qemu_sandbox_in(config, id, annotations, None).await
}

/// As [`create_qemu_sandbox`], the VM joining the pod's network namespace `netns` (the path
/// of the OCI spec's network namespace) in the configured network model.
///
/// The sandbox's `annotations` set its configuration and boot size ([`crate::pod_config`]):
/// an annotation not allowed, or a size past the maximum, is refused before anything is made.
pub async fn create_qemu_sandbox_in(
    config: &Config,
    id: SandboxId,
    annotations: BTreeMap<String, String>,
    netns: Option<PathBuf>,
) -> Result<(Sandbox, BootReport), SandboxError> {
    create_qemu_sandbox_for(config, id, annotations, netns, None).await
}

/// As [`create_qemu_sandbox_in`], for a VM made for one container whose OCI `spec` is given:
/// the VM's processes go into the host cgroup the spec names (`linux.cgroupsPath`,
/// `linux.resources`; see [`crate::host_cgroup`]: a bad path or value is refused before
/// anything is made), and the VM boots with the container's limits added
/// ([`crate::sizing::spec_workload`]) rather than hot-plugging them right after the boot.
pub async fn create_qemu_sandbox_for(
    config: &Config,
    id: SandboxId,
    annotations: BTreeMap<String, String>,
    netns: Option<PathBuf>,
    spec: Option<&serde_json::Value>,
) -> Result<(Sandbox, BootReport), SandboxError> {
    let first = spec.map(crate::sizing::spec_workload).unwrap_or_default();
    let host = HostCapacity::detect();
    let base = config;
    let (effective, size) = pod_config(config, &annotations, host)?;
    // Room to hot-plug up to the maxima (vCPUs at most 255, QEMU's limit without an IOMMU).
    let (max_vcpus, max_memory_mib) = max_size(config, &effective, host);
    let pod_size = size;
    let size = crate::sizing::boot_with_container(size, first, (max_vcpus, max_memory_mib))?;
    let config = &effective;
    let mut settings = sandbox_settings(config, &id)?;
    settings.vm.vcpus = size.vcpus;
    settings.vm.memory_mib = size.memory_mib;
    set_maxima(&mut settings, config, max_vcpus, max_memory_mib);
    settings.netns = netns;
    if let Some(spec) = spec {
        settings.host_cgroup =
            host_cgroup::request_from_spec(spec, config.runtime.vm_memory_overhead_mib)?;
        if let Some(request) = &settings.host_cgroup {
            settings.vm.cgroup_procs = host_cgroup::procs_files(&request.record.path)?;
        }
    }
    let store = Store::open(config.runtime.root.clone())?;
    // The key of the configuration the VM is made from: the pod's, at the configured size
    // (annotations that size the pod are hot-plugged, not a reason to miss).
    let mut keyed = config.clone();
    keyed.hypervisor.vcpus = base.hypervisor.vcpus;
    keyed.hypervisor.memory_mib = base.hypervisor.memory_mib;
    let source = vm_source(&keyed, pod_size, &settings);
    let made = Sandbox::create_from(
        store.clone(),
        id.clone(),
        config,
        settings.clone(),
        annotations.clone(),
        qemu_parts(config)?,
        source,
    )
    .await;
    match made {
        Err(SandboxError::FactoryVm { vm, source }) => {
            // The sandbox and the VM are gone again: start over with a VM of its own.
            tracing::warn!(vm = %vm, error = %crate::ErrorChain(&*source), "the factory's VM failed; booting a VM of its own");
            Sandbox::create_from(
                store,
                id,
                config,
                settings,
                annotations,
                qemu_parts(config)?,
                VmSource::Boot {
                    note: Some("factory-miss:adoption-failed"),
                },
            )
            .await
        }
        other => other,
    }
}

/// Where the VM of a sandbox of `config` whose pod asks for `pod_size` comes from: the
/// factory when one is configured and its VMs (booted at the configured size, with room up to
/// the maxima of `settings`) can be hot-plugged to the pod's size, else a boot of its own. A
/// container's own limits are hot-plugged when it is created, as for any sandbox.
fn vm_source(
    config: &Config,
    pod_size: crate::pod_config::BootSize,
    settings: &SandboxSettings,
) -> VmSource {
    if config.factory.cache == 0 {
        return VmSource::Boot { note: None };
    }
    let pod = runvm_hypervisor::VmSize {
        vcpus: pod_size.vcpus,
        memory_mib: pod_size.memory_mib,
    };
    let base = config.hypervisor.memory_mib;
    let reachable = pod.vcpus <= settings.vm.max_vcpus.max(config.hypervisor.vcpus)
        && (pod.memory_mib <= base
            || (settings.vm.max_memory_mib != 0 && pod.memory_mib <= settings.vm.max_memory_mib));
    if !reachable {
        return VmSource::Boot {
            note: Some("factory-miss:pod-size"),
        };
    }
    VmSource::Factory {
        key: crate::factory::vm_key(config),
        pod_size: pod,
    }
}

/// Sets the VM's hotplug maxima (`max_memory_mib` only with `hypervisor.memory_hotplug`).
fn set_maxima(settings: &mut SandboxSettings, config: &Config, vcpus: u32, memory_mib: u64) {
    settings.vm.max_vcpus = vcpus.min(255);
    settings.vm.max_memory_mib = if config.hypervisor.memory_hotplug {
        u32::try_from(memory_mib).unwrap_or(u32::MAX)
    } else {
        0
    };
}

/// PCIe root ports a factory VM keeps free for the cards of the pod that adopts it (its
/// devices and later hot-adds).
pub const FACTORY_VM_HOTPLUG_PORTS: u32 = 4;

/// Settings of factory VM `vm` ([`crate::factory`]): the configured size with room to hot-plug
/// up to the maxima, no network (the adopting pod's cards are hot-added), run and shared
/// folders in `ROOT/.vmhome~ID`, which the adopting sandbox keeps.
pub fn factory_vm_settings(
    config: &Config,
    vm: &SandboxId,
) -> Result<SandboxSettings, SandboxError> {
    let mut settings = sandbox_settings(config, vm)?;
    let home = Store::new(config.runtime.root.clone()).vm_home(vm);
    settings.vm.run_dir = home.join("vm");
    settings.vm.shared_dir = Some(SharedDir {
        path: home.join("shared"),
        tag: SHARED_FS_TAG.into(),
    });
    settings.vm.hotplug_ports = FACTORY_VM_HOTPLUG_PORTS;
    let (max_vcpus, max_memory_mib) = max_size(config, config, HostCapacity::detect());
    set_maxima(&mut settings, config, max_vcpus, max_memory_mib);
    Ok(settings)
}

/// A QEMU backend and an agent connector for a new sandbox of `config`.
pub fn qemu_parts(config: &Config) -> Result<VmParts, SandboxError> {
    Ok(VmParts {
        hypervisor: Box::new(Qemu::new(qemu_settings(config)?)),
        connector: Arc::new(TtrpcConnector::new(config.agent.request_timeout())),
    })
}

/// Picks up sandbox `id` from the state under `config.runtime.root`, re-attaching to its VM.
pub fn open_sandbox(config: &Config, id: &SandboxId) -> Result<Sandbox, SandboxError> {
    let store = Store::new(config.runtime.root.clone());
    Sandbox::fetch(
        store,
        id,
        |record| {
            // The sandbox's own configuration snapshot decides the programs, so a changed
            // config file does not change a running sandbox.
            let settings = qemu_settings(&record.config)?;
            let hv: Box<dyn Hypervisor> = if record.state == State::Stopped {
                Box::new(Qemu::new(settings))
            } else {
                Box::new(Qemu::attach(settings, record.vm.clone())?)
            };
            Ok(hv)
        },
        Arc::new(TtrpcConnector::new(config.agent.request_timeout())),
    )
}
