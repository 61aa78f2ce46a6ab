//! Heat scanner cost against real processes.
//!
//! `cargo bench -p replicad-replicator --bench scan`
//!
//! For each count (`REPLICAD_BENCH_PROCS`, default `100,1000,5000`) it
//! starts that many real `sleep` processes (each maps several files: its
//! program, libc, the dynamic loader, the locale archive), then runs full
//! scanner passes (`REPLICAD_BENCH_RUNS`, default 5) under a policy that
//! covers every cgroup and both kinds (the worst case: numa_maps is read for
//! every process), interleaved with a baseline pass that only reads every
//! process's `maps` (the least any scanner must read). It prints medians:
//! CPU per pass and per process, the ratio to the baseline, and the share
//! of one core a pass per default interval (10 s) would take; against the
//! goal of at most 1% of one core at 1000 processes. Everything else on
//! the machine is scanned too and counted in "processes".

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use replicad_procfs::ProcReader;
use replicad_replicator::heat::{Policies, Policy, ScanConfig, Scanner};
use replicad_replicator::Topology;

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let counts: Vec<usize> = std::env::var("REPLICAD_BENCH_PROCS")
        .unwrap_or_else(|_| "100,1000,5000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("REPLICAD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5)
        .max(1);
    let topology = match Topology::detect() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("scan bench: no topology: {e}");
            std::process::exit(1);
        }
    };
    let all = Policies {
        list: vec![Policy::observe_everything("bench")],
    };
    let interval = ScanConfig::default().interval;
    println!(
        "scanner cost, {runs} runs each, medians; a pass per {} s interval as a share of one core",
        interval.as_secs()
    );
    println!(
        "{:>6}  {:>9}  {:>11}  {:>10}  {:>12}  {:>8}  {:>13}",
        "sleeps", "processes", "pass CPU ms", "per proc us", "maps-only ms", "ratio", "core share"
    );
    for &n in &counts {
        let mut children: Vec<Child> = Vec::with_capacity(n);
        for _ in 0..n {
            match Command::new("sleep")
                .arg("600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
            {
                Ok(c) => children.push(c),
                Err(e) => {
                    eprintln!("scan bench: could not start sleep #{}: {e}", children.len());
                    break;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(300));
        let proc = ProcReader::default();
        let mut pass = Vec::new();
        let mut base = Vec::new();
        let mut procs = 0;
        for _ in 0..runs {
            let mut s = Scanner::new(proc.clone(), topology.clone(), "/run/replicad".into());
            let st = s.full_pass(&all);
            procs = st.processes;
            pass.push(st.cpu.as_secs_f64());
            let c0 = thread_cpu();
            let mut lines = 0usize;
            for pid in proc.pids().unwrap_or_default() {
                if let Ok(Some(t)) = proc.maps_text(pid) {
                    lines += t.lines().count();
                }
            }
            std::hint::black_box(lines);
            base.push((thread_cpu() - c0).as_secs_f64());
        }
        let p = median(pass);
        let b = median(base);
        println!(
            "{:>6}  {:>9}  {:>11.1}  {:>10.1}  {:>12.1}  {:>7.2}x  {:>12.2}%",
            children.len(),
            procs,
            p * 1e3,
            p * 1e6 / procs.max(1) as f64,
            b * 1e3,
            p / b.max(1e-9),
            p / interval.as_secs_f64() * 100.0
        );
        for mut c in children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
