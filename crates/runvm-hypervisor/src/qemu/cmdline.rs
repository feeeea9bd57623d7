//! The QEMU command line, built from a typed [`VmConfig`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::{Accelerator, HypervisorError, NetDevice, Result, VmConfig, VsockBackend};

/// Kernel parameters runvm always passes, before the configured extra ones.
///
/// `panic=-1` makes a panicking guest reboot at once, and `-no-reboot` turns a reboot into QEMU
/// exiting, so a dead guest is noticed instead of hanging. The rest shorten the boot (measured
/// with `cargo xtask bench boot`: about 0.4 s of guest time under TCG): skip the timer check,
/// expedite RCU grace periods, do not probe the i8042 keyboard controller the VM lacks, keep
/// SMP alternatives, reboot through the keyboard controller, skip the crypto self-tests.
/// `tsc=reliable` is left out on purpose: under TCG the guest calibrates its TSC against
/// emulated timers, and on a loaded host a bad calibration without the clocksource watchdog
/// makes the guest's clock run fast (its request deadlines then expire early).
pub const BASE_KERNEL_PARAMS: &[&str] = &[
    "console=ttyS0",
    "panic=-1",
    "quiet",
    "no_timer_check",
    "rcupdate.rcu_expedited=1",
    "i8042.direct=1",
    "i8042.dumbkbd=1",
    "i8042.nopnp=1",
    "i8042.noaux=1",
    "noreplace-smp",
    "reboot=k",
    "cryptomgr.notests",
];

/// The kernel parameter that onlines memory as it is hot-plugged (into the movable zone, so
/// that it can be unplugged again), for VMs with a virtio-mem device.
pub const MEMORY_HOTPLUG_PARAM: &str = "memhp_default_state=online_movable";

/// The id of the virtio-mem device (and `vmem-mem` its memory backend).
pub const VIRTIO_MEM_ID: &str = "vmem0";

/// The files of a VM's run folder. Fixed names, so any process can find them again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunDirLayout {
    /// The folder itself.
    pub dir: PathBuf,
}

impl RunDirLayout {
    /// The layout of `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RunDirLayout { dir: dir.into() }
    }
    /// QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    /// The guest's serial console.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
    /// QEMU's stderr.
    pub fn qemu_log(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }
    /// virtiofsd's vhost-user socket.
    pub fn virtiofsd_socket(&self) -> PathBuf {
        self.dir.join("fs.sock")
    }
    /// virtiofsd's stderr.
    pub fn virtiofsd_log(&self) -> PathBuf {
        self.dir.join("virtiofsd.log")
    }
    /// vhost-device-vsock's vhost-user socket.
    pub fn vsock_socket(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    /// The hybrid-vsock socket the host connects to.
    pub fn vsock_uds(&self) -> PathBuf {
        self.dir.join("vsock.hv")
    }
    /// vhost-device-vsock's stderr.
    pub fn vsock_log(&self) -> PathBuf {
        self.dir.join("vhost-device-vsock.log")
    }
    /// The empty folder the jail of confined process `name` is mounted over (in that
    /// process's mount namespace only).
    pub fn jail_root(&self, name: &str) -> PathBuf {
        self.dir.join(format!("jail-{name}"))
    }
}

