//! `runvm check`: is this host able to run sandboxes, and what to do where it is not.

use std::path::Path;
use std::process::Command;

use runvm_hypervisor::{Accelerator, HostCpu};

use crate::config::{resolve_program, Config, VsockMode};

/// One requirement and how the host meets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckItem {
    /// What is checked.
    pub name: &'static str,
    /// Whether it is met.
    pub ok: bool,
    /// What was found.
    pub detail: String,
    /// What to do when not met.
    pub fix: Option<String>,
    /// Whether a sandbox can run without it.
    pub required: bool,
}

/// The whole report.
#[derive(Debug, Clone)]
pub struct CheckReport {
    /// Every requirement, in display order.
    pub items: Vec<CheckItem>,
    /// The accelerator that will be used, or why none can be.
    pub accelerator: Result<Accelerator, String>,
}

impl CheckReport {
    /// A sandbox can run: every required item is met and an accelerator is usable.
    pub fn can_run(&self) -> bool {
        self.accelerator.is_ok() && self.items.iter().all(|i| i.ok || !i.required)
    }
}

fn item(name: &'static str, ok: bool, detail: String, fix: &str, required: bool) -> CheckItem {
    CheckItem {
        name,
        ok,
        detail,
        fix: (!ok).then(|| fix.to_string()),
        required,
    }
}

/// First line of `program --version`.
fn version_line(program: &Path) -> Option<String> {
    let out = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

fn program_item(name: &'static str, configured: &str, fix: &str, required: bool) -> CheckItem {
    match resolve_program(configured) {
        Some(path) => {
            let version = version_line(&path).unwrap_or_else(|| "version unknown".into());
            item(
                name,
                true,
                format!("{} ({version})", path.display()),
                fix,
                required,
            )
        }
        None => item(
            name,
            false,
            format!("{configured:?} not found in /opt/runvm/bin or $PATH"),
            fix,
            required,
        ),
    }
}

fn file_item(name: &'static str, path: &Path, fix: &str) -> CheckItem {
    match path.metadata() {
        Ok(m) if m.is_file() => item(
            name,
            true,
            format!("{} ({:.1} MiB)", path.display(), m.len() as f64 / 1048576.0),
            fix,
            true,
        ),
        _ => item(
            name,
            false,
            format!("{} is missing", path.display()),
            fix,
            true,
        ),
    }
}

/// The cgroup layout of the host: "v2", "v1", "hybrid" or none.
fn cgroup_layout() -> Option<&'static str> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let v2_root = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some("/sys/fs/cgroup") && l.contains(" cgroup2 "));
    let v1 = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup"));
    let v2 = mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2"));
    match (v2_root, v1, v2) {
        (true, _, _) => Some("v2 (unified)"),
        (false, true, true) => Some("hybrid (v1 with a cgroup2 mount)"),
        (false, true, false) => Some("v1"),
        (false, false, true) => Some("v2"),
        (false, false, false) => None,
    }
}

/// Whether the VM's processes can be confined as configured (`hypervisor.confine`,
/// `hypervisor.user`); unconfined is a warning.
fn confinement_item(config: &Config) -> CheckItem {
    let h = &config.hypervisor;
    if !h.confine {
        return item(
            "confinement",
            false,
            "off (hypervisor.confine = false): QEMU and its helpers run as root, unconfined".into(),
            "create the user (make setup) and set hypervisor.confine = true",
            false,
        );
    }
    let seccomp = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Seccomp:"));
    if !seccomp {
        return item(
            "confinement",
            false,
            "the kernel has no seccomp (no Seccomp line in /proc/self/status)".into(),
            "run a kernel with CONFIG_SECCOMP_FILTER, or set hypervisor.confine = false (unconfined)",
            true,
        );
    }
    match runvm_hypervisor::qemu::jail::VmmUser::lookup(&h.user) {
        Ok(user) => {
            let uids = match user.subuids {
                Some((first, count)) => format!(
                    "a uid per VM from {}'s subordinate uids {first}-{}",
                    user.name,
                    u64::from(first) + u64::from(count) - 1
                ),
                None => format!(
                    "{}'s uid {} for every VM (no range for it in {}: add one for a uid per VM)",
                    user.name,
                    user.uid,
                    runvm_hypervisor::qemu::jail::SUBUID_FILE
                ),
            };
            item(
                "confinement",
                true,
                format!(
                    "QEMU and vhost-device-vsock in jails as {uids}, group {}; QEMU -sandbox \
                     on; virtiofsd --sandbox namespace, seccomp",
                    user.gid
                ),
                "",
                true,
            )
        }
        Err(e) => item(
            "confinement",
            false,
            e.to_string(),
            "run scripts/setup.sh (creates the user), set hypervisor.user to an existing \
             unprivileged user, or hypervisor.confine = false on a host that cannot confine",
            true,
        ),
    }
}

