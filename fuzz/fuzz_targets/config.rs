//! Config files: parsing never panics; errors always name the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(e) = replicad::config::Config::parse(text, Path::new("fuzz.toml")) {
            assert!(e.to_string().starts_with("fuzz.toml"));
        }
    }
});
