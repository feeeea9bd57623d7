//! runvm's configuration: TOML, every key optional, unknown keys refused.
//!
//! Looked up in this order: the path given by the caller (`--config`), the `RUNVM_CONFIG`
//! environment variable, `/etc/runvm/config.toml`. A path named by the first two must exist; the
//! default may be absent, and then the built-in defaults apply (they work with no file).
//! docs/configuration.md lists every key with its default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use runvm_hypervisor::{AccelMode, VirtiofsCache};
use serde::{Deserialize, Serialize};

use crate::regular_file::{read_regular_file_to_string, FileError};

mod telemetry;
pub use telemetry::TracingConfig;

/// The default configuration file.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/runvm/config.toml";
/// The environment variable that names the configuration file.
pub const CONFIG_ENV: &str = "RUNVM_CONFIG";
/// Where `setup.sh` installs virtiofsd and vhost-device-vsock; searched before `$PATH`.
pub const TOOLS_PREFIX: &str = "/opt/runvm/bin";
/// Where `cargo xtask guest` writes the guest image.
pub const DEFAULT_GUEST_DIR: &str = "/var/lib/runvm/guest";
/// The largest configuration file accepted, bytes (1 MiB; every key written out takes about
/// 1 KiB).
pub const MAX_CONFIG_FILE_BYTES: u64 = 1 << 20;

/// Errors loading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read, is not a regular file, or is larger than
    /// [`MAX_CONFIG_FILE_BYTES`].
    #[error(transparent)]
    Read(#[from] FileError),
    /// The file is not valid TOML, has an unknown key or a value of the wrong type.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the TOML parser said, naming the key, line and column.
        message: String,
    },
    /// A value is out of range.
    #[error("config file {}: {key} = {value}: {valid}", path.as_deref().map(Path::display).map(|d| d.to_string()).unwrap_or_else(|| "(built-in defaults)".into()))]
    Invalid {
        /// The file, if any.
        path: Option<PathBuf>,
        /// The key, as `section.key`.
        key: &'static str,
        /// The value given.
        value: String,
        /// What would be valid.
        valid: &'static str,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where state lives.
    pub runtime: RuntimeConfig,
    /// The VM and its helpers.
    pub hypervisor: HypervisorConfig,
    /// The guest image.
    pub guest: GuestConfig,
    /// The agent channel.
    pub agent: AgentConfig,
    /// Pod networking.
    pub network: NetworkConfig,
    /// The VM factory (docs/factory.md).
    pub factory: FactoryConfig,
    /// OpenTelemetry traces (docs/observability.md).
    pub tracing: TracingConfig,
    /// The file this was loaded from; `None` for built-in defaults.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

/// `[runtime]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Root of runvm's state: one folder per sandbox.
    pub root: PathBuf,
    /// How many VMs of this root boot at once; more wait their turn (they queue, not fail).
    /// 0: the host's CPU count.
    pub max_parallel_boots: u32,
    /// The configuration keys a sandbox's `io.runvm.config.<key>` annotations may set: patterns
    /// where `*` matches any run of characters (see [`crate::pod_config`]).
    pub enable_annotations: Vec<String>,
    /// MiB added to the memory limit written to a sandbox's host cgroup (`linux.cgroupsPath`):
    /// the VM's own memory beyond what the pod's containers use (QEMU, virtiofsd,
    /// vhost-device-vsock, the guest kernel and agent); see docs/kubernetes.md.
    pub vm_memory_overhead_mib: u32,
}

/// The default of `runtime.vm_memory_overhead_mib`: an idle VM measured 181 MiB in its host
/// cgroup (200 MiB at the peak of its boot) under TCG, with margin (docs/kubernetes.md).
pub const DEFAULT_VM_MEMORY_OVERHEAD_MIB: u32 = 256;

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            root: PathBuf::from("/run/runvm"),
            max_parallel_boots: 0,
            enable_annotations: crate::pod_config::DEFAULT_ENABLE_ANNOTATIONS
                .iter()
                .map(|p| p.to_string())
                .collect(),
            vm_memory_overhead_mib: DEFAULT_VM_MEMORY_OVERHEAD_MIB,
        }
    }
}

impl RuntimeConfig {
    /// [`max_parallel_boots`](Self::max_parallel_boots) resolved: at least 1.
    pub fn parallel_boots(&self) -> u32 {
        match self.max_parallel_boots {
            0 => std::thread::available_parallelism()
                .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
                .unwrap_or(1),
            n => n,
        }
    }
}

