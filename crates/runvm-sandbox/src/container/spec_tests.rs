use serde_json::json;

use super::*;

fn minimal() -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}},
        "root": {"path": "rootfs"},
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "data", "options": ["rbind", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1"},
                {"type": "ipc"}
            ],
            "cgroupsPath": "/kubepods/pod1/c1"
        },
        "hooks": {"prestart": [{"path": "/usr/bin/true"}]}
    })
}

fn bundle() -> tempfile::TempDir {
    let b = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(b.path().join("rootfs")).unwrap();
    std::fs::create_dir_all(b.path().join("data")).unwrap();
    b
}

#[test]
fn paths_are_rewritten_into_the_guest_share() {
    let b = bundle();
    let p = prepare(b.path(), &minimal(), "c1").unwrap();
    assert_eq!(p.guest_spec["root"]["path"], "/run/runvm/shared/c1/rootfs");
    assert_eq!(
        p.guest_spec["mounts"][1]["source"],
        "/run/runvm/shared/c1/mounts/1-data"
    );
    assert_eq!(
        p.guest_spec["mounts"][0]["source"], "proc",
        "non-bind mounts untouched"
    );
    assert_eq!(p.binds.len(), 2);
    assert_eq!(p.binds[0].source, b.path().join("rootfs"));
    assert_eq!(p.binds[0].target, PathBuf::from("c1/rootfs"));
    assert!(!p.binds[0].readonly);
    assert_eq!(p.binds[1].target, PathBuf::from("c1/mounts/1-data"));
    assert!(p.binds[1].readonly);
    assert_eq!(p.host_spec, minimal());
}

#[test]
fn host_namespaces_hooks_and_cgroup_path_do_not_cross_into_the_guest() {
    let b = bundle();
    let p = prepare(b.path(), &minimal(), "c1").unwrap();
    let ns = p.guest_spec["linux"]["namespaces"].as_array().unwrap();
    assert_eq!(
        ns,
        &[json!({"type": "pid"}), json!({"type": "ipc"})],
        "network namespace with a host path removed"
    );
    assert!(ns.iter().all(|n| n.get("path").is_none()));
    assert_eq!(p.guest_spec["linux"]["cgroupsPath"], "/runvm/c1");
    // The host's hooks stay on the host.
    assert!(p.guest_spec.get("hooks").is_none());
    assert_eq!(p.hooks.prestart.len(), 1);
}

#[test]
fn container_hooks_go_to_the_guest_and_host_hooks_stay() {
    let b = bundle();
    let mut spec = minimal();
    spec["hooks"] = json!({
        "createRuntime": [{"path": "/usr/bin/true"}],
        "createContainer": [{"path": "/bin/true"}],
        "startContainer": [{"path": "/bin/echo", "args": ["echo", "hi"]}],
        "poststop": [{"path": "/usr/bin/true"}]
    });
    let p = prepare(b.path(), &spec, "c1").unwrap();
    let guest = p.guest_spec["hooks"].as_object().unwrap();
    let mut kinds: Vec<&String> = guest.keys().collect();
    kinds.sort();
    assert_eq!(kinds, ["createContainer", "startContainer"]);
    assert_eq!(p.hooks.create_runtime.len(), 1);
    assert_eq!(p.hooks.poststop.len(), 1);
    spec["hooks"] = json!({"prestart": [{"path": "true"}]});
    let err = prepare(b.path(), &spec, "c1").unwrap_err().to_string();
    assert!(err.contains("hooks.prestart[0].path"), "{err}");
}

