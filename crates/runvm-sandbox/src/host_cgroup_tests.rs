use serde_json::json;

use super::*;

fn path(given: &str) -> String {
    cgroupfs_path(given).unwrap().display().to_string()
}

fn refused(given: &str) -> String {
    let e = cgroupfs_path(given).unwrap_err().to_string();
    assert!(e.contains(&format!("{given:?}")), "{e}");
    assert!(e.contains("valid:"), "{e}");
    e
}

#[test]
fn cgroupfs_paths_absolute_and_relative_lie_under_the_root() {
    assert_eq!(
        path("/kubepods/besteffort/pod1/abc"),
        "/kubepods/besteffort/pod1/abc"
    );
    assert_eq!(path("runvm/c1"), "/runvm/c1");
    assert_eq!(path("//a///b/"), "/a/b");
}

#[test]
fn paths_leaving_or_naming_the_root_are_refused_by_name() {
    assert!(refused("/kubepods/../../etc").contains("`..`"));
    assert!(refused("../x").contains("`..`"));
    assert!(refused("/a/./b").contains("`.`"));
    assert!(refused("/").contains("root cgroup"));
    assert!(refused("a\nb").contains("newline"));
}

#[test]
fn systemd_paths_expand_their_slice_as_systemd_does() {
    assert_eq!(
        path("kubepods-besteffort-pod1.slice:cri-containerd:abc"),
        "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-abc.scope"
    );
    assert_eq!(
        path("system.slice:runvm:c1"),
        "/system.slice/runvm-c1.scope"
    );
    assert_eq!(path(":runvm:c1"), "/system.slice/runvm-c1.scope");
    assert_eq!(path("-.slice::c1"), "/c1.scope");
    assert_eq!(path("a.slice:p:a-b.slice"), "/a.slice/a-b.slice");
}

#[test]
fn malformed_systemd_paths_are_refused_by_name() {
    assert!(refused("kubepods.slice:cri").contains("three"));
    assert!(refused("a:b:c:d").contains("three"));
    assert!(refused("kubepods:cri:abc").contains("`.slice`"));
    assert!(refused("a--b.slice:p:n").contains("malformed"));
    assert!(refused("-a.slice:p:n").contains("malformed"));
    assert!(refused("a.slice:p:").contains("empty"));
    assert!(refused("a.slice:p:..").contains("`.`/`..`"));
    assert!(refused("a.slice:p/q:n").contains("`/`"));
}

fn resources(value: serde_json::Value) -> Option<LinuxResources> {
    Some(serde_json::from_value(value).unwrap())
}

#[test]
fn memory_limit_gets_the_vm_overhead_and_the_rest_passes_as_given() {
    let spec = resources(json!({
        "memory": {"limit": 268435456, "swap": 536870912},
        "cpu": {"shares": 512, "quota": 150000, "period": 100000, "cpus": "0"},
        "pids": {"limit": 64}
    }));
    let r = host_resources(spec.as_ref(), 100).unwrap();
    let memory = r.memory().as_ref().unwrap();
    assert_eq!(memory.limit(), Some(268_435_456 + 100 * 1024 * 1024));
    assert_eq!(memory.swap(), Some(536_870_912 + 100 * 1024 * 1024));
    let cpu = r.cpu().as_ref().unwrap();
    assert_eq!(cpu.shares(), Some(512));
    assert_eq!(cpu.quota(), Some(150_000));
    assert_eq!(cpu.period(), Some(100_000));
    assert_eq!(cpu.cpus().as_deref(), Some("0"));
    assert_eq!(r.pids().as_ref().unwrap().limit(), 64);
}

#[test]
fn no_limit_stays_no_limit_and_no_resources_write_nothing() {
    let spec =
        resources(json!({"memory": {"limit": -1}, "cpu": {"quota": -1}, "pids": {"limit": -1}}));
    let r = host_resources(spec.as_ref(), 100).unwrap();
    assert_eq!(r.memory().as_ref().unwrap().limit(), Some(-1));
    assert_eq!(r.cpu().as_ref().unwrap().quota(), Some(-1));
    assert_eq!(r.pids().as_ref().unwrap().limit(), -1);
    let none = host_resources(None, 100).unwrap();
    assert!(none.memory().is_none() && none.cpu().is_none() && none.pids().is_none());
}

#[test]
fn zero_or_negative_resources_are_refused_by_name() {
    for (value, field) in [
        (json!({"memory": {"limit": 0}}), "memory.limit = 0"),
        (json!({"memory": {"limit": -5}}), "memory.limit = -5"),
        (json!({"memory": {"swap": 0}}), "memory.swap = 0"),
        (json!({"cpu": {"quota": 0}}), "cpu.quota = 0"),
        (json!({"cpu": {"quota": 999}}), "cpu.quota = 999"),
        (json!({"cpu": {"period": 0}}), "cpu.period = 0"),
        (json!({"cpu": {"shares": 0}}), "cpu.shares = 0"),
        (json!({"pids": {"limit": 0}}), "pids.limit = 0"),
        (json!({"pids": {"limit": -2}}), "pids.limit = -2"),
    ] {
        let e = host_resources(resources(value).as_ref(), 0)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("linux.resources.{field}")), "{e}");
        assert!(e.contains("valid:"), "{e}");
    }
}

#[test]
fn request_from_spec_reads_path_and_resources_or_nothing() {
    let spec = json!({"linux": {
        "cgroupsPath": "/runvm-test/c1",
        "resources": {"memory": {"limit": 67108864}}
    }});
    let req = request_from_spec(&spec, 1).unwrap().unwrap();
    assert_eq!(req.record.given, "/runvm-test/c1");
    assert_eq!(req.record.path, PathBuf::from("/runvm-test/c1"));
    assert_eq!(
        req.resources.memory().as_ref().unwrap().limit(),
        Some(67_108_864 + 1024 * 1024)
    );
    assert_eq!(request_from_spec(&json!({"linux": {}}), 1).unwrap(), None);
    assert_eq!(
        request_from_spec(&json!({"linux": {"cgroupsPath": ""}}), 1).unwrap(),
        None
    );
    let e = request_from_spec(&json!({"linux": {"cgroupsPath": "/a/../.."}}), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("\"/a/../..\""), "{e}");
}
