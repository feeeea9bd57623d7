use super::*;
use crate::state::tests::sample_sandbox;

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("root")).unwrap();
    (dir, store)
}

fn id(s: &str) -> SandboxId {
    SandboxId::parse(s).unwrap()
}

#[test]
fn a_vm_never_handed_out_is_the_pools() {
    let (_dir, store) = store();
    assert_eq!(owner(&store, &id("vm-1"), None), Owner::Pool);
}

#[test]
fn a_vm_handed_to_a_sandbox_that_never_recorded_it_is_the_pools() {
    let (_dir, store) = store();
    // The sandbox does not exist (its creator died before storing it, or removed it).
    assert_eq!(owner(&store, &id("vm-1"), Some("c1")), Owner::Pool);
    // The sandbox exists but names no factory VM, or another one.
    let mut record = sample_sandbox("c1");
    record.factory_vm = Some(id("vm-2"));
    drop(store.create_sandbox(&record).unwrap());
    assert_eq!(owner(&store, &id("vm-1"), Some("c1")), Owner::Pool);
}

#[test]
fn a_vm_whose_sandbox_recorded_it_is_the_sandboxes() {
    let (_dir, store) = store();
    let mut record = sample_sandbox("c1");
    record.factory_vm = Some(id("vm-1"));
    drop(store.create_sandbox(&record).unwrap());
    assert_eq!(
        owner(&store, &id("vm-1"), Some("c1")),
        Owner::Sandbox(id("c1"))
    );
}

#[test]
fn a_vm_whose_folder_names_a_sandbox_that_recorded_it_is_the_sandboxes() {
    // The pool record is gone or unreadable (no handed-to): the folder's owner file decides.
    let (_dir, store) = store();
    std::fs::create_dir_all(store.vm_home(&id("vm-1"))).unwrap();
    mark_adopter(&store, &id("vm-1"), &id("c1")).unwrap();
    assert_eq!(adopter(&store, &id("vm-1")), Some(id("c1")));
    assert_eq!(
        owner(&store, &id("vm-1"), None),
        Owner::Pool,
        "c1 does not exist"
    );
    let mut record = sample_sandbox("c1");
    record.factory_vm = Some(id("vm-1"));
    drop(store.create_sandbox(&record).unwrap());
    assert_eq!(owner(&store, &id("vm-1"), None), Owner::Sandbox(id("c1")));
}

#[test]
fn a_handed_to_that_is_no_id_leaves_the_vm_to_the_pool() {
    let (_dir, store) = store();
    assert_eq!(owner(&store, &id("vm-1"), Some("../etc")), Owner::Pool);
}

#[test]
fn the_key_changes_with_what_a_vm_is_made_from() {
    let base = Config::default();
    let mut other = base.clone();
    other.hypervisor.memory_mib += 64;
    assert_ne!(vm_key(&base), vm_key(&other));
    let mut network = base.clone();
    network.factory.cache = 3;
    assert_eq!(
        vm_key(&base),
        vm_key(&network),
        "the factory's own size is no part of a VM"
    );
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinuz");
    std::fs::write(&kernel, b"one").unwrap();
    let mut rebuilt = base.clone();
    rebuilt.guest.kernel = kernel.clone();
    let before = vm_key(&rebuilt);
    std::fs::write(&kernel, b"a rebuilt kernel").unwrap();
    assert_ne!(before, vm_key(&rebuilt));
}

#[test]
fn requests_and_replies_are_one_json_line_each() {
    let take = Request::Take {
        sandbox: id("c1"),
        key: "k".into(),
    };
    let line = serde_json::to_string(&take).unwrap();
    assert!(!line.contains('\n'));
    assert_eq!(serde_json::from_str::<Request>(&line).unwrap(), take);
    let sent = sample_sandbox("vm-1");
    let reply = Reply::Vm {
        id: id("vm-1"),
        record: Box::new(sent.clone()),
    };
    let line = serde_json::to_string(&reply).unwrap();
    assert!(!line.contains('\n'));
    match serde_json::from_str::<Reply>(&line).unwrap() {
        Reply::Vm { id: vm, record } => {
            assert_eq!(vm.as_str(), "vm-1");
            assert_eq!(*record, sent);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_miss_names_itself_in_the_timeline() {
    use client::Miss;
    assert_eq!(Miss::NotRunning.phase(), "factory-miss:down");
    assert_eq!(
        Miss::Refused("empty: all 2 VMs are taken".into()).phase(),
        "factory-miss:empty"
    );
    assert_eq!(Miss::Failed("x".into()).phase(), "factory-miss:error");
}
