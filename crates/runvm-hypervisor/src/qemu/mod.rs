//! The QEMU backend: QEMU plus its helpers (virtiofsd for the shared folder, vhost-device-vsock
//! for the agent channel where the host has no `/dev/vhost-vsock`), driven over QMP.

mod cmdline;
pub mod jail;
mod process;
pub(crate) mod resize;

pub use cmdline::{
    kernel_cmdline, qemu_args, validate, RunDirLayout, BASE_KERNEL_PARAMS, MEMORY_HOTPLUG_PARAM,
    VIRTIO_MEM_ID,
};
pub use process::{
    cap_log, find_by_argument, proc_cpu_time, proc_exe, proc_start_time, runs_program, tail,
    FoundProcess,
};
pub use resize::PLUG_TIMEOUT;

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use nix::sys::signal::Signal;

use crate::qmp::{QmpClient, VmRunState};
use crate::{
    poll_until, Accelerator, AgentAddress, Capabilities, Hypervisor, HypervisorError, NetDevice,
    OnSpawn, Result, SavedProcess, VirtiofsCache, VmConfig, VmProcess, VmState, VsockBackend,
};
use jail::{Jail, VmmUser};
use process::{ManagedChild, Placement};

/// The vsock port of the agent.
const AGENT_PORT: u32 = 1024;
/// How long a helper's clean exit waits for QEMU's exit to show (see `check_children`).
const HELPER_CLEAN_EXIT_GRACE: Duration = Duration::from_secs(5);
/// How long a helper's failure waits for QEMU's exit to show.
const HELPER_FAILED_GRACE: Duration = Duration::from_secs(1);

/// The programs the QEMU backend runs, and how long it gives them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuSettings {
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// `virtiofsd`.
    pub virtiofsd: PathBuf,
    /// `vhost-device-vsock`.
    pub vhost_device_vsock: PathBuf,
    /// virtiofsd's `--cache`.
    pub virtiofs_cache: VirtiofsCache,
    /// How long a helper or QEMU may take to create its socket.
    pub start_timeout: Duration,
    /// The most each log of the VM (guest console, QEMU's and each helper's output) holds;
    /// beyond it the oldest part is dropped at the next [`Hypervisor::check`].
    pub log_max_bytes: u64,
    /// The unprivileged user QEMU and vhost-device-vsock run as, each in its own jail, and
    /// virtiofsd in its namespace sandbox; `None`: unconfined (`hypervisor.confine = false`,
    /// for hosts that cannot confine).
    pub confinement: Option<VmmUser>,
}

/// QEMU's own seccomp filter, with every optional group denied.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

