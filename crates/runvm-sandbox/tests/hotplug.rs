//! The VM sized to its containers by hot-plug, in a real VM (one boot): a container with
//! limits of 2 CPUs and 1 GiB grows the VM by 2 vCPUs and 1 GiB (virtio-mem), which the
//! container can use; an update to 3 CPUs adds one more; a request past the maxima is refused
//! by name with the VM unchanged; another process finds the size in `sandbox.json`; deleting
//! the container gives the memory and (under TCG, where vCPUs are onlined, not hot-added) the
//! vCPUs back.
//!
//! Needs the host set-up, busybox-static, gcc with a static libc and a guest image with
//! virtio_mem (`cargo xtask guest`); `make test` provides them.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use runvm_hypervisor::VmSize;
use runvm_sandbox::container::bundle::default_spec;
use runvm_sandbox::sandbox::{create_qemu_sandbox, open_sandbox};
use runvm_sandbox::{Sandbox, SandboxId};
use serde_json::json;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// A static program that allocates MiB (its argument), writes every page, and says `touched`.
const TOUCH_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1;
    size_t len = mib << 20;
    char *p = malloc(len);
    if (!p) { puts("malloc failed"); return 1; }
    for (size_t i = 0; i < len; i += 4096) p[i] = (char)i;
    long sum = 0;
    for (size_t i = 0; i < len; i += 4096) sum += p[i];
    free(p);
    printf("touched %zu MiB %ld\n", mib, sum);
    return 0;
}
"#;

/// Builds the touch program into `rootfs/bin/touchmem`.
fn build_touch(rootfs: &Path, dir: &Path) {
    let src = dir.join("touchmem.c");
    std::fs::write(&src, TOUCH_C).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(rootfs.join("bin/touchmem"))
        .arg(&src)
        .output()
        .expect("gcc (a static libc is needed)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `args` in container `id`; returns (stdout, exit code).
async fn run(sb: &mut Sandbox, id: &str, exec_id: &str, args: &[&str]) -> (String, i32) {
    let io = exec(sb, id, exec_req(exec_id, args, false)).await;
    let (out, _) = outputs(io).await;
    let code = sb.wait(&cid(id), exec_id).await.unwrap().code;
    (String::from_utf8_lossy(&out).into_owned(), code)
}

fn mem_total(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("no MemTotal in {meminfo:?}"))
}

fn limits(cpus: u32, memory: u64) -> serde_json::Value {
    json!({
        "cpu": {"quota": i64::from(cpus) * 100_000, "period": 100_000},
        "memory": {"limit": memory}
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_with_limits_grows_the_vm_and_its_deletion_shrinks_it() {
    let mut host = Host::new();
    host.config.hypervisor.max_vcpus = 4;
    host.config.hypervisor.max_memory_mib = 2560;
    let id = SandboxId::parse("hp").unwrap();
    let (mut sb, report) = create_qemu_sandbox(&host.config, id.clone(), BTreeMap::new())
        .await
        .expect("boot");
    let boot_total = report.guest.mem_total_bytes;
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 1,
            memory_mib: 512
        }
    );
    assert_eq!(report.guest.cpu_count, 1);

    let mut spec = default_spec(&["sleep", "1000"], false);
    spec["linux"]["resources"] = limits(2, GIB);
    let bundle = host.bundle("big", &spec);
    build_touch(&bundle.join("rootfs"), host.dir.path());
    let t = Instant::now();
    let _io = create(&mut sb, "big", bundle, stdio(false, false)).await;
    eprintln!(
        "create with hot-plug of 2 vCPUs and 1 GiB: {:?}",
        t.elapsed()
    );
    sb.start_container(&cid("big")).await.unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 3,
            memory_mib: 1536
        }
    );

    // The guest sees the CPUs online and the memory, and the container can use it.
    let (online, _) = run(
        &mut sb,
        "big",
        "online",
        &["cat", "/sys/devices/system/cpu/online"],
    )
    .await;
    assert_eq!(online.trim(), "0-2", "online CPUs");
    let (nproc, _) = run(&mut sb, "big", "nproc", &["nproc"]).await;
    assert_eq!(nproc.trim(), "3");
    let (meminfo, _) = run(&mut sb, "big", "mem", &["cat", "/proc/meminfo"]).await;
    let total = mem_total(&meminfo);
    assert!(total >= GIB, "MemTotal {} MiB", total / MIB);
    assert!(
        total >= boot_total + 1000 * MIB,
        "MemTotal {} MiB after boot's {} MiB",
        total / MIB,
        boot_total / MIB
    );
    let (out, code) = run(&mut sb, "big", "touch", &["/bin/touchmem", "800"]).await;
    assert_eq!(
        (code, out.starts_with("touched 800 MiB")),
        (0, true),
        "{out:?}"
    );
    // The container's own limits hold in the guest, as before.
    let (max, _) = run(&mut sb, "big", "cpumax", &["cat", "/sys/fs/cgroup/cpu.max"]).await;
    assert_eq!(max.trim(), "200000 100000");

    // An update to 3 CPUs adds one more vCPU.
    sb.update_resources(&cid("big"), &json!({"cpu": {"quota": 300_000}}))
        .await
        .unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1536
        }
    );
    let (nproc, _) = run(&mut sb, "big", "nproc3", &["nproc"]).await;
    assert_eq!(nproc.trim(), "4");

    // Past the maxima: refused by name, the VM and the container unchanged.
    let e = sb
        .update_resources(&cid("big"), &json!({"cpu": {"quota": 800_000}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("9 vCPUs asked for") && e.contains("hypervisor.max_vcpus = 4"),
        "{e}"
    );
    let e = sb
        .update_resources(&cid("big"), &json!({"memory": {"limit": 4 * GIB}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4608 MiB asked for") && e.contains("hypervisor.max_memory_mib = 2560"),
        "{e}"
    );
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1536
        }
    );
    let (max, _) = run(
        &mut sb,
        "big",
        "cpumax2",
        &["cat", "/sys/fs/cgroup/cpu.max"],
    )
    .await;
    assert_eq!(
        max.trim(),
        "300000 100000",
        "the refused update reached the container"
    );

    // Another process finds the size in the sandbox's state.
    sb.detach();
    let mut sb = open_sandbox(&host.config, &id).unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1536
        }
    );

    // Deleting the container gives the memory back, and under TCG the vCPUs (offlined in the
    // guest; hot-added ones under KVM stay: see runvm-hypervisor's qemu/resize.rs).
    sb.signal(&cid("big"), "", 9, false).await.unwrap();
    sb.wait(&cid("big"), "").await.unwrap();
    sb.delete_container(&cid("big"), false).await.unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 1,
            memory_mib: 512
        }
    );
    let agent = sb.agent().await.unwrap();
    let cpus = agent.guest_details().await.unwrap().cpu_count;
    assert_eq!(cpus, 1, "CPUs online after the delete");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = agent.guest_details().await.unwrap().mem_total_bytes;
        if now <= boot_total + 64 * MIB {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "MemTotal still {} MiB after the delete",
            now / MIB
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    sb.stop().await.unwrap();
    sb.delete(false).await.unwrap();
    host.assert_nothing_left();
}

