//! `replicad`: the daemon. See `replicad --help`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::EnvFilter;

use replicad::config::{Config, DEFAULT};
use replicad::daemon::{self, Overrides};

#[derive(Debug, Parser)]
#[command(
    name = "replicad",
    version,
    about = "Keep node-local copies of hot read-mostly files, coherent under writes",
    long_about = "replicad copies hot read-mostly files (shared libraries, model weights, \
                  index files) into each NUMA node's local memory, serves the copies to \
                  processes over its control socket, and invalidates every copy before any \
                  write reaches the file (a read lease fences each source).\n\n\
                  Without --config it runs on the embedded default configuration \
                  (`replicad --print-default-config` shows it). SIGHUP reloads the config; \
                  SIGTERM invalidates every replica, releases every fence and exits.\n\n\
                  Logs go to stderr; set RUST_LOG (e.g. RUST_LOG=debug) for more."
)]
struct Args {
    /// Configuration file (TOML). Default: the embedded configuration.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override daemon.run_dir (node stores and socket live here).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Override daemon.socket.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Override daemon.metrics_listen ("" turns HTTP off).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Print the embedded default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    /// Check a configuration file and exit (0: valid).
    #[arg(long, value_name = "FILE")]
    check_config: Option<PathBuf>,
}

fn main() -> ExitCode {
    // The fence keeper is replicad run again by the daemon, with its end
    // of a socketpair: nothing else of replicad runs in it.
    let mut argv = std::env::args();
    if argv.nth(1).as_deref() == Some(replicad_replicator::fence::keeper::KEEPER_ARG) {
        let Some(fd) = argv.next().and_then(|a| a.parse().ok()) else {
            eprintln!("replicad: the fence keeper needs its socket's fd number");
            return ExitCode::from(2);
        };
        let run_dir = argv.next().map(PathBuf::from);
        return ExitCode::from(replicad_replicator::fence::keeper::run(fd, run_dir) as u8);
    }
    // First, before any thread exists: lease-break signals must be blocked
    // in every thread so that only the fence thread's signalfd sees them.
    if let Err(e) = daemon::prepare() {
        eprintln!("replicad: {e:#}");
        return ExitCode::from(1);
    }
    let args = Args::parse();
    if args.print_default_config {
        print!("{DEFAULT}");
        return ExitCode::SUCCESS;
    }
    if let Some(file) = &args.check_config {
        return match Config::load(file) {
            Ok(_) => {
                println!("{}: valid", file.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("replicad: {e}");
                ExitCode::from(2)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let over = Overrides {
        run_dir: args.run_dir,
        socket: args.socket,
        metrics_listen: args.metrics_listen,
    };
    match daemon::run(args.config, over) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("replicad: {e:#}");
            ExitCode::from(1)
        }
    }
}