impl QemuSettings {
    /// The program a process of role `name` runs.
    pub fn program(&self, name: &str) -> Option<&std::path::Path> {
        match name {
            "qemu" => Some(&self.qemu),
            "virtiofsd" => Some(&self.virtiofsd),
            "vhost-device-vsock" => Some(&self.vhost_device_vsock),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    New,
    Prepared,
    Running,
    Paused,
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::New => "not prepared",
            State::Prepared => "prepared",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

/// One QEMU VM and its helpers.
#[derive(Debug)]
pub struct Qemu {
    settings: QemuSettings,
    state: State,
    config: Option<VmConfig>,
    layout: Option<RunDirLayout>,
    qemu: Option<ManagedChild>,
    helpers: Vec<ManagedChild>,
    qmp: Option<QmpClient>,
    /// When each start phase ended (see [`Hypervisor::start_marks`]).
    marks: Vec<(&'static str, SystemTime)>,
}

impl Qemu {
    /// A backend that will run the programs in `settings`.
    pub fn new(settings: QemuSettings) -> Self {
        Qemu {
            settings,
            state: State::New,
            config: None,
            layout: None,
            qemu: None,
            helpers: Vec::new(),
            qmp: None,
            marks: Vec::new(),
        }
    }

    /// The run folder's layout, once prepared.
    pub fn layout(&self) -> Option<&RunDirLayout> {
        self.layout.as_ref()
    }

    fn require(&self, operation: &'static str, ok: &[State]) -> Result<()> {
        if ok.contains(&self.state) {
            Ok(())
        } else {
            Err(HypervisorError::InvalidState {
                operation,
                state: self.state.name(),
            })
        }
    }

    fn prepared(&self) -> Result<(&VmConfig, &RunDirLayout)> {
        match (&self.config, &self.layout) {
            (Some(c), Some(l)) => Ok((c, l)),
            _ => Err(HypervisorError::InvalidState {
                operation: "start",
                state: self.state.name(),
            }),
        }
    }

    /// The processes started so far, as saved for another process.
    fn saved_processes(&self) -> Vec<SavedProcess> {
        self.qemu
            .iter()
            .chain(self.helpers.iter())
            .map(|c| SavedProcess {
                name: c.name.to_string(),
                pid: c.pid(),
                start_time: c.start_time(),
            })
            .collect()
    }

    /// Tells `on_spawn` about the processes so far; `latest` names the one just spawned.
    fn record_spawn(&self, on_spawn: &mut OnSpawn<'_>, latest: &ManagedChild) -> Result<()> {
        on_spawn(&self.saved_processes()).map_err(|source| HypervisorError::RecordFailed {
            program: latest.name,
            pid: latest.pid(),
            source,
        })
    }

    /// The jail of the confined process `name` (running `program`) of this VM, if confined:
    /// the run folder writable, `program` read-only where `/usr` does not hold it, and for
    /// QEMU the guest kernel, the initramfs and, with KVM, `/dev/kvm`.
    fn jail_for(&self, name: &str, program: &Path) -> Result<Option<jail::PreparedJail>> {
        let Some(user) = &self.settings.confinement else {
            return Ok(None);
        };
        let (config, layout) = self.prepared()?;
        let root = layout.jail_root(name);
        match std::fs::create_dir(&root) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(source) => {
                return Err(HypervisorError::Io {
                    action: "create the jail's root",
                    path: root,
                    source,
                })
            }
        }
        let mut jail = Jail::new(&root, user.for_vm(&layout.dir)).writable(&layout.dir);
        if !program.starts_with("/usr/") {
            jail = jail.read_only(program);
        }
        if name == "qemu" {
            jail = jail.read_only(&config.kernel).read_only(&config.initrd);
            if config.accelerator == Accelerator::Kvm {
                jail = jail.device("/dev/kvm");
            }
        }
        jail.prepare().map(Some)
    }

    async fn start_helpers(&mut self, on_spawn: &mut OnSpawn<'_>) -> Result<()> {
        let (config, layout) = self.prepared()?;
        // The user the VM's processes run as (its own uid: `VmmUser::for_vm`).
        let confined = self
            .settings
            .confinement
            .as_ref()
            .map(|u| u.for_vm(&layout.dir));
        let mut wanted: Vec<(&'static str, PathBuf, Vec<OsString>, PathBuf, PathBuf)> = Vec::new();
        if let Some(share) = &config.shared_dir {
            if confined.is_some() {
                // virtiofsd's namespace sandbox sees only mounts that propagate into it: the
                // containers' folders bound into the share later must.
                share_propagating(&share.path)?;
            }
            let sandbox = if confined.is_some() {
                "namespace"
            } else {
                "none"
            };
            wanted.push((
                "virtiofsd",
                self.settings.virtiofsd.clone(),
                vec![
                    "--shared-dir".into(),
                    share.path.clone().into(),
                    "--socket-path".into(),
                    layout.virtiofsd_socket().into(),
                    "--sandbox".into(),
                    sandbox.into(),
                    "--seccomp".into(),
                    "kill".into(),
                    "--cache".into(),
                    self.settings.virtiofs_cache.as_arg().into(),
                ],
                layout.virtiofsd_log(),
                layout.virtiofsd_socket(),
            ));
        }
        if config.vsock == VsockBackend::VhostUser {
            wanted.push((
                "vhost-device-vsock",
                self.settings.vhost_device_vsock.clone(),
                vec![
                    "--guest-cid".into(),
                    "3".into(),
                    "--socket".into(),
                    layout.vsock_socket().into(),
                    "--uds-path".into(),
                    layout.vsock_uds().into(),
                ],
                layout.vsock_log(),
                layout.vsock_socket(),
            ));
        }
        let cgroup_procs = config.cgroup_procs.clone();
        // Start all, then wait for all: the helpers come up in parallel.
        let mut sockets = Vec::new();
        for (name, program, args, log, socket) in wanted {
            // virtiofsd must stay root to serve every file as its owner: it confines itself.
            let jail = if name == "virtiofsd" {
                None
            } else {
                self.jail_for(name, &program)?
            };
            let placement = Placement {
                cgroup_procs: &cgroup_procs,
                jail,
                ..Placement::default()
            };
            let child = ManagedChild::spawn_placed(name, &program, &args, &log, placement)?;
            self.helpers.push(child);
            if let Some(child) = self.helpers.last() {
                self.record_spawn(on_spawn, child)?;
            }
            sockets.push(socket);
        }
        let timeout = self.settings.start_timeout;
        for (helper, socket) in self.helpers.iter_mut().zip(sockets) {
            let up = poll_until(timeout, || socket.exists() || helper.exited().is_some()).await;
            if helper.exited().is_some() || !up {
                let status = match helper.exited() {
                    Some(s) => s.to_string(),
                    None => format!(
                        "did not create {} within {} ms",
                        socket.display(),
                        timeout.as_millis()
                    ),
                };
                return Err(HypervisorError::HelperFailed {
                    program: helper.name,
                    status,
                    stderr: helper.log_tail(5),
                });
            }
            if let Some(user) = &confined {
                // QEMU, confined, connects to it.
                give_socket(&socket, user)?;
            }
        }
        Ok(())
    }

    async fn start_qemu(&mut self, on_spawn: &mut OnSpawn<'_>) -> Result<()> {
        let (config, layout) = self.prepared()?;
        let mut args = qemu_args(config, layout)?;
        if self.settings.confinement.is_some() {
            args.extend(["-sandbox".into(), QEMU_SANDBOX.into()]);
        }
        let qmp_path = layout.qmp_socket();
        let log = layout.qemu_log();
        tracing::debug!(args = ?args, "qemu command line");
        // What needs privilege reaches QEMU as open descriptors (see `cmdline::net_fds`).
        let mut opened: Vec<(i32, std::fs::File)> = Vec::new();
        for (index, device) in config.net_devices.iter().enumerate() {
            let (fd, vhostfd) = cmdline::net_fds(index, config.vhost_net);
            opened.push((fd, open_card(config.netns.as_deref(), device)?));
            if let Some(vhostfd) = vhostfd {
                opened.push((vhostfd, open_device("/dev/vhost-net")?));
            }
        }
        if let VsockBackend::Vhost { .. } = config.vsock {
            opened.push((cmdline::VSOCK_FD, open_device("/dev/vhost-vsock")?));
        }
        let fds: Vec<(i32, &std::fs::File)> = opened.iter().map(|(n, f)| (*n, f)).collect();
        let jail = self.jail_for("qemu", &self.settings.qemu)?;
        let placement = Placement {
            netns: config.netns.as_deref(),
            fds: &fds,
            cgroup_procs: &config.cgroup_procs,
            jail,
        };
        let mut qemu =
            ManagedChild::spawn_placed("qemu", &self.settings.qemu, &args, &log, placement)?;
        drop(fds);
        drop(opened);
        let spawned = SystemTime::now();
        // Recorded before anything else can fail; a failed record stops it again (`start`).
        let saved: Vec<SavedProcess> = self
            .saved_processes()
            .into_iter()
            .chain(std::iter::once(SavedProcess {
                name: qemu.name.to_string(),
                pid: qemu.pid(),
                start_time: qemu.start_time(),
            }))
            .collect();
        let recorded = on_spawn(&saved).map_err(|source| HypervisorError::RecordFailed {
            program: qemu.name,
            pid: qemu.pid(),
            source,
        });
        let timeout = self.settings.start_timeout;
        if recorded.is_ok() {
            poll_until(timeout, || qmp_path.exists() || qemu.exited().is_some()).await;
        }
        let early_exit = |qemu: &mut ManagedChild| HypervisorError::QemuExited {
            status: qemu.status_text(),
            stderr: qemu.log_tail(10),
        };
        if let Err(e) = recorded {
            self.qemu = Some(qemu);
            return Err(e);
        }
        if qemu.exited().is_some() {
            let err = early_exit(&mut qemu);
            self.qemu = Some(qemu);
            return Err(err);
        }
        self.qemu = Some(qemu);
        self.marks.push(("qemu-spawned", spawned));
        let mut qmp = match QmpClient::connect(&qmp_path, timeout).await {
            Ok(q) => q,
            Err(e) => {
                let qemu = self.qemu.as_mut().expect("set above");
                // An exit explains the failure better than the socket error.
                if qemu.wait_exit(Duration::from_millis(200)).await {
                    return Err(early_exit(qemu));
                }
                return Err(e.into());
            }
        };
        let status = qmp.query_status().await?;
        if status != VmRunState::Running {
            return Err(HypervisorError::QemuExited {
                status: format!("VM is {status:?} instead of running"),
                stderr: self
                    .qemu
                    .as_ref()
                    .map(|q| q.log_tail(10))
                    .unwrap_or_default(),
            });
        }
        self.qmp = Some(qmp);
        self.marks.push(("qmp-connected", SystemTime::now()));
        Ok(())
    }

    /// Stops every process and removes the run folder. Best effort, never fails.
    async fn teardown(&mut self, graceful_timeout: Duration) {
        let alive = self.qemu.as_mut().is_some_and(|q| q.exited().is_none());
        if alive && self.qmp.is_none() {
            // An attached VM: connect now to stop it in order.
            if let Err(e) = self.qmp().await {
                tracing::warn!(error = %e, "cannot reach QEMU's monitor to stop it");
            }
        }
        if let Some(qemu) = self.qemu.as_mut() {
            if qemu.exited().is_none() {
                if let Some(qmp) = self.qmp.as_mut() {
                    if self.state == State::Paused {
                        let _ = qmp.cont().await;
                    }
                    // ACPI power button: a guest that handles it powers off cleanly.
                    if qmp.system_powerdown().await.is_ok()
                        && qemu.wait_exit(graceful_timeout).await
                    {
                        tracing::debug!("qemu exited after system_powerdown");
                    } else if qmp.quit().await.is_ok() {
                        qemu.wait_exit(Duration::from_secs(2)).await;
                    }
                }
            }
            if qemu.exited().is_none() {
                tracing::warn!(pid = qemu.pid(), "qemu did not quit; killing it");
                qemu.signal(Signal::SIGKILL);
                qemu.wait_exit(Duration::from_secs(5)).await;
            }
        }
        self.qmp = None;
        // virtiofsd exits once QEMU is gone; the vsock helper needs a signal.
        for helper in &mut self.helpers {
            helper.terminate(Duration::from_secs(1)).await;
        }
        self.helpers.clear();
        self.qemu = None;
        self.unshare_share();
        if let Some(layout) = &self.layout {
            if let Err(e) = std::fs::remove_dir_all(&layout.dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(dir = %layout.dir.display(), error = %e, "cannot remove run folder");
                }
            }
        }
        self.state = State::Stopped;
    }

    /// Undoes what confinement mounted for virtiofsd (see [`share_propagating`]).
    fn unshare_share(&self) {
        if self.settings.confinement.is_none() {
            return;
        }
        if let Some(share) = self.config.as_ref().and_then(|c| c.shared_dir.as_ref()) {
            unshare_share(&share.path);
        }
    }

    /// Keeps every log of the run folder within `log_max_bytes`.
    fn cap_logs(&self) {
        let Some(layout) = &self.layout else {
            return;
        };
        for log in [
            layout.console_log(),
            layout.qemu_log(),
            layout.virtiofsd_log(),
            layout.vsock_log(),
        ] {
            let freed = cap_log(&log, self.settings.log_max_bytes);
            if freed > 0 {
                tracing::debug!(log = %log.display(), freed, "log capped");
            }
        }
    }

    async fn check_children(&mut self) -> Result<()> {
        // virtiofsd and vhost-device-vsock end (cleanly) when QEMU closes their sockets, which
        // QEMU does before its own exit shows; on a loaded host that gap exceeds a second. When
        // a helper is gone, give QEMU's exit time to show, so the report names the cause rather
        // than the consequence: longer when the helper ended cleanly, as it does after QEMU.
        let mut grace = Duration::ZERO;
        for helper in &mut self.helpers {
            match helper.exited() {
                Some("exit status: 0") => grace = HELPER_CLEAN_EXIT_GRACE,
                Some(_) => grace = grace.max(HELPER_FAILED_GRACE),
                None => {}
            }
        }
        if let Some(qemu) = self.qemu.as_mut() {
            if qemu.wait_exit(grace).await {
                return Err(HypervisorError::QemuExited {
                    status: qemu.status_text(),
                    stderr: qemu.log_tail(10),
                });
            }
        }
        for helper in &mut self.helpers {
            if let Some(status) = helper.exited().map(str::to_string) {
                return Err(HypervisorError::HelperFailed {
                    program: helper.name,
                    status,
                    stderr: helper.log_tail(5),
                });
            }
        }
        Ok(())
    }

    async fn qmp(&mut self) -> Result<&mut QmpClient> {
        if self.qmp.is_none() {
            let (_, layout) = self.prepared()?;
            let path = layout.qmp_socket();
            let client = QmpClient::connect(&path, self.settings.start_timeout).await?;
            self.qmp = Some(client);
        }
        self.qmp.as_mut().ok_or(HypervisorError::InvalidState {
            operation: "talk to QEMU",
            state: "not started",
        })
    }

    /// Takes over a running VM another process started and saved with
    /// [`Hypervisor::save`]. Nothing is started; QMP is connected when first needed.
    pub fn attach(settings: QemuSettings, saved: VmState) -> Result<Qemu> {
        let layout = RunDirLayout::new(&saved.config.run_dir);
        let log_of = |name: &str| match name {
            "qemu" => layout.qemu_log(),
            "virtiofsd" => layout.virtiofsd_log(),
            _ => layout.vsock_log(),
        };
        let mut qemu = None;
        let mut helpers = Vec::new();
        for p in &saved.processes {
            let name: &'static str = match p.name.as_str() {
                "qemu" => "qemu",
                "virtiofsd" => "virtiofsd",
                "vhost-device-vsock" => "vhost-device-vsock",
                other => {
                    return Err(HypervisorError::InvalidConfig(format!(
                        "saved VM state names an unknown process {other:?}"
                    )))
                }
            };
            let child = ManagedChild::adopt(
                name,
                p.pid,
                p.start_time,
                &log_of(name),
                settings.program(name),
            );
            if name == "qemu" {
                qemu = Some(child);
            } else {
                helpers.push(child);
            }
        }
        if qemu.is_none() {
            return Err(HypervisorError::InvalidConfig(
                "saved VM state has no qemu process".into(),
            ));
        }
        Ok(Qemu {
            settings,
            state: if saved.paused {
                State::Paused
            } else {
                State::Running
            },
            config: Some(saved.config),
            layout: Some(layout),
            qemu,
            helpers,
            qmp: None,
            marks: Vec::new(),
        })
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn start_marks(&self) -> Vec<(&'static str, SystemTime)> {
        self.marks.clone()
    }

    fn cpu_time(&self) -> Option<Duration> {
        self.qemu.as_ref().and_then(|q| proc_cpu_time(q.pid()))
    }

    async fn prepare(&mut self, config: VmConfig) -> Result<()> {
        self.require("prepare", &[State::New])?;
        validate(&config)?;
        for (what, path) in [
            ("guest kernel", &config.kernel),
            ("guest initramfs", &config.initrd),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::MissingFile {
                    what,
                    path: path.clone(),
                    hint: "build the guest image with `cargo xtask guest` (or `make guest`)".into(),
                });
            }
        }
        if let Some(share) = &config.shared_dir {
            if !share.path.is_dir() {
                return Err(HypervisorError::MissingFile {
                    what: "shared folder",
                    path: share.path.clone(),
                    hint: "the sandbox creates it before the VM starts".into(),
                });
            }
        }
        let layout = RunDirLayout::new(&config.run_dir);
        if layout.dir.exists() {
            return Err(HypervisorError::InvalidConfig(format!(
                "run folder {} exists already: is another VM using it?",
                layout.dir.display()
            )));
        }
        std::fs::create_dir_all(&layout.dir).map_err(|source| HypervisorError::Io {
            action: "create run folder",
            path: layout.dir.clone(),
            source,
        })?;
        if let Some(user) = &self.settings.confinement {
            if let Err(e) = confined_run_dir(&layout, user) {
                let _ = std::fs::remove_dir_all(&layout.dir);
                return Err(e);
            }
        }
        self.layout = Some(layout);
        self.config = Some(config);
        self.state = State::Prepared;
        Ok(())
    }

    async fn start(&mut self, on_spawn: &mut OnSpawn<'_>) -> Result<()> {
        self.require("start", &[State::Prepared])?;
        self.marks.clear();
        let started = async {
            self.start_helpers(on_spawn).await?;
            self.marks.push(("helpers-started", SystemTime::now()));
            self.start_qemu(on_spawn).await
        }
        .await;
        match started {
            Ok(()) => {
                self.state = State::Running;
                Ok(())
            }
            Err(e) => {
                self.teardown(Duration::ZERO).await;
                Err(e)
            }
        }
    }

    async fn stop(&mut self, graceful_timeout: Duration) -> Result<()> {
        if self.state != State::Stopped {
            self.teardown(graceful_timeout).await;
        }
        Ok(())
    }

    async fn pause(&mut self) -> Result<()> {
        self.require("pause", &[State::Running])?;
        self.qmp().await?.stop().await?;
        self.state = State::Paused;
        Ok(())
    }

    async fn resume(&mut self) -> Result<()> {
        self.require("resume", &[State::Paused])?;
        self.qmp().await?.cont().await?;
        self.state = State::Running;
        Ok(())
    }

    async fn check(&mut self) -> Result<()> {
        self.require("check", &[State::Running, State::Paused])?;
        self.cap_logs();
        self.check_children().await
    }

    async fn resize(&mut self, target: crate::VmSize) -> Result<crate::VmSize> {
        self.resize_vm(target).await
    }

    async fn add_net_device(&mut self, device: &NetDevice) -> Result<()> {
        self.require("hot-add a network card", &[State::Running])?;
        cmdline::validate_net_device(device)?;
        let (config, _) = self.prepared()?;
        if config.net_devices.iter().any(|d| d.id == device.id) {
            return Err(HypervisorError::NetDevice {
                id: device.id.clone(),
                reason: "the VM has a card with this id already".into(),
            });
        }
        // Cards present at boot sit on the root bus; hot-added ones take a free root port.
        let used: Vec<&String> = config
            .net_devices
            .iter()
            .filter_map(|d| d.hotplug_port.as_ref())
            .collect();
        let port = (0..config.hotplug_ports)
            .map(cmdline::hotplug_port_id)
            .find(|p| !used.contains(&p))
            .ok_or_else(|| HypervisorError::NetDevice {
                id: device.id.clone(),
                reason: format!("no free hotplug port (the VM has {})", config.hotplug_ports),
            })?;
        let vhost = config.vhost_net;
        let tap = open_card(config.netns.as_deref(), device)?;
        let vhost_dev = vhost.then(|| open_device("/dev/vhost-net")).transpose()?;
        let qmp = self.qmp().await?;
        // The tap (and vhost-net device) reach QEMU as descriptors over the monitor socket.
        use std::os::fd::AsFd;
        let fdname = format!("fd-{}", device.id);
        let vhostname = format!("vhostfd-{}", device.id);
        let close = |name: &str| serde_json::json!({ "fdname": name });
        qmp.getfd(&fdname, tap.as_fd()).await?;
        if let Some(dev) = &vhost_dev {
            if let Err(e) = qmp.getfd(&vhostname, dev.as_fd()).await {
                let _ = qmp
                    .execute::<serde::de::IgnoredAny>("closefd", Some(close(&fdname)))
                    .await;
                return Err(e.into());
            }
        }
        let vhostfd = vhost_dev.as_ref().map(|_| vhostname.as_str());
        if let Err(e) = qmp.netdev_add_fd(&device.id, &fdname, vhostfd).await {
            for name in std::iter::once(fdname.as_str()).chain(vhostfd) {
                let _ = qmp
                    .execute::<serde::de::IgnoredAny>("closefd", Some(close(name)))
                    .await;
            }
            return Err(e.into());
        }
        let card = serde_json::json!({
            "driver": "virtio-net-pci",
            "id": format!("dev-{}", device.id),
            "netdev": device.id,
            "mac": device.mac,
            "bus": port,
        });
        if let Err(e) = qmp.device_add(card).await {
            let _ = qmp.netdev_del(&device.id).await;
            return Err(e.into());
        }
        if let Some(config) = self.config.as_mut() {
            config.net_devices.push(NetDevice {
                hotplug_port: Some(port),
                ..device.clone()
            });
        }
        Ok(())
    }

    async fn remove_net_device(&mut self, id: &str) -> Result<()> {
        self.require("hot-remove a network card", &[State::Running])?;
        let (config, _) = self.prepared()?;
        if !config.net_devices.iter().any(|d| d.id == id) {
            return Err(HypervisorError::NetDevice {
                id: id.to_owned(),
                reason: "the VM has no such card".into(),
            });
        }
        let timeout = self.settings.start_timeout;
        let qmp = self.qmp().await?;
        if !qmp.device_del(&format!("dev-{id}"), timeout).await? {
            return Err(HypervisorError::NetDevice {
                id: id.to_owned(),
                reason: format!("the guest did not release the card within {timeout:?}"),
            });
        }
        qmp.netdev_del(id).await?;
        if let Some(config) = self.config.as_mut() {
            config.net_devices.retain(|d| d.id != id);
        }
        Ok(())
    }

    fn save(&self) -> Result<VmState> {
        let (config, _) = self.prepared()?;
        self.require("save", &[State::Running, State::Paused])?;
        Ok(VmState {
            config: config.clone(),
            processes: self.saved_processes(),
            paused: self.state == State::Paused,
        })
    }

    fn detach(&mut self) {
        // Forget the processes without stopping them: another process attaches later.
        self.qmp = None;
        self.qemu = None;
        self.helpers.clear();
        self.state = State::Stopped;
    }

    fn adopt(&mut self, saved: VmState) -> Result<()> {
        self.require("adopt a running VM", &[State::New])?;
        *self = Qemu::attach(self.settings.clone(), saved)?;
        Ok(())
    }

    fn agent_address(&self) -> Result<AgentAddress> {
        let (config, layout) = self.prepared()?;
        Ok(match config.vsock {
            VsockBackend::Vhost { guest_cid } => AgentAddress::Vsock {
                cid: guest_cid,
                port: AGENT_PORT,
            },
            VsockBackend::VhostUser => AgentAddress::HybridVsock {
                uds_path: layout.vsock_uds(),
                port: AGENT_PORT,
            },
        })
    }

    fn pids(&self) -> Vec<VmProcess> {
        self.saved_processes()
            .into_iter()
            .map(|p| VmProcess {
                name: p.name,
                pid: p.pid,
            })
            .collect()
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            pause: true,
            shared_fs: true,
            block_hotplug: false,
        }
    }

