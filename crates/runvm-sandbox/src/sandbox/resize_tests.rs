//! Unit tests of sizing the VM to its containers, against the mock hypervisor and agent.

use std::time::Duration;

use runvm_hypervisor::VmSize;
use serde_json::json;

use super::tests::{cid, fixture, new_container, Fixture};
use crate::container::bundle;

/// A fixture whose VM (1 vCPU, 256 MiB at boot; base 1 vCPU, 512 MiB) can grow to 4 vCPUs and
/// 2048 MiB.
fn hotplug_fixture() -> Fixture {
    let mut f = fixture(Duration::from_secs(5));
    f.settings.vm.max_vcpus = 4;
    f.settings.vm.max_memory_mib = 2048;
    f
}

/// A bundle running `sleep` with CPU and memory limits.
fn limited_bundle(f: &Fixture, name: &str, cpus: i64, memory: i64) -> std::path::PathBuf {
    let dir = f.root.path().join("bundles").join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut spec = bundle::default_spec(&["sleep", "100"], false);
    spec["linux"]["resources"] = json!({
        "cpu": {"quota": cpus * 100_000, "period": 100_000},
        "memory": {"limit": memory}
    });
    bundle::busybox_bundle(&dir, &spec).unwrap();
    dir
}

fn vm_calls(f: &Fixture) -> Vec<String> {
    f.vm.lock()
        .unwrap()
        .calls
        .iter()
        .filter(|c| c.starts_with("resize"))
        .cloned()
        .collect()
}

#[tokio::test]
async fn containers_limits_resize_the_vm_which_the_agent_onlines_and_the_record_keeps() {
    let mut f = hotplug_fixture();
    let (mut sb, _) = f.create().await.unwrap();
    let b = limited_bundle(&f, "c1", 2, 512 << 20);
    sb.create_container(new_container("c1", b)).await.unwrap();
    // Base 1 vCPU and 512 MiB plus the container's 2 CPUs and 512 MiB.
    assert_eq!(vm_calls(&f), ["resize 3 1024"]);
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 3,
            memory_mib: 1024
        }
    );
    assert!(f
        .agent()
        .lock()
        .unwrap()
        .calls
        .contains(&"online_cpu_mem 3".to_string()));
    // On disk, for another process.
    let record = f.store().load_sandbox(sb.id()).unwrap();
    assert_eq!(record.vm.config.hotplugged.cpus.len(), 2);
    assert_eq!(
        record.vm.config.size(),
        VmSize {
            vcpus: 3,
            memory_mib: 1024
        }
    );

    // A second container adds its limits; an update changes only what it names.
    let b = limited_bundle(&f, "c2", 1, 256 << 20);
    sb.create_container(new_container("c2", b)).await.unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1280
        }
    );
    sb.update_resources(&cid("c2"), &json!({"memory": {"limit": 768 << 20}}))
        .await
        .unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1792
        }
    );
    let c2 = f.store().load_container(sb.id(), &cid("c2")).unwrap();
    assert_eq!(c2.spec["linux"]["resources"]["cpu"]["quota"], 100_000);
    assert_eq!(c2.spec["linux"]["resources"]["memory"]["limit"], 768 << 20);

    // Removing a container gives its memory back (hot-added vCPUs stay, as with QEMU).
    sb.delete_container(&cid("c2"), true).await.unwrap();
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 4,
            memory_mib: 1024
        }
    );
    sb.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_need_past_the_maxima_is_refused_by_name_with_the_vm_and_guest_unchanged() {
    let mut f = hotplug_fixture();
    let (mut sb, _) = f.create().await.unwrap();
    let b = limited_bundle(&f, "c1", 1, 0);
    sb.create_container(new_container("c1", b)).await.unwrap();
    let before = vm_calls(&f);
    let updates_before = f.agent().lock().unwrap().calls.len();

    let e = sb
        .update_resources(&cid("c1"), &json!({"cpu": {"quota": 400_000}}))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("5 vCPUs asked for"), "{e}");
    assert!(
        e.contains("hypervisor.vcpus = 1, plus the CPU limits of containers: c1 4"),
        "{e}"
    );
    assert!(e.contains("hypervisor.max_vcpus = 4"), "{e}");
    assert_eq!(vm_calls(&f), before, "the VM was resized");
    let agent_calls = f.agent().lock().unwrap().calls.clone();
    assert_eq!(
        agent_calls.len(),
        updates_before,
        "the guest was asked: {agent_calls:?}"
    );
    let c1 = f.store().load_container(sb.id(), &cid("c1")).unwrap();
    assert_eq!(c1.spec["linux"]["resources"]["cpu"]["quota"], 100_000);

    // A new container past the memory maximum: nothing stored, mounted or in the guest.
    let b = limited_bundle(&f, "big", 0, 2 << 30);
    let e = sb
        .create_container(new_container("big", b))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("2560 MiB asked for") && e.contains("hypervisor.max_memory_mib = 2048"),
        "{e}"
    );
    assert!(!sb.containers().unwrap().contains(&cid("big")));
    assert!(!f.agent().lock().unwrap().containers.contains_key("big"));
    assert!(!crate::container::share::is_mounted(
        &sb.dir().join("shared/big/rootfs")
    ));
    assert_eq!(vm_calls(&f), before);
    sb.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_failed_resize_fails_the_create_and_leaves_nothing() {
    let mut f = hotplug_fixture();
    let (mut sb, _) = f.create().await.unwrap();
    f.vm.lock().unwrap().fail_resize = Some("QEMU refused".into());
    let b = limited_bundle(&f, "c1", 1, 0);
    let e = sb
        .create_container(new_container("c1", b))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("QEMU refused"), "{e}");
    assert!(sb.containers().unwrap().is_empty());
    assert!(!f.agent().lock().unwrap().containers.contains_key("c1"));
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 1,
            memory_mib: 256
        }
    );
    sb.delete(true).await.unwrap();
}

#[tokio::test]
async fn a_vm_without_hotplug_room_is_left_as_booted() {
    let mut f = fixture(Duration::from_secs(5));
    let (mut sb, _) = f.create().await.unwrap();
    let b = limited_bundle(&f, "c1", 2, 1 << 30);
    sb.create_container(new_container("c1", b)).await.unwrap();
    assert!(vm_calls(&f).is_empty());
    assert_eq!(
        sb.vm_size(),
        VmSize {
            vcpus: 1,
            memory_mib: 256
        }
    );
    sb.delete(true).await.unwrap();
}
