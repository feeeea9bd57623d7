//! runc's process and resource commands: exec, events, update, features.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use runvm_sandbox::agent::ContainerStats;
use runvm_sandbox::config::Config;
use runvm_sandbox::standalone::{self, StandaloneError, OCI_VERSION};
use runvm_sandbox::timeline;
use runvm_sandbox::ContainerId;
use serde_json::{json, Value};

use crate::args::{ExecArgs, Global, UpdateArgs};
use crate::oci::block_on;
use crate::standin::{self, StandinIo};

/// The most bytes of JSON read from a file or stdin given on the command line (`exec
/// --process`, `update --resources`, `network`'s arguments): they are a few KiB.
pub const MAX_JSON_INPUT_BYTES: u64 = 1 << 20;

/// Reads the JSON input `what` (a flag's name, or what the argument is) from `path`, or stdin
/// for `-`: at most [`MAX_JSON_INPUT_BYTES`], more is refused (so `/dev/zero` cannot eat the
/// memory). A pipe is taken: `--process <(...)` is a caller's right.
pub fn read_json_input(path: &Path, what: &str) -> Result<String> {
    let stdin = path == Path::new("-");
    let name = if stdin {
        "stdin".to_string()
    } else {
        path.display().to_string()
    };
    let mut data = Vec::new();
    let limit = MAX_JSON_INPUT_BYTES + 1;
    let read = if stdin {
        std::io::stdin().lock().take(limit).read_to_end(&mut data)
    } else {
        std::fs::File::open(path).and_then(|f| f.take(limit).read_to_end(&mut data))
    };
    read.with_context(|| format!("{what}: cannot read {name}"))?;
    if data.len() as u64 > MAX_JSON_INPUT_BYTES {
        anyhow::bail!("{what}: {name} is too large: over the cap of {MAX_JSON_INPUT_BYTES} bytes");
    }
    String::from_utf8(data).with_context(|| format!("{what}: {name} is not UTF-8 text"))
}

/// The OCI process `exec` runs: the --process file, or the container's own process with the
/// command and flags given.
fn exec_process(base: &Value, a: &ExecArgs) -> Result<Value> {
    if let Some(path) = &a.process {
        let text = read_json_input(path, "--process")?;
        let p: Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid OCI process", path.display()))?;
        return process_with_defaults(p).with_context(|| path.display().to_string());
    }
    if a.command.is_empty() {
        anyhow::bail!("exec args cannot be empty");
    }
    let mut p = base.clone();
    if !p.is_object() {
        p = json!({"user": {"uid": 0, "gid": 0}, "cwd": "/", "env": []});
    }
    p["args"] = json!(a.command);
    p["terminal"] = json!(a.tty);
    if let Some(env) = p.get_mut("env").and_then(Value::as_array_mut) {
        env.extend(a.env.iter().map(|e| json!(e)));
    } else {
        p["env"] = json!(a.env);
    }
    if let Some(cwd) = &a.cwd {
        p["cwd"] = json!(cwd);
    }
    if let Some((uid, gid)) = a.user {
        p["user"] = json!({"uid": uid, "gid": gid});
    }
    if !a.additional_gids.is_empty() {
        p["user"]["additionalGids"] = json!(a.additional_gids);
    }
    Ok(p)
}

/// An `exec --process` object with what it leaves out filled in as runc's Go decoding does
/// (user 0:0, no env, no terminal) and `cwd` `/`; `args` must be there.
fn process_with_defaults(mut p: Value) -> Result<Value> {
    let Some(o) = p.as_object_mut() else {
        anyhow::bail!("not a valid OCI process: not a JSON object");
    };
    if o.get("args")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty)
    {
        anyhow::bail!("args must not be empty");
    }
    let user = o.entry("user").or_insert_with(|| json!({}));
    if let Some(u) = user.as_object_mut() {
        u.entry("uid").or_insert(json!(0));
        u.entry("gid").or_insert(json!(0));
    }
    o.entry("cwd").or_insert(json!("/"));
    o.entry("env").or_insert(json!([]));
    o.entry("terminal").or_insert(json!(false));
    Ok(p)
}