    fn console_tail(&self, lines: usize) -> Vec<String> {
        self.layout
            .as_ref()
            .map(|l| tail(&l.console_log(), lines))
            .unwrap_or_default()
    }

    fn helper_log_tails(&self, lines: usize) -> Vec<String> {
        let Some(l) = self.layout.as_ref() else {
            return Vec::new();
        };
        [
            ("vhost-device-vsock", l.vsock_log()),
            ("virtiofsd", l.virtiofsd_log()),
        ]
        .into_iter()
        .flat_map(|(name, path)| {
            tail(&path, lines)
                .into_iter()
                .map(move |line| format!("{name}: {line}"))
        })
        .collect()
    }
}

/// Readies the run folder of a confined VM: the VM's user's group may make its sockets and
/// files there but not rename or remove root's (sticky, `root:GROUP 1770`); the guest console
/// log is made here, root's, writable by the group (QEMU opens it, cannot replace it).
fn confined_run_dir(layout: &RunDirLayout, user: &VmmUser) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let io = |action: &'static str, path: PathBuf| {
        move |source| HypervisorError::Io {
            action,
            path,
            source,
        }
    };
    std::os::unix::fs::chown(&layout.dir, Some(0), Some(user.gid)).map_err(io(
        "give the run folder to the VM's group",
        layout.dir.clone(),
    ))?;
    std::fs::set_permissions(&layout.dir, std::fs::Permissions::from_mode(0o1770))
        .map_err(io("set the run folder's mode", layout.dir.clone()))?;
    let console = layout.console_log();
    std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&console)
        .map_err(io("create the console log", console.clone()))?;
    std::os::unix::fs::chown(&console, Some(0), Some(user.gid)).map_err(io(
        "give the console log to the VM's group",
        console.clone(),
    ))?;
    std::fs::set_permissions(&console, std::fs::Permissions::from_mode(0o660))
        .map_err(io("set the console log's mode", console))?;
    Ok(())
}