/// How the VM gets its vsock device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VsockMode {
    /// The kernel's vhost-vsock where `/dev/vhost-vsock` exists, vhost-device-vsock otherwise.
    #[default]
    Auto,
    /// The kernel's vhost-vsock.
    Vhost,
    /// vhost-device-vsock (hybrid vsock over a unix socket).
    VhostUser,
}

/// `[hypervisor]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HypervisorConfig {
    /// QEMU binary: a path, or a name looked up in `/opt/runvm/bin` then `$PATH`.
    pub qemu: String,
    /// virtiofsd binary, looked up like `qemu`.
    pub virtiofsd: String,
    /// vhost-device-vsock binary, looked up like `qemu`.
    pub vhost_device_vsock: String,
    /// virtiofsd's caching policy for the shared folder: `auto`, `always`, `metadata` or
    /// `never` (see docs/configuration.md).
    pub virtiofs_cache: VirtiofsCache,
    /// `auto`, `kvm` or `tcg`.
    pub accelerator: AccelMode,
    /// `auto`, `vhost` or `vhost-user`.
    pub vsock: VsockMode,
    /// vCPUs per sandbox VM.
    pub vcpus: u32,
    /// Guest RAM per sandbox VM, MiB.
    pub memory_mib: u32,
    /// The most vCPUs a sandbox VM boots with (its base plus what the pod asks for); 0: the
    /// host's CPU count.
    pub max_vcpus: u32,
    /// The most guest RAM a sandbox VM boots with, MiB; 0: the host's RAM.
    pub max_memory_mib: u32,
    /// Whether a running VM's memory follows its containers' limits (a virtio-mem device up to
    /// `max_memory_mib`); it costs about 64 MiB of QEMU memory per VM under TCG (measured in
    /// docs/configuration.md, "Hot-plug"). vCPUs follow regardless.
    pub memory_hotplug: bool,
    /// Extra kernel parameters.
    pub kernel_params: Vec<String>,
    /// Under TCG, QEMU's translation cache in MiB (0: QEMU's default, 1 GiB of address space
    /// of which about 70 MiB gets used by a boot). Smaller saves host memory per VM.
    pub tcg_tb_size_mib: u32,
    /// How long QEMU and each helper may take to come up, ms.
    pub start_timeout_ms: u64,
    /// How long a VM may take to power off before it is stopped by force, ms.
    pub stop_timeout_ms: u64,
    /// The cap, bytes, on the guest console log and on each helper's log in the VM's run folder
    /// (oldest output is dropped beyond it); [`LOG_MAX_BYTES_RANGE`].
    pub log_max_bytes: u64,
    /// Whether the VM's processes are confined: QEMU and vhost-device-vsock as `user` in
    /// jails of their own, QEMU's seccomp filter on, virtiofsd in its namespace sandbox.
    /// `false` only on hosts that cannot confine (`runvm check` warns).
    pub confine: bool,
    /// The unprivileged user confined VM processes run as (made by `make setup`).
    pub user: String,
}

/// Valid values of `hypervisor.log_max_bytes`: 4 KiB to 1 GiB.
pub const LOG_MAX_BYTES_RANGE: std::ops::RangeInclusive<u64> = 4096..=1_073_741_824;

impl Default for HypervisorConfig {
    fn default() -> Self {
        HypervisorConfig {
            qemu: "qemu-system-x86_64".into(),
            virtiofsd: "virtiofsd".into(),
            vhost_device_vsock: "vhost-device-vsock".into(),
            virtiofs_cache: VirtiofsCache::Auto,
            accelerator: AccelMode::Auto,
            vsock: VsockMode::Auto,
            vcpus: 1,
            memory_mib: 512,
            max_vcpus: 0,
            max_memory_mib: 0,
            memory_hotplug: true,
            kernel_params: Vec::new(),
            tcg_tb_size_mib: 32,
            start_timeout_ms: 10_000,
            stop_timeout_ms: 5_000,
            log_max_bytes: 1_048_576,
            confine: true,
            user: DEFAULT_VMM_USER.into(),
        }
    }
}

/// The default `hypervisor.user`, which `make setup` creates.
pub const DEFAULT_VMM_USER: &str = "runvm-vmm";

/// `[guest]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestConfig {
    /// Guest kernel.
    pub kernel: PathBuf,
    /// Guest initramfs (agent as /init).
    pub initrd: PathBuf,
}

