use std::os::unix::fs::PermissionsExt;

use super::fsio::FaultPoint;
use super::*;
use crate::state::tests::{sample_container, sample_sandbox};
use crate::state::State;

fn sid(s: &str) -> SandboxId {
    SandboxId::parse(s).unwrap()
}

fn cid(s: &str) -> ContainerId {
    ContainerId::parse(s).unwrap()
}

fn new_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("root")).unwrap();
    (dir, store)
}

/// Names in `dir`, sorted.
fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn temp_files(dir: &Path) -> Vec<String> {
    names(dir)
        .into_iter()
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn sandboxes_round_trip_and_are_listed() {
    let (_t, store) = new_store();
    let a = sample_sandbox("pod-b");
    let b = sample_sandbox("pod-a");
    drop(store.create_sandbox(&a).unwrap());
    drop(store.create_sandbox(&b).unwrap());
    assert_eq!(store.load_sandbox(&a.id).unwrap(), a);
    assert_eq!(store.load_sandbox(&b.id).unwrap(), b);
    assert_eq!(
        store.list_sandboxes().unwrap(),
        vec![sid("pod-a"), sid("pod-b")]
    );
    assert_eq!(
        names(&store.sandbox_dir(&a.id)),
        [CONTAINERS_DIR, LOCK_FILE, SANDBOX_FILE]
    );

    // Not sandboxes: a file named like an id, a folder not named by an id, a staging folder.
    fs::write(store.root().join("notes.txt"), "x").unwrap();
    fs::create_dir(store.root().join("not an id")).unwrap();
    fs::create_dir(store.root().join(".creating~pod-c~1-1")).unwrap();
    assert_eq!(
        store.list_sandboxes().unwrap(),
        vec![sid("pod-a"), sid("pod-b")]
    );

    let mut changed = a.clone();
    changed.transition(State::Running).unwrap();
    changed.mark("started");
    let lock = store.lock_exclusive(&a.id).unwrap();
    store.save_sandbox(&lock, &changed).unwrap();
    assert_eq!(store.load_sandbox(&a.id).unwrap(), changed);
    assert_ne!(changed, a);
}

#[test]
fn a_store_with_no_root_yet_is_empty_and_made_on_first_create() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::new(t.path().join("a/b/root"));
    assert!(store.list_sandboxes().unwrap().is_empty());
    assert!(!store.root().exists());
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    assert_eq!(store.list_sandboxes().unwrap(), vec![sid("p")]);
}

#[test]
fn missing_things_are_not_found_with_ids_and_paths() {
    let (_t, store) = new_store();
    let root = store.root().display().to_string();
    let err = store.load_sandbox(&sid("ghost")).unwrap_err();
    assert!(matches!(err, StoreError::SandboxNotFound { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("sandbox ghost not found in {root}")
    );
    assert!(matches!(
        store.lock_shared(&sid("ghost")),
        Err(StoreError::SandboxNotFound { .. })
    ));
    assert!(matches!(
        store.list_containers(&sid("ghost")),
        Err(StoreError::SandboxNotFound { .. })
    ));

    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    let err = store.load_container(&sid("p"), &cid("c9")).unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, StoreError::ContainerNotFound { .. }),
        "{err:?}"
    );
    assert!(text.contains("container c9 of sandbox p"), "{text}");
    assert!(text.contains(&format!("{root}/p/containers/c9")), "{text}");
    assert!(err.is_not_found());

    let lock = store.lock_exclusive(&sid("p")).unwrap();
    let err = store
        .save_container(&lock, &sample_container("p", "c9"))
        .unwrap_err();
    assert!(
        matches!(err, StoreError::ContainerNotFound { .. }),
        "{err:?}"
    );
    let err = store.remove_container(&lock, &cid("c9")).unwrap_err();
    assert!(
        matches!(err, StoreError::ContainerNotFound { .. }),
        "{err:?}"
    );
}

