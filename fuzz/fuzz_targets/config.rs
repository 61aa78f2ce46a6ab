//! Config files: parsing never panics; errors always name the file, and a
//! syntax error's line and column lie inside the text; a config that
//! parses gives the engine its part and a socket path.
#![no_main]
use libfuzzer_sys::fuzz_target;
use replicad::config::{Config, ConfigError};
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(cfg) => {
            let _ = cfg.engine();
            let _ = cfg.socket();
        }
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.toml"));
            if let ConfigError::Parse { line, column, .. } = e {
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(line >= 1 && line <= lines.len(), "line {line}");
                let width = lines.get(line - 1).map_or(0, |l| l.len());
                assert!(column >= 1 && column <= width + 1, "column {column}");
            }
        }
    }
});
