//! `replicactl`: the CLI. See `replicactl --help`.

use std::process::ExitCode;

use clap::Parser;

use replicad::ctl::{self, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match ctl::run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("replicactl: {e:#}");
            ExitCode::from(ctl::exit_code(&e))
        }
    }
}