#[test]
fn creating_an_existing_sandbox_fails_and_overwrites_nothing() {
    let (_t, store) = new_store();
    let first = sample_sandbox("p");
    drop(store.create_sandbox(&first).unwrap());
    let mut second = sample_sandbox("p");
    second.annotations.insert("other".into(), "value".into());
    let err = store.create_sandbox(&second).unwrap_err();
    assert!(matches!(err, StoreError::SandboxExists { .. }), "{err:?}");
    assert!(
        err.to_string().contains("sandbox p exists already"),
        "{err}"
    );
    assert_eq!(store.load_sandbox(&first.id).unwrap(), first);

    // A folder someone else made, even empty, is not taken over.
    fs::create_dir(store.root().join("q")).unwrap();
    let err = store.create_sandbox(&sample_sandbox("q")).unwrap_err();
    assert!(matches!(err, StoreError::SandboxExists { .. }), "{err:?}");
    assert!(names(&store.root().join("q")).is_empty());
    // And no staging folder is left behind.
    assert_eq!(names(store.root()), ["p", "q"]);
}

#[test]
fn publishing_never_replaces_an_existing_folder() {
    let t = tempfile::tempdir().unwrap();
    let (staging, target) = (t.path().join("s"), t.path().join("t"));
    fs::create_dir(&staging).unwrap();
    fs::create_dir(&target).unwrap();
    let err = fsio::publish_dir(&staging, &target).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
    assert!(staging.exists());
    fs::remove_dir(&target).unwrap();
    fsio::publish_dir(&staging, &target).unwrap();
    assert!(target.exists() && !staging.exists());
}

#[test]
fn the_new_sandbox_is_locked_until_the_creator_lets_go() {
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    assert_eq!(lock.mode(), LockMode::Exclusive);
    assert_eq!(lock.path(), store.lock_path(&sid("p")));
    let err = store.try_lock_shared(&sid("p")).unwrap_err();
    assert!(matches!(err, StoreError::LockBusy { .. }), "{err:?}");
    drop(lock);
    store.try_lock_shared(&sid("p")).unwrap();
}

#[test]
fn containers_round_trip_are_listed_and_removed() {
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    let c1 = sample_container("p", "c1");
    let c2 = sample_container("p", "c2");
    store.create_container(&lock, &c2).unwrap();
    store.create_container(&lock, &c1).unwrap();
    assert_eq!(store.load_container(&sid("p"), &cid("c1")).unwrap(), c1);
    assert_eq!(
        store.list_containers(&sid("p")).unwrap(),
        vec![cid("c1"), cid("c2")]
    );

    let mut twin = c1.clone();
    twin.bundle = "/elsewhere".into();
    let err = store.create_container(&lock, &twin).unwrap_err();
    assert!(matches!(err, StoreError::ContainerExists { .. }), "{err:?}");
    assert_eq!(store.load_container(&sid("p"), &cid("c1")).unwrap(), c1);

    let mut running = c1.clone();
    running.transition(State::Running).unwrap();
    running.execs.remove("e1");
    store.save_container(&lock, &running).unwrap();
    assert_eq!(
        store.load_container(&sid("p"), &cid("c1")).unwrap(),
        running
    );

    store.remove_container(&lock, &cid("c2")).unwrap();
    assert_eq!(store.list_containers(&sid("p")).unwrap(), vec![cid("c1")]);
    assert!(store
        .load_container(&sid("p"), &cid("c2"))
        .unwrap_err()
        .is_not_found());
    // Nothing but container folders in containers/.
    assert_eq!(
        names(&store.sandbox_dir(&sid("p")).join(CONTAINERS_DIR)),
        ["c1"]
    );
}

#[test]
fn removing_a_sandbox_removes_its_whole_folder() {
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    store
        .create_container(&lock, &sample_container("p", "c"))
        .unwrap();
    let dir = store.sandbox_dir(&sid("p"));
    fs::create_dir_all(dir.join("vm")).unwrap();
    fs::create_dir_all(dir.join("shared/c/rootfs")).unwrap();
    fs::write(dir.join("vm/console.log"), "boot").unwrap();
    drop(store.create_sandbox(&sample_sandbox("other")).unwrap());

    store.remove_sandbox(lock).unwrap();
    assert!(!dir.exists());
    assert_eq!(names(store.root()), ["other"]);
    assert!(store.load_sandbox(&sid("p")).unwrap_err().is_not_found());
    assert!(store.lock_exclusive(&sid("p")).unwrap_err().is_not_found());
    // The id is free again.
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
}

