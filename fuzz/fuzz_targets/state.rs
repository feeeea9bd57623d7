//! State records: `sandbox.json` and `container.json` as the store reads them
//! (`store::parse_record`: the version first, then the whole record with validated ids and the
//! lenient configuration), and what it writes back read again unchanged.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use runvm_sandbox::state::{ContainerRecord, SandboxRecord};
use runvm_sandbox::store::parse_record;

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("state"), |data: &[u8]| {
    if let Ok(record) = parse_record::<SandboxRecord>(Path::new("sandbox.json"), data) {
        let written = serde_json::to_vec_pretty(&record).expect("a record serializes");
        let again: SandboxRecord = parse_record(Path::new("sandbox.json"), &written)
            .unwrap_or_else(|e| panic!("a written sandbox record does not read back: {e}"));
        assert_eq!(again, record);
        let _ = record.qmp_socket();
    }
    if let Ok(record) = parse_record::<ContainerRecord>(Path::new("container.json"), data) {
        let written = serde_json::to_vec_pretty(&record).expect("a record serializes");
        let again: ContainerRecord = parse_record(Path::new("container.json"), &written)
            .unwrap_or_else(|e| panic!("a written container record does not read back: {e}"));
        // The spec is free JSON: numbers may not keep their exact text, so compare the rest.
        assert_eq!((&again.id, &again.sandbox_id, again.state), (&record.id, &record.sandbox_id, record.state));
        assert_eq!((&again.init, &again.execs, &again.mounts), (&record.init, &record.execs, &record.mounts));
    }
});