impl Default for GuestConfig {
    fn default() -> Self {
        GuestConfig {
            kernel: Path::new(DEFAULT_GUEST_DIR).join("vmlinuz"),
            initrd: Path::new(DEFAULT_GUEST_DIR).join("initrd.img"),
        }
    }
}

/// `[network]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// How the VM joins the pod's network namespace.
    pub model: crate::network::NetworkModel,
}

/// `[factory]`: VMs booted before anyone asks (docs/factory.md). Off by default.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FactoryConfig {
    /// How many booted VMs `runvm factory init` keeps ready; 0: no factory, every sandbox
    /// boots its own VM.
    pub cache: u32,
    /// Clones of a saved template VM. Not supported (see [`FactoryConfig::TEMPLATE_REFUSED`]).
    pub template: bool,
}

impl FactoryConfig {
    /// The most VMs the cache may keep ready.
    pub const MAX_CACHE: u32 = 64;
    /// Why `factory.template = true` is refused.
    pub const TEMPLATE_REFUSED: &'static str = "valid: false (a template clone maps the \
        template's memory private copy-on-write, but runvm's agent channel \
        (vhost-user-vsock) and shared folder (virtio-fs) are vhost-user devices whose \
        backends must share the guest's memory; use factory.cache, see docs/factory.md)";
}

/// `[agent]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// How long the agent may take to answer after QEMU started, ms.
    pub boot_timeout_ms: u64,
    /// Longest wait for one agent request, ms.
    pub request_timeout_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            boot_timeout_ms: 30_000,
            request_timeout_ms: 10_000,
        }
    }
}

impl AgentConfig {
    /// `boot_timeout_ms` as a duration.
    pub fn boot_timeout(&self) -> Duration {
        Duration::from_millis(self.boot_timeout_ms)
    }
    /// `request_timeout_ms` as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
}