#[test]
fn writes_need_the_exclusive_lock_of_that_sandbox() {
    let (t, store) = new_store();
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    drop(store.create_sandbox(&sample_sandbox("q")).unwrap());
    let record = sample_sandbox("p");

    let shared = store.lock_shared(&sid("p")).unwrap();
    let err = store.save_sandbox(&shared, &record).unwrap_err();
    assert!(matches!(err, StoreError::LockNotHeld { .. }), "{err:?}");
    assert!(
        err.to_string().contains("the lock given is shared"),
        "{err}"
    );
    let err = store.remove_sandbox(shared).unwrap_err();
    assert!(matches!(err, StoreError::LockNotHeld { .. }), "{err:?}");

    let other = store.lock_exclusive(&sid("q")).unwrap();
    let err = store.save_sandbox(&other, &record).unwrap_err();
    assert!(err.to_string().contains("sandbox q's"), "{err}");
    let err = store
        .create_container(&other, &sample_container("p", "c"))
        .unwrap_err();
    assert!(matches!(err, StoreError::LockNotHeld { .. }), "{err:?}");
    drop(other);

    // Same id in another store.
    let elsewhere = Store::open(t.path().join("other-root")).unwrap();
    let foreign = elsewhere.create_sandbox(&sample_sandbox("p")).unwrap();
    let err = store.save_sandbox(&foreign, &record).unwrap_err();
    assert!(matches!(err, StoreError::LockNotHeld { .. }), "{err:?}");
    assert!(store.load_sandbox(&sid("p")).is_ok());
}

const SAVE_FAULTS: [FaultPoint; 5] = [
    FaultPoint::TempCreated,
    FaultPoint::HalfWritten,
    FaultPoint::Written,
    FaultPoint::Synced,
    FaultPoint::Renamed,
];

#[test]
fn a_crash_at_any_point_of_a_save_leaves_a_whole_record() {
    let (_t, store) = new_store();
    let old = sample_sandbox("p");
    drop(store.create_sandbox(&old).unwrap());
    let dir = store.sandbox_dir(&old.id);
    for point in SAVE_FAULTS {
        let crashing = Store {
            crash_at: Some(point),
            ..store.clone()
        };
        let mut new = old.clone();
        new.state = State::Running;
        new.annotations.insert("big".into(), "x".repeat(10_000));
        let lock = store.lock_exclusive(&old.id).unwrap();
        let err = crashing.save_sandbox(&lock, &new).unwrap_err();
        assert!(format!("{:?}", err).contains("simulated crash"), "{err:?}");
        drop(lock);

        let read = store.load_sandbox(&old.id).unwrap();
        let temps = temp_files(&dir);
        if point == FaultPoint::Renamed {
            assert_eq!(read, new, "{point:?}");
            assert!(temps.is_empty(), "{point:?}: {temps:?}");
        } else {
            assert_eq!(read, old, "{point:?}: the old record must survive");
            assert_eq!(temps.len(), 1, "{point:?}: {temps:?}");
            let temp_len = fs::metadata(dir.join(&temps[0])).unwrap().len();
            let new_len = serde_json::to_vec_pretty(&new).unwrap().len() as u64 + 1;
            let expected = match point {
                FaultPoint::TempCreated => 0,
                FaultPoint::HalfWritten => new_len / 2,
                _ => new_len,
            };
            assert_eq!(temp_len, expected, "{point:?}");
            // The leftover is ignored by readers and listing.
            assert_eq!(store.list_sandboxes().unwrap(), vec![old.id.clone()]);
        }
        // The next successful write removes leftovers.
        let lock = store.lock_exclusive(&old.id).unwrap();
        store.save_sandbox(&lock, &old).unwrap();
        assert!(temp_files(&dir).is_empty(), "{point:?}");
        assert_eq!(store.load_sandbox(&old.id).unwrap(), old);
    }
}

#[test]
fn a_crash_during_a_container_save_leaves_the_old_record() {
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    let old = sample_container("p", "c");
    store.create_container(&lock, &old).unwrap();
    let crashing = Store {
        crash_at: Some(FaultPoint::HalfWritten),
        ..store.clone()
    };
    let mut new = old.clone();
    new.state = State::Running;
    assert!(crashing.save_container(&lock, &new).is_err());
    assert_eq!(store.load_container(&sid("p"), &cid("c")).unwrap(), old);
    let cdir = store.container_dir(&sid("p"), &cid("c"));
    assert_eq!(temp_files(&cdir).len(), 1);
    drop(lock);
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(temp_files(&cdir).is_empty());
    assert_eq!(names(&cdir), [CONTAINER_FILE]);
}