/// Checks this host against `config`.
pub fn run(config: &Config) -> CheckReport {
    let h = &config.hypervisor;
    let host = HostCpu::detect();
    let mut items = vec![program_item(
        "QEMU",
        &h.qemu,
        "apt-get install qemu-system-x86 (or run scripts/setup.sh)",
        true,
    )];
    let guest_fix = "build the guest image: cargo xtask guest (or make guest)";
    let root = &config.runtime.root;
    let root_check = crate::store::check_root(root);
    items.push(item(
        "state root",
        root_check.is_ok(),
        match &root_check {
            Ok(()) => format!("{} (owned by root, not writable by others)", root.display()),
            Err(e) => e.to_string(),
        },
        "make it a folder owned by root with mode 0700 (chown root: ROOT && chmod 0700 ROOT)",
        true,
    ));
    items.push(file_item("guest kernel", &config.guest.kernel, guest_fix));
    items.push(file_item(
        "guest initramfs",
        &config.guest.initrd,
        guest_fix,
    ));
    if let Some(manifest) = config
        .guest
        .initrd
        .parent()
        .map(|d| d.join("manifest.json"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
    {
        let field = |k: &str| {
            manifest
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string()
        };
        // Manifests written before the field existed carry Debian's cloud kernel.
        let kernel = match manifest.get("kernel").and_then(|v| v.as_str()) {
            Some("runvm") => format!(
                "runvm's, built from {} {}",
                field("kernel_package"),
                field("kernel_package_version")
            ),
            _ => format!(
                "Debian's cloud kernel, {} {}",
                field("kernel_package"),
                field("kernel_package_version")
            ),
        };
        items.push(item(
            "guest image manifest",
            true,
            format!(
                "kernel {} ({kernel}), agent {}",
                field("kernel_release"),
                field("agent_version")
            ),
            "",
            false,
        ));
    }
    items.push(item(
        "/dev/kvm",
        host.kvm_device_opens,
        if host.kvm_device_opens { "opens read-write".into() } else { "does not open".into() },
        "load kvm_intel or kvm_amd, or run on a host with virtualization; TCG is used meanwhile (slower)",
        false,
    ));
    items.push(item(
        "CPU virtualization (vmx/svm)",
        host.has_vmx_or_svm,
        if host.has_vmx_or_svm {
            "present".into()
        } else {
            "absent (a paravirtual or nested-less host)".into()
        },
        "enable VT-x/AMD-V or nested virtualization; TCG is used meanwhile (slower)",
        false,
    ));
    let vhost_dev = Path::new("/dev/vhost-vsock").exists();
    let use_vhost = match h.vsock {
        VsockMode::Vhost => true,
        VsockMode::VhostUser => false,
        VsockMode::Auto => vhost_dev,
    };
    if use_vhost {
        items.push(item(
            "vsock (kernel vhost-vsock)",
            vhost_dev,
            if vhost_dev {
                "/dev/vhost-vsock present".into()
            } else {
                "/dev/vhost-vsock missing".into()
            },
            "modprobe vhost_vsock, or set hypervisor.vsock = \"vhost-user\"",
            true,
        ));
    } else {
        let mut it = program_item(
            "vsock (vhost-device-vsock)",
            &h.vhost_device_vsock,
            "run scripts/setup.sh (cargo install vhost-device-vsock into /opt/runvm)",
            true,
        );
        it.detail = format!("hybrid vsock via {}", it.detail);
        items.push(it);
    }
    items.push(program_item(
        "virtiofsd",
        &h.virtiofsd,
        "run scripts/setup.sh (cargo install virtiofsd into /opt/runvm)",
        true,
    ));
    items.push(confinement_item(config));
    let cg = cgroup_layout();
    items.push(item(
        "cgroups",
        cg.is_some(),
        cg.map(str::to_string)
            .unwrap_or_else(|| "no cgroup file system mounted".into()),
        "mount cgroup2 on /sys/fs/cgroup",
        false,
    ));
    let iptables = crate::network::portfwd::find_iptables();
    items.push(item(
        "iptables (kubectl port-forward)",
        iptables.is_ok(),
        match &iptables {
            Ok(p) => p.display().to_string(),
            Err(e) => e.to_string(),
        },
        "apt-get install iptables (or run scripts/setup.sh); pods run without it, but CRI PortForward cannot reach them",
        false,
    ));
    let accelerator = h.accelerator.resolve(&host).map_err(|e| e.to_string());
    CheckReport { items, accelerator }
}