/// The exit status of `exec` when the process could not be started, as runc's (`exec failed:
/// ...`, 255), so that a caller tells it from the process's own exit status.
pub const EXEC_FAILED_STATUS: u8 = 255;

/// `exec`: a new process in the container; its exit status, or 255 when it could not start.
pub fn exec(global: &Global, config: &Config, a: &ExecArgs) -> Result<ExitCode> {
    match exec_process_in(global, config, a) {
        Ok(code) => Ok(code),
        Err(e) => {
            let message = format!("exec failed: {e:#}");
            crate::logging::error(&message);
            eprintln!("runvm: error: {message}");
            Ok(ExitCode::from(EXEC_FAILED_STATUS))
        }
    }
}

fn exec_process_in(global: &Global, config: &Config, a: &ExecArgs) -> Result<ExitCode> {
    let id = ContainerId::parse(&a.id)?;
    let nanos = runvm_sandbox::state::unix_now_ns() % 1_000_000_000;
    let exec_id = format!("exec-{}-{nanos:x}", std::process::id());
    let (terminal, process, cgroup) = {
        let (sb, st) = standalone::open(config, &id)?;
        // As runc: a created container takes new processes too; a paused one only with
        // --ignore-paused (and then the guest refuses it: see docs/cli.md).
        match st.status {
            "running" | "created" => {}
            "paused" if a.ignore_paused => {}
            "paused" => {
                anyhow::bail!("cannot exec in a paused container (use --ignore-paused to override)")
            }
            "stopped" => return Err(StandaloneError::ExecStopped.into()),
            _ => return Err(StandaloneError::NotRunning.into()),
        }
        let base = sb.container(&id)?.spec.get("process").cloned();
        let process = exec_process(&base.unwrap_or(Value::Null), a)?;
        let terminal = process
            .get("terminal")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if terminal && a.detach && a.io.console_socket.is_none() {
            anyhow::bail!(
                "cannot allocate tty if runvm will detach without setting console socket"
            );
        }
        (
            terminal,
            process,
            sb.record().vm.config.cgroup_procs.clone(),
        )
    };
    let io = match &a.io.console_socket {
        Some(socket) => standin::console(socket)?,
        None => StandinIo::Inherit,
    };
    // The stand-in starts the exec over its own (the only) agent connection and says how it
    // went; this process never connects to the agent.
    let handoff = standin::Handoff::Exec(standin::ExecHandoff { process, terminal });
    let started = standin::spawn(
        global, config, &id, &exec_id, terminal, io, &cgroup, handoff,
    )?;
    let mut child = started.child;
    if let Some(ready) = started.ready {
        if let Err(e) = standin::exec_started(ready) {
            let _ = child.wait();
            return Err(e);
        }
    }
    if let Some(path) = &a.io.pid_file {
        standin::write_pid_file(path, child.id())?;
    }
    if a.detach {
        return Ok(ExitCode::SUCCESS);
    }
    let code = standin::wait_foreground(child, terminal && a.io.console_socket.is_none())?;
    Ok(ExitCode::from(code))
}

/// An object with the fields Go's `omitempty` leaves out (zero numbers, empty lists) removed.
fn omit_empty(pairs: &[(&str, Value)], omitempty: &[&str]) -> Value {
    let mut m = serde_json::Map::new();
    for (key, value) in pairs {
        let empty = value.as_u64() == Some(0) || value.as_array().is_some_and(Vec::is_empty);
        if !(empty && omitempty.contains(key)) {
            m.insert((*key).to_string(), value.clone());
        }
    }
    Value::Object(m)
}