#[test]
fn open_removes_leftover_temp_files() {
    let (_t, store) = new_store();
    let old = sample_sandbox("p");
    drop(store.create_sandbox(&old).unwrap());
    let crashing = Store {
        crash_at: Some(FaultPoint::Written),
        ..store.clone()
    };
    let lock = store.lock_exclusive(&old.id).unwrap();
    assert!(crashing.save_sandbox(&lock, &sample_sandbox("p")).is_err());
    let dir = store.sandbox_dir(&old.id);
    assert_eq!(temp_files(&dir).len(), 1);

    // Not while another holder has the sandbox locked: it may be writing.
    Store::open(store.root().to_path_buf()).unwrap();
    assert_eq!(temp_files(&dir).len(), 1);
    drop(lock);
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(temp_files(&dir).is_empty());
    assert_eq!(store.load_sandbox(&old.id).unwrap(), old);
}

#[test]
fn a_crash_while_creating_leaves_no_sandbox_and_open_cleans_up() {
    for point in [FaultPoint::HalfWritten, FaultPoint::Staged] {
        let (_t, store) = new_store();
        let crashing = Store {
            crash_at: Some(point),
            ..store.clone()
        };
        assert!(crashing.create_sandbox(&sample_sandbox("p")).is_err());
        assert!(store.list_sandboxes().unwrap().is_empty(), "{point:?}");
        assert!(store.load_sandbox(&sid("p")).unwrap_err().is_not_found());
        let left = names(store.root());
        assert_eq!(left.len(), 1, "{point:?}: {left:?}");
        assert!(left[0].starts_with(".creating~p~"), "{left:?}");
        // The id is not taken by the leftover.
        drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
        Store::open(store.root().to_path_buf()).unwrap();
        assert_eq!(names(store.root()), ["p"], "{point:?}");
    }
}

#[test]
fn open_leaves_a_staging_folder_whose_creator_is_alive() {
    let (_t, store) = new_store();
    let staging = store.root().join(".creating~p~99-1");
    fsio::create_private_dir(&staging).unwrap();
    let lock_file = fsio::create_private_file(&staging.join(LOCK_FILE)).unwrap();
    lock::lock_blocking(&lock_file, LockMode::Exclusive).unwrap();
    // A creator that has not made its lock file yet, seen just now.
    let young = store.root().join(".creating~q~99-2");
    fsio::create_private_dir(&young).unwrap();
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(staging.exists() && young.exists());
    drop(lock_file);
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(!staging.exists());
    assert!(young.exists());
}

#[test]
fn a_crash_while_creating_a_container_leaves_no_container() {
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    let crashing = Store {
        crash_at: Some(FaultPoint::Staged),
        ..store.clone()
    };
    assert!(crashing
        .create_container(&lock, &sample_container("p", "c"))
        .is_err());
    assert!(store.list_containers(&sid("p")).unwrap().is_empty());
    drop(lock);
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(names(&store.sandbox_dir(&sid("p")).join(CONTAINERS_DIR)).is_empty());
}

#[test]
fn open_finishes_an_interrupted_removal() {
    let (_t, store) = new_store();
    let grave = store.root().join(".removing~p~1-1");
    fs::create_dir_all(grave.join("containers/c")).unwrap();
    fs::write(grave.join("sandbox.json"), "{}").unwrap();
    assert!(store.list_sandboxes().unwrap().is_empty());
    Store::open(store.root().to_path_buf()).unwrap();
    assert!(names(store.root()).is_empty());
}

