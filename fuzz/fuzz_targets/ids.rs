//! Sandbox and container ids (`SandboxId::parse`, `ContainerId::parse`, and their serde form,
//! as state files and requests give them).
#![no_main]

use libfuzzer_sys::fuzz_target;
use runvm_sandbox::{ContainerId, SandboxId};

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("ids"), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let sandbox = SandboxId::parse(text);
    let container = ContainerId::parse(text);
    assert_eq!(sandbox.is_ok(), container.is_ok(), "{text:?}");
    if let Ok(id) = &sandbox {
        // A valid id is safe as one file name and round-trips.
        assert_eq!(id.as_str(), text);
        assert!(!text.contains('/') && text != "." && text != "..");
        let json = serde_json::to_string(id).expect("an id serializes");
        assert_eq!(serde_json::from_str::<SandboxId>(&json).ok().as_ref(), Some(id));
    } else if let Err(e) = &sandbox {
        assert!(e.value.chars().count() <= 200);
    }
    // The same text as a JSON document (a state file field).
    let _ = serde_json::from_slice::<ContainerId>(data);
});
