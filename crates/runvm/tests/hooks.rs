//! OCI hooks through the `runvm` binary, with real VMs: each hook type writes what it got to a
//! file and the test compares; a failing prestart hook fails `create` and leaves nothing.

mod common;

use std::path::Path;

use common::{assert_fails, spec, text, Host};
use serde_json::{json, Value};

/// A host hook (`/bin/sh -c SCRIPT`) that saves its stdin (the state) to `out`.
fn saving_hook(out: &Path, extra: &str) -> Value {
    json!({
        "path": "/bin/sh",
        "args": ["sh", "-c", format!("cat > {}; {extra}", out.display())],
        "env": ["HOOK_ENV=from-the-spec"],
        "timeout": 20
    })
}

fn saved(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_hook_runs_at_its_stage_with_the_containers_state() {
    let host = Host::new();
    let d = host.dir.path();
    let mut s = spec(&["sh", "-c", "echo up; exec sleep 600"]);
    s["annotations"] = json!({"org.example/hooked": "yes"});
    s["hooks"] = json!({
        "createRuntime": [saving_hook(&d.join("createRuntime.json"), "")],
        "prestart": [saving_hook(
            &d.join("prestart.json"),
            &format!("echo \"$HOOK_ENV $0\" > {}", d.join("prestart.env").display()),
        )],
        "poststart": [saving_hook(&d.join("poststart.json"), "")],
        "poststop": [saving_hook(&d.join("poststop.json"), "")],
        // In the guest, in the container's namespaces, from its root file system: the
        // createContainer hook before the container's root becomes `/` (its program is the
        // image's, run in that root), the startContainer hook inside it.
        "createContainer": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", "cat > /create-hook.json; echo \"$HOOK_ENV $(hostname)\" > /create-hook.env"],
            "env": ["HOOK_ENV=in-the-guest"],
            "timeout": 20
        }],
        "startContainer": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", "echo start-hook-ran > /dev/shm/start-hook"]
        }]
    });
    let b = host.bundle("h1", &s);
    let (code, _, err) =
        host.run_to_files(&["create", "--bundle", b.to_str().unwrap(), "h1"], "h1");
    assert_eq!(code, Some(0), "{}", std::fs::read_to_string(err).unwrap());
    for stage in ["createRuntime", "prestart"] {
        let st = saved(&d.join(format!("{stage}.json")));
        assert_eq!(st["id"], "h1", "{stage}: {st}");
        assert_eq!(st["status"], "creating", "{stage}: {st}");
        assert_eq!(st["bundle"], b.to_str().unwrap(), "{stage}: {st}");
        assert_eq!(
            st["annotations"]["org.example/hooked"], "yes",
            "{stage}: {st}"
        );
        // The pid is the VM's: QEMU, in the pod's network namespace.
        let pid = st["pid"].as_u64().unwrap();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
        assert!(
            exe.to_string_lossy().contains("qemu-system"),
            "{stage}: {exe:?}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(d.join("prestart.env")).unwrap(),
        "from-the-spec sh\n"
    );
    // The createContainer hook wrote into the container's root (shared with the host's
    // rootfs folder), with its environment, in the container's UTS namespace.
    let rootfs = b.join("rootfs");
    let st = saved(&rootfs.join("create-hook.json"));
    assert_eq!(st["id"], "h1", "{st}");
    assert_eq!(st["status"], "creating", "{st}");
    assert_eq!(
        std::fs::read_to_string(rootfs.join("create-hook.env")).unwrap(),
        "in-the-guest runvm\n"
    );
    assert!(
        !d.join("poststart.json").exists(),
        "poststart ran before start"
    );

    assert!(host.run(&["start", "h1"]).status.success());
    let st = saved(&d.join("poststart.json"));
    assert_eq!(st["status"], "running");
    let exec = host.run(&["exec", "h1", "cat", "/dev/shm/start-hook"]);
    assert_eq!(
        text(&exec.stdout),
        "start-hook-ran\n",
        "{}",
        text(&exec.stderr)
    );

    assert!(!d.join("poststop.json").exists());
    let del = host.run(&["delete", "--force", "h1"]);
    assert!(del.status.success(), "{}", text(&del.stderr));
    let st = saved(&d.join("poststop.json"));
    assert_eq!(st["id"], "h1");
    assert_eq!(st["status"], "stopped");
    host.assert_nothing_left();
}

#[test]
fn a_failing_prestart_hook_fails_create_and_leaves_nothing() {
    let host = Host::new();
    let mut s = spec(&["sh", "-c", "echo never"]);
    s["hooks"] = json!({
        "prestart": [{
            "path": "/bin/sh",
            "args": ["sh", "-c", "echo network setup refused >&2; exit 7"]
        }]
    });
    let b = host.bundle("bad", &s);
    let out = host.run(&["create", "--bundle", b.to_str().unwrap(), "bad"]);
    assert_fails(&out, "prestart hook /bin/sh failed");
    assert_fails(&out, "exit status: 7");
    assert_fails(&out, "network setup refused");
    assert_fails(&host.run(&["state", "bad"]), "does not exist");

    // A failing createContainer hook (in the guest) fails create too, named with its status.
    let mut s = spec(&["sh", "-c", "echo never"]);
    s["hooks"] = json!({
        "createContainer": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 9"]}]
    });
    let b = host.bundle("badcc", &s);
    let out = host.run(&["create", "--bundle", b.to_str().unwrap(), "badcc"]);
    assert_fails(
        &out,
        "hook /bin/sh failed: hook command exited with non-zero exit code: 9",
    );
    assert_fails(&host.run(&["state", "badcc"]), "does not exist");
    // One whose program the image lacks is named too.
    s["hooks"] = json!({"createContainer": [{"path": "/usr/bin/no-such-hook"}]});
    let b = host.bundle("nohook", &s);
    let out = host.run(&["create", "--bundle", b.to_str().unwrap(), "nohook"]);
    assert_fails(&out, "hook /usr/bin/no-such-hook failed");
    host.assert_nothing_left();
}