/// Checks a VM config for values QEMU would refuse or that cannot boot.
pub fn validate(config: &VmConfig) -> Result<()> {
    if !(1..=255).contains(&config.vcpus) {
        return Err(HypervisorError::InvalidConfig(format!(
            "vcpus = {} is out of range; valid: 1 to 255",
            config.vcpus
        )));
    }
    if config.max_vcpus > 255 {
        return Err(HypervisorError::InvalidConfig(format!(
            "max_vcpus = {} is out of range; valid: 0 (no CPU hotplug) to 255",
            config.max_vcpus
        )));
    }
    if config.memory_mib < 64 {
        return Err(HypervisorError::InvalidConfig(format!(
            "memory_mib = {} is too small; valid: 64 or more",
            config.memory_mib
        )));
    }
    // A unix socket path holds at most 107 bytes; the longest runvm makes in the run folder is
    // the hybrid-vsock listener of a port (`vsock.hv_PORT`).
    let longest = RunDirLayout::new(&config.run_dir)
        .vsock_uds()
        .as_os_str()
        .len()
        + 11;
    if longest > 107 {
        return Err(HypervisorError::InvalidConfig(format!(
            "run folder {} is too long for unix socket paths in it ({longest} bytes; valid: at \
             most 107): use a shorter runtime.root",
            config.run_dir.display()
        )));
    }
    if let VsockBackend::Vhost { guest_cid } = config.vsock {
        if guest_cid < 3 {
            return Err(HypervisorError::InvalidConfig(format!(
                "guest_cid = {guest_cid} is reserved; valid: 3 or more"
            )));
        }
    }
    if let Some(share) = &config.shared_dir {
        if share.tag.is_empty() || share.tag.len() > 36 || share.tag.contains(',') {
            return Err(HypervisorError::InvalidConfig(format!(
                "virtio-fs tag {:?} is invalid; valid: 1 to 36 characters, no comma",
                share.tag
            )));
        }
    }
    for device in &config.net_devices {
        validate_net_device(device)?;
    }
    if config.hotplug_ports > 16 {
        return Err(HypervisorError::InvalidConfig(format!(
            "hotplug_ports = {} is out of range; valid: 0 to 16",
            config.hotplug_ports
        )));
    }
    for p in &config.kernel_params {
        if p.contains('"') || p.contains('\n') {
            return Err(HypervisorError::InvalidConfig(format!(
                "kernel parameter {p:?} holds a quote or newline"
            )));
        }
    }
    Ok(())
}

/// Checks a network card's id, tap name and MAC before they reach QEMU.
pub fn validate_net_device(device: &NetDevice) -> Result<()> {
    let refuse = |reason: String| {
        Err(HypervisorError::NetDevice {
            id: device.id.clone(),
            reason,
        })
    };
    let id_ok = !device.id.is_empty()
        && device.id.len() <= 32
        && device
            .id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !id_ok {
        return refuse("the id must be 1 to 32 characters of A-Z, a-z, 0-9, - and _".into());
    }
    let tap_ok = !device.tap.is_empty()
        && device.tap.len() <= 15
        && device
            .tap
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !tap_ok {
        return refuse(format!(
            "tap name {:?} must be 1 to 15 characters of A-Z, a-z, 0-9, -, _ and .",
            device.tap
        ));
    }
    let parts: Vec<&str> = device.mac.split(':').collect();
    let mac_ok = parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit()));
    if !mac_ok {
        return refuse(format!(
            "MAC address {:?} is not of the form aa:bb:cc:dd:ee:ff",
            device.mac
        ));
    }
    Ok(())
}

/// The id of the PCIe root port `n` left free for hotplug.
pub fn hotplug_port_id(n: u32) -> String {
    format!("hp{n}")
}

/// The first file descriptor number QEMU gets network cards on: card `i` (in the order of
/// [`VmConfig::net_devices`]) has its tap or macvtap at `FIRST_NET_FD + 2 * i` and, with
/// vhost-net, its `/dev/vhost-net` at the next number. The host opens them all (QEMU, confined,
/// could not), in the VM's network namespace.
pub const FIRST_NET_FD: i32 = 100;

/// The descriptor number of the host's `/dev/vhost-vsock` for a vhost-vsock VM.
pub const VSOCK_FD: i32 = 99;

/// The descriptor numbers of card `index`'s tap and, with `vhost`, vhost-net device.
pub fn net_fds(index: usize, vhost: bool) -> (i32, Option<i32>) {
    let fd = FIRST_NET_FD + 2 * i32::try_from(index).unwrap_or(i32::MAX / 4);
    (fd, vhost.then_some(fd + 1))
}

/// The QEMU arguments of the netdev of `device` (for `-netdev`): its tap is descriptor `fd`,
/// its vhost-net device (if any) `vhostfd`.
pub fn netdev_arg(device: &NetDevice, fd: i32, vhostfd: Option<i32>) -> String {
    match vhostfd {
        Some(v) => format!("tap,id={},fd={fd},vhost=on,vhostfd={v}", device.id),
        None => format!("tap,id={},fd={fd}", device.id),
    }
}

