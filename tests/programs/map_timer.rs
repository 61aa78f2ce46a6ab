//! `replicad-map-timer SOCKET PATH N`: map PATH through the client API N
//! times, one after another, and print one line: how many were backed by
//! the replica, and the p50, p99 and max time of one `map_with` in µs.
//! Tests run it as another user while someone floods the daemon.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test program

use std::path::PathBuf;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, socket, path, n] = &args[..] else {
        eprintln!("usage: replicad-map-timer SOCKET PATH N");
        std::process::exit(2);
    };
    let n: usize = n.parse().unwrap();
    let opts = replicad_client::MapOptions {
        socket: PathBuf::from(socket),
        node: None,
        timeout: Duration::from_secs(5),
    };
    let mut times = Vec::with_capacity(n);
    let mut on_replica = 0;
    let mut reasons = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let m = replicad_client::map_with(path, &opts).unwrap();
        times.push(t.elapsed().as_secs_f64() * 1e6);
        match m.backing() {
            replicad_client::Backing::Replica { .. } => on_replica += 1,
            replicad_client::Backing::File { reason } => reasons.push(reason.clone()),
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let q = |f: f64| times[((times.len() - 1) as f64 * f).round() as usize];
    println!(
        "maps={n} on_replica={on_replica} p50_us={:.0} p99_us={:.0} max_us={:.0}",
        q(0.5),
        q(0.99),
        q(1.0)
    );
    for r in reasons.iter().take(3) {
        println!("file: {r}");
    }
}
