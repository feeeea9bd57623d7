//! The `runvm` binary as a user runs it.

use std::path::Path;
use std::process::{Command, Output};

fn runvm(args: &[&str], config: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_runvm"));
    cmd.env_remove("RUNVM_CONFIG").env_remove("RUST_LOG");
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    cmd.args(args).output().expect("run runvm")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn write_config(dir: &Path, body: &str) -> std::path::PathBuf {
    let p = dir.join("config.toml");
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn env_prints_the_effective_config_with_file_values() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[hypervisor]\nmemory_mib = 768\n");
    let out = runvm(&["env"], Some(&cfg));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains(&format!("# loaded from {}", cfg.display())),
        "{stdout}"
    );
    assert!(stdout.contains("memory_mib = 768"), "{stdout}");
    assert!(stdout.contains("accelerator = \"auto\""), "{stdout}");
    assert!(stdout.contains("root = \"/run/runvm\""), "{stdout}");
}

#[test]
fn env_var_names_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[hypervisor]\nvcpus = 2\n");
    let out = Command::new(env!("CARGO_BIN_EXE_runvm"))
        .env("RUNVM_CONFIG", &cfg)
        .arg("env")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("vcpus = 2"));
}

#[test]
fn unknown_config_key_fails_naming_key_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[agent]\nboot_timeout = 5\n");
    let out = runvm(&["env"], Some(&cfg));
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("boot_timeout"), "{err}");
    assert!(err.contains(&cfg.display().to_string()), "{err}");
    assert!(
        err.contains("boot_timeout_ms"),
        "expected keys listed: {err}"
    );
}

#[test]
fn missing_config_file_named_by_flag_is_an_error() {
    let out = runvm(&["env"], Some(Path::new("/nonexistent/runvm.toml")));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/nonexistent/runvm.toml"));
}

#[test]
fn check_lists_requirements_and_the_accelerator() {
    let out = runvm(&["check"], None);
    let stdout = text(&out.stdout);
    for name in [
        "QEMU",
        "guest kernel",
        "guest initramfs",
        "/dev/kvm",
        "vmx/svm",
        "virtiofsd",
        "cgroups",
    ] {
        assert!(stdout.contains(name), "{name} missing from:\n{stdout}");
    }
    assert!(
        stdout.contains("accelerator: kvm") || stdout.contains("accelerator: tcg"),
        "{stdout}"
    );
    assert!(
        out.status.success(),
        "this host is set up (make test runs setup):\n{stdout}"
    );
}

#[test]
fn check_fails_and_says_what_to_do_when_qemu_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[hypervisor]\nqemu = \"/nonexistent/qemu\"\n");
    let out = runvm(&["check"], Some(&cfg));
    assert_eq!(out.status.code(), Some(1));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("✗ QEMU"), "{stdout}");
    assert!(
        stdout.contains("apt-get install qemu-system-x86"),
        "{stdout}"
    );
    assert!(stdout.contains("cannot run"), "{stdout}");
}

#[test]
fn check_with_forced_kvm_on_a_host_without_it_explains() {
    let host = runvm_hypervisor::HostCpu::detect();
    if host.kvm_usable() {
        return; // Forced KVM is fine where KVM works; nothing to refuse here.
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "[hypervisor]\naccelerator = \"kvm\"\n");
    let out = runvm(&["check"], Some(&cfg));
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stdout).contains("accelerator: none: accelerator \"kvm\" was asked for"));
}

#[test]
fn boot_prints_accelerator_agent_version_and_time_then_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let out = Command::new(env!("CARGO_BIN_EXE_runvm"))
        .env_remove("RUNVM_CONFIG")
        .arg("--root")
        .arg(&root)
        .args(["boot", "--id", "cli-boot"])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let expected_accel = if runvm_hypervisor::HostCpu::detect().kvm_usable() {
        "kvm"
    } else {
        "tcg"
    };
    assert!(
        stdout.contains(&format!("accelerator:     {expected_accel}")),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("runvm-agent {}", env!("CARGO_PKG_VERSION"))),
        "{stdout}"
    );
    assert!(stdout.contains("agent ready in:"), "{stdout}");
    assert!(stdout.contains("sandbox stopped"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn boot_refuses_a_bad_sandbox_id() {
    let out = runvm(&["boot", "--id", "../escape"], None);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("invalid id \"../escape\""), "{err}");
}

#[test]
fn a_missing_vmm_user_fails_boot_and_check_by_name_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    let cfg = write_config(
        dir.path(),
        &format!(
            "[runtime]\nroot = {:?}\n[hypervisor]\nuser = \"no-such-vmm-user\"\n",
            root.display()
        ),
    );
    let out = runvm(&["boot"], Some(&cfg));
    assert_ne!(out.status.code(), Some(0));
    let err = text(&out.stderr);
    assert!(err.contains("no-such-vmm-user"), "{err}");
    assert!(
        err.contains("no such user") && err.contains("useradd"),
        "{err}"
    );
    // Refused before anything was made.
    let left: Vec<_> = std::fs::read_dir(&root)
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    let out = runvm(&["check"], Some(&cfg));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("✗ confinement") && stdout.contains("no-such-vmm-user"),
        "{stdout}"
    );

    // A user name that cannot be one is refused by the configuration, naming the key.
    let cfg = write_config(dir.path(), "[hypervisor]\nuser = \"a b\"\n");
    let err = text(&runvm(&["env"], Some(&cfg)).stderr);
    assert!(
        err.contains("hypervisor.user") && err.contains("\"a b\""),
        "{err}"
    );

    // Unconfined on purpose: check warns, and still passes.
    let cfg = write_config(dir.path(), "[hypervisor]\nconfine = false\n");
    let stdout = text(&runvm(&["check"], Some(&cfg)).stdout);
    assert!(
        stdout.contains("✗ confinement") && stdout.contains("(optional)"),
        "{stdout}"
    );
    assert!(stdout.contains("confine = false"), "{stdout}");
}