/// Host PSS of the VM's processes (QEMU and its helpers), KiB.
fn vm_pss_kib(sb: &Sandbox) -> u64 {
    sb.pids()
        .iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{}/smaps_rollup", p.pid))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Polls the guest's MemTotal until `done` holds it (60 s at most).
async fn wait_mem_total(sb: &mut Sandbox, done: impl Fn(u64) -> bool) -> u64 {
    let agent = sb.agent().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = agent.guest_details().await.unwrap().mem_total_bytes;
        if done(now) {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "MemTotal stuck at {} MiB",
            now / MIB
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The figures of docs/kubernetes.md ("Hot-plug"): the time `update` takes to grow a running
/// VM by 1 vCPU and 1 GiB, agent onlining included (median of 5), and the host PSS of a pod
/// with a 1 GiB limit, idle, then after its container touched 800 MiB and freed it. A
/// measurement, not a check of behaviour:
/// `cargo test -p runvm-sandbox --test hotplug -- --ignored --nocapture hotplug_figures`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement; run by hand (see the doc comment)"]
async fn hotplug_figures() {
    let mut host = Host::new();
    host.config.hypervisor.max_vcpus = 6;
    host.config.hypervisor.max_memory_mib = 2560;
    let id = SandboxId::parse("hpbench").unwrap();
    let (mut sb, report) = create_qemu_sandbox(&host.config, id, BTreeMap::new())
        .await
        .expect("boot");
    let boot_total = report.guest.mem_total_bytes;
    let mut spec = default_spec(&["sleep", "1000"], false);
    spec["linux"]["resources"] = json!({"memory": {"limit": -1}});
    let bundle = host.bundle("w", &spec);
    build_touch(&bundle.join("rootfs"), host.dir.path());
    let _io = create(&mut sb, "w", bundle, stdio(false, false)).await;
    sb.start_container(&cid("w")).await.unwrap();

    let mut times = Vec::new();
    for n in 1..=5u32 {
        let grow = json!({
            "cpu": {"quota": i64::from(n) * 100_000, "period": 100_000},
            "memory": {"limit": GIB}
        });
        let t = Instant::now();
        sb.update_resources(&cid("w"), &grow).await.unwrap();
        times.push(t.elapsed());
        assert_eq!(
            sb.vm_size(),
            VmSize {
                vcpus: 1 + n,
                memory_mib: 1536
            }
        );
        wait_mem_total(&mut sb, |m| m >= boot_total + 1000 * MIB).await;
        // Back to no memory limit: the 1 GiB is unplugged before the next round.
        sb.update_resources(&cid("w"), &json!({"memory": {"limit": -1}}))
            .await
            .unwrap();
        wait_mem_total(&mut sb, |m| m <= boot_total + 64 * MIB).await;
    }
    let mut sorted = times.clone();
    sorted.sort();
    eprintln!(
        "FIGURE hot-add 1 vCPU + 1 GiB: median {:?} of {times:?}",
        sorted[2]
    );

    // A pod with a 1 GiB limit: idle, then after 800 MiB touched and freed.
    sb.update_resources(&cid("w"), &json!({"memory": {"limit": GIB}}))
        .await
        .unwrap();
    wait_mem_total(&mut sb, |m| m >= boot_total + 1000 * MIB).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = vm_pss_kib(&sb);
    let (out, code) = run(&mut sb, "w", "touch", &["/bin/touchmem", "800"]).await;
    assert_eq!(code, 0, "{out}");
    let touched_at = Instant::now();
    let mut after = vm_pss_kib(&sb);
    // Free page reporting hands freed pages back in batches, seconds after the free.
    while touched_at.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_secs(2)).await;
        after = vm_pss_kib(&sb);
    }
    eprintln!(
        "FIGURE host PSS of the VM (qemu + helpers), 1 GiB limit: idle {} MiB, 30 s after \
         800 MiB touched and freed {} MiB",
        idle / 1024,
        after / 1024
    );
    sb.stop().await.unwrap();
    sb.delete(false).await.unwrap();
    host.assert_nothing_left();
}
