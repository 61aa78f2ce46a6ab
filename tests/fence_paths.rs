//! Always lease (issue 9, part): a file that can ever become writable is
//! leased, so the ways it becomes writable later (remount read-write,
//! `chattr -i`, the writable twin of a read-only bind mount) meet the
//! fence like any writer: the replica is truncated before the writer's
//! open returns, and the next generation has the new bytes. And a
//! `replicate` while a writer holds the file fails and names it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn run(cmd: &str, args: &[&str], target: &Path) {
    let ok = Command::new(cmd)
        .args(args)
        .arg(target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "{cmd} {args:?} {}", target.display());
}

fn umount(dir: &Path) {
    let c = std::ffi::CString::new(dir.to_str().unwrap()).unwrap();
    // SAFETY: unmounting a test mount by a valid path.
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

/// Unmounts on drop, so a failed assertion leaves no mount behind.
struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        umount(self.0);
    }
}

/// An overlay at `<dir>/merged` over `lower` (holding `f`, 64 KiB of 1s),
/// `upper` and `work`; false if this kernel cannot mount one here.
fn overlay(dir: &Path) -> bool {
    let p = |n: &str| dir.join(n);
    for n in ["lower", "upper", "work", "merged"] {
        std::fs::create_dir(p(n)).unwrap();
    }
    std::fs::write(p("lower/f"), vec![1u8; 64 * 1024]).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        p("lower").display(),
        p("upper").display(),
        p("work").display()
    );
    Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(p("merged"))
        .status()
        .unwrap()
        .success()
}