/// runc's stats event (`types.Event` with `types.Stats`): the same keys, Go's `omitempty`
/// respected (a zero counter is left out where runc leaves it out), the network interfaces
/// with Go's field names. What the guest does not measure (per-CPU usage, swap, PSI) is
/// absent, as runc leaves it when its cgroup lacks it.
fn stats_event(id: &ContainerId, s: &ContainerStats) -> Value {
    let network: Vec<Value> = s
        .network
        .iter()
        .map(|n| {
            json!({"Name": n.name, "RxBytes": n.rx_bytes, "RxPackets": n.rx_packets,
                "RxErrors": n.rx_errors, "RxDropped": n.rx_dropped, "TxBytes": n.tx_bytes,
                "TxPackets": n.tx_packets, "TxErrors": n.tx_errors, "TxDropped": n.tx_dropped})
        })
        .collect();
    let usage = omit_empty(
        &[
            ("total", json!(s.cpu.usage_total_ns)),
            ("kernel", json!(s.cpu.usage_kernel_ns)),
            ("user", json!(s.cpu.usage_user_ns)),
        ],
        &["total"],
    );
    let throttling = omit_empty(
        &[
            ("throttledPeriods", json!(s.cpu.throttled_periods)),
            ("throttledTime", json!(s.cpu.throttled_time_ns)),
        ],
        &["throttledPeriods", "throttledTime"],
    );
    let entry = |limit: u64, usage: u64, max: u64| {
        omit_empty(
            &[
                ("limit", json!(limit)),
                ("usage", json!(usage)),
                ("max", json!(max)),
                ("failcnt", json!(0)),
            ],
            &["usage", "max"],
        )
    };
    let mut memory = omit_empty(
        &[
            ("cache", json!(s.memory.cache_bytes)),
            (
                "usage",
                entry(
                    s.memory.limit_bytes,
                    s.memory.usage_bytes,
                    s.memory.max_usage_bytes,
                ),
            ),
            ("swap", entry(0, 0, 0)),
            ("kernel", entry(0, 0, 0)),
            ("kernelTCP", entry(0, 0, 0)),
        ],
        &["cache"],
    );
    memory["raw"] = json!({"oom_kill": s.memory.oom_kills});
    let blkio: Vec<Value> = [("Read", s.io_read_bytes), ("Write", s.io_write_bytes)]
        .iter()
        .map(|(op, v)| omit_empty(&[("op", json!(op)), ("value", json!(v))], &["value"]))
        .collect();
    json!({
        "type": "stats",
        "id": id.as_str(),
        "data": {
            "cpu": {"usage": usage, "throttling": throttling},
            "cpuset": {"cpu_exclusive": 0, "mem_hardwall": 0, "mem_exclusive": 0,
                       "memory_migrate": 0, "memory_spread_page": 0, "memory_spread_slab": 0,
                       "memory_pressure": 0, "sched_load_balance": 0,
                       "sched_relax_domain_level": 0},
            "memory": memory,
            "pids": omit_empty(&[("current", json!(s.pids_current)), ("limit", json!(s.pids_limit))],
                               &["current", "limit"]),
            "blkio": {"ioServiceBytesRecursive": blkio},
            "hugetlb": {},
            "intel_rdt": {},
            "network_interfaces": if network.is_empty() { Value::Null } else { json!(network) }
        }
    })
}

