//! Any text given as a configuration: parsed and validated, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(config) = sluice::config::Config::parse(text) {
            if config.validate().is_ok() {
                let generation = sluice::generation::Generation::build(1, config);
                let _ = generation.route_for("/x");
            }
        }
    }
});
