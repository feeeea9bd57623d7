//! The VM factory (`runvm factory init|status|destroy`, `[factory] cache = N`): sandboxes take
//! booted VMs from the pool, each VM is its own (random bytes, files, processes), the pool
//! refills, a killed factory leaves only what `factory destroy` removes, and without a factory
//! a sandbox boots its own VM and says so in its timeline.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use common::{spec, text, Host};
use serde_json::Value;

/// A private root with a configuration file keeping `cache` VMs ready.
fn factory_host(cache: u32) -> (Host, PathBuf) {
    let host = Host::new();
    let config = host.dir.path().join("runvm.toml");
    std::fs::write(&config, format!("[factory]\ncache = {cache}\n")).unwrap();
    (host, config)
}

/// `runvm --config CONFIG ARGS`.
fn runvm(host: &Host, config: &Path, args: &[&str]) -> Output {
    let mut all = vec!["--config", config.to_str().unwrap()];
    all.extend_from_slice(args);
    host.cmd(&all).stdin(Stdio::null()).output().unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

fn status(host: &Host, config: &Path) -> Value {
    let out = ok(
        runvm(host, config, &["factory", "status", "--format", "json"]),
        "factory status",
    );
    serde_json::from_str(&out).unwrap()
}

/// `runvm run -d` of a sleeper with the factory's configuration.
fn run_sleeper(host: &Host, config: &Path, id: &str) {
    let b = host.bundle(id, &spec(&["sleep", "1000"]));
    let err = host.dir.path().join(format!("{id}.err"));
    let status = host
        .cmd(&[
            "--config",
            config.to_str().unwrap(),
            "run",
            "-d",
            "--bundle",
            b.to_str().unwrap(),
            id,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .status()
        .unwrap();
    assert!(
        status.success(),
        "{}",
        std::fs::read_to_string(err).unwrap()
    );
}

fn record(host: &Host, id: &str) -> Value {
    let text = std::fs::read_to_string(host.root.join(id).join("sandbox.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn phases(record: &Value) -> Vec<String> {
    record["timeline"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p[0].as_str().unwrap().to_string())
        .collect()
}

fn exec(host: &Host, config: &Path, id: &str, script: &str) -> String {
    ok(
        runvm(host, config, &["exec", id, "/bin/sh", "-c", script]),
        script,
    )
}

fn wait_ready(host: &Host, config: &Path, ready: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let s = status(host, config);
        if s["ready"].as_u64() == Some(ready) {
            return s;
        }
        assert!(Instant::now() < deadline, "the pool never refilled: {s}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Ends what a test left when it fails half-way: its containers, then the factory.
struct Cleanup<'a> {
    host: &'a Host,
    config: PathBuf,
    ids: &'static [&'static str],
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for id in self.ids {
            let _ = runvm(self.host, &self.config, &["delete", "--force", id]);
        }
        let _ = runvm(self.host, &self.config, &["factory", "destroy"]);
    }
}

fn remove(host: &Host, config: &Path, id: &str) {
    ok(runvm(host, config, &["delete", "--force", id]), "delete");
}

#[test]
fn sandboxes_take_their_own_vms_from_the_pool_and_it_refills() {
    let (host, config) = factory_host(2);
    let _cleanup = Cleanup {
        host: &host,
        config: config.clone(),
        ids: &["c1", "c2"],
    };
    let shown = ok(runvm(&host, &config, &["factory", "init"]), "factory init");
    assert!(shown.contains("2 ready"), "{shown}");
    let s = status(&host, &config);
    assert_eq!(s["running"], true);
    assert_eq!(s["cache"], 2);

    // Two sandboxes at once, each from the pool.
    run_sleeper(&host, &config, "c1");
    run_sleeper(&host, &config, "c2");
    let (r1, r2) = (record(&host, "c1"), record(&host, "c2"));
    for r in [&r1, &r2] {
        assert!(
            phases(r).contains(&"factory-vm-taken".to_string()),
            "{:?}",
            phases(r)
        );
    }
    assert_ne!(r1["factory_vm"], r2["factory_vm"]);
    assert!(r1["factory_vm"].is_string(), "{}", r1["factory_vm"]);
    let pids = |r: &Value| -> Vec<u64> {
        r["vm"]["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["pid"].as_u64().unwrap())
            .collect()
    };
    assert!(pids(&r1).iter().all(|p| !pids(&r2).contains(p)));

    // Each VM is its own: random bytes, files, wall clock.
    let u1 = exec(&host, &config, "c1", "cat /proc/sys/kernel/random/uuid");
    let u2 = exec(&host, &config, "c2", "cat /proc/sys/kernel/random/uuid");
    assert_ne!(u1, u2);
    exec(&host, &config, "c1", "echo one > /dev/shm/mine");
    let other = runvm(&host, &config, &["exec", "c2", "cat", "/dev/shm/mine"]);
    assert!(!other.status.success(), "c2 sees c1's file");
    let guest: i64 = exec(&host, &config, "c1", "date +%s")
        .trim()
        .parse()
        .unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!((guest - now).abs() <= 1, "guest clock {guest}, host {now}");

    let s = status(&host, &config);
    assert_eq!(s["hits"], 2, "{s}");
    let s = wait_ready(&host, &config, 2);
    assert!(s["last_refill_ms"].is_u64(), "{s}");

    // A sandbox removed takes its VM's folder with it; the pool's VMs stay.
    let home1 = host
        .root
        .join(format!(".vmhome~{}", r1["factory_vm"].as_str().unwrap()));
    assert!(home1.is_dir());
    remove(&host, &config, "c1");
    assert!(!home1.exists(), "{} left", home1.display());

    // Destroy ends the pool; the adopted VM of c2 keeps running.
    let out = ok(runvm(&host, &config, &["factory", "destroy"]), "destroy");
    assert!(out.contains("destroyed"), "{out}");
    assert!(!host.root.join("~factory").exists());
    exec(&host, &config, "c2", "true");
    // A record torn beyond reading: `delete --force` still finds the VM it adopted (its
    // folder names the sandbox) and ends it.
    let home2 = host
        .root
        .join(format!(".vmhome~{}", r2["factory_vm"].as_str().unwrap()));
    std::fs::write(host.root.join("c2/sandbox.json"), b"{ torn").unwrap();
    remove(&host, &config, "c2");
    assert!(!home2.exists(), "{} left", home2.display());
    host.assert_nothing_left();
}

#[test]
fn a_killed_factory_leaves_only_what_destroy_removes_and_sandboxes_boot_their_own() {
    let (host, config) = factory_host(1);
    let _cleanup = Cleanup {
        host: &host,
        config: config.clone(),
        ids: &["solo"],
    };
    ok(runvm(&host, &config, &["factory", "init"]), "factory init");
    let pid = status(&host, &config)["pid"].as_u64().unwrap();
    // SAFETY: kill(2) with plain integers on the daemon this test started.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while status(&host, &config)["running"] == true {
        assert!(Instant::now() < deadline, "the factory did not die");
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = status(&host, &config);
    assert_eq!(s["records"], 1, "{s}");
    let marker = host.root.join(".vmhome~").display().to_string();
    assert!(
        !common::processes_with(&marker).is_empty(),
        "the pool VM died with its factory"
    );

    // No factory: the sandbox boots a VM of its own, and its timeline says why.
    let b = host.bundle("solo", &spec(&["echo", "cold"]));
    let out = ok(
        runvm(
            &host,
            &config,
            &["run", "--keep", "--bundle", b.to_str().unwrap(), "solo"],
        ),
        "run",
    );
    assert_eq!(out, "cold\n");
    let solo = record(&host, "solo");
    assert!(
        phases(&solo).contains(&"factory-miss:down".to_string()),
        "{:?}",
        phases(&solo)
    );
    assert!(solo.get("factory_vm").is_none(), "{solo}");
    remove(&host, &config, "solo");

    ok(runvm(&host, &config, &["factory", "destroy"]), "destroy");
    assert!(common::processes_with(&marker).is_empty());
    host.assert_nothing_left();
}

#[test]
fn factory_configuration_errors_name_the_key_and_what_is_valid() {
    let host = Host::new();
    let cases = [
        ("[factory]\ncache = 0\n", "factory.cache = 0"),
        ("[factory]\ncache = 65\n", "valid: 0 (no factory) to 64"),
        ("[factory]\ntemplate = true\n", "factory.template = true"),
    ];
    for (i, (toml, message)) in cases.iter().enumerate() {
        let config = host.dir.path().join(format!("c{i}.toml"));
        std::fs::write(&config, toml).unwrap();
        let out = runvm(&host, &config, &["factory", "init"]);
        common::assert_fails(&out, message);
    }
    assert!(!host.root.join("~factory").exists());
    host.assert_nothing_left();
}

#[test]
fn a_changed_guest_image_is_never_handed_out_and_the_pool_is_remade() {
    let host = Host::new();
    // A kernel of the test's own, which the test "rebuilds" (its modification time changes).
    let kernel = host.dir.path().join("vmlinuz");
    std::fs::copy("/var/lib/runvm/guest/vmlinuz", &kernel).unwrap();
    let config = host.dir.path().join("runvm.toml");
    std::fs::write(
        &config,
        format!(
            "[guest]\nkernel = \"{}\"\n[factory]\ncache = 1\n",
            kernel.display()
        ),
    )
    .unwrap();
    let _cleanup = Cleanup {
        host: &host,
        config: config.clone(),
        ids: &["old", "new"],
    };
    ok(runvm(&host, &config, &["factory", "init"]), "factory init");
    let key = status(&host, &config)["source"]["key"].clone();
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    std::fs::File::options()
        .write(true)
        .open(&kernel)
        .unwrap()
        .set_modified(later)
        .unwrap();

    // The pool's VM is from the old kernel: not handed out; the sandbox boots its own.
    let b = host.bundle("old", &spec(&["true"]));
    let run = |id: &str| {
        ok(
            runvm(
                &host,
                &config,
                &["run", "--keep", "--bundle", b.to_str().unwrap(), id],
            ),
            "run",
        );
        let phases = phases(&record(&host, id));
        remove(&host, &config, id);
        phases
    };
    let first = run("old");
    assert!(
        first.contains(&"factory-miss:stale".to_string()),
        "{first:?}"
    );
    // The pool is remade from the new kernel, and its VM handed out.
    let s = wait_ready(&host, &config, 1);
    assert_ne!(s["source"]["key"], key, "{s}");
    let second = run("new");
    assert!(
        second.contains(&"factory-vm-taken".to_string()),
        "{second:?}"
    );
    ok(runvm(&host, &config, &["factory", "destroy"]), "destroy");
    host.assert_nothing_left();
}
