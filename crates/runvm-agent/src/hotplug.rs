//! Onlining what the host hot-plugged: vCPUs (`/sys/devices/system/cpu/cpuN/online`) and
//! memory blocks (`/sys/devices/system/memory/memoryN/state`).
//!
//! A hot-added vCPU reaches the guest as an ACPI event the kernel handles asynchronously, and
//! then stays offline until someone onlines it; under TCG the vCPUs are present from boot and
//! the kernel brings up only the boot count (`maxcpus=`). Either way the agent makes as many
//! CPUs online as the host says the VM has: onlining them as they appear, or offlining extra
//! ones when the size drops. Memory from the virtio-mem device is onlined by the kernel itself
//! (`memhp_default_state=online_movable` on the command line); blocks left offline are onlined
//! here, movable where the kernel allows, so they can be unplugged again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::error::{AgentError, Result};

const CPU_DIR: &str = "/sys/devices/system/cpu";
const MEMORY_DIR: &str = "/sys/devices/system/memory";

/// The longest wait the host may ask for.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// The numbered entries `prefixN` of `dir`, with N.
fn numbered(dir: &Path, prefix: &str) -> Vec<(u32, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u32, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let n = name.to_str()?.strip_prefix(prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// How many CPUs a kernel CPU list (`0-3,5`) names.
pub fn count_cpu_list(text: &str) -> u32 {
    text.trim()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.parse::<u32>(), b.parse::<u32>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 0,
            },
            None => u32::from(part.parse::<u32>().is_ok()),
        })
        .sum()
}

fn online_cpu_count() -> u32 {
    std::fs::read_to_string(Path::new(CPU_DIR).join("online"))
        .map(|t| count_cpu_list(&t))
        .unwrap_or(0)
}

/// Brings the number of online CPUs towards `want`: onlines offline CPUs present (lowest
/// first) while fewer are online, offlines the highest-numbered ones while more are; returns
/// how many it changed.
fn set_online_cpus(want: u32) -> u32 {
    let cpus = numbered(Path::new(CPU_DIR), "cpu");
    let mut changed = 0;
    let mut online = online_cpu_count();
    // cpu0 (and any CPU that cannot go offline) has no `online` file.
    let state = |dir: &Path| std::fs::read_to_string(dir.join("online")).ok();
    if online < want {
        for (n, dir) in &cpus {
            if online >= want {
                break;
            }
            if state(dir).as_deref().map(str::trim) == Some("0") {
                match std::fs::write(dir.join("online"), "1") {
                    Ok(()) => {
                        online += 1;
                        changed += 1;
                    }
                    Err(e) => tracing::warn!(cpu = n, error = %e, "cannot online the CPU"),
                }
            }
        }
    } else if online > want {
        for (n, dir) in cpus.iter().rev() {
            if online <= want {
                break;
            }
            if state(dir).as_deref().map(str::trim) == Some("1") {
                match std::fs::write(dir.join("online"), "0") {
                    Ok(()) => {
                        online -= 1;
                        changed += 1;
                    }
                    Err(e) => tracing::warn!(cpu = n, error = %e, "cannot offline the CPU"),
                }
            }
        }
    }
    changed
}

/// Onlines every offline memory block (movable first, else as the kernel chooses); returns
/// how many it onlined.
fn online_memory_blocks() -> u32 {
    let mut onlined = 0;
    for (n, dir) in numbered(Path::new(MEMORY_DIR), "memory") {
        let state = dir.join("state");
        let Ok(current) = std::fs::read_to_string(&state) else {
            continue;
        };
        if current.trim() != "offline" {
            continue;
        }
        let done =
            std::fs::write(&state, "online_movable").or_else(|_| std::fs::write(&state, "online"));
        match done {
            Ok(()) => onlined += 1,
            Err(e) => tracing::warn!(block = n, error = %e, "cannot online the memory block"),
        }
    }
    onlined
}

/// What [`online_cpu_mem`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Onlined {
    /// CPUs online at the end.
    pub online_cpus: u32,
    /// Memory blocks onlined.
    pub memory_blocks: u32,
}

/// Onlines CPUs as they appear (or offlines extra ones) until `cpus` are online or `wait`
/// passed, then onlines offline memory blocks. Runs on a blocking thread (a sysfs write that
/// onlines a CPU takes milliseconds).
pub fn online_cpu_mem(cpus: u32, wait: Duration) -> Result<Onlined> {
    if wait > MAX_WAIT {
        return Err(AgentError::invalid(format!(
            "timeout {} ms is out of range; valid: at most {} ms",
            wait.as_millis(),
            MAX_WAIT.as_millis()
        )));
    }
    let deadline = Instant::now() + wait;
    let mut onlined_cpus = 0;
    loop {
        onlined_cpus += set_online_cpus(cpus);
        if online_cpu_count() == cpus || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let online_cpus = online_cpu_count();
    let memory_blocks = online_memory_blocks();
    tracing::info!(
        online_cpus,
        changed_cpus = onlined_cpus,
        memory_blocks,
        "CPUs and hot-plugged memory onlined"
    );
    if online_cpus != cpus {
        return Err(AgentError::new(
            ttrpc::Code::DEADLINE_EXCEEDED,
            format!(
                "{online_cpus} CPUs online after {} ms; {cpus} were asked for",
                wait.as_millis()
            ),
        ));
    }
    Ok(Onlined {
        online_cpus,
        memory_blocks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_are_counted_by_ranges_and_singles() {
        assert_eq!(count_cpu_list("0\n"), 1);
        assert_eq!(count_cpu_list("0-3\n"), 4);
        assert_eq!(count_cpu_list("0-1,3,5-6"), 5);
        assert_eq!(count_cpu_list(""), 0);
        assert_eq!(count_cpu_list("3-1,x"), 0);
    }
}