/// Wait (20 s at most) until the first source is at generation `at_least`
/// or later with a valid replica of it.
fn wait_for_generation(d: &Daemon, at_least: u64, what: &str) {
    let t0 = Instant::now();
    loop {
        let st = d.status();
        let s = &st.sources[0];
        if s.generation >= at_least
            && s.replicas.iter().any(|r| {
                r.generation == s.generation
                    && r.state == replicad_client::proto::ReplicaState::Valid
            })
        {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Replicate `seen` (the path the daemon is given) and check it is leased;
/// then write new bytes through `written` (the same inode, another way in)
/// and check the fence held: the replica the reader had is truncated by
/// the time the writer's open returns, and the next generation is served
/// with the new bytes.
fn write_meets_the_fence(d: &Daemon, seen: &Path, written: &Path, make_writable: impl FnOnce()) {
    d.ctl_ok(&["replicate", seen.to_str().unwrap()]);
    let st = d.status();
    let src = &st.sources[0];
    assert_eq!(src.fence, "lease", "{st:?}");
    assert_eq!(
        src.replicas[0].state,
        replicad_client::proto::ReplicaState::Valid
    );
    // What a reader of the replica holds: the file itself, by fd.
    let replica = std::fs::File::open(&src.replicas[0].file).unwrap();
    let before = replica.metadata().unwrap().len();
    assert!(before > 0);
    make_writable();
    let new: Vec<u8> = (0..before).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(written)
        .unwrap();
    // The writer is in: the replica is already gone from every page table.
    assert_eq!(
        replica.metadata().unwrap().len(),
        0,
        "the writer got in while the replica still held the old bytes"
    );
    w.write_all(&new).unwrap();
    drop(w);
    // The next generation, with the new bytes.
    wait_for_generation(d, 2, "no new generation");
    let out = d.ctl_ok(&["map", seen.to_str().unwrap()]);
    assert!(out.contains("backed by replica"), "{out}");
    let want = format!("fnv1a64 {:016x}", fnv1a(&new));
    assert!(
        out.contains(&want),
        "served other bytes than the file's: {out} (want {want})"
    );
}

#[test]
fn a_read_only_mount_is_leased_and_a_remount_rw_meets_the_fence() {
    if !root_or_skip("a_read_only_mount_is_leased_and_a_remount_rw_meets_the_fence") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("ro-remount");
    let view = dir.path().join("view");
    std::fs::create_dir(&view).unwrap();
    run(
        "mount",
        &["-t", "tmpfs", "-o", "size=4m", "replicad-test-ro"],
        &view,
    );
    let _m = Mount(&view);
    let f = view.join("f");
    // Filled by a child: a writable fd of this process on the tmpfs could be
    // inherited by another test's fork, and a remount read-only then fails
    // with EBUSY until that child execs.
    let staged = dir.path().join("staged");
    make_file(&staged, 256 * 1024, 3);
    run("cp", &[staged.to_str().unwrap()], &f);
    run("mount", &["-o", "remount,ro"], &view);
    write_meets_the_fence(&d, &f, &f, || run("mount", &["-o", "remount,rw"], &view));
}

#[test]
fn an_immutable_file_is_leased_and_chattr_minus_i_meets_the_fence() {
    if !root_or_skip("an_immutable_file_is_leased_and_chattr_minus_i_meets_the_fence") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("immutable");
    let f = dir.path().join("f");
    make_file(&f, 256 * 1024, 4);
    run("chattr", &["+i"], &f);
    // Whatever happens, the scratch dir must be removable afterwards.
    struct Mutable<'a>(&'a Path);
    impl Drop for Mutable<'_> {
        fn drop(&mut self) {
            let _ = Command::new("chattr").arg("-i").arg(self.0).status();
        }
    }
    let _g = Mutable(&f);
    write_meets_the_fence(&d, &f, &f, || run("chattr", &["-i"], &f));
}

#[test]
fn a_read_only_bind_mount_is_leased_and_its_writable_twin_meets_the_fence() {
    if !root_or_skip("a_read_only_bind_mount_is_leased_and_its_writable_twin_meets_the_fence") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("ro-bind");
    let src = dir.path().join("src");
    let view = dir.path().join("view");
    std::fs::create_dir(&src).unwrap();
    std::fs::create_dir(&view).unwrap();
    make_file(&src.join("f"), 256 * 1024, 5);
    run("mount", &["--bind", src.to_str().unwrap()], &view);
    let _m = Mount(&view);
    run("mount", &["-o", "remount,bind,ro"], &view);
    // The view really is read-only.
    let e = std::fs::OpenOptions::new()
        .write(true)
        .open(view.join("f"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    write_meets_the_fence(&d, &view.join("f"), &src.join("f"), || {});
}

#[test]
fn replicate_while_a_writer_holds_the_file_fails_and_names_the_writer() {
    if !root_or_skip("replicate_while_a_writer_holds_the_file_fails_and_names_the_writer") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("held");
    let f = dir.path().join("f");
    make_file(&f, 64 * 1024, 6);
    d.ctl_ok(&["replicate", f.to_str().unwrap()]);
    // A writer breaks the fence and keeps the file open.
    let _w = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    let t0 = Instant::now();
    while d.status().sources[0].fence != "broken" {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(10));
    }
    let err = d.ctl_err(&["replicate", f.to_str().unwrap()]);
    let me = format!("pid {}", std::process::id());
    assert!(err.contains("open for writing by"), "{err}");
    assert!(err.contains(&me), "the writer is not named: {err}");
    // Nothing claims to be replicated meanwhile.
    let st = d.status();
    assert!(
        st.sources[0]
            .replicas
            .iter()
            .all(|r| r.state != replicad_client::proto::ReplicaState::Valid),
        "{st:?}"
    );
}

/// `open(O_RDONLY|O_TRUNC)` cuts a file without breaking the read lease:
/// the modify watch sees it and the replica is revoked at once. The window
/// (truncation to revoke) is the kernel's gap; it is measured and printed.
#[test]
fn a_truncation_no_break_announces_is_revoked_and_the_window_measured() {
    if !root_or_skip("a_truncation_no_break_announces_is_revoked_and_the_window_measured") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("otrunc");
    let f = dir.path().join("f");
    let mut windows = Vec::new();
    for round in 0..5u8 {
        make_file(&f, 256 * 1024, 10 + round);
        if round == 0 {
            d.ctl_ok(&["replicate", f.to_str().unwrap()]);
        }
        // The replica of the current generation, held as a reader would.
        let t0 = Instant::now();
        let replica = loop {
            let st = d.status();
            let s = &st.sources[0];
            let valid = s.replicas.iter().find(|r| {
                r.generation == s.generation
                    && s.size == 256 * 1024
                    && r.state == replicad_client::proto::ReplicaState::Valid
            });
            if let Some(r) = valid {
                break std::fs::File::open(&r.file).unwrap();
            }
            assert!(t0.elapsed() < Duration::from_secs(20), "no replica: {st:?}");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(replica.metadata().unwrap().len(), 256 * 1024);
        let cut = Instant::now();
        drop(
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_TRUNC)
                .open(&f)
                .unwrap(),
        );
        assert_eq!(std::fs::metadata(&f).unwrap().len(), 0);
        while replica.metadata().unwrap().len() != 0 {
            assert!(
                cut.elapsed() < Duration::from_secs(1),
                "the replica still held the old bytes 1 s after an O_TRUNC"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        windows.push(cut.elapsed());
    }
    windows.sort();
    eprintln!(
        "O_RDONLY|O_TRUNC to revoke: median {:?}, max {:?} (5 rounds)",
        windows[2], windows[4]
    );
    assert!(d.metric("replicad_invalidations_total{reason=\"modified\"}") >= 5.0);
}

/// overlayfs: a lease on the merged file is not broken by a write to a
/// layer's own file (the lower file, or the upper one after a copy-up),
/// which the overlay shows at once. Both are fenced beside the source.
#[test]
fn overlay_writes_to_either_layer_meet_the_fence() {
    if !root_or_skip("overlay_writes_to_either_layer_meet_the_fence") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("overlay");
    let p = |n: &str| dir.path().join(n);
    if !overlay(dir.path()) {
        skip(
            "overlay_writes_to_either_layer_meet_the_fence",
            "this kernel cannot mount overlayfs here",
        );
        return;
    }
    let _m = Mount(&p("merged"));
    let merged = p("merged/f");
    // 1. The lower file written directly, under the overlay's feet.
    write_meets_the_fence(&d, &merged, &p("lower/f"), || {});
    // 2. A write through the overlay copies the file up; then the upper
    //    file written directly.
    let gen_before = d.status().sources[0].generation;
    std::fs::write(&merged, vec![9u8; 64 * 1024]).unwrap();
    assert!(p("upper/f").is_file(), "no copy-up");
    let t0 = Instant::now();
    let replica = loop {
        let st = d.status();
        let s = &st.sources[0];
        let valid = s.replicas.iter().find(|r| {
            s.generation > gen_before
                && r.generation == s.generation
                && r.state == replicad_client::proto::ReplicaState::Valid
        });
        if let Some(r) = valid {
            break std::fs::File::open(&r.file).unwrap();
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "no new generation: {st:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(p("upper/f"))
        .unwrap();
    assert_eq!(
        replica.metadata().unwrap().len(),
        0,
        "a write to the upper file got in while the replica held the old bytes"
    );
    w.write_all(&[7u8; 4096]).unwrap();
}

/// One inode, two sources: a lower file replicated by its own path and
/// through an overlay share one inotify watch. Evicting the overlay source
/// must leave the other's watch, and an O_TRUNC of the lower file must
/// still revoke it.
#[test]
fn a_watch_shared_by_two_sources_outlives_either() {
    if !root_or_skip("a_watch_shared_by_two_sources_outlives_either") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("shared-watch");
    let p = |n: &str| dir.path().join(n);
    if !overlay(dir.path()) {
        skip(
            "a_watch_shared_by_two_sources_outlives_either",
            "no overlayfs here",
        );
        return;
    }
    let _m = Mount(&p("merged"));
    d.ctl_ok(&["replicate", p("lower/f").to_str().unwrap()]);
    d.ctl_ok(&["replicate", p("merged/f").to_str().unwrap()]);
    d.ctl_ok(&["evict", p("merged/f").to_str().unwrap()]);
    let st = d.status();
    assert_eq!(st.sources.len(), 1, "{st:?}");
    let replica = std::fs::File::open(&st.sources[0].replicas[0].file).unwrap();
    drop(
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_TRUNC)
            .open(p("lower/f"))
            .unwrap(),
    );
    let t0 = Instant::now();
    while replica.metadata().unwrap().len() != 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the direct source's watch went with the evicted overlay source"
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// A layer's lease broken by force (the daemon and its keeper stopped for
/// longer than lease-break-time while a writer opened the lower file
/// directly) is counted and logged as a forced break, as the source's is.
#[test]
fn a_forced_break_on_an_overlay_layer_is_counted() {
    if !root_or_skip("a_forced_break_on_an_overlay_layer_is_counted") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("overlay-forced");
    let p = |n: &str| dir.path().join(n);
    if !overlay(dir.path()) {
        skip(
            "a_forced_break_on_an_overlay_layer_is_counted",
            "this kernel cannot mount overlayfs here",
        );
        return;
    }
    let _m = Mount(&p("merged"));
    d.ctl_ok(&["replicate", p("merged/f").to_str().unwrap()]);
    let _t = BreakTime::set(1);
    let keeper = keeper_of(d.pid()).expect("a fence keeper");
    // SAFETY: signals to the keeper of the daemon this test started.
    unsafe { libc::kill(keeper as i32, libc::SIGSTOP) };
    d.signal(libc::SIGSTOP);
    let t0 = std::time::Instant::now();
    let w = std::fs::OpenOptions::new()
        .write(true)
        .open(p("lower/f"))
        .unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900),
        "{waited:?}"
    );
    d.signal(libc::SIGCONT);
    // SAFETY: as above.
    unsafe { libc::kill(keeper as i32, libc::SIGCONT) };
    let t1 = std::time::Instant::now();
    while d.metric("replicad_forced_breaks_total") < 1.0 {
        assert!(
            t1.elapsed() < std::time::Duration::from_secs(5),
            "{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    drop(w);
    assert!(d.log().contains("on this layer"), "{}", d.log());
}

/// A copy-up no write announces: `chmod` of the merged file copies it up
/// (the overlay's lease sees no break), which makes an upper file a writer
/// can reach directly. The metadata change revokes, the new generation
/// fences the upper file too, and a direct write to it meets the fence.
#[test]
fn a_copy_up_by_chmod_fences_the_new_upper_file() {
    if !root_or_skip("a_copy_up_by_chmod_fences_the_new_upper_file") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("overlay-chmod");
    let p = |n: &str| dir.path().join(n);
    if !overlay(dir.path()) {
        skip(
            "a_copy_up_by_chmod_fences_the_new_upper_file",
            "this kernel cannot mount overlayfs here",
        );
        return;
    }
    let _m = Mount(&p("merged"));
    let merged = p("merged/f");
    write_meets_the_fence(&d, &merged, &p("upper/f"), || {
        std::fs::set_permissions(&merged, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(p("upper/f").is_file(), "no copy-up");
        // The copy-up's new generation, fenced on the upper file as well.
        wait_for_generation(&d, 2, "the chmod's copy-up never made a new generation");
    });
}

/// A source on overlayfs whose layers cannot be found (here: the lower
/// directory renamed after the mount, so mountinfo names a path that is
/// gone) is refused, not fenced on the merged file alone: a write to the
/// layer's own file would go unfenced.
#[test]
fn an_overlay_source_with_unknown_layers_is_refused() {
    if !root_or_skip("an_overlay_source_with_unknown_layers_is_refused") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("overlay-unknown");
    let p = |n: &str| dir.path().join(n);
    if !overlay(dir.path()) {
        skip(
            "an_overlay_source_with_unknown_layers_is_refused",
            "this kernel cannot mount overlayfs here",
        );
        return;
    }
    let _m = Mount(&p("merged"));
    std::fs::rename(p("lower"), p("lower-moved")).unwrap();
    let e = d.ctl_err(&["replicate", p("merged/f").to_str().unwrap()]);
    assert!(e.contains("overlayfs"), "{e}");
    assert!(d.status().sources.is_empty());
    assert_eq!(
        d.metric("replicad_fence_failures_total{reason=\"overlay_layers\"}"),
        1.0
    );
}

/// A lease signals the task that took it (`F_SETLEASE` makes the calling
/// thread the file's owner), and the kernel finds no task to signal once
/// that thread has exited. `replicate` runs on a pooled request thread
/// that exits after a while idle: the break must still reach replicad
/// (its fence takes the owner over for the whole process), and the
/// writer's open must meet the revoke, not lease-break-time.
#[test]
fn a_break_reaches_replicad_after_the_thread_that_leased_exited() {
    if !root_or_skip("a_break_reaches_replicad_after_the_thread_that_leased_exited") {
        return;
    }
    let d = Daemon::start("");
    let dir = scratch("lease-owner");
    let file = dir.path().join("f");
    make_file(&file, 256 * 1024, 1);
    d.ctl_ok(&["replicate", file.to_str().unwrap()]);
    // Until every pooled request thread is gone (the pool keeps an idle
    // one 10 s): the two async workers stay, named alike.
    let pooled = || {
        std::fs::read_dir(format!("/proc/{}/task", d.pid()))
            .unwrap()
            .flatten()
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "replicad-io")
            })
            .count()
    };
    let t0 = Instant::now();
    while pooled() > 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "{} request threads still there after 30 s",
            pooled() - 2
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let t0 = Instant::now();
    std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    let waited = t0.elapsed();
    assert!(
        waited < Duration::from_secs(1),
        "the writer waited {waited:?}"
    );
    assert_eq!(
        d.metric("replicad_invalidations_total{reason=\"write\"}"),
        1.0,
        "{}",
        d.log()
    );
    assert_eq!(d.metric("replicad_forced_breaks_total"), 0.0);
    eprintln!("the leasing thread exited: the writer waited {waited:?}");
}