#[test]
fn a_pod_container_is_told_to_join_its_sandbox_containers_ipc_uts_and_pid_namespaces() {
    let b = bundle();
    let mut spec = minimal();
    spec["linux"]["namespaces"] = json!([
        {"type": "pid", "path": "/proc/42/ns/pid"},
        {"type": "network", "path": "/var/run/netns/cni-1"},
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "mount"}
    ]);
    spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod1"
    });
    let p = prepare(b.path(), &spec, "c1").unwrap();
    assert_eq!(
        p.guest_spec["annotations"][POD_NAMESPACES_ANNOTATION],
        "pod1:pid,ipc,uts"
    );
    let ns = p.guest_spec["linux"]["namespaces"].as_array().unwrap();
    assert!(ns.iter().all(|n| n.get("path").is_none()), "{ns:?}");
    assert_eq!(p.host_spec, spec, "the stored spec is the one given");

    // Not for the pod's sandbox container itself, nor outside a CRI pod: refused there.
    spec["annotations"]["io.kubernetes.cri.container-type"] = json!("sandbox");
    let err = prepare(b.path(), &spec, "pod1").unwrap_err().to_string();
    assert!(err.contains("linux.namespaces[0].path"), "{err}");
    let p = prepare(b.path(), &minimal(), "c1").unwrap();
    assert!(p.guest_spec.get("annotations").is_none());
}

#[test]
fn a_pod_container_may_not_join_other_namespaces_by_path() {
    let b = bundle();
    let mut spec = minimal();
    spec["linux"]["namespaces"] = json!([
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "mount", "path": "/proc/42/ns/mnt"}
    ]);
    spec["annotations"] = json!({
        "io.kubernetes.cri.container-type": "container",
        "io.kubernetes.cri.sandbox-id": "pod1"
    });
    let err = prepare(b.path(), &spec, "c1").unwrap_err().to_string();
    assert!(err.contains("linux.namespaces[1].path"), "{err}");
    assert!(err.contains("mount namespace at /proc/42/ns/mnt"), "{err}");
}

#[test]
fn a_namespace_path_outside_a_pod_is_refused_naming_it_and_what_is_valid() {
    let b = bundle();
    for (typ, path) in [
        ("ipc", "/proc/42/ns/ipc"),
        ("uts", "/proc/42/ns/uts"),
        ("pid", "/proc/42/ns/pid"),
        ("mount", "/proc/42/ns/mnt"),
        ("cgroup", "/proc/42/ns/cgroup"),
        ("user", "/proc/42/ns/user"),
        ("time", "/proc/42/ns/time"),
    ] {
        let mut spec = minimal();
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": typ, "path": path}));
        let err = prepare(b.path(), &spec, "c1").unwrap_err().to_string();
        assert!(
            err.contains("config.json: linux.namespaces[3].path"),
            "{err}"
        );
        assert!(
            err.contains(&format!("cannot join the {typ} namespace at {path}")),
            "{err}"
        );
        assert!(
            err.contains("only the network namespace may be given by path"),
            "{err}"
        );
        assert!(err.contains("only containers of a pod"), "{err}");
    }
}

#[test]
fn spec_without_process_is_refused_with_its_json_path() {
    let b = bundle();
    let mut s = minimal();
    s.as_object_mut().unwrap().remove("process");
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(e.contains("config.json: process: missing"), "{e}");
}

#[test]
fn empty_args_and_relative_cwd_are_refused() {
    let b = bundle();
    let mut s = minimal();
    s["process"]["args"] = json!([]);
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(e.contains("process.args"), "{e}");
    let mut s = minimal();
    s["process"]["cwd"] = json!("tmp");
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(e.contains("process.cwd") && e.contains("\"tmp\""), "{e}");
}

#[test]
fn missing_rootfs_is_named() {
    let b = bundle();
    let mut s = minimal();
    s["root"]["path"] = json!("nope");
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(
        e.contains("root.path") && e.contains(&b.path().join("nope").display().to_string()),
        "{e}"
    );
    s["root"]["path"] = json!("../rootfs");
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(e.contains("\"..\""), "{e}");
}

#[test]
fn absolute_rootfs_is_used_as_is() {
    let b = bundle();
    let mut s = minimal();
    s["root"]["path"] = json!(b.path().join("rootfs").display().to_string());
    let p = prepare(b.path(), &s, "c1").unwrap();
    assert_eq!(p.binds[0].source, b.path().join("rootfs"));
}

