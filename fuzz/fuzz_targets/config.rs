//! Config files: parsing never panics; errors always name the file, and a
//! syntax error's line and column lie inside the text; a config that
//! parses gives the engine its part and a socket path, and its policies'
//! globs match any path without panicking; a line error points inside the
//! text.
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
            let groups = vec!["/system.slice/a.service".to_string(), text.to_string()];
            for p in &cfg.heat.policies.list {
                let _ = p.covers(&groups);
                let _ = p.wants(text, replicad_replicator::heat::Kind::Text);
            }
        }
        Err(e) => {
            assert!(e.to_string().starts_with("fuzz.toml"));
            if let ConfigError::Line { line, .. } = e {
                assert!(
                    line >= 1 && line <= text.split('\n').count().max(1),
                    "line {line}"
                );
            } else if let ConfigError::Parse { line, column, .. } = e {
                let lines: Vec<&str> = text.split('\n').collect();
                assert!(line >= 1 && line <= lines.len(), "line {line}");
                let width = lines.get(line - 1).map_or(0, |l| l.len());
                assert!(column >= 1 && column <= width + 1, "column {column}");
            }
        }
    }
});
