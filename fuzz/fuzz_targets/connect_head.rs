//! Request heads and targets from the network: the front's framing checks, the CONNECT head
//! parser, and absolute-URI / authority / Sluice-Target parsing. Never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice::front::inspect(data, 65536, 8192);
    let _ = sluice::tunnel::parse_head(data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice::target::split_absolute(text);
        let _ = sluice::target::Origin::parse_with_base(text);
        let _ = sluice::target::parse_authority(text, None);
        let _ = sluice::target::parse_authority(text, Some(443));
    }
});
