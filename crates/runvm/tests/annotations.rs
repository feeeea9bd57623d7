//! Per-sandbox configuration by `io.runvm.config.*` annotations through the `runvm` binary:
//! the VM boots at the size the spec asks for; annotations not allowed, and sizes past the
//! maximum, are refused at create by name with nothing left behind (one real VM).

mod common;

use common::{spec, text, Host};
use serde_json::{json, Value};

fn annotated(annotations: Value) -> Value {
    let mut config = spec(&["sleep", "600"]);
    config["annotations"] = annotations;
    config
}

/// `runvm create` of `config` as container `id`, expected to fail: its stderr.
fn create_refused(host: &Host, id: &str, config: &Value) -> String {
    let bundle = host.bundle(id, config);
    let (code, _, err) =
        host.run_to_files(&["create", "--bundle", bundle.to_str().unwrap(), id], id);
    let err = std::fs::read_to_string(err).unwrap();
    assert_eq!(code, Some(1), "create {id} should fail: {err}");
    err
}

#[test]
fn a_disallowed_config_annotation_is_refused_at_create_by_name() {
    let host = Host::new();
    let err = create_refused(
        &host,
        "kernel",
        &annotated(json!({
            "io.runvm.config.hypervisor.vcpus": "2",
            "io.runvm.config.guest.kernel": "/tmp/evil-vmlinuz",
        })),
    );
    assert!(err.contains("io.runvm.config.guest.kernel"), "{err}");
    assert!(err.contains("/tmp/evil-vmlinuz"), "{err}");
    assert!(err.contains("not allowed"), "{err}");
    assert!(
        err.contains("\"hypervisor.vcpus\", \"hypervisor.memory_mib\""),
        "{err}"
    );
    host.assert_nothing_left();
}

#[test]
fn a_size_past_the_maximum_is_refused_at_create_by_name() {
    let host = Host::new();
    // hypervisor.max_vcpus defaults to the host's CPU count (fewer than 255 here).
    let err = create_refused(
        &host,
        "huge",
        &annotated(json!({"io.runvm.config.hypervisor.vcpus": "255"})),
    );
    assert!(err.contains("255 vCPUs"), "{err}");
    assert!(err.contains("io.runvm.config.hypervisor.vcpus"), "{err}");
    assert!(err.contains("hypervisor.max_vcpus"), "{err}");
    // Out of the key's own range: named with the range.
    let err = create_refused(
        &host,
        "zero",
        &annotated(json!({"io.runvm.config.hypervisor.memory_mib": "0"})),
    );
    assert!(
        err.contains("io.runvm.config.hypervisor.memory_mib=\"0\"") && err.contains("64 to"),
        "{err}"
    );
    host.assert_nothing_left();
}

#[test]
fn the_vm_boots_at_the_size_the_annotations_ask_for() {
    let host = Host::new();
    let config = annotated(json!({
        "io.runvm.config.hypervisor.vcpus": "2",
        "io.runvm.config.hypervisor.memory_mib": "768",
    }));
    let bundle = host.bundle("sized", &config);
    let (code, _, err) = host.run_to_files(
        &["create", "--bundle", bundle.to_str().unwrap(), "sized"],
        "create",
    );
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(&err).unwrap());
    let out = host.run(&[
        "exec",
        "sized",
        "sh",
        "-c",
        "nproc; grep MemTotal /proc/meminfo",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("2"), "{stdout}");
    let kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {stdout}"));
    // The kernel keeps some for itself: about 768 MiB, well above the 512 MiB default.
    assert!(
        (650 * 1024..=768 * 1024).contains(&kib),
        "MemTotal {kib} kB, expected about 768 MiB"
    );
    let del = host.run(&["delete", "--force", "sized"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    host.assert_nothing_left();
}
