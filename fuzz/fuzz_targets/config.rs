//! The TOML configuration: `Config::from_toml` (unknown keys and wrong types refused, with the
//! line and column), `validate`, and `to_toml` (what `runvm env` prints) read back unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use runvm_sandbox::config::Config;

fuzz_target!(init: runvm_fuzz::write_seeds_and_exit_if_asked("config"), |data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(config) = Config::from_toml(text) else {
        return;
    };
    let valid = config.validate().is_ok();
    let printed = config.to_toml();
    let again = Config::from_toml(&printed)
        .unwrap_or_else(|e| panic!("to_toml's output does not parse: {e}\n{printed}"));
    assert_eq!(again, config, "to_toml does not round-trip:\n{printed}");
    assert_eq!(again.validate().is_ok(), valid);
});
