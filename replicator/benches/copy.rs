//! Copy throughput of the replica store against `cp` and memcpy.
//!
//! `cargo bench -p replicad-replicator --bench copy`
//!
//! For each size (`REPLICAD_BENCH_SIZES`, default `64m,1g`) it writes a
//! source file under /var/tmp (a disk filesystem, warm in the page cache),
//! opens a [`Store`] on node 0 in a temp dir (tmpfs `mpol=bind:0`, the same
//! with `huge=within_size`, and memfd + mbind), and times, run after run
//! (`REPLICAD_BENCH_RUNS`, default 5), interleaved:
//! - `/bin/cp` of the source into the same tmpfs (the file deleted between
//!   runs);
//! - every [`CopyMethod`] through `Store::create` + `ReplicaFile::fill_with`
//!   with 1 thread and with `copy_threads` (2) threads (`REPLICAD_BENCH_THREADS`,
//!   default `1,2`);
//! - memcpy between two prefaulted buffers of the same size.
//!
//! It prints medians in GB/s (10^9 bytes per second), each one's ratio to
//! `cp` into the same store and to `cp` into the plain (4 KiB page) tmpfs,
//! and the spread of the runs. The first run of every method is checked byte
//! for byte against the source.

use std::fs;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use replicad_replicator::copy::CopyMethod;
use replicad_replicator::store::{ReplicaIdent, Store, StoreConfig, StoreKind};

const MIB: u64 = 1 << 20;

fn main() {
    if let Err(e) = run() {
        eprintln!("copy bench failed: {e}");
        std::process::exit(1);
    }
}

fn env_list<T>(name: &str, default: &str, parse: impl Fn(&str) -> Option<T>) -> io::Result<Vec<T>> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_string());
    text.split(',')
        .map(|s| {
            parse(s.trim()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{name}: cannot parse {s:?}"),
                )
            })
        })
        .collect()
}

/// "64m", "1g", "4096", "512k".
fn parse_size(s: &str) -> Option<u64> {
    let s = s.to_ascii_lowercase();
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1 << 10),
        'm' => (&s[..s.len() - 1], MIB),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (&s[..], 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 && bytes.is_multiple_of(1 << 30) {
        format!("{} GiB", bytes >> 30)
    } else if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} B")
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One store variant under test.
struct Variant {
    name: &'static str,
    store: Store,
}

/// One timed series.
struct Series {
    store: &'static str,
    what: String,
    threads: Option<usize>,
    secs: Vec<f64>,
}

fn source_file(size: u64) -> io::Result<(PathBuf, fs::File)> {
    let path = PathBuf::from(format!(
        "/var/tmp/replicad-bench-{}-{}",
        std::process::id(),
        size
    ));
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut block = vec![0u8; MIB as usize];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let mut left = size;
    let mut i = 0u8;
    while left > 0 {
        let n = left.min(MIB) as usize;
        // Make blocks differ so a misplaced chunk is caught.
        block[0] = i;
        i = i.wrapping_add(1);
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    // Written back now, so writeback does not run during the timings; the
    // pages stay in the page cache.
    f.sync_all()?;
    // Warm: read it all once.
    let mut buf = vec![0u8; 8 * MIB as usize];
    let mut off = 0;
    while off < size {
        let n = f.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        off += n as u64;
    }
    Ok((path, f))
}

fn ident_of(path: &Path, f: &fs::File, generation: u64) -> io::Result<ReplicaIdent> {
    Ok(ReplicaIdent::of_file(path, &f.metadata()?, generation))
}

fn same_bytes(a: &fs::File, b: &fs::File, len: u64) -> io::Result<bool> {
    let mut x = vec![0u8; 8 * MIB as usize];
    let mut y = vec![0u8; 8 * MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(x.len() as u64) as usize;
        a.read_exact_at(&mut x[..n], off)?;
        b.read_exact_at(&mut y[..n], off)?;
        if x[..n] != y[..n] {
            return Ok(false);
        }
        off += n as u64;
    }
    Ok(true)
}

fn time_cp(src: &Path, dir: &Path) -> io::Result<f64> {
    let dst = dir.join("cp-bench");
    let t = Instant::now();
    let status = Command::new("/bin/cp").arg(src).arg(&dst).status()?;
    let secs = t.elapsed().as_secs_f64();
    fs::remove_file(&dst)?;
    if !status.success() {
        return Err(io::Error::other(format!("/bin/cp failed: {status}")));
    }
    Ok(secs)
}

fn time_memcpy(size: u64, runs: usize) -> Vec<f64> {
    let mut a = vec![1u8; size as usize];
    let mut b = vec![2u8; size as usize];
    // Prefault both (the vec! above may be lazily zeroed pages for 0; 1 and
    // 2 force real pages).
    a[0] = 3;
    b[0] = 4;
    (0..runs)
        .map(|_| {
            let t = Instant::now();
            b.copy_from_slice(&a);
            std::hint::black_box(&mut b);
            let s = t.elapsed().as_secs_f64();
            a[1] = a[1].wrapping_add(1);
            s
        })
        .collect()
}

fn run() -> io::Result<()> {
    let sizes = env_list("REPLICAD_BENCH_SIZES", "64m,1g", parse_size)?;
    let runs = std::env::var("REPLICAD_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(5)
        .max(1);
    let thread_counts = env_list("REPLICAD_BENCH_THREADS", "1,2", |s| s.parse::<usize>().ok())?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIP copy bench: mounting the tmpfs store needs root");
        return Ok(());
    }
    let tmp = tempfile::Builder::new()
        .prefix("replicad-bench")
        .tempdir_in("/tmp")?;
    let mut variants = Vec::new();
    for (name, huge, memfd) in [
        ("tmpfs", false, false),
        ("tmpfs-huge", true, false),
        ("memfd", false, true),
    ] {
        let cfg = StoreConfig {
            run_dir: tmp.path().join(name),
            size: None,
            huge_pages: huge,
            force_memfd: memfd,
            copy_threads: 2,
        };
        let store = Store::open(&cfg, &[0], &Default::default()).map_err(io::Error::other)?;
        let want = if memfd {
            StoreKind::Memfd
        } else {
            StoreKind::Tmpfs
        };
        if store.kind(0) != Some(want) {
            println!("SKIP copy bench {name}: the store could not be set up as {want:?}");
            continue;
        }
        variants.push(Variant { name, store });
    }
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "replicad copy bench: {cpus} CPUs, {runs} runs, source on /var/tmp (warm), node 0, \
         default method {}",
        CopyMethod::DEFAULT
    );
    let result = bench_sizes(&sizes, runs, &thread_counts, &variants);
    for v in &variants {
        v.store.close();
    }
    result
}

