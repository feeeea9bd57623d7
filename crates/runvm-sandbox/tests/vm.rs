//! Integration tests on real VMs (QEMU; TCG where the host has no usable KVM).
//!
//! They need the host set-up (`scripts/setup.sh`) and the guest image (`cargo xtask guest`);
//! `make test` does both first. Each test uses its own state root and checks that nothing is
//! left behind: no process whose command line names that root, no sandbox folder.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use runvm_sandbox::config::{resolve_program, Config};
use runvm_sandbox::sandbox::create_qemu_sandbox;
use runvm_sandbox::{SandboxError, SandboxId};

/// A private state root and configuration for one test.
struct TestHost {
    root: tempfile::TempDir,
    config: Config,
}

impl TestHost {
    fn new() -> TestHost {
        let root = tempfile::Builder::new()
            .prefix("runvm-it-")
            .tempdir()
            .expect("temp dir");
        let mut config = Config::default();
        config.runtime.root = root.path().join("state");
        for p in [&config.guest.kernel, &config.guest.initrd] {
            assert!(
                p.is_file(),
                "{} is missing: build the guest image with `cargo xtask guest` (make test does)",
                p.display()
            );
        }
        TestHost { root, config }
    }

    /// A script in the test folder that runs `program` with `extra` arguments added.
    fn wrapper(&self, name: &str, program: &str, extra: &str) -> String {
        let real = resolve_program(program).unwrap_or_else(|| panic!("{program} not installed"));
        let path = self.root.path().join(name);
        std::fs::write(
            &path,
            format!("#!/bin/sh\nexec {} \"$@\" {extra}\n", real.display()),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.display().to_string()
    }

    /// Panics if a process or a sandbox folder of this test is left.
    fn assert_nothing_left(&self) {
        let marker = self.root.path().display().to_string();
        let mut left = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            if pid == std::process::id() {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&marker) {
                left.push(format!("{pid}: {cmdline}"));
            }
        }
        assert!(left.is_empty(), "processes left behind: {left:#?}");
        let state = &self.config.runtime.root;
        let entries: Vec<PathBuf> = std::fs::read_dir(state)
            .map(|rd| rd.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            entries.is_empty(),
            "files left in {}: {entries:?}",
            state.display()
        );
    }
}

fn id(s: &str) -> SandboxId {
    SandboxId::parse(s).unwrap()
}

fn manifest_field(config: &Config, key: &str) -> String {
    let path = config.guest.initrd.parent().unwrap().join("manifest.json");
    let text = std::fs::read_to_string(&path).expect("guest image manifest");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_boots_agent_reports_its_version_and_stop_leaves_nothing() {
    let host = TestHost::new();
    let (mut sb, report) = create_qemu_sandbox(&host.config, id("boot1"), Default::default())
        .await
        .unwrap();

    let agent = sb.agent().await.expect("connected agent");
    agent.check().await.expect("health check answers");
    assert_eq!(report.agent.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        report.agent.kernel_release,
        manifest_field(&host.config, "kernel_release")
    );
    assert_eq!(report.agent.api_version, runvm_protocol::API_VERSION);
    assert_eq!(report.guest.cpu_count, host.config.hypervisor.vcpus);
    let mem = report.guest.mem_total_bytes >> 20;
    let configured = u64::from(host.config.hypervisor.memory_mib);
    assert!(
        mem > configured / 2 && mem <= configured,
        "guest sees {mem} MiB"
    );
    let names: Vec<String> = sb.pids().into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["qemu", "virtiofsd", "vhost-device-vsock"]);
    assert!(sb.dir().join("vm/console.log").exists());

    sb.stop().await.unwrap();
    sb.delete(false).await.unwrap();
    host.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_times_out_with_guest_console_and_leaves_nothing() {
    let mut host = TestHost::new();
    // Everything after "--" is init's argv: the agent serves a unix socket inside the guest,
    // so the host's vsock connection never finds it.
    host.config.hypervisor.kernel_params = vec![
        "--".into(),
        "--listen".into(),
        "unix:///run/elsewhere.sock".into(),
    ];
    // Long enough for the guest to reach the agent even on a loaded host.
    host.config.agent.boot_timeout_ms = 25_000;
    let err = create_qemu_sandbox(&host.config, id("silent"), Default::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SandboxError::AgentTimeout { .. }), "{text}");
    assert!(text.contains("within 25000 ms"), "{text}");
    assert!(
        text.contains("runvm-agent listening") && text.contains("unix:///run/elsewhere.sock"),
        "console tail missing from: {text}"
    );
    host.assert_nothing_left();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_without_init_is_reported_as_vm_exit_with_console() {
    let mut host = TestHost::new();
    host.config.hypervisor.kernel_params = vec!["rdinit=/no/such/init".into(), "init=/none".into()];
    let err = create_qemu_sandbox(&host.config, id("noinit"), Default::default())
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, SandboxError::VmDied { .. }), "{text}");
    assert!(text.contains("qemu exited"), "{text}");
    assert!(
        text.contains("Kernel panic"),
        "console tail missing from: {text}"
    );
    host.assert_nothing_left();
}