impl Config {
    /// Loads the configuration: `explicit` (a `--config` flag), else `$RUNVM_CONFIG`, else
    /// `/etc/runvm/config.toml` if it exists, else the defaults.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let loaded = Config::load_inner(explicit)?;
        crate::timeline::note_config_loaded(crate::state::unix_now_ns());
        Ok(loaded)
    }

    fn load_inner(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let env = std::env::var_os(CONFIG_ENV).filter(|v| !v.is_empty());
        match (explicit, env) {
            (Some(p), _) => Config::from_file(p),
            (None, Some(p)) => Config::from_file(Path::new(&p)),
            (None, None) if Path::new(DEFAULT_CONFIG_PATH).exists() => {
                Config::from_file(Path::new(DEFAULT_CONFIG_PATH))
            }
            (None, None) => {
                let c = Config::default();
                c.validate()?;
                Ok(c)
            }
        }
    }

    /// Loads and validates one file: a regular file (not a FIFO, a device or a folder) of at
    /// most [`MAX_CONFIG_FILE_BYTES`], read once.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = read_regular_file_to_string(path, MAX_CONFIG_FILE_BYTES)?;
        let mut config = Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })?;
        config.source = Some(path.to_path_buf());
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (no validation). The error text names the key and position.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e: toml::de::Error| {
            let position = e.span().map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                let source = text.lines().nth(line - 1).unwrap_or("").trim();
                format!("line {line}, column {column} (`{source}`): ")
            });
            format!("{}{}", position.unwrap_or_default(), e.message().trim_end())
        })
    }

    /// The effective configuration as TOML (what `runvm env` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    /// Checks ranges and consistency.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, value: String, valid| ConfigError::Invalid {
            path: self.source.clone(),
            key,
            value,
            valid,
        };
        let h = &self.hypervisor;
        if !(1..=255).contains(&h.vcpus) {
            return Err(invalid(
                "hypervisor.vcpus",
                h.vcpus.to_string(),
                "valid: 1 to 255",
            ));
        }
        if !(64..=1_048_576).contains(&h.memory_mib) {
            return Err(invalid(
                "hypervisor.memory_mib",
                h.memory_mib.to_string(),
                "valid: 64 to 1048576",
            ));
        }
        if h.max_vcpus > 255 {
            return Err(invalid(
                "hypervisor.max_vcpus",
                h.max_vcpus.to_string(),
                "valid: 0 (the host's CPU count) to 255",
            ));
        }
        if h.max_memory_mib != 0 && !(64..=1_048_576).contains(&h.max_memory_mib) {
            return Err(invalid(
                "hypervisor.max_memory_mib",
                h.max_memory_mib.to_string(),
                "valid: 0 (the host's RAM) or 64 to 1048576",
            ));
        }
        if let Some(bad) = self
            .runtime
            .enable_annotations
            .iter()
            .find(|p| !crate::pod_config::valid_pattern(p))
        {
            return Err(invalid(
                "runtime.enable_annotations",
                format!("{bad:?}"),
                "valid: patterns of a-z, 0-9, `_`, `.` and `*` (e.g. \"hypervisor.vcpus\")",
            ));
        }
        if h.tcg_tb_size_mib != 0 && !(4..=4096).contains(&h.tcg_tb_size_mib) {
            return Err(invalid(
                "hypervisor.tcg_tb_size_mib",
                h.tcg_tb_size_mib.to_string(),
                "valid: 0 (QEMU's default) or 4 to 4096",
            ));
        }
        for (key, value) in [
            ("hypervisor.qemu", &h.qemu),
            ("hypervisor.virtiofsd", &h.virtiofsd),
            ("hypervisor.vhost_device_vsock", &h.vhost_device_vsock),
        ] {
            if value.trim().is_empty() {
                return Err(invalid(key, "\"\"".into(), "valid: a program name or path"));
            }
        }
        for (key, ms) in [
            ("hypervisor.start_timeout_ms", h.start_timeout_ms),
            ("agent.boot_timeout_ms", self.agent.boot_timeout_ms),
            ("agent.request_timeout_ms", self.agent.request_timeout_ms),
        ] {
            if !(100..=600_000).contains(&ms) {
                return Err(invalid(key, ms.to_string(), "valid: 100 to 600000 (ms)"));
            }
        }
        if self.factory.cache > FactoryConfig::MAX_CACHE {
            return Err(invalid(
                "factory.cache",
                self.factory.cache.to_string(),
                "valid: 0 (no factory) to 64",
            ));
        }
        if self.factory.template {
            return Err(invalid(
                "factory.template",
                "true".into(),
                FactoryConfig::TEMPLATE_REFUSED,
            ));
        }
        if !self.tracing.endpoint_is_valid() {
            return Err(invalid(
                "tracing.otlp_endpoint",
                format!("{:?}", self.tracing.otlp_endpoint),
                TracingConfig::VALID_ENDPOINT,
            ));
        }
        if h.stop_timeout_ms > 600_000 {
            return Err(invalid(
                "hypervisor.stop_timeout_ms",
                h.stop_timeout_ms.to_string(),
                "valid: 0 to 600000 (ms)",
            ));
        }
        if !LOG_MAX_BYTES_RANGE.contains(&h.log_max_bytes) {
            return Err(invalid(
                "hypervisor.log_max_bytes",
                h.log_max_bytes.to_string(),
                "valid: 4096 to 1073741824 (bytes: 4 KiB to 1 GiB)",
            ));
        }
        let user_ok = !h.user.is_empty()
            && h.user.len() <= 32
            && h.user
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !user_ok {
            return Err(invalid(
                "hypervisor.user",
                format!("{:?}", h.user),
                "valid: a user name of 1 to 32 characters of A-Z, a-z, 0-9, -, _ and .",
            ));
        }
        if self.runtime.max_parallel_boots > 1024 {
            return Err(invalid(
                "runtime.max_parallel_boots",
                self.runtime.max_parallel_boots.to_string(),
                "valid: 0 (the host's CPU count) to 1024",
            ));
        }
        if self.runtime.vm_memory_overhead_mib > 1_048_576 {
            return Err(invalid(
                "runtime.vm_memory_overhead_mib",
                self.runtime.vm_memory_overhead_mib.to_string(),
                "valid: 0 to 1048576 (MiB)",
            ));
        }
        if !self.runtime.root.is_absolute() {
            return Err(invalid(
                "runtime.root",
                format!("{:?}", self.runtime.root),
                "valid: an absolute path",
            ));
        }
        for (key, p) in [
            ("guest.kernel", &self.guest.kernel),
            ("guest.initrd", &self.guest.initrd),
        ] {
            if !p.is_absolute() {
                return Err(invalid(key, format!("{p:?}"), "valid: an absolute path"));
            }
        }
        Ok(())
    }
}

/// Finds a program: a value holding `/` is a path; a bare name is looked up in
/// `/opt/runvm/bin`, then in `$PATH`.
pub fn resolve_program(name: &str) -> Option<PathBuf> {
    resolve_program_in(
        name,
        Path::new(TOOLS_PREFIX),
        std::env::var_os("PATH").as_deref(),
    )
}