/// Opens network card `device`'s host end for QEMU: its macvtap's character device
/// (`/dev/tapN`), or its tap, attached in the network namespace `netns`.
fn open_card(netns: Option<&Path>, device: &NetDevice) -> Result<std::fs::File> {
    match &device.macvtap {
        Some(path) => open_device(path),
        None => open_tap(netns, &device.tap),
    }
}

/// Opens a character device read-write (a macvtap, `/dev/vhost-net`, `/dev/vhost-vsock`) for
/// QEMU to inherit.
fn open_device(path: impl AsRef<Path>) -> Result<std::fs::File> {
    let path = path.as_ref();
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|source| HypervisorError::Io {
            action: "open device for QEMU",
            path: path.to_path_buf(),
            source,
        })
}

/// Attaches to the existing tap `name` of network namespace `netns` (the host's if `None`):
/// `/dev/net/tun` opened and attached with `TUNSETIFF` in a thread of its own that joins the
/// namespace, so that this process's threads stay where they are.
fn open_tap(netns: Option<&Path>, name: &str) -> Result<std::fs::File> {
    let ns = netns
        .map(|path| {
            std::fs::File::open(path).map_err(|source| HypervisorError::Netns {
                path: path.to_path_buf(),
                source,
            })
        })
        .transpose()?;
    let fail = |source: std::io::Error| HypervisorError::Io {
        action: "attach to tap",
        path: PathBuf::from(name),
        source,
    };
    let attach = || -> std::io::Result<std::fs::File> {
        use std::os::fd::AsRawFd;
        if let Some(ns) = &ns {
            // SAFETY: setns(2) on an open namespace file; it moves only this thread, which
            // ends after the attach.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        // The flags QEMU itself attaches with.
        tun_attach(name, libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR)
    };
    std::thread::scope(|scope| {
        scope
            .spawn(attach)
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the attaching thread panicked")))
    })
    .map_err(fail)
}

/// Opens `/dev/net/tun` and attaches it (`TUNSETIFF`) to the tun or tap device `name` of the
/// calling thread's network namespace with `flags` (`IFF_*`; with `IFF_TUN_EXCL` it makes the
/// device instead and fails if it exists). The one place runvm attaches to a tap.
pub fn tun_attach(name: &str, flags: libc::c_int) -> std::io::Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    if name.len() >= req.ifr_name.len() {
        return Err(std::io::Error::other("name too long"));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is, and `tun` is an open /dev/net/tun.
    if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// Gives the vhost-user socket `path` (made by a helper) to `user`, so that QEMU running as
/// that user can connect.
fn give_socket(path: &Path, user: &VmmUser) -> Result<()> {
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(|source| {
        HypervisorError::Io {
            action: "give the socket to the VM's user",
            path: path.to_path_buf(),
            source,
        }
    })
}

/// Makes the shared folder `path` a mount point of its own whose mounts propagate (a bind of
/// itself, marked shared), unless it is one already: virtiofsd's namespace sandbox takes a
/// copy of it as a slave, which then receives the containers' folders bound into the share
/// later, and their unmounting. Undone by [`unshare_share`].
fn share_propagating(path: &Path) -> Result<()> {
    use nix::mount::{mount, MsFlags};
    let fail = |e: nix::Error| HypervisorError::Io {
        action: "make the shared folder a shared mount",
        path: path.to_path_buf(),
        source: std::io::Error::from(e),
    };
    mount(
        Some(path),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(fail)?;
    if let Err(e) = mount(
        None::<&str>,
        path,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    ) {
        let _ = nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH);
        return Err(fail(e));
    }
    Ok(())
}

/// Undoes [`share_propagating`]: detaches the shared folder's own mount (with what is still
/// mounted under it), leaving the folder. Best effort.
fn unshare_share(path: &Path) {
    match nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot unmount the shared folder")
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // A caller that forgot `stop` (or panicked) must not leak a VM.
        if !matches!(self.state, State::New | State::Stopped) {
            tracing::warn!("Qemu dropped without stop; killing its processes");
            for c in self.qemu.iter_mut().chain(self.helpers.iter_mut()) {
                c.kill_now();
            }
            self.unshare_share();
            if let Some(layout) = &self.layout {
                let _ = std::fs::remove_dir_all(&layout.dir);
            }
        }
    }
}