#[tokio::test]
async fn qemu_refusing_an_option_reports_its_own_stderr() {
    let mut host = TestHost::new();
    host.config.hypervisor.qemu = host.wrapper(
        "qemu-bad",
        "qemu-system-x86_64",
        "-device no-such-device-model",
    );
    let text = create_qemu_sandbox(&host.config, id("badqemu"), Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("qemu exited"), "{text}");
    assert!(
        text.contains("no-such-device-model"),
        "QEMU's stderr missing: {text}"
    );
    host.assert_nothing_left();
}

#[tokio::test]
async fn missing_qemu_binary_is_named_with_how_to_install() {
    let mut host = TestHost::new();
    host.config.hypervisor.qemu = "/nonexistent/qemu-system-x86_64".into();
    let text = create_qemu_sandbox(&host.config, id("noqemu"), Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("hypervisor.qemu") && text.contains("/nonexistent/qemu-system-x86_64"),
        "{text}"
    );
    assert!(text.contains("apt-get install qemu-system-x86"), "{text}");
    host.assert_nothing_left();
}

#[tokio::test]
async fn virtiofsd_dying_at_start_is_named_with_its_reason() {
    let mut host = TestHost::new();
    host.config.hypervisor.virtiofsd = host.wrapper("virtiofsd-bad", "virtiofsd", "--no-such-flag");
    let text = create_qemu_sandbox(&host.config, id("badfs"), Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(text.contains("virtiofsd failed at start"), "{text}");
    assert!(
        text.contains("--no-such-flag"),
        "virtiofsd's stderr missing: {text}"
    );
    host.assert_nothing_left();
}

#[tokio::test]
async fn vsock_helper_dying_at_start_is_named_with_its_reason() {
    let mut host = TestHost::new();
    host.config.hypervisor.vsock = runvm_sandbox::config::VsockMode::VhostUser;
    host.config.hypervisor.vhost_device_vsock =
        host.wrapper("vsock-bad", "vhost-device-vsock", "--guest-cid 1");
    let text = create_qemu_sandbox(&host.config, id("badvsock"), Default::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        text.contains("vhost-device-vsock failed at start"),
        "{text}"
    );
    host.assert_nothing_left();
}

#[tokio::test]
async fn missing_guest_kernel_names_the_path_and_the_build_command() {
    for which in ["kernel", "initrd"] {
        let mut host = TestHost::new();
        let missing = host.root.path().join(format!("no-{which}"));
        match which {
            "kernel" => host.config.guest.kernel = missing.clone(),
            _ => host.config.guest.initrd = missing.clone(),
        }
        let text = create_qemu_sandbox(&host.config, id("nokernel"), Default::default())
            .await
            .unwrap_err()
            .to_string();
        assert!(text.contains(&missing.display().to_string()), "{text}");
        assert!(text.contains("cargo xtask guest"), "{text}");
        host.assert_nothing_left();
    }
}

#[test]
fn state_root_is_private_to_each_test() {
    let a = TestHost::new();
    let b = TestHost::new();
    assert_ne!(a.config.runtime.root, b.config.runtime.root);
    assert!(Path::new(&a.config.runtime.root).is_absolute());
    let _ = Duration::ZERO;
}