fn resolve_program_in(
    name: &str,
    prefix: &Path,
    path_var: Option<&std::ffi::OsStr>,
) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let executable = |p: &Path| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    };
    if name.contains('/') {
        let p = PathBuf::from(name);
        return executable(&p).then_some(p);
    }
    std::iter::once(prefix.to_path_buf())
        .chain(path_var.map(std::env::split_paths).into_iter().flatten())
        .map(|dir| dir.join(name))
        .find(|p| executable(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_need_no_file() {
        let c = Config::default();
        c.validate().unwrap();
        assert_eq!(c.runtime.root, PathBuf::from("/run/runvm"));
        assert_eq!(c.hypervisor.accelerator, AccelMode::Auto);
        assert_eq!(
            c.guest.kernel,
            PathBuf::from("/var/lib/runvm/guest/vmlinuz")
        );
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c =
            Config::from_toml("[hypervisor]\nmemory_mib = 1024\naccelerator = \"tcg\"\n").unwrap();
        assert_eq!(c.hypervisor.memory_mib, 1024);
        assert_eq!(c.hypervisor.accelerator, AccelMode::Tcg);
        assert_eq!(c.hypervisor.vcpus, 1);
        assert_eq!(c.agent, AgentConfig::default());
    }

    #[test]
    fn unknown_key_is_named_with_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        std::fs::write(&p, "[hypervisor]\nmemory_mb = 1024\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("memory_mb"), "{err}");
        assert!(err.contains(&p.display().to_string()), "{err}");
    }

    #[test]
    fn unknown_section_is_refused() {
        let err = Config::from_toml("[hypervsor]\nvcpus = 2\n").unwrap_err();
        assert!(err.contains("hypervsor"), "{err}");
    }

    #[test]
    fn mistyped_value_is_refused_with_key() {
        let err = Config::from_toml("[hypervisor]\nvcpus = \"two\"\n").unwrap_err();
        assert!(err.contains("vcpus"), "{err}");
        let err = Config::from_toml("[hypervisor]\naccelerator = \"hvf\"\n").unwrap_err();
        assert!(err.contains("hvf") || err.contains("accelerator"), "{err}");
        let err = Config::from_toml("[hypervisor]\nvirtiofs_cache = \"dax\"\n").unwrap_err();
        assert!(err.contains("virtiofs_cache"), "{err}");
        assert!(err.contains("auto") && err.contains("never"), "{err}");
    }

    #[test]
    fn out_of_range_value_names_key_value_and_valid_range() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[hypervisor]\nvcpus = 0\n").unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("hypervisor.vcpus = 0"), "{err}");
        assert!(err.contains("1 to 255"), "{err}");
        let mut c = Config::default();
        c.runtime.root = "relative".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("runtime.root"));
    }

    /// Each numeric key, a value just outside its range on each side, and the range's text.
    #[test]
    fn every_numeric_key_is_bounded_and_named() {
        type Set = fn(&mut Config, u64);
        let cases: &[(&str, Set, &[u64], &str)] = &[
            (
                "hypervisor.vcpus",
                |c, v| c.hypervisor.vcpus = v as u32,
                &[0, 256],
                "1 to 255",
            ),
            (
                "hypervisor.memory_mib",
                |c, v| c.hypervisor.memory_mib = v as u32,
                &[0, 63, 1_048_577],
                "64 to 1048576",
            ),
            (
                "hypervisor.tcg_tb_size_mib",
                |c, v| c.hypervisor.tcg_tb_size_mib = v as u32,
                &[1, 3, 4097],
                "4 to 4096",
            ),
            (
                "hypervisor.start_timeout_ms",
                |c, v| c.hypervisor.start_timeout_ms = v,
                &[0, 99, 600_001, u64::MAX],
                "100 to 600000",
            ),
            (
                "hypervisor.stop_timeout_ms",
                |c, v| c.hypervisor.stop_timeout_ms = v,
                &[600_001, u64::MAX],
                "0 to 600000",
            ),
            (
                "hypervisor.log_max_bytes",
                |c, v| c.hypervisor.log_max_bytes = v,
                &[0, 4095, 1_073_741_825, u64::MAX],
                "4096 to 1073741824",
            ),
            (
                "agent.boot_timeout_ms",
                |c, v| c.agent.boot_timeout_ms = v,
                &[0, 99, 600_001],
                "100 to 600000",
            ),
            (
                "agent.request_timeout_ms",
                |c, v| c.agent.request_timeout_ms = v,
                &[0, 99, 600_001],
                "100 to 600000",
            ),
        ];
        for (key, set, bad, valid) in cases {
            for value in *bad {
                let mut c = Config::default();
                set(&mut c, *value);
                let err = c.validate().unwrap_err().to_string();
                assert!(err.contains(&format!("{key} = {value}")), "{err}");
                assert!(err.contains(valid), "{err}");
            }
        }
    }

    #[test]
    fn log_max_bytes_defaults_to_one_mib_and_takes_its_range_ends() {
        assert_eq!(Config::default().hypervisor.log_max_bytes, 1_048_576);
        for v in [4096, 1_073_741_824] {
            let c = Config::from_toml(&format!("[hypervisor]\nlog_max_bytes = {v}\n")).unwrap();
            assert_eq!(c.hypervisor.log_max_bytes, v);
            c.validate().unwrap();
        }
        let err = Config::from_toml("[hypervisor]\nlog_max_bytes = -1\n").unwrap_err();
        assert!(err.contains("log_max_bytes"), "{err}");
    }

    #[test]
    fn a_fifo_config_file_is_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let err = Config::load(Some(&p)).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains("FIFO"), "{err}");
        assert!(err.contains("a regular file is required"), "{err}");
    }

    #[test]
    fn a_device_or_folder_config_file_is_refused() {
        let err = Config::from_file(Path::new("/dev/zero"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/zero is a character device"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = Config::from_file(dir.path()).unwrap_err().to_string();
        assert!(err.contains("is a directory"), "{err}");
    }

    #[test]
    fn an_oversize_config_file_is_refused_naming_its_size_and_the_cap() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        let mut text = String::from("[hypervisor]\nvcpus = 2\n");
        let size = MAX_CONFIG_FILE_BYTES as usize + 1;
        text.push_str(&"#".repeat(size - text.len()));
        std::fs::write(&p, &text).unwrap();
        let err = Config::from_file(&p).unwrap_err().to_string();
        assert!(err.contains(&p.display().to_string()), "{err}");
        assert!(err.contains(&size.to_string()), "{err}");
        assert!(err.contains(&MAX_CONFIG_FILE_BYTES.to_string()), "{err}");
        // One byte less, at the cap, is read.
        text.pop();
        std::fs::write(&p, &text).unwrap();
        assert_eq!(Config::from_file(&p).unwrap().hypervisor.vcpus, 2);
    }

    #[test]
    fn missing_explicit_file_is_an_error_naming_it() {
        let err = Config::load(Some(Path::new("/nonexistent/runvm.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/runvm.toml"), "{err}");
    }

    #[test]
    fn rendered_config_parses_back_to_the_same() {
        let mut c = Config::default();
        c.hypervisor.kernel_params = vec!["loglevel=3".into()];
        let back = Config::from_toml(&c.to_toml()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn programs_resolve_from_prefix_then_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let prefix = dir.path().join("prefix");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&prefix).unwrap();
        std::fs::create_dir_all(&bin).unwrap();
        for p in [
            prefix.join("a"),
            bin.join("a"),
            bin.join("b"),
            bin.join("noexec"),
        ] {
            std::fs::write(&p, "").unwrap();
            let mode = if p.ends_with("noexec") { 0o644 } else { 0o755 };
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let path_var = Some(bin.as_os_str());
        assert_eq!(
            resolve_program_in("a", &prefix, path_var),
            Some(prefix.join("a"))
        );
        assert_eq!(
            resolve_program_in("b", &prefix, path_var),
            Some(bin.join("b"))
        );
        assert_eq!(resolve_program_in("noexec", &prefix, path_var), None);
        assert_eq!(resolve_program_in("missing", &prefix, path_var), None);
        let abs = bin.join("b").display().to_string();
        assert_eq!(resolve_program_in(&abs, &prefix, None), Some(bin.join("b")));
    }
}

#[cfg(test)]
mod doc_tests {
    use super::*;

    /// docs/configuration.md shows every key with its default; keep it true.
    #[test]
    fn documented_defaults_are_the_built_in_defaults() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/configuration.md"),
        )
        .unwrap();
        let block = doc
            .split("```toml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .expect("a toml block in docs/configuration.md");
        assert_eq!(Config::from_toml(block).unwrap(), Config::default());
        // Every key is written out, not left to defaults.
        let rendered = Config::default().to_toml();
        for line in rendered.lines().filter(|l| l.contains(" = ")) {
            let key = line.split(" = ").next().unwrap();
            assert!(
                block.lines().any(|l| l.starts_with(&format!("{key} = "))),
                "key {key} is not documented"
            );
        }
    }
}
