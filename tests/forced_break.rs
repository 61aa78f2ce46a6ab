//! A lease the kernel breaks by force (issue 9, part). With the daemon
//! *and* its fence keeper stopped for longer than
//! `/proc/sys/fs/lease-break-time` (two faults: one alone is the keeper's
//! to handle, tests/keeper.rs), the kernel lets the writer in while
//! replicas are still mapped. What this shows is that replicad sees it when
//! it runs again: the break is counted as forced, logged, and the replicas
//! are revoked at once. A test binary of its own: it lowers a global
//! setting.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn a_forced_break_is_seen_counted_and_revoked_when_replicad_runs_again() {
    if !root_or_skip("a_forced_break_is_seen_counted_and_revoked_when_replicad_runs_again") {
        return;
    }
    let _t = BreakTime::set(1);
    let d = Daemon::start("");
    let dir = scratch("forced");
    let f = dir.path().join("f");
    make_file(&f, 128 * 1024, 7);
    d.ctl_ok(&["replicate", f.to_str().unwrap()]);
    let st = d.status();
    let replica = std::fs::File::open(&st.sources[0].replicas[0].file).unwrap();
    assert_eq!(d.metric("replicad_forced_breaks_total"), 0.0);
    let keeper = keeper_of(d.pid()).expect("a fence keeper");
    // SAFETY: a signal to the keeper process this test's daemon started.
    unsafe { libc::kill(keeper as i32, libc::SIGSTOP) };
    d.signal(libc::SIGSTOP);
    let t0 = Instant::now();
    let w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    let waited = t0.elapsed();
    // The kernel, not replicad, let the writer in.
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
    assert!(replica.metadata().unwrap().len() > 0);
    d.signal(libc::SIGCONT);
    let t1 = Instant::now();
    while replica.metadata().unwrap().len() != 0 {
        assert!(
            t1.elapsed() < Duration::from_secs(5),
            "not revoked after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let revoked = t1.elapsed();
    drop(w);
    // SAFETY: as above.
    unsafe { libc::kill(keeper as i32, libc::SIGCONT) };
    let t2 = Instant::now();
    while d.metric("replicad_forced_breaks_total") < 1.0 {
        assert!(t2.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(d.log().contains("broke the lease by force"), "{}", d.log());
    assert!(d.log().contains("the writer waited 1 s"), "{}", d.log());
    // The writer-wait histogram holds the kernel's wait (lease-break-time,
    // 1 s), not the revoke's few µs after SIGCONT.
    assert_eq!(d.metric("replicad_writer_wait_seconds_count"), 1.0);
    assert!(d.metric("replicad_writer_wait_seconds_sum") >= 1.0);
    eprintln!("writer let in by the kernel after {waited:?}; revoked {revoked:?} after SIGCONT");
}