/// `events --timeline`: the start timeline of the container's sandbox, as a text waterfall
/// (and SVG into `svg`).
pub fn timeline(config: &Config, id: &str, svg: Option<&Path>) -> Result<ExitCode> {
    let id = ContainerId::parse(id)?;
    let (sb, _) = standalone::open(config, &id)?;
    let record = sb.record();
    let accelerator = record.accelerator();
    println!("start timeline of {id} (accelerator: {accelerator})");
    print!("{}", timeline::waterfall(&record.timeline));
    if let Some(path) = svg {
        let title = format!("runvm start timeline: {id} ({accelerator})");
        std::fs::write(path, timeline::svg(&record.timeline, &title))
            .with_context(|| format!("cannot write the SVG to {}", path.display()))?;
        eprintln!("SVG written to {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// `events`: stats every `interval` (bounded by its flag's parser: 1ms to 24h).
pub fn events(config: &Config, id: &str, once: bool, interval: Duration) -> Result<ExitCode> {
    let id = ContainerId::parse(id)?;
    block_on(async {
        let (mut sb, st) = standalone::open(config, &id)?;
        if st.status == "stopped" {
            anyhow::bail!("container with id {id} is not running");
        }
        if !once {
            // OOM kills as they happen, next to the periodic stats.
            let agent = sb.agent().await?;
            let me = id.to_string();
            tokio::spawn(async move {
                while let Ok(who) = agent.oom_event().await {
                    if who == me {
                        println!("{}", json!({"type": "oom", "id": who}));
                    }
                }
            });
        }
        loop {
            let stats = sb.stats(&id).await?;
            println!("{}", stats_event(&id, &stats));
            if once {
                return Ok(ExitCode::SUCCESS);
            }
            tokio::time::sleep(interval).await;
            if standalone::state(config, &id)?.status == "stopped" {
                return Ok(ExitCode::SUCCESS);
            }
        }
    })
}

/// OCI `linux.resources` from `update`'s flags.
fn resources_from_flags(a: &UpdateArgs) -> Result<Value> {
    let mut r = json!({});
    let mut memory = serde_json::Map::new();
    for (key, value) in [
        ("limit", a.memory),
        ("reservation", a.memory_reservation),
        ("swap", a.memory_swap),
    ] {
        if let Some(v) = value {
            memory.insert(key.into(), json!(v));
        }
    }
    if !memory.is_empty() {
        r["memory"] = Value::Object(memory);
    }
    let mut cpu = serde_json::Map::new();
    let pairs: [(&str, Option<Value>); 7] = [
        ("shares", a.cpu_share.map(|v| json!(v))),
        ("quota", a.cpu_quota.map(|v| json!(v))),
        ("period", a.cpu_period.map(|v| json!(v))),
        ("realtimeRuntime", a.cpu_rt_runtime.map(|v| json!(v))),
        ("realtimePeriod", a.cpu_rt_period.map(|v| json!(v))),
        ("cpus", a.cpuset_cpus.as_ref().map(|v| json!(v))),
        ("mems", a.cpuset_mems.as_ref().map(|v| json!(v))),
    ];
    for (key, value) in pairs {
        if let Some(v) = value {
            cpu.insert(key.into(), v);
        }
    }
    if !cpu.is_empty() {
        r["cpu"] = Value::Object(cpu);
    }
    if let Some(limit) = a.pids_limit {
        r["pids"] = json!({"limit": limit});
    }
    if let Some(weight) = a.blkio_weight {
        r["blockIO"] = json!({"weight": weight});
    }
    Ok(r)
}

pub fn update(config: &Config, a: &UpdateArgs) -> Result<ExitCode> {
    let id = ContainerId::parse(&a.id)?;
    let resources = match &a.resources {
        Some(path) => {
            let text = read_json_input(path, "--resources")?;
            serde_json::from_str(&text).with_context(|| {
                format!("{}: not valid JSON for linux.resources", path.display())
            })?
        }
        None => resources_from_flags(a)?,
    };
    block_on(async {
        let (mut sb, st) = standalone::open(config, &id)?;
        if st.status == "stopped" {
            return Err(StandaloneError::NotRunning.into());
        }
        // The VM's host cgroup follows (memory + the VM overhead), checked before either side
        // changes; only for the container the VM was made for (one that joined another's VM
        // does not set that VM's limits).
        let own = sb.id().as_str() == id.as_str();
        let host = match &sb.record().host_cgroup {
            Some(cgroup) if own => Some(runvm_sandbox::host_cgroup::update_request(
                cgroup,
                &resources,
                sb.record().config.runtime.vm_memory_overhead_mib,
            )?),
            _ => None,
        };
        sb.update_resources(&id, &resources).await?;
        if let Some(request) = &host {
            runvm_sandbox::host_cgroup::apply(request)?;
        }
        Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// What runvm supports, in runc's `features` format. Hooks are not run (they would run on
/// the host, outside the VM the container is in); cgroups are v2, in the guest.
pub fn features() -> Result<ExitCode> {
    const CAPS: &[&str] = &[
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_DAC_READ_SEARCH",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_SETGID",
        "CAP_SETUID",
        "CAP_SETPCAP",
        "CAP_LINUX_IMMUTABLE",
        "CAP_NET_BIND_SERVICE",
        "CAP_NET_BROADCAST",
        "CAP_NET_ADMIN",
        "CAP_NET_RAW",
        "CAP_IPC_LOCK",
        "CAP_IPC_OWNER",
        "CAP_SYS_MODULE",
        "CAP_SYS_RAWIO",
        "CAP_SYS_CHROOT",
        "CAP_SYS_PTRACE",
        "CAP_SYS_PACCT",
        "CAP_SYS_ADMIN",
        "CAP_SYS_BOOT",
        "CAP_SYS_NICE",
        "CAP_SYS_RESOURCE",
        "CAP_SYS_TIME",
        "CAP_SYS_TTY_CONFIG",
        "CAP_MKNOD",
        "CAP_LEASE",
        "CAP_AUDIT_WRITE",
        "CAP_AUDIT_CONTROL",
        "CAP_SETFCAP",
        "CAP_MAC_OVERRIDE",
        "CAP_MAC_ADMIN",
        "CAP_SYSLOG",
        "CAP_WAKE_ALARM",
        "CAP_BLOCK_SUSPEND",
        "CAP_AUDIT_READ",
        "CAP_PERFMON",
        "CAP_BPF",
        "CAP_CHECKPOINT_RESTORE",
    ];
    // The filter flags libcontainer sets (through libseccomp) in the guest.
    const SECCOMP_FLAGS: &[&str] = &[
        "SECCOMP_FILTER_FLAG_TSYNC",
        "SECCOMP_FILTER_FLAG_LOG",
        "SECCOMP_FILTER_FLAG_SPEC_ALLOW",
        "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV",
    ];
    let features = json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": OCI_VERSION,
        "hooks": ["prestart", "createRuntime", "createContainer", "startContainer",
                  "poststart", "poststop"],
        "mountOptions": [
            "async", "atime", "bind", "defaults", "dev", "diratime", "dirsync", "exec",
            "mand", "noatime", "nodev", "nodiratime", "noexec", "nomand", "norelatime",
            "nostrictatime", "nosuid", "private", "rbind", "relatime", "remount", "ro",
            "rprivate", "rshared", "rslave", "runbindable", "rw", "shared", "slave",
            "strictatime", "sync", "unbindable"
        ],
        "linux": {
            "namespaces": ["cgroup", "ipc", "mount", "network", "pid", "user", "uts"],
            "capabilities": CAPS,
            "cgroup": {"v1": false, "v2": true, "systemd": false, "systemdUser": false},
            "seccomp": {
                "enabled": true,
                // Loaded in the guest into every process of the container (init and exec'd).
                // SCMP_ACT_NOTIFY is refused at create: its listener would be on the host.
                "actions": ["SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO", "SCMP_ACT_KILL",
                            "SCMP_ACT_KILL_PROCESS", "SCMP_ACT_KILL_THREAD", "SCMP_ACT_LOG",
                            "SCMP_ACT_TRACE", "SCMP_ACT_TRAP"],
                "operators": ["SCMP_CMP_EQ", "SCMP_CMP_GE", "SCMP_CMP_GT", "SCMP_CMP_LE",
                              "SCMP_CMP_LT", "SCMP_CMP_MASKED_EQ", "SCMP_CMP_NE"],
                "archs": ["SCMP_ARCH_X86", "SCMP_ARCH_X86_64", "SCMP_ARCH_X32"],
                "knownFlags": SECCOMP_FLAGS,
                "supportedFlags": SECCOMP_FLAGS
            },
            "apparmor": {"enabled": false},
            "selinux": {"enabled": false}
        },
        "annotations": {
            "io.runvm.version": env!("CARGO_PKG_VERSION"),
            "io.runvm.isolation": "vm",
            "io.runvm.hooks": "createRuntime, prestart, poststart and poststop run on the host (prestart in the pod's network namespace, with QEMU's pid in the state); createContainer and startContainer in the guest, in the container's namespaces",
            // Every type may be new; only `network` may be given by path (docs/cli.md).
            "io.runvm.namespace-paths": "network only (the VM runs in it) for host namespaces; /proc/PID/ns/TYPE of another runvm container (PID as `runvm state` prints it) joins its ipc, uts, pid, network or cgroup namespace, the container being made in that container's VM; any other path (a host ipc, uts, pid, mount, cgroup, user or time namespace, or another container's mount, user or time namespace) is refused at create",
            "io.runvm.mount-propagation": "binds show the host folder both ways with every option; host mounts made later under a shared source reach the container unless the bind is private or rprivate; mounts made in the container never reach the host; rootfsPropagation applies in the guest"
        }
    });
    println!("{}", serde_json::to_string_pretty(&features)?);
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn exec_args(args: &[&str]) -> ExecArgs {
        let argv = ["runvm", "exec"].into_iter().chain(args.iter().copied());
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Exec(a) => *a,
            other => panic!("not exec: {other:?}"),
        }
    }

    #[test]
    fn exec_user_becomes_the_process_user() {
        let p = exec_process(
            &Value::Null,
            &exec_args(&["-u", "1000:4294967294", "c1", "id"]),
        );
        assert_eq!(
            p.unwrap()["user"],
            json!({"uid": 1000, "gid": 4294967294u32})
        );
    }

    #[test]
    fn a_process_file_gets_runcs_defaults() {
        let p = process_with_defaults(json!({"args": ["id"]})).unwrap();
        assert_eq!(p["user"], json!({"uid": 0, "gid": 0}));
        assert_eq!(p["cwd"], "/");
        assert_eq!(p["env"], json!([]));
        assert_eq!(p["terminal"], false);
        let p = process_with_defaults(json!({"args": ["id"], "user": {"uid": 7}, "cwd": "/tmp"}))
            .unwrap();
        assert_eq!(p["user"], json!({"uid": 7, "gid": 0}));
        assert_eq!(p["cwd"], "/tmp");
        let err = process_with_defaults(json!({"cwd": "/"})).unwrap_err();
        assert!(err.to_string().contains("args must not be empty"), "{err}");
        assert!(process_with_defaults(json!([1])).is_err());
    }

    #[test]
    fn stats_events_have_runcs_shape() {
        let id = ContainerId::parse("c1").unwrap();
        let mut st = ContainerStats::default();
        st.cpu.usage_total_ns = 5;
        st.pids_current = 2;
        st.memory.limit_bytes = 100;
        let e = stats_event(&id, &st);
        assert_eq!(e["type"], "stats");
        assert_eq!(e["id"], "c1");
        let d = &e["data"];
        assert_eq!(
            d["cpu"]["usage"],
            json!({"total": 5, "kernel": 0, "user": 0})
        );
        assert_eq!(d["cpu"]["throttling"], json!({}));
        assert_eq!(d["pids"], json!({"current": 2}));
        assert_eq!(d["memory"]["usage"], json!({"limit": 100, "failcnt": 0}));
        assert_eq!(d["memory"]["swap"], json!({"limit": 0, "failcnt": 0}));
        assert_eq!(
            d["blkio"]["ioServiceBytesRecursive"][0],
            json!({"op": "Read"})
        );
        assert_eq!(d["network_interfaces"], Value::Null);
        assert_eq!(d["hugetlb"], json!({}));
        assert!(d["cpuset"].is_object());
    }

    #[test]
    fn json_inputs_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("process.json");
        std::fs::write(&p, "{}").unwrap();
        assert_eq!(read_json_input(&p, "--process").unwrap(), "{}");
        let err = read_json_input(Path::new("/dev/zero"), "--process")
            .unwrap_err()
            .to_string();
        assert!(err.contains("--process: /dev/zero is too large"), "{err}");
        assert!(err.contains(&MAX_JSON_INPUT_BYTES.to_string()), "{err}");
        std::fs::write(&p, vec![b' '; MAX_JSON_INPUT_BYTES as usize + 1]).unwrap();
        let err = read_json_input(&p, "--resources").unwrap_err().to_string();
        assert!(err.contains("--resources"), "{err}");
        assert!(err.contains("too large"), "{err}");
        let err = read_json_input(dir.path(), "--process")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err:#}");
    }

    #[test]
    fn update_flags_become_linux_resources() {
        let cli = Cli::try_parse_from([
            "runvm",
            "update",
            "--memory",
            "64m",
            "--cpu-quota",
            "-1",
            "--pids-limit",
            "100",
            "--blkio-weight",
            "500",
            "c1",
        ])
        .unwrap();
        let Command::Update(a) = cli.command else {
            panic!("not update");
        };
        let r = resources_from_flags(&a).unwrap();
        assert_eq!(r["memory"]["limit"], 64 << 20);
        assert_eq!(r["cpu"]["quota"], -1);
        assert_eq!(r["pids"]["limit"], 100);
        assert_eq!(r["blockIO"]["weight"], 500);
    }
}