#[test]
fn bind_mount_with_missing_source_is_named_by_index() {
    let b = bundle();
    let mut s = minimal();
    s["mounts"][1]["source"] = json!("/nonexistent/data");
    let e = prepare(b.path(), &s, "c1").unwrap_err().to_string();
    assert!(
        e.contains("mounts[1].source") && e.contains("/nonexistent/data"),
        "{e}"
    );
}

#[test]
fn wrong_types_are_reported_with_their_json_path() {
    let file = Path::new("/b/config.json");
    let e = parse(
        file,
        r#"{"ociVersion":"1.0.2","process":{"args":"sh","cwd":"/"}}"#,
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("/b/config.json: process.args:"), "{e}");
    let e = parse(file, "{not json").unwrap_err().to_string();
    assert!(e.contains("not valid JSON (line 1"), "{e}");
}

#[test]
fn bundle_must_be_an_existing_absolute_folder() {
    let e = load(Path::new("relative/bundle")).unwrap_err().to_string();
    assert!(e.contains("not an absolute path"), "{e}");
    let e = load(Path::new("/nonexistent/bundle"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/nonexistent/bundle") && e.contains("does not exist"),
        "{e}"
    );
    let b = bundle();
    let e = load(b.path()).unwrap_err().to_string();
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn a_fifo_config_json_is_refused_without_hanging() {
    let b = bundle();
    let file = b.path().join("config.json");
    nix::unistd::mkfifo(&file, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let started = std::time::Instant::now();
    let err = load(b.path()).unwrap_err();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let text = err.to_string();
    assert!(text.contains(&file.display().to_string()), "{text}");
    assert!(text.contains("FIFO"), "{text}");
    assert!(text.contains("a regular file is required"), "{text}");
}

#[test]
fn a_device_or_folder_config_json_is_refused() {
    let b = bundle();
    let file = b.path().join("config.json");
    std::os::unix::fs::symlink("/dev/zero", &file).unwrap();
    let text = load(b.path()).unwrap_err().to_string();
    assert!(text.contains("character device"), "{text}");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let text = load(b.path()).unwrap_err().to_string();
    assert!(text.contains("directory"), "{text}");
    assert!(text.contains(&file.display().to_string()), "{text}");
}

#[test]
fn an_oversize_config_json_is_refused_naming_its_size_and_the_cap() {
    let b = bundle();
    let file = b.path().join("config.json");
    // Valid JSON, padded with spaces past the cap.
    let mut text = serde_json::to_string(&minimal()).unwrap();
    text.push_str(&" ".repeat(MAX_CONFIG_JSON_BYTES as usize));
    std::fs::write(&file, &text).unwrap();
    let err = load(b.path()).unwrap_err().to_string();
    assert!(err.contains(&file.display().to_string()), "{err}");
    assert!(err.contains(&text.len().to_string()), "{err}");
    assert!(err.contains(&MAX_CONFIG_JSON_BYTES.to_string()), "{err}");
    // At the cap it is read.
    text.truncate(MAX_CONFIG_JSON_BYTES as usize);
    std::fs::write(&file, &text).unwrap();
    load(b.path()).unwrap();
}

/// The command line's resolver in miniature: pid 42 is container `a`'s, 43 container `b`'s.
fn owner_of(path: &Path) -> Option<String> {
    let s = path.to_str()?;
    if s.starts_with("/proc/42/ns/") {
        Some("a".into())
    } else if s.starts_with("/proc/43/ns/") {
        Some("b".into())
    } else {
        None
    }
}

#[test]
fn namespaces_of_another_container_are_joined_in_its_vm() {
    let b = bundle();
    let mut spec = minimal();
    spec["linux"]["namespaces"] = json!([
        {"type": "ipc", "path": "/proc/42/ns/ipc"},
        {"type": "uts", "path": "/proc/42/ns/uts"},
        {"type": "pid", "path": "/proc/42/ns/pid"},
        {"type": "network", "path": "/proc/42/ns/net"},
        {"type": "cgroup", "path": "/proc/42/ns/cgroup"},
        {"type": "mount"}
    ]);
    let p = prepare_resolving(b.path(), &spec, "c1", &owner_of).unwrap();
    assert_eq!(p.member_of.as_deref(), Some("a"));
    assert_eq!(
        p.guest_spec["annotations"][POD_NAMESPACES_ANNOTATION],
        "a:ipc,uts,pid,network,cgroup"
    );
    // Every entry stays (the agent fills in the paths of `a`'s init in the guest), the
    // network one too: it is `a`'s namespace in the guest, not a host one.
    let namespaces = p.guest_spec["linux"]["namespaces"].as_array().unwrap();
    assert_eq!(namespaces.len(), 6);
    assert!(namespaces.iter().all(|ns| ns.get("path").is_none()));
}

#[test]
fn a_host_network_namespace_stays_the_vms_when_other_namespaces_are_joined() {
    let b = bundle();
    std::fs::write(b.path().join("config.json"), {
        let mut spec = minimal();
        spec["linux"]["namespaces"] = json!([
            {"type": "ipc", "path": "/proc/42/ns/ipc"},
            {"type": "network", "path": "/var/run/netns/cni-1"}
        ]);
        spec.to_string()
    })
    .unwrap();
    let loaded = Bundle::load_resolving(b.path(), "c1", &owner_of).unwrap();
    assert_eq!(loaded.prepared.member_of.as_deref(), Some("a"));
    assert_eq!(loaded.netns, Some(PathBuf::from("/var/run/netns/cni-1")));
    let namespaces = loaded.prepared.guest_spec["linux"]["namespaces"]
        .as_array()
        .unwrap();
    assert!(namespaces.iter().all(|ns| ns["type"] != "network"));

    // Joining the network of `a` instead: no host network namespace for the container.
    std::fs::write(b.path().join("config.json"), {
        let mut spec = minimal();
        spec["linux"]["namespaces"] = json!([{"type": "network", "path": "/proc/42/ns/net"}]);
        spec.to_string()
    })
    .unwrap();
    let loaded = Bundle::load_resolving(b.path(), "c1", &owner_of).unwrap();
    assert_eq!(loaded.netns, None);
    assert_eq!(loaded.prepared.member_of.as_deref(), Some("a"));
}

#[test]
fn joining_another_containers_namespaces_refuses_what_cannot_be_done_naming_it() {
    let b = bundle();
    let cases = [
        (
            json!([{"type": "mount", "path": "/proc/42/ns/mnt"}]),
            "cannot join the mount namespace of container a (/proc/42/ns/mnt)",
        ),
        (
            json!([{"type": "user", "path": "/proc/42/ns/user"}]),
            "cannot join the user namespace of container a",
        ),
        (
            json!([{"type": "ipc", "path": "/proc/42/ns/uts"}]),
            "/proc/42/ns/uts is not a ipc namespace (a ipc namespace is /proc/PID/ns/ipc)",
        ),
        (
            json!([
                {"type": "ipc", "path": "/proc/42/ns/ipc"},
                {"type": "uts", "path": "/proc/43/ns/uts"}
            ]),
            "/proc/43/ns/uts is a namespace of container b, another one of container a",
        ),
        (
            json!([{"type": "ipc", "path": "/proc/44/ns/ipc"}]),
            "give /proc/PID/ns/TYPE with its pid as `runvm state` prints it",
        ),
    ];
    for (namespaces, expected) in cases {
        let mut spec = minimal();
        spec["linux"]["namespaces"] = namespaces;
        let err = prepare_resolving(b.path(), &spec, "c1", &owner_of)
            .unwrap_err()
            .to_string();
        assert!(err.contains("linux.namespaces["), "{err}");
        assert!(err.contains(expected), "{err}\nexpected: {expected}");
    }
}
