//! Locks between two processes: the test binary runs itself again as the lock holder.

use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::*;
use crate::state::tests::sample_sandbox;

/// Set in the child: `ROOT|ID|MODE|HOLD_MS|DIR` (DIR receives the `ready` and `releasing`
/// files).
const HOLDER_ENV: &str = "RUNVM_TEST_LOCK_HOLDER";
const HOLD: Duration = Duration::from_millis(500);

/// Does nothing in a normal run. Run by [`spawn_holder`] with [`HOLDER_ENV`] set, it takes the
/// lock, creates `ready`, holds the lock, creates `releasing`, and lets go.
#[test]
fn lock_holder_child() {
    let Ok(spec) = std::env::var(HOLDER_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let [root, id, mode, hold_ms, dir] = parts[..] else {
        panic!("bad {HOLDER_ENV}: {spec}")
    };
    let store = Store::new(root.into());
    let id = SandboxId::parse(id).unwrap();
    let lock = match mode {
        "shared" => store.lock_shared(&id),
        _ => store.lock_exclusive(&id),
    }
    .unwrap();
    let dir = Path::new(dir);
    fs::write(dir.join("ready"), "").unwrap();
    thread::sleep(Duration::from_millis(hold_ms.parse().unwrap()));
    // Written while still held: whoever gets the lock next must find it.
    fs::write(dir.join("releasing"), "").unwrap();
    drop(lock);
}

struct Holder {
    child: Child,
    dir: tempfile::TempDir,
}

impl Holder {
    fn releasing(&self) -> bool {
        self.dir.path().join("releasing").exists()
    }

    fn finish(self) {
        let out = self.child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "lock holder failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Starts a process holding sandbox `id`'s lock in `mode` for [`HOLD`]; returns once it holds.
fn spawn_holder(store: &Store, id: &SandboxId, mode: LockMode) -> Holder {
    let dir = tempfile::tempdir().unwrap();
    let test = format!(
        "{}::lock_holder_child",
        module_path!().split_once("::").unwrap().1
    );
    let spec = format!(
        "{}|{id}|{mode}|{}|{}",
        store.root().display(),
        HOLD.as_millis(),
        dir.path().display()
    );
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test.as_str(), "--exact", "--nocapture", "--test-threads=1"])
        .env(HOLDER_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dir.path().join("ready").exists() {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "lock holder exited ({status}) before taking the lock: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "lock holder never took the lock");
        thread::sleep(Duration::from_millis(5));
    }
    Holder { child, dir }
}

fn store_with(id: &str) -> (tempfile::TempDir, Store, SandboxId) {
    let t = tempfile::tempdir().unwrap();
    let store = Store::open(t.path().join("root")).unwrap();
    let record = sample_sandbox(id);
    drop(store.create_sandbox(&record).unwrap());
    (t, store, record.id)
}

#[test]
fn an_exclusive_holder_in_another_process_keeps_readers_out_until_it_lets_go() {
    let (_t, store, id) = store_with("p");
    let holder = spawn_holder(&store, &id, LockMode::Exclusive);

    let err = store.try_lock_shared(&id).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LockBusy {
                mode: LockMode::Shared,
                ..
            }
        ),
        "{err:?}"
    );
    let err = store.try_lock_exclusive(&id).unwrap_err();
    assert!(matches!(err, StoreError::LockBusy { .. }), "{err:?}");
    assert!(
        !holder.releasing(),
        "the holder let go too early for this test to mean anything"
    );

    let started = Instant::now();
    let lock = store
        .lock_shared_timeout(&id, Duration::from_secs(10))
        .unwrap();
    assert!(
        holder.releasing(),
        "got the shared lock while the other process held it"
    );
    assert!(
        started.elapsed() > Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(lock.mode(), LockMode::Shared);
    drop(lock);
    holder.finish();
}

#[test]
fn shared_holders_in_two_processes_coexist_and_keep_a_writer_waiting() {
    let (_t, store, id) = store_with("p");
    let holder = spawn_holder(&store, &id, LockMode::Shared);

    let reader = store.try_lock_shared(&id).unwrap();
    assert!(
        !holder.releasing(),
        "the holder let go too early for this test to mean anything"
    );
    drop(reader);
    let err = store.try_lock_exclusive(&id).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::LockBusy {
                mode: LockMode::Exclusive,
                ..
            }
        ),
        "{err:?}"
    );

    let lock = store.lock_exclusive(&id).unwrap();
    assert!(
        holder.releasing(),
        "got the exclusive lock while a reader held it"
    );
    drop(lock);
    holder.finish();
}

#[test]
fn a_lock_timeout_names_the_sandbox_and_the_lock_file() {
    let (_t, store, id) = store_with("pod-7");
    let held = store.lock_exclusive(&id).unwrap();
    let started = Instant::now();
    let err = store
        .lock_shared_timeout(&id, Duration::from_millis(200))
        .unwrap_err();
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(200), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert!(matches!(err, StoreError::LockTimeout { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!(
            "timed out after 200 ms waiting for the shared lock of sandbox pod-7 ({})",
            store.lock_path(&id).display()
        )
    );
    drop(held);
    store
        .lock_exclusive_timeout(&id, Duration::from_millis(200))
        .unwrap();
}

#[test]
fn a_waiter_on_a_sandbox_removed_meanwhile_gets_not_found() {
    let (_t, store, id) = store_with("p");
    let held = store.lock_exclusive(&id).unwrap();
    let waiter = {
        let (store, id) = (store.clone(), id.clone());
        thread::spawn(move || store.lock_shared_timeout(&id, Duration::from_secs(10)))
    };
    thread::sleep(Duration::from_millis(100));
    store.remove_sandbox(held).unwrap();
    let err = waiter.join().unwrap().unwrap_err();
    assert!(matches!(err, StoreError::SandboxNotFound { .. }), "{err:?}");
}

#[test]
fn a_waiter_on_a_sandbox_removed_and_made_again_locks_the_new_one() {
    let (_t, store, id) = store_with("p");
    let held = store.lock_exclusive(&id).unwrap();
    // Opens the old lock file and waits on it.
    let waiter = {
        let (store, id) = (store.clone(), id.clone());
        thread::spawn(move || store.lock_exclusive_timeout(&id, Duration::from_secs(10)))
    };
    thread::sleep(Duration::from_millis(100));
    let dir = store.sandbox_dir(&id);
    let grave = store.root().join(".removing~test");
    // Remove and re-create while the old lock is still held, then release the old one.
    fs::rename(&dir, &grave).unwrap();
    let new_lock = store.create_sandbox(&sample_sandbox("p")).unwrap();
    drop(held);
    thread::sleep(Duration::from_millis(100));
    assert!(
        !waiter.is_finished(),
        "the waiter took a lock on the removed sandbox's file"
    );
    drop(new_lock);
    let lock = waiter.join().unwrap().unwrap();
    assert_eq!(lock.path(), store.lock_path(&id));
    // It really holds the new sandbox's lock.
    assert!(store.try_lock_shared(&id).is_err());
}
