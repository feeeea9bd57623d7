//! The pod's VM follows its containers' limits by hot-plug (issue #12): checked inside the CRI
//! pod test, on its VM (booted at base 1 vCPU / 512 MiB plus the pod's 1 CPU / 256 MiB).

use k8s_cri::v1::{
    CreateContainerRequest, LinuxContainerResources, Mount, PodSandboxConfig,
    RemoveContainerRequest, StartContainerRequest, StopContainerRequest,
    UpdateContainerResourcesRequest,
};

use super::{container_config, exec_sync, Runtime};

const MIB: u64 = 1 << 20;
const GIB: i64 = 1 << 30;

/// A static program that allocates MiB (its argument), writes every page, and says `touched`.
const TOUCH_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {
    size_t mib = argc > 1 ? strtoul(argv[1], 0, 10) : 1, len = mib << 20;
    char *p = malloc(len);
    if (!p) { puts("malloc failed"); return 1; }
    for (size_t i = 0; i < len; i += 4096) p[i] = (char)i;
    free(p);
    printf("touched %zu MiB\n", mib);
    return 0;
}
"#;

fn resources(cpus: i64, memory: i64) -> LinuxContainerResources {
    LinuxContainerResources {
        cpu_period: 100_000,
        cpu_quota: cpus * 100_000,
        memory_limit_in_bytes: memory,
        ..Default::default()
    }
}

async fn mem_total(rt: &mut Runtime, id: &str) -> u64 {
    let (meminfo, _, _) = exec_sync(rt, id, &["head", "-1", "/proc/meminfo"]).await;
    meminfo
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .unwrap_or_else(|| panic!("MemTotal in {meminfo:?}"))
}

/// In the running pod (its container `other` without limits): a container with limits of 2
/// CPUs and 1 GiB grows the VM to base + 2 vCPUs and base + 1 GiB, where 800 MiB can be
/// allocated; UpdateContainerResources to 3 CPUs adds one more; past `hypervisor.max_vcpus`
/// (4 in this test's configuration) it fails by name, the VM unchanged; removing the container
/// gives its memory back.
pub async fn check(
    rt: &mut Runtime,
    pod_id: &str,
    pod: &PodSandboxConfig,
    dir: &std::path::Path,
    other: &str,
) {
    let before = mem_total(rt, other).await;
    let tools = dir.join("hotplug-tools");
    std::fs::create_dir_all(&tools).unwrap();
    std::fs::write(tools.join("touchmem.c"), TOUCH_C).unwrap();
    let out = std::process::Command::new("gcc")
        .args(["-static", "-O1", "-o"])
        .arg(tools.join("touchmem"))
        .arg(tools.join("touchmem.c"))
        .output()
        .expect("gcc (a static libc is needed)");
    assert!(
        out.status.success(),
        "gcc: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut config = container_config("sized", &["sleep", "1000"], false);
    if let Some(linux) = config.linux.as_mut() {
        linux.resources = Some(resources(2, GIB));
    }
    config.mounts = vec![Mount {
        container_path: "/tools".into(),
        host_path: tools.display().to_string(),
        readonly: true,
        ..Default::default()
    }];
    let id = rt
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(config),
            sandbox_config: Some(pod.clone()),
        })
        .await
        .expect("CreateContainer with limits")
        .into_inner()
        .container_id;
    rt.start_container(StartContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("StartContainer");

    // Base 1 + 2 vCPUs (the pod's boot size of 2 is below), 512 + 1024 MiB.
    let (cpus, _, _) = exec_sync(rt, &id, &["cat", "/sys/devices/system/cpu/online"]).await;
    assert_eq!(cpus.trim(), "0-2", "online CPUs with a 2-CPU container");
    let total = mem_total(rt, &id).await;
    assert!(total >= GIB as u64, "MemTotal {} MiB", total / MIB);
    assert!(
        total >= before + 700 * MIB,
        "MemTotal {} MiB, {} MiB before",
        total / MIB,
        before / MIB
    );
    let (out, _, code) = exec_sync(rt, &id, &["/tools/touchmem", "800"]).await;
    assert_eq!((code, out.as_str()), (0, "touched 800 MiB\n"));

    let update = |cpus| UpdateContainerResourcesRequest {
        container_id: id.clone(),
        linux: Some(resources(cpus, GIB)),
        ..Default::default()
    };
    rt.update_container_resources(update(3))
        .await
        .expect("UpdateContainerResources to 3 CPUs");
    let (nproc, _, _) = exec_sync(rt, &id, &["nproc"]).await;
    assert_eq!(nproc.trim(), "4", "base 1 + 3 CPUs");
    let e = rt
        .update_container_resources(update(8))
        .await
        .expect_err("an update past hypervisor.max_vcpus");
    assert!(
        e.message().contains("9 vCPUs asked for")
            && e.message().contains("hypervisor.max_vcpus = 4"),
        "{e:?}"
    );
    let (nproc, _, _) = exec_sync(rt, &id, &["nproc"]).await;
    assert_eq!(nproc.trim(), "4", "the VM changed on a refused update");

    rt.stop_container(StopContainerRequest {
        container_id: id.clone(),
        timeout: 1,
    })
    .await
    .expect("StopContainer");
    rt.remove_container(RemoveContainerRequest {
        container_id: id.clone(),
    })
    .await
    .expect("RemoveContainer");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let now = mem_total(rt, other).await;
        if now <= before + 64 * MIB {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "MemTotal {} MiB after the removal, {} MiB before",
            now / MIB,
            before / MIB
        );
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}