/// The QEMU arguments of the card of `device` (for `-device`).
pub fn net_card_arg(device: &NetDevice) -> String {
    format!(
        "virtio-net-pci,netdev={id},id=dev-{id},mac={mac}",
        id = device.id,
        mac = device.mac
    )
}

fn path_str(p: &Path) -> Result<&str> {
    let s = p.to_str().ok_or_else(|| {
        HypervisorError::InvalidConfig(format!("path {} is not valid UTF-8", p.display()))
    })?;
    if s.contains(',') {
        // QEMU option values use ',' as separator; a path holding one would be misparsed.
        return Err(HypervisorError::InvalidConfig(format!(
            "path {s:?} holds a comma, which QEMU options cannot carry"
        )));
    }
    Ok(s)
}

/// The full kernel command line for `config`.
pub fn kernel_cmdline(config: &VmConfig) -> String {
    let hotplug = config.hotplug_memory_mib() > 0;
    let maxcpus = config
        .cpus_by_onlining()
        .then(|| format!("maxcpus={}", config.vcpus));
    BASE_KERNEL_PARAMS
        .iter()
        .map(|s| s.to_string())
        .chain(hotplug.then(|| MEMORY_HOTPLUG_PARAM.to_string()))
        .chain(maxcpus)
        .chain(config.kernel_params.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// QEMU's arguments for `config`, its run folder laid out as `layout`.
pub fn qemu_args(config: &VmConfig, layout: &RunDirLayout) -> Result<Vec<OsString>> {
    validate(config)?;
    let mem = config.memory_mib;
    let mut args: Vec<String> = vec![
        "-name".into(),
        "runvm".into(),
        "-no-user-config".into(),
        "-nodefaults".into(),
        "-no-reboot".into(),
        "-display".into(),
        "none".into(),
        "-machine".into(),
        "q35,memory-backend=mem".into(),
    ];
    match config.accelerator {
        Accelerator::Kvm => {
            args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()])
        }
        Accelerator::Tcg if config.tcg_tb_size_mib > 0 => args.extend([
            "-accel".into(),
            format!("tcg,tb-size={}", config.tcg_tb_size_mib),
        ]),
        Accelerator::Tcg => args.extend(["-accel".into(), "tcg".into()]),
    }
    let smp = if config.cpus_by_onlining() {
        // All present, the guest brings up `vcpus` of them (`maxcpus=`), onlines more later.
        config.max_vcpus.to_string()
    } else if config.max_vcpus > config.vcpus {
        format!("{},maxcpus={}", config.vcpus, config.max_vcpus)
    } else {
        config.vcpus.to_string()
    };
    let hotplug_mib = config.hotplug_memory_mib();
    let memory = if hotplug_mib > 0 {
        format!("{mem}M,maxmem={}M", mem + hotplug_mib)
    } else {
        format!("{mem}M")
    };
    args.extend([
        "-smp".into(),
        smp,
        "-m".into(),
        memory,
        // vhost-user devices need guest RAM in a shared memfd.
        "-object".into(),
        format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
        "-chardev".into(),
        format!("file,id=console,path={}", path_str(&layout.console_log())?),
        "-serial".into(),
        "chardev:console".into(),
        "-qmp".into(),
        format!(
            "unix:{},server=on,wait=off",
            path_str(&layout.qmp_socket())?
        ),
        // Free page reporting: the guest hands pages it freed (the initramfs once unpacked,
        // boot-time memory) back to the host, which drops them from QEMU's memory.
        "-device".into(),
        "virtio-balloon-pci,id=balloon0,free-page-reporting=on".into(),
    ]);
    if hotplug_mib > 0 {
        // Memory to plug later: shared like the boot memory (vhost-user devices map it), taken
        // from the host only as the guest touches what was plugged; unplugged blocks are
        // given back (the device discards them).
        args.extend([
            "-object".into(),
            format!("memory-backend-memfd,id={VIRTIO_MEM_ID}-mem,size={hotplug_mib}M,share=on"),
            "-device".into(),
            format!(
                "virtio-mem-pci,id={VIRTIO_MEM_ID},memdev={VIRTIO_MEM_ID}-mem,requested-size={}M",
                config.hotplugged.memory_mib
            ),
        ]);
    }
    match config.vsock {
        VsockBackend::Vhost { guest_cid } => args.extend([
            "-device".into(),
            format!("vhost-vsock-pci,id=vsock0,guest-cid={guest_cid},vhostfd={VSOCK_FD}"),
        ]),
        VsockBackend::VhostUser => args.extend([
            "-chardev".into(),
            format!(
                "socket,id=vsockchr,path={}",
                path_str(&layout.vsock_socket())?
            ),
            "-device".into(),
            "vhost-user-vsock-pci,id=vsock0,chardev=vsockchr".into(),
        ]),
    }
    if let Some(share) = &config.shared_dir {
        args.extend([
            "-chardev".into(),
            format!(
                "socket,id=fschr,path={}",
                path_str(&layout.virtiofsd_socket())?
            ),
            "-device".into(),
            format!("vhost-user-fs-pci,id=fs0,chardev=fschr,tag={}", share.tag),
        ]);
    }
    for (index, device) in config.net_devices.iter().enumerate() {
        let (fd, vhostfd) = net_fds(index, config.vhost_net);
        args.extend([
            "-netdev".into(),
            netdev_arg(device, fd, vhostfd),
            "-device".into(),
            net_card_arg(device),
        ]);
    }
    for n in 0..config.hotplug_ports {
        // q35's root bus takes no hotplug: hot-added cards go to these ports.
        args.extend([
            "-device".into(),
            format!(
                "pcie-root-port,id={},bus=pcie.0,chassis={},slot={}",
                hotplug_port_id(n),
                n + 1,
                n + 1
            ),
        ]);
    }
    args.extend([
        "-kernel".into(),
        path_str(&config.kernel)?.to_string(),
        "-initrd".into(),
        path_str(&config.initrd)?.to_string(),
        "-append".into(),
        kernel_cmdline(config),
    ]);
    Ok(args.into_iter().map(OsString::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SharedDir;

    fn config() -> VmConfig {
        VmConfig {
            vcpus: 2,
            memory_mib: 512,
            kernel: "/g/vmlinuz".into(),
            initrd: "/g/initrd.img".into(),
            kernel_params: vec!["loglevel=3".into()],
            accelerator: Accelerator::Tcg,
            shared_dir: Some(SharedDir {
                path: "/r/shared".into(),
                tag: "runvm".into(),
            }),
            vsock: VsockBackend::VhostUser,
            run_dir: "/r".into(),
            netns: None,
            net_devices: Vec::new(),
            hotplug_ports: 0,
            vhost_net: false,
            tcg_tb_size_mib: 0,
            cgroup_procs: Vec::new(),
            max_vcpus: 0,
            max_memory_mib: 0,
            hotplugged: Default::default(),
        }
    }

    fn args(config: &VmConfig) -> Vec<String> {
        qemu_args(config, &RunDirLayout::new(&config.run_dir))
            .unwrap()
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    /// The value following `flag`, for each occurrence.
    fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn tcg_vm_has_cpus_memory_kernel_and_shared_memfd() {
        let a = args(&config());
        assert_eq!(values(&a, "-accel"), ["tcg"]);
        assert!(values(&a, "-cpu").is_empty(), "no -cpu host under TCG");
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["512M"]);
        assert_eq!(values(&a, "-kernel"), ["/g/vmlinuz"]);
        assert_eq!(values(&a, "-initrd"), ["/g/initrd.img"]);
        assert!(values(&a, "-object").contains(&"memory-backend-memfd,id=mem,size=512M,share=on"));
        assert_eq!(values(&a, "-machine"), ["q35,memory-backend=mem"]);
        assert!(a.contains(&"-no-reboot".to_string()));
    }

    #[test]
    fn a_vm_with_maxima_gets_cpu_slots_and_a_shared_virtio_mem_device() {
        let mut c = config();
        c.max_vcpus = 4;
        c.max_memory_mib = 2561;
        let a = args(&c);
        // Under TCG all vCPUs are present and the guest boots with 2 of them.
        assert_eq!(values(&a, "-smp"), ["4"]);
        assert!(values(&a, "-append")[0].contains(" maxcpus=2"));
        let mut kvm = c.clone();
        kvm.accelerator = Accelerator::Kvm;
        assert_eq!(values(&args(&kvm), "-smp"), ["2,maxcpus=4"]);
        assert!(!values(&args(&kvm), "-append")[0].contains("maxcpus"));
        assert_eq!(values(&a, "-m"), ["512M,maxmem=2560M"], "2 MiB blocks");
        assert!(values(&a, "-object")
            .contains(&"memory-backend-memfd,id=vmem0-mem,size=2048M,share=on"));
        assert!(values(&a, "-device")
            .contains(&"virtio-mem-pci,id=vmem0,memdev=vmem0-mem,requested-size=0M"));
        assert!(values(&a, "-append")[0].contains(" memhp_default_state=online_movable "));
        // Without maxima (or maxima at the boot size): no hotplug at all.
        c.max_vcpus = 2;
        c.max_memory_mib = 512;
        let a = args(&c);
        assert_eq!(values(&a, "-smp"), ["2"]);
        assert_eq!(values(&a, "-m"), ["512M"]);
        assert!(!values(&a, "-append")[0].contains("memhp"));
        c.max_vcpus = 256;
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("max_vcpus = 256"));
    }

    #[test]
    fn kvm_vm_uses_host_cpu() {
        let mut c = config();
        c.accelerator = Accelerator::Kvm;
        let a = args(&c);
        assert_eq!(values(&a, "-accel"), ["kvm"]);
        assert_eq!(values(&a, "-cpu"), ["host"]);
    }

    #[test]
    fn kernel_params_follow_base_params() {
        let a = args(&config());
        let cmdline = values(&a, "-append");
        assert_eq!(cmdline.len(), 1);
        assert!(cmdline[0].starts_with("console=ttyS0 panic=-1 quiet no_timer_check "));
        assert!(!cmdline[0].contains("tsc=reliable"), "{cmdline:?}");
        assert!(
            cmdline[0].ends_with(" cryptomgr.notests loglevel=3"),
            "{cmdline:?}"
        );
    }

    #[test]
    fn tcg_translation_cache_size_is_passed_when_set() {
        let mut c = config();
        c.tcg_tb_size_mib = 32;
        assert_eq!(values(&args(&c), "-accel"), ["tcg,tb-size=32"]);
        c.accelerator = Accelerator::Kvm;
        assert_eq!(
            values(&args(&c), "-accel"),
            ["kvm"],
            "no TCG option under KVM"
        );
    }

    #[test]
    fn vhost_user_vsock_and_virtiofs_devices_point_into_run_dir() {
        let a = args(&config());
        let chardevs = values(&a, "-chardev");
        assert!(chardevs.contains(&"socket,id=vsockchr,path=/r/vsock.sock"));
        assert!(chardevs.contains(&"socket,id=fschr,path=/r/fs.sock"));
        assert!(chardevs.contains(&"file,id=console,path=/r/console.log"));
        let devices = values(&a, "-device");
        assert!(devices.contains(&"vhost-user-vsock-pci,id=vsock0,chardev=vsockchr"));
        assert!(devices.contains(&"vhost-user-fs-pci,id=fs0,chardev=fschr,tag=runvm"));
        assert_eq!(values(&a, "-qmp"), ["unix:/r/qmp.sock,server=on,wait=off"]);
    }

    #[test]
    fn kernel_vhost_vsock_uses_guest_cid_and_no_share_means_no_fs_device() {
        let mut c = config();
        c.vsock = VsockBackend::Vhost { guest_cid: 42 };
        c.shared_dir = None;
        let a = args(&c);
        let devices = values(&a, "-device");
        assert_eq!(
            devices,
            [
                "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
                "vhost-vsock-pci,id=vsock0,guest-cid=42,vhostfd=99"
            ]
        );
    }

    #[test]
    fn out_of_range_values_are_refused_with_the_value() {
        let mut c = config();
        c.vcpus = 0;
        let e = qemu_args(&c, &RunDirLayout::new("/r"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("vcpus = 0") && e.contains("1 to 255"), "{e}");
        let mut c = config();
        c.memory_mib = 16;
        let e = qemu_args(&c, &RunDirLayout::new("/r"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("memory_mib = 16"), "{e}");
        let mut c = config();
        c.vsock = VsockBackend::Vhost { guest_cid: 2 };
        assert!(qemu_args(&c, &RunDirLayout::new("/r")).is_err());
    }

    #[test]
    fn a_run_folder_too_long_for_socket_paths_is_refused_with_its_path() {
        let mut c = config();
        c.run_dir = std::path::PathBuf::from(format!("/run/{}", "x".repeat(90)));
        let e = validate(&c).unwrap_err().to_string();
        assert!(e.contains(&c.run_dir.display().to_string()), "{e}");
        assert!(
            e.contains("at most 107") && e.contains("runtime.root"),
            "{e}"
        );
        c.run_dir = std::path::PathBuf::from(format!("/run/{}", "x".repeat(70)));
        validate(&c).unwrap();
    }

    #[test]
    fn net_devices_are_taps_with_their_mac_and_hotplug_ports_follow() {
        let mut c = config();
        c.net_devices = vec![NetDevice {
            id: "net0".into(),
            tap: "tap0_runvm".into(),
            mac: "02:aa:bb:cc:dd:ee".into(),
            macvtap: None,
            hotplug_port: None,
        }];
        c.hotplug_ports = 2;
        let a = args(&c);
        let mut with_vhost = c.clone();
        with_vhost.vhost_net = true;
        assert_eq!(
            values(&args(&with_vhost), "-netdev"),
            ["tap,id=net0,fd=100,vhost=on,vhostfd=101"]
        );
        assert_eq!(values(&a, "-netdev"), ["tap,id=net0,fd=100"]);
        let devices = values(&a, "-device");
        assert!(devices.contains(&"virtio-net-pci,netdev=net0,id=dev-net0,mac=02:aa:bb:cc:dd:ee"));
        assert!(devices.contains(&"pcie-root-port,id=hp0,bus=pcie.0,chassis=1,slot=1"));
        assert!(devices.contains(&"pcie-root-port,id=hp1,bus=pcie.0,chassis=2,slot=2"));
    }

    #[test]
    fn taps_and_macvtaps_are_passed_as_descriptors_in_order() {
        let mut c = config();
        let dev = |id: &str, macvtap: Option<&str>| NetDevice {
            id: id.into(),
            tap: format!("{id}_runvm"),
            mac: "02:aa:bb:cc:dd:ee".into(),
            macvtap: macvtap.map(Into::into),
            hotplug_port: None,
        };
        c.net_devices = vec![
            dev("net0", Some("/dev/tap30000")),
            dev("net1", None),
            dev("net2", Some("/dev/tap30001")),
        ];
        let a = args(&c);
        assert_eq!(
            values(&a, "-netdev"),
            [
                "tap,id=net0,fd=100",
                "tap,id=net1,fd=102",
                "tap,id=net2,fd=104"
            ]
        );
    }

    #[test]
    fn bad_net_device_values_are_refused_by_name() {
        for (id, tap, mac, needle) in [
            ("net,0", "tap0", "02:00:00:00:00:01", "id"),
            ("net0", "tap0,x", "02:00:00:00:00:01", "tap0,x"),
            (
                "net0",
                "tap0123456789abcdef",
                "02:00:00:00:00:01",
                "tap0123456789abcdef",
            ),
            ("net0", "tap0", "02:00:00:00:00", "02:00:00:00:00"),
        ] {
            let mut c = config();
            c.net_devices = vec![NetDevice {
                id: id.into(),
                tap: tap.into(),
                mac: mac.into(),
                macvtap: None,
                hotplug_port: None,
            }];
            let e = qemu_args(&c, &RunDirLayout::new("/r"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{e}");
        }
    }

    #[test]
    fn comma_in_path_is_refused_not_misparsed() {
        let mut c = config();
        c.kernel = "/g/a,b".into();
        let e = qemu_args(&c, &RunDirLayout::new("/r"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("comma"), "{e}");
    }
}
