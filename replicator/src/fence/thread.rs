//! The fence thread: reads lease-break signals from a `signalfd`, so
//! breaks never wait behind copy work. If the realtime queue overflows the
//! kernel sends `SIGIO` instead, without the fd; the thread then reports
//! [`FenceEvent::Overflow`] and the engine checks every lease.

use std::io;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use nix::sys::inotify::WatchDescriptor;

use super::ModifyWatch;
use crate::sys;

/// The realtime signal lease breaks arrive on.
pub fn fence_signal() -> libc::c_int {
    libc::SIGRTMIN() + 4
}

/// Block the fence signals in the calling thread; call before starting any
/// thread, so every thread inherits the mask and breaks reach the signalfd.
/// Also takes what systemd's fd store passed (see
/// [`super::fdstore::capture`]), before anything else opens an fd.
pub fn prepare() -> io::Result<()> {
    super::fdstore::capture();
    sys::block_signals(&[fence_signal(), libc::SIGIO])
}

/// Whether [`prepare`] ran in this thread.
pub fn prepared() -> bool {
    sys::signal_blocked(fence_signal()) && sys::signal_blocked(libc::SIGIO)
}

/// What the fence thread reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceEvent {
    /// A writer broke the lease on this fd; `at` is when the signal was read.
    Break { fd: RawFd, at: Instant },
    /// The realtime queue overflowed: some break's fd is unknown.
    Overflow { at: Instant },
    /// A watched source changed without a break (see [`ModifyWatch`]).
    Modified { wd: WatchDescriptor, at: Instant },
    /// The modify watch's queue overflowed: check every leased source.
    ModifiedUnknown { at: Instant },
    /// A watched source was opened (while its opens are watched).
    Opened { wd: WatchDescriptor },
    /// Nothing happened for a poll period (100 ms).
    Tick,
}

/// The running fence thread.
#[derive(Debug)]
pub struct FenceThread {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl FenceThread {
    /// Start the thread; `on_event` runs on it for every break, and for
    /// every modification `watch` sees.
    pub fn spawn<F>(on_event: F, watch: Option<Arc<ModifyWatch>>) -> io::Result<FenceThread>
    where
        F: Fn(FenceEvent) + Send + 'static,
    {
        if !prepared() {
            return Err(io::Error::other(
                "the fence signals are not blocked: call fence::prepare() before starting threads",
            ));
        }
        let rt = fence_signal();
        let sfd = sys::signalfd(&[rt, libc::SIGIO])?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let handle = std::thread::Builder::new()
            .name("replicad-fence".into())
            .spawn(move || {
                // A writer waits on this thread: busy readers of the
                // replicas it revokes must not delay it (it sleeps in poll
                // otherwise, and holds the list lock only briefly).
                if let Err(e) = sys::realtime_thread() {
                    tracing::debug!("fence thread without SCHED_FIFO: {e}");
                }
                run(sfd, watch, rt, &stop2, on_event)
            })?;
        Ok(FenceThread {
            stop,
            handle: Some(handle),
        })
    }

    /// Stop the thread and wait for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for FenceThread {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run<F: Fn(FenceEvent)>(
    sfd: OwnedFd,
    watch: Option<Arc<ModifyWatch>>,
    rt: libc::c_int,
    stop: &AtomicBool,
    on_event: F,
) {
    while !stop.load(Ordering::SeqCst) {
        let ready = match &watch {
            Some(w) => sys::wait_readable_any(&[sfd.as_fd(), w.as_fd()], 100),
            None => sys::wait_readable_any(&[sfd.as_fd()], 100),
        };
        if ready == 0 {
            on_event(FenceEvent::Tick);
            continue;
        }
        loop {
            match sys::read_signal(sfd.as_fd()) {
                Ok(Some(info)) => {
                    let at = Instant::now();
                    if info.signo == rt {
                        on_event(FenceEvent::Break { fd: info.fd, at });
                    } else {
                        on_event(FenceEvent::Overflow { at });
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    crate::warn_limited!("fence signalfd read failed: {e}");
                    break;
                }
            }
        }
        if let Some(w) = &watch {
            match w.modified() {
                Ok(seen) => {
                    let at = Instant::now();
                    for s in seen {
                        on_event(match s {
                            super::Seen::Modified(wd) => FenceEvent::Modified { wd, at },
                            super::Seen::Opened(wd) => FenceEvent::Opened { wd },
                            super::Seen::Overflow => FenceEvent::ModifiedUnknown { at },
                        });
                    }
                }
                Err(e) => crate::warn_limited!("reading the modify watch failed: {e}"),
            }
        }
    }
}
