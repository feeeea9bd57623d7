//! What PID 1 must do: kernel file systems, modules, reaping, power-off.

use std::fs::File;
use std::path::Path;

use nix::errno::Errno;
use nix::kmod::{finit_module, ModuleInitFlags};
use nix::mount::{mount, MsFlags};

/// The file listing module files (relative to its folder) in load order, one per line.
pub const MODULE_ORDER_FILE: &str = "/lib/modules/load-order";

/// Microseconds of CLOCK_BOOTTIME: time since the guest kernel started.
pub fn boottime_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|t| (t.tv_sec() as u64) * 1_000_000 + (t.tv_nsec() as u64) / 1_000)
        .unwrap_or(0)
}

/// Mounts /proc, /sys, /dev (+pts, shm), /run, /tmp and the cgroup2 hierarchy. A mount that
/// fails is reported on the console and skipped: the agent still serves, and the host sees the
/// failure in the console log.
pub fn mount_kernel_filesystems() {
    let nosuid_noexec_nodev = MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_NODEV;
    let table: &[(&str, &str, &str, MsFlags, Option<&str>)] = &[
        ("proc", "/proc", "proc", nosuid_noexec_nodev, None),
        ("sysfs", "/sys", "sysfs", nosuid_noexec_nodev, None),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        (
            "shm",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
        (
            "tmpfs",
            "/tmp",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "cgroup2",
            "/sys/fs/cgroup",
            "cgroup2",
            nosuid_noexec_nodev,
            None,
        ),
    ];
    for (source, target, fstype, flags, data) in table {
        if let Err(e) = std::fs::create_dir_all(target) {
            eprintln!("runvm-agent: cannot create {target}: {e}");
            continue;
        }
        match mount(Some(*source), *target, Some(*fstype), *flags, *data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(e) => eprintln!("runvm-agent: cannot mount {fstype} on {target}: {e}"),
        }
    }
}

/// Loads each module named in `order_file`, in order, with finit_module. A module already
/// present (EEXIST) is fine; any other failure is logged and loading goes on. Without the file
/// (runvm's own kernel, which has everything built in) there is nothing to load.
pub fn load_modules(order_file: &Path) {
    let list = match std::fs::read_to_string(order_file) {
        Ok(list) => list,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("no module list: the kernel has its drivers built in");
            return;
        }
        Err(e) => {
            tracing::warn!(file = %order_file.display(), error = %e, "cannot read the module list; loading none");
            return;
        }
    };
    let dir = order_file.parent().unwrap_or(Path::new("/"));
    let mut loaded = 0;
    for name in list.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = dir.join(name);
        let result = File::open(&path).map_err(|e| e.to_string()).and_then(|f| {
            finit_module(&f, c"", ModuleInitFlags::empty()).map_err(|e| e.to_string())
        });
        match result {
            Ok(()) => loaded += 1,
            Err(e) if e == Errno::EEXIST.to_string() => {}
            Err(e) => tracing::error!(module = %path.display(), error = %e, "cannot load module"),
        }
    }
    tracing::info!(loaded, "kernel modules loaded");
}

/// Syncs the file systems and powers the VM off. Never returns.
pub fn power_off() -> ! {
    tracing::info!("powering off");
    nix::unistd::sync();
    let err = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("runvm-agent: power-off failed: {err:?}");
    // PID 1 must not exit (the kernel would panic); panic=-1 plus -no-reboot ends the VM anyway.
    std::process::exit(1)
}

/// Reports a fatal error on the console and ends the VM (PID 1) or the process.
pub fn fatal(pid1: bool, message: &str) -> ! {
    eprintln!("runvm-agent: fatal: {message}");
    tracing::error!("fatal: {message}");
    if pid1 {
        power_off();
    }
    std::process::exit(1)
}
