//! The VM as the sandbox describes it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Accelerator;

/// Everything needed to boot one sandbox VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Number of virtual CPUs (1 to 255).
    pub vcpus: u32,
    /// Guest RAM in MiB (at least 64).
    pub memory_mib: u32,
    /// Guest kernel (bzImage).
    pub kernel: PathBuf,
    /// Guest initramfs with the agent as `/init`.
    pub initrd: PathBuf,
    /// Extra kernel command-line parameters, appended after runvm's own.
    pub kernel_params: Vec<String>,
    /// The accelerator, already resolved.
    pub accelerator: Accelerator,
    /// A host folder shared with the guest over virtio-fs.
    pub shared_dir: Option<SharedDir>,
    /// How the agent channel is provided.
    pub vsock: VsockBackend,
    /// The VM's private folder on the host: sockets, logs, pid files. Created by `prepare`,
    /// removed by `stop`.
    pub run_dir: PathBuf,
    /// The network namespace QEMU runs in (a bind-mounted namespace file such as
    /// `/run/netns/NAME`); `None`: the host's. The taps of `net_devices` live there.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// The VM's network cards, present at boot (hot-added ones are appended).
    #[serde(default)]
    pub net_devices: Vec<NetDevice>,
    /// PCIe root ports left free for hot-adding devices (0: no hotplug).
    #[serde(default)]
    pub hotplug_ports: u32,
    /// Network cards use the kernel's vhost-net (`/dev/vhost-net`; with KVM only).
    #[serde(default)]
    pub vhost_net: bool,
    /// Under TCG, the translation cache's size in MiB (0: QEMU's default). The cache is most
    /// of QEMU's own memory under TCG.
    #[serde(default)]
    pub tcg_tb_size_mib: u32,
    /// The `cgroup.procs` files of the host cgroup the VM's processes (QEMU and its helpers)
    /// go into: each process writes itself there between fork and exec, before it allocates
    /// anything (empty: they stay in their parent's cgroups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup_procs: Vec<PathBuf>,
}

/// A virtio-net card backed by a tap device in the VM's network namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetDevice {
    /// The id of the card's QEMU netdev (`[A-Za-z0-9_-]`, at most 32 characters); the card
    /// itself is `dev-ID`.
    pub id: String,
    /// The tap device's name in the VM's network namespace (at most 15 characters).
    pub tap: String,
    /// The card's MAC address, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// For a macvtap: its character device (`/dev/tapN`), which QEMU gets open as a file
    /// descriptor; `tap` is then the macvtap's name, for messages. `None`: `tap` is a tap QEMU
    /// opens by name.
    #[serde(default)]
    pub macvtap: Option<std::path::PathBuf>,
    /// The PCIe root port a hot-added card sits on (set by the hypervisor); `None` for cards
    /// present at boot.
    #[serde(default)]
    pub hotplug_port: Option<String>,
}

/// A host folder exported to the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedDir {
    /// Host folder.
    pub path: PathBuf,
    /// The tag the guest mounts (`mount -t virtiofs TAG /mnt`).
    pub tag: String,
}

/// virtiofsd's caching policy (`--cache`): what the guest kernel may keep of the shared files.
///
/// With `never` and `metadata` the guest opens files for direct I/O, which a guest kernel before
/// 6.6 (no `FUSE_DIRECT_IO_ALLOW_MMAP`) cannot map `MAP_SHARED` (`ENODEV`). With `auto` the guest
/// caches file data while a file is open and drops it at each open, and attributes and names for
/// about a second (virtiofsd's timeout); `always` keeps both much longer (a day), so a change made
/// on the host may stay unseen in the guest.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VirtiofsCache {
    /// Data cached while open; attributes and names for about a second.
    #[default]
    Auto,
    /// Data, attributes and names cached for long: host-side changes may stay unseen.
    Always,
    /// Attributes and names cached, no data: no shared mappings on a guest kernel before 6.6.
    Metadata,
    /// Nothing cached: no shared mappings on a guest kernel before 6.6.
    Never,
}

impl VirtiofsCache {
    /// The value of virtiofsd's `--cache`.
    pub fn as_arg(self) -> &'static str {
        match self {
            VirtiofsCache::Auto => "auto",
            VirtiofsCache::Always => "always",
            VirtiofsCache::Metadata => "metadata",
            VirtiofsCache::Never => "never",
        }
    }
}

/// How the VM's vsock device is provided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VsockBackend {
    /// The kernel's vhost-vsock (`/dev/vhost-vsock`); the host uses AF_VSOCK to this CID.
    Vhost {
        /// The guest's context id, unique on the host (3 or more).
        guest_cid: u32,
    },
    /// A `vhost-device-vsock` process; the host reaches the guest through a unix socket
    /// ("hybrid vsock": `CONNECT <port>\n`, answered `OK <port>\n`).
    VhostUser,
}

/// Where the host reaches a port of the guest's vsock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AgentAddress {
    /// AF_VSOCK to `cid:port`.
    Vsock {
        /// Guest context id.
        cid: u32,
        /// Guest port.
        port: u32,
    },
    /// A unix socket speaking the hybrid-vsock handshake.
    HybridVsock {
        /// The unix socket.
        uds_path: PathBuf,
        /// Guest port.
        port: u32,
    },
}

/// A host process that is part of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmProcess {
    /// Its role: "qemu", "virtiofsd", "vhost-device-vsock".
    pub name: String,
    /// Its pid.
    pub pid: u32,
}

/// What a hypervisor backend supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Pausing and resuming vCPUs.
    pub pause: bool,
    /// A virtio-fs shared folder.
    pub shared_fs: bool,
    /// Block device hotplug.
    pub block_hotplug: bool,
}

/// A host process of a running VM, as saved for another process to take over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedProcess {
    /// Its role: "qemu", "virtiofsd", "vhost-device-vsock".
    pub name: String,
    /// Its pid.
    pub pid: u32,
    /// Its start time (clock ticks since boot), to tell it from a later process with the same
    /// pid.
    pub start_time: u64,
}

/// What another process needs to take over a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    /// The VM's config (run folder, vsock, ...).
    pub config: VmConfig,
    /// Its host processes.
    pub processes: Vec<SavedProcess>,
    /// Whether its vCPUs are paused.
    pub paused: bool,
}