fn bench_sizes(
    sizes: &[u64],
    runs: usize,
    thread_counts: &[usize],
    variants: &[Variant],
) -> io::Result<()> {
    let no_abort = AtomicBool::new(false);
    for &size in sizes {
        let (src_path, src) = source_file(size)?;
        let mut series: Vec<Series> = Vec::new();
        let mut generation = 0u64;
        let result = (|| -> io::Result<()> {
            for run in 0..runs {
                for v in variants {
                    if let Some(dir) = v
                        .store
                        .dir(0)
                        .filter(|_| v.store.kind(0) == Some(StoreKind::Tmpfs))
                    {
                        let s = time_cp(&src_path, dir)?;
                        push(&mut series, v.name, "cp".to_string(), None, s);
                    }
                    for method in CopyMethod::ALL {
                        for &threads in thread_counts {
                            generation += 1;
                            let id = ident_of(&src_path, &src, generation)?;
                            let t = Instant::now();
                            let r = v.store.create(0, &id).map_err(io::Error::other)?;
                            r.fill_with(src.as_fd(), size, &no_abort, &id, method, threads)
                                .map_err(io::Error::other)?;
                            let secs = t.elapsed().as_secs_f64();
                            if run == 0 {
                                let ro =
                                    fs::File::from(r.open_readonly().map_err(io::Error::other)?);
                                if !same_bytes(&src, &ro, size)? {
                                    return Err(io::Error::other(format!(
                                        "{} {method} x{threads}: replica differs from the source",
                                        v.name
                                    )));
                                }
                                let p = r.placement().map_err(io::Error::other)?;
                                if p.misplaced != 0 {
                                    println!(
                                        "  warning: {} {method}: {} of {} pages off node 0",
                                        v.name, p.misplaced, p.pages
                                    );
                                }
                            }
                            r.remove();
                            push(&mut series, v.name, method.to_string(), Some(threads), secs);
                        }
                    }
                }
            }
            Ok(())
        })();
        let _ = fs::remove_file(&src_path);
        result?;
        let mut memcpy = time_memcpy(size, runs);
        report(size, &mut series, median(&mut memcpy));
    }
    Ok(())
}

fn push(
    series: &mut Vec<Series>,
    store: &'static str,
    what: String,
    threads: Option<usize>,
    secs: f64,
) {
    match series
        .iter_mut()
        .find(|s| s.store == store && s.what == what && s.threads == threads)
    {
        Some(s) => s.secs.push(secs),
        None => series.push(Series {
            store,
            what,
            threads,
            secs: vec![secs],
        }),
    }
}

fn report(size: u64, series: &mut [Series], memcpy_secs: f64) {
    let gbs = |secs: f64| size as f64 / secs / 1e9;
    println!(
        "\nsize {} ({} runs each)",
        human(size),
        series.first().map_or(0, |s| s.secs.len())
    );
    println!(
        "  {:<11} {:<14} {:>7} {:>12} {:>8} {:>12} {:>13}",
        "store", "copy", "threads", "median GB/s", "vs cp", "vs cp tmpfs", "min-max GB/s"
    );
    let mut cp_rate = std::collections::HashMap::new();
    for s in series.iter_mut() {
        let m = median(&mut s.secs);
        if s.what == "cp" {
            cp_rate.insert(s.store, gbs(m));
        }
    }
    // "vs cp": against cp into the same store (memfd has none: the plain
    // tmpfs one); "vs cp tmpfs": against cp into the plain 4 KiB tmpfs.
    let plain = cp_rate.get("tmpfs").copied();
    let ratio = |rate: f64, base: Option<f64>| {
        base.map_or("-".to_string(), |b| format!("{:.2}x", rate / b))
    };
    for s in series.iter_mut() {
        let rate = gbs(median(&mut s.secs));
        let same = cp_rate.get(s.store).copied().or(plain);
        let threads = s.threads.map_or("-".to_string(), |t| t.to_string());
        let what = if s.what == "cp" {
            "cp (/bin/cp)"
        } else {
            &s.what
        };
        // secs is sorted by median(): slowest last.
        let spread = format!(
            "{:.2}-{:.2}",
            gbs(s.secs.last().copied().unwrap_or(f64::NAN)),
            gbs(s.secs.first().copied().unwrap_or(f64::NAN))
        );
        println!(
            "  {:<11} {:<14} {:>7} {:>12.2} {:>8} {:>12} {:>13}",
            s.store,
            what,
            threads,
            rate,
            ratio(rate, same),
            ratio(rate, plain),
            spread
        );
    }
    let rate = gbs(memcpy_secs);
    println!(
        "  {:<11} {:<14} {:>7} {:>12.2} {:>8} {:>12}",
        "memory",
        "memcpy",
        1,
        rate,
        "-",
        ratio(rate, plain)
    );
}