#[test]
fn corrupt_files_are_errors_naming_the_file_and_position() {
    let (_t, store) = new_store();
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    let path = store.sandbox_dir(&sid("p")).join(SANDBOX_FILE);
    fs::write(&path, "{\n  \"id\": \"p\",\n  \"state\": runni").unwrap();
    let err = store.load_sandbox(&sid("p")).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot parse state file {}", path.display())
    );
    let StoreError::Corrupt { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(source.line(), 3, "{source}");
    assert!(source.to_string().contains("line 3"), "{source}");

    // Valid JSON of the wrong shape too.
    fs::write(&path, "{\"id\": \"p\", \"state\": \"sleeping\"}").unwrap();
    let err = store.load_sandbox(&sid("p")).unwrap_err();
    let StoreError::Corrupt { source, .. } = &err else {
        panic!("{err:?}")
    };
    assert!(source.to_string().contains("sleeping"), "{source}");

    let lock = store.lock_exclusive(&sid("p")).unwrap();
    store
        .create_container(&lock, &sample_container("p", "c"))
        .unwrap();
    let cpath = store
        .container_dir(&sid("p"), &cid("c"))
        .join(CONTAINER_FILE);
    fs::write(&cpath, "").unwrap();
    let err = store.load_container(&sid("p"), &cid("c")).unwrap_err();
    assert!(
        err.to_string().contains(&cpath.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_record_in_the_wrong_folder_is_refused() {
    let (_t, store) = new_store();
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    drop(store.create_sandbox(&sample_sandbox("q")).unwrap());
    let p = store.sandbox_dir(&sid("p")).join(SANDBOX_FILE);
    fs::copy(&p, store.sandbox_dir(&sid("q")).join(SANDBOX_FILE)).unwrap();
    let err = store.load_sandbox(&sid("q")).unwrap_err();
    assert!(
        matches!(err, StoreError::Mismatch { field: "id", .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("\"p\""), "{err}");

    let lock = store.lock_exclusive(&sid("q")).unwrap();
    store
        .create_container(&lock, &sample_container("q", "c"))
        .unwrap();
    let record = serde_json::to_vec(&sample_container("p", "c")).unwrap();
    fs::write(
        store
            .container_dir(&sid("q"), &cid("c"))
            .join(CONTAINER_FILE),
        record,
    )
    .unwrap();
    let err = store.load_container(&sid("q"), &cid("c")).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Mismatch {
                field: "sandbox_id",
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_record_from_a_newer_runvm_is_refused() {
    let (_t, store) = new_store();
    drop(store.create_sandbox(&sample_sandbox("p")).unwrap());
    let path = store.sandbox_dir(&sid("p")).join(SANDBOX_FILE);
    let mut v: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
    v["version"] = (RECORD_VERSION + 1).into();
    v["state"] = "hibernating".into();
    fs::write(&path, serde_json::to_vec(&v).unwrap()).unwrap();
    let err = store.load_sandbox(&sid("p")).unwrap_err();
    assert!(
        matches!(err, StoreError::NewerVersion { found, .. } if found == RECORD_VERSION + 1),
        "{err:?}"
    );
}

#[test]
fn files_are_0600_and_folders_0700() {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("root")).unwrap();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    store
        .create_container(&lock, &sample_container("p", "c"))
        .unwrap();
    store.save_sandbox(&lock, &sample_sandbox("p")).unwrap();
    let dir = store.sandbox_dir(&sid("p"));
    let cdir = store.container_dir(&sid("p"), &cid("c"));
    for folder in [
        store.root().to_path_buf(),
        dir.clone(),
        dir.join(CONTAINERS_DIR),
        cdir.clone(),
    ] {
        assert_eq!(mode(&folder), 0o700, "{}", folder.display());
    }
    for file in [
        dir.join(SANDBOX_FILE),
        dir.join(LOCK_FILE),
        cdir.join(CONTAINER_FILE),
    ] {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn mount_points_are_read_with_escapes() {
    let table = "22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
                 42 27 0:39 / /run/runvm/p/shared/my\\040dir rw - tmpfs none rw\n\
                 43 27 0:40 / /a\\134b rw - tmpfs none rw\n";
    assert_eq!(
        fsio::mount_points(table),
        [
            PathBuf::from("/proc"),
            PathBuf::from("/run/runvm/p/shared/my dir"),
            PathBuf::from("/a\\b")
        ]
    );
}

/// Needs CAP_SYS_ADMIN to mount a tmpfs; says so and passes without it.
#[test]
fn removal_refuses_while_something_is_mounted_in_the_sandbox() {
    use nix::mount::{mount, umount, MsFlags};
    let (_t, store) = new_store();
    let lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    let target = store.sandbox_dir(&sid("p")).join("shared/c/rootfs");
    fs::create_dir_all(&target).unwrap();
    if let Err(e) = mount(
        Some("tmpfs"),
        &target,
        Some("tmpfs"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        eprintln!("skipping the mount part: cannot mount a tmpfs here: {e}");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = umount(&self.0);
        }
    }
    let mounted = Unmount(target.clone());
    fs::write(target.join("precious"), "host data").unwrap();
    let err = store.remove_sandbox(lock).unwrap_err();
    let StoreError::MountsRemain { mounts, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(mounts, &[fs::canonicalize(&target).unwrap()]);
    assert!(err.to_string().contains("shared/c/rootfs"), "{err}");
    assert!(target.join("precious").exists());
    umount(&target).unwrap();
    std::mem::forget(mounted);
    // The refused removal moved nothing; with the mount gone it succeeds.
    assert!(store.load_sandbox(&sid("p")).is_ok());
    let lock = store.lock_exclusive(&sid("p")).unwrap();
    store.remove_sandbox(lock).unwrap();
    assert!(store.list_sandboxes().unwrap().is_empty());
}

#[test]
fn vm_run_dir_stays_in_the_sandbox_folder_unless_socket_paths_would_be_too_long() {
    let short = vm_run_dir(Path::new("/run/runvm"), &sid("web"));
    assert_eq!(short, Path::new("/run/runvm/web/vm"));
    let cri_id = sid(&"a".repeat(64));
    let deep = Path::new("/tmp/runvm-shim-XXXXXX/runvm");
    let moved = vm_run_dir(deep, &cri_id);
    assert_eq!(moved.parent(), Some(deep));
    let name = moved.file_name().unwrap().to_string_lossy().into_owned();
    assert!(
        name.starts_with(VM_DIR_PREFIX) && name.len() == VM_DIR_PREFIX.len() + 16,
        "{name}"
    );
    assert_eq!(
        moved,
        vm_run_dir(deep, &cri_id),
        "the same id gives the same folder"
    );
    assert_ne!(moved, vm_run_dir(deep, &sid(&"b".repeat(64))));
}

#[test]
fn moved_vm_run_dirs_are_not_listed_as_sandboxes() {
    let (_tmp, store) = new_store();
    fs::create_dir_all(
        store
            .root()
            .join(format!("{VM_DIR_PREFIX}0123456789abcdef")),
    )
    .unwrap();
    assert!(store.list_sandboxes().unwrap().is_empty());
}

#[test]
fn a_root_others_can_change_is_refused_by_name() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("state");
    // Missing: fine, made 0700.
    check_root(&root).unwrap();
    Store::open(root.clone()).unwrap();
    check_root(&root).unwrap();
    for (mode, word) in [(0o777, "others"), (0o770, "its group"), (0o1777, "others")] {
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = Store::open(root.clone()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&root.display().to_string()) && text.contains(word),
            "{text}"
        );
        assert_eq!(err.kind(), crate::ErrorKind::FailedPrecondition);
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    check_root(&root).unwrap();
    // A symbolic link or a file is no root either.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&root, &link).unwrap();
    assert!(check_root(&link)
        .unwrap_err()
        .to_string()
        .contains("symbolic link"));
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    assert!(check_root(&file)
        .unwrap_err()
        .to_string()
        .contains("not a folder"));
}

#[test]
fn a_teardown_in_progress_is_waited_for_and_a_finished_one_is_not() {
    let (_t, store) = new_store();
    let pod = sample_sandbox("pod");
    drop(store.create_sandbox(&pod).unwrap());
    // No teardown: no wait.
    store
        .wait_teardown(&pod.id, Duration::from_millis(1))
        .unwrap();
    assert!(!store.teardown_in_progress(&pod.id));
    let held = store.hold_teardown(&pod.id).unwrap();
    assert!(store.teardown_in_progress(&pod.id));
    // A second holder is refused at once; a waiter times out naming the file.
    assert!(matches!(
        store.hold_teardown(&pod.id),
        Err(StoreError::LockBusy { .. })
    ));
    match store.wait_teardown(&pod.id, Duration::from_millis(50)) {
        Err(StoreError::LockTimeout { path, .. }) => assert!(path.ends_with(TEARDOWN_FILE)),
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The holder removes the sandbox, then lets go: the waiter returns once it has.
    let waiter = {
        let store = store.clone();
        let id = pod.id.clone();
        std::thread::spawn(move || store.wait_teardown(&id, Duration::from_secs(10)))
    };
    std::thread::sleep(Duration::from_millis(100));
    assert!(!waiter.is_finished());
    let lock = store.lock_exclusive(&pod.id).unwrap();
    store.remove_sandbox(lock).unwrap();
    drop(held);
    waiter.join().unwrap().unwrap();
    assert!(!store.teardown_in_progress(&pod.id));
    // A sandbox that is gone has no teardown to wait for.
    store
        .wait_teardown(&pod.id, Duration::from_millis(1))
        .unwrap();
}
