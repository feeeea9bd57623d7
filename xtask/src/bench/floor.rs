//! The floor: QEMU with runvm's kernel, accelerator, machine and kernel command line, and an
//! initramfs whose init powers off at once. QEMU's start to its exit is kernel-to-init with
//! nothing of runvm in it (no helpers, no agent, no devices but the serial console).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use runvm_hypervisor::qemu::{qemu_args, RunDirLayout};
use runvm_hypervisor::{Accelerator, VsockBackend};
use runvm_sandbox::config::Config;
use runvm_sandbox::sandbox::{qemu_settings, sandbox_settings};
use runvm_sandbox::SandboxId;

use super::procs::timed;
use crate::guest::cpio::Archive;

/// The host's static busybox, the initramfs's only program.
const BUSYBOX: &str = "/bin/busybox";

/// What the floor's init writes to the console, proof that it ran (a guest that panics also
/// ends QEMU, under `panic=-1` and `-no-reboot`).
const INIT_MARK: &str = "runvm-floor-init";

/// A prepared floor VM: QEMU's program and arguments.
#[derive(Debug)]
pub struct Floor {
    qemu: PathBuf,
    args: Vec<OsString>,
    dir: PathBuf,
    /// The accelerator, resolved as runvm resolves it.
    pub accelerator: Accelerator,
}

/// The initramfs: `/bin/busybox` and an `/init` that powers off at once.
pub fn initramfs() -> Result<Vec<u8>> {
    let busybox = std::fs::read(BUSYBOX).with_context(|| {
        format!("read {BUSYBOX} (install busybox-static, a statically linked busybox)")
    })?;
    let mut a = Archive::new();
    a.dir("bin", 0o755)?;
    a.dir("dev", 0o755)?;
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.file("bin/busybox", 0o755, busybox)?;
    a.file(
        "init",
        0o755,
        format!(
            "#!/bin/busybox sh\n/bin/busybox echo {INIT_MARK}\nexec /bin/busybox poweroff -f\n"
        )
        .into_bytes(),
    )?;
    let mut out = Vec::new();
    a.write_to(&mut out)?;
    Ok(out)
}

impl Floor {
    /// Prepares the floor VM in `dir` from runvm's configuration: the VM runvm would start,
    /// with the initramfs swapped and without the vsock, virtio-fs and QMP.
    pub fn prepare(config: &Config, dir: &Path) -> Result<Floor> {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let initrd = dir.join("floor.cpio");
        std::fs::write(&initrd, initramfs()?)
            .with_context(|| format!("write {}", initrd.display()))?;
        let id = SandboxId::parse("bench-floor")?;
        let mut vm = sandbox_settings(config, &id)?.vm;
        vm.initrd = initrd;
        vm.shared_dir = None;
        vm.vsock = VsockBackend::VhostUser;
        vm.run_dir = dir.to_path_buf();
        vm.netns = None;
        vm.net_devices.clear();
        vm.hotplug_ports = 0;
        let args = qemu_args(&vm, &RunDirLayout::new(dir))?;
        Ok(Floor {
            qemu: qemu_settings(config)?.qemu,
            args: without_agent_devices(args),
            dir: dir.to_path_buf(),
            accelerator: vm.accelerator,
        })
    }

    /// Boots the floor VM once; the time from QEMU's start to its exit.
    pub fn run(&self, n: u32) -> Result<Duration> {
        let console = RunDirLayout::new(&self.dir).console_log();
        let _ = std::fs::remove_file(&console);
        let took = timed(
            Command::new(&self.qemu).args(&self.args),
            &self.dir,
            &format!("floor-{n}"),
        )?;
        let text = std::fs::read_to_string(&console).unwrap_or_default();
        if !text.contains(INIT_MARK) {
            let tail: Vec<&str> = text.lines().rev().take(3).collect();
            bail!(
                "the floor's init did not run; the console ended with: {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
            );
        }
        Ok(took)
    }
}

/// `args` without the QMP socket and the vsock device and its chardev (nothing serves them).
fn without_agent_devices(args: Vec<OsString>) -> Vec<OsString> {
    let mut out = Vec::with_capacity(args.len());
    let mut it = args.into_iter().peekable();
    while let Some(flag) = it.next() {
        let drop_pair = match (flag.to_str(), it.peek().and_then(|v| v.to_str())) {
            (Some("-qmp"), _) => true,
            (Some("-chardev" | "-device"), Some(v)) => v.contains("vsock"),
            _ => false,
        };
        if drop_pair {
            it.next();
        } else {
            out.push(flag);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qmp_and_vsock_are_dropped_and_the_rest_kept() {
        let args: Vec<OsString> = [
            "-machine",
            "q35",
            "-qmp",
            "unix:/r/qmp.sock",
            "-chardev",
            "socket,id=vsockchr,path=/r/vsock.sock",
            "-device",
            "vhost-user-vsock-pci,id=vsock0,chardev=vsockchr",
            "-chardev",
            "file,id=console,path=/r/console.log",
            "-no-reboot",
            "-append",
            "console=ttyS0 panic=-1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let kept: Vec<String> = without_agent_devices(args)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            kept,
            [
                "-machine",
                "q35",
                "-chardev",
                "file,id=console,path=/r/console.log",
                "-no-reboot",
                "-append",
                "console=ttyS0 panic=-1"
            ]
        );
    }

    #[test]
    fn initramfs_has_busybox_and_an_init_that_powers_off() {
        if !Path::new(BUSYBOX).exists() {
            return;
        }
        let bytes = initramfs().unwrap();
        let names: Vec<String> = crate::guest::cpio::tests::read_back(&bytes)
            .into_iter()
            .map(|e| e.name)
            .collect();
        assert!(names.contains(&"init".to_string()), "{names:?}");
        assert!(names.contains(&"bin/busybox".to_string()), "{names:?}");
    }
}
