//! Choosing the accelerator: KVM where the host can really run a guest under it, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: a paravirtual KVM (PVM) opens and runs real-mode code but
//! hangs a stock Linux guest. A CPU that can virtualize shows `vmx` (Intel) or `svm` (AMD) in
//! `/proc/cpuinfo`; only then is KVM chosen in `auto` mode.

use std::fmt;
use std::fs::OpenOptions;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::HypervisorError;

/// The accelerator a VM runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accelerator {
    /// Hardware virtualization through `/dev/kvm`.
    Kvm,
    /// QEMU's Tiny Code Generator: software emulation, works everywhere, slower.
    Tcg,
}

impl fmt::Display for Accelerator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accelerator::Kvm => "kvm",
            Accelerator::Tcg => "tcg",
        })
    }
}

/// The configured choice: `auto` detects, `kvm` and `tcg` force.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelMode {
    /// KVM where usable, TCG otherwise.
    #[default]
    Auto,
    /// KVM; an error where it is not usable.
    Kvm,
    /// TCG, always.
    Tcg,
}

impl FromStr for AccelMode {
    type Err = HypervisorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(AccelMode::Auto),
            "kvm" => Ok(AccelMode::Kvm),
            "tcg" => Ok(AccelMode::Tcg),
            other => Err(HypervisorError::InvalidConfig(format!(
                "accelerator {other:?} is not one of auto, kvm, tcg"
            ))),
        }
    }
}

impl fmt::Display for AccelMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AccelMode::Auto => "auto",
            AccelMode::Kvm => "kvm",
            AccelMode::Tcg => "tcg",
        })
    }
}

/// What the host offers for virtualization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCpu {
    /// `/dev/kvm` opens read-write.
    pub kvm_device_opens: bool,
    /// `/proc/cpuinfo` lists `vmx` or `svm`.
    pub has_vmx_or_svm: bool,
}

impl HostCpu {
    /// Reads the host: opens `/dev/kvm` and scans `/proc/cpuinfo`.
    pub fn detect() -> HostCpu {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        HostCpu {
            kvm_device_opens: kvm_device_opens(Path::new("/dev/kvm")),
            has_vmx_or_svm: cpuinfo_has_virt_flags(&cpuinfo),
        }
    }

    /// KVM can boot a stock guest here.
    pub fn kvm_usable(&self) -> bool {
        self.kvm_device_opens && self.has_vmx_or_svm
    }
}

impl AccelMode {
    /// Picks the accelerator for `host`, or explains why the forced one cannot be used.
    pub fn resolve(self, host: &HostCpu) -> Result<Accelerator, HypervisorError> {
        match self {
            AccelMode::Tcg => Ok(Accelerator::Tcg),
            AccelMode::Auto if host.kvm_usable() => Ok(Accelerator::Kvm),
            AccelMode::Auto => Ok(Accelerator::Tcg),
            AccelMode::Kvm if host.kvm_usable() => Ok(Accelerator::Kvm),
            AccelMode::Kvm => Err(HypervisorError::AcceleratorUnavailable(format!(
                "accelerator \"kvm\" was asked for, but {}; set accelerator = \"auto\" or \"tcg\"",
                match (host.kvm_device_opens, host.has_vmx_or_svm) {
                    (false, _) => "/dev/kvm does not open",
                    (true, false) => "the CPU shows neither vmx nor svm (a paravirtual KVM cannot boot a stock guest)",
                    (true, true) => "KVM is not usable",
                }
            ))),
        }
    }
}

/// Whether `path` (normally `/dev/kvm`) opens read-write.
pub fn kvm_device_opens(path: &Path) -> bool {
    OpenOptions::new().read(true).write(true).open(path).is_ok()
}

/// Whether a `/proc/cpuinfo` text lists `vmx` or `svm` among the flags.
pub fn cpuinfo_has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .filter_map(|l| l.split_once(':'))
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PVM: HostCpu = HostCpu {
        kvm_device_opens: true,
        has_vmx_or_svm: false,
    };
    const BARE_METAL: HostCpu = HostCpu {
        kvm_device_opens: true,
        has_vmx_or_svm: true,
    };
    const NO_KVM: HostCpu = HostCpu {
        kvm_device_opens: false,
        has_vmx_or_svm: true,
    };

    #[test]
    fn auto_picks_tcg_on_paravirtual_kvm() {
        assert_eq!(AccelMode::Auto.resolve(&PVM).unwrap(), Accelerator::Tcg);
    }

    #[test]
    fn auto_picks_kvm_where_cpu_virtualizes() {
        assert_eq!(
            AccelMode::Auto.resolve(&BARE_METAL).unwrap(),
            Accelerator::Kvm
        );
    }

    #[test]
    fn auto_picks_tcg_without_dev_kvm() {
        assert_eq!(AccelMode::Auto.resolve(&NO_KVM).unwrap(), Accelerator::Tcg);
    }

    #[test]
    fn forced_kvm_refused_with_reason() {
        let err = AccelMode::Kvm.resolve(&PVM).unwrap_err().to_string();
        assert!(err.contains("neither vmx nor svm"), "{err}");
        let err = AccelMode::Kvm.resolve(&NO_KVM).unwrap_err().to_string();
        assert!(err.contains("/dev/kvm does not open"), "{err}");
    }

    #[test]
    fn forced_tcg_always_tcg() {
        assert_eq!(
            AccelMode::Tcg.resolve(&BARE_METAL).unwrap(),
            Accelerator::Tcg
        );
    }

    #[test]
    fn cpuinfo_flags_are_matched_as_whole_words() {
        assert!(cpuinfo_has_virt_flags(
            "processor: 0\nflags\t\t: fpu vme svm sse\n"
        ));
        assert!(cpuinfo_has_virt_flags("flags : vmx\n"));
        assert!(!cpuinfo_has_virt_flags("flags : fpu vmxx hypervisor\n"));
        assert!(!cpuinfo_has_virt_flags("model name : vmx svm\n"));
    }

    #[test]
    fn mode_parses_and_refuses_unknown() {
        assert_eq!("kvm".parse::<AccelMode>().unwrap(), AccelMode::Kvm);
        let err = "hvf".parse::<AccelMode>().unwrap_err().to_string();
        assert!(
            err.contains("\"hvf\"") && err.contains("auto, kvm, tcg"),
            "{err}"
        );
    }
}
