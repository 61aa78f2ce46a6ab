//! Rate-limited logs, per call site (as firecracker's
//! `logger/rate_limited.rs`): a log that can fire once per process, per file
//! or per request must not flood the journal when ten thousand of them come
//! at once.
//!
//! ```text
//!  warn_limited!("{}: ...", path)
//!     └─ static RateLimit (this call site only)
//!          window start (AtomicU64, ms) ── events this window (AtomicU64)
//!          first `burst` events of a window: logged
//!          the rest: counted, not logged (no formatting, no allocation)
//!          first event of the next window: logged with
//!            "(N similar messages suppressed)"
//! ```
//!
//! The default is [`BURST`] events per [`WINDOW`]; `warn_limited!(limit:
//! (3, Duration::from_secs(1)), "...")` sets another. Suppressed events are
//! reported by the next event of the same call site after its window ends;
//! until one comes, they are only counted. Levels that are off cost a
//! `tracing::enabled!` check and touch no counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

#[doc(hidden)]
pub use tracing as __tracing;

/// Events a call site logs per window by default.
pub const BURST: u64 = 10;
/// The default window.
pub const WINDOW: Duration = Duration::from_secs(10);

/// What to do with one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it; `suppressed` events of this call site were dropped since the
    /// last one logged.
    Log { suppressed: u64 },
    /// Drop it (counted).
    Suppress,
}

/// One call site's limiter; lives in a `static`. Lock-free: two atomics.
#[derive(Debug)]
pub struct RateLimit {
    burst: u64,
    window_ms: u64,
    /// Start of the current window, ms since [`epoch`] plus one (0: no
    /// event yet).
    start: AtomicU64,
    /// Events in the current window, logged or not.
    count: AtomicU64,
}

/// The monotonic clock's origin for every limiter in this process.
fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl RateLimit {
    /// `burst` events per `window` (a zero burst still logs one).
    pub const fn new(burst: u64, window: Duration) -> RateLimit {
        let ms = window.as_millis();
        RateLimit {
            burst: if burst == 0 { 1 } else { burst },
            window_ms: if ms == 0 {
                1
            } else if ms > u64::MAX as u128 {
                u64::MAX
            } else {
                ms as u64
            },
            start: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// [`BURST`] per [`WINDOW`].
    pub const fn default_limit() -> RateLimit {
        RateLimit::new(BURST, WINDOW)
    }

    /// Decide on one event now.
    pub fn check(&self) -> Verdict {
        self.check_at(now_ms())
    }

    /// Decide on one event at `now` (ms on any monotonic clock).
    pub fn check_at(&self, now: u64) -> Verdict {
        let stamp = now.saturating_add(1);
        let start = self.start.load(Ordering::Acquire);
        if start == 0 || stamp.saturating_sub(start) >= self.window_ms {
            // The first event of a new window: whoever moves the start
            // resets the count and reports what the old window dropped.
            if self
                .start
                .compare_exchange(start, stamp, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                let before = self.count.swap(1, Ordering::AcqRel);
                return Verdict::Log {
                    suppressed: before.saturating_sub(self.burst),
                };
            }
            // Another thread opened the window; count in it.
        }
        let n = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        if n <= self.burst {
            Verdict::Log { suppressed: 0 }
        } else {
            Verdict::Suppress
        }
    }
}

/// Log at `$level` through the call site's own [`RateLimit`].
#[doc(hidden)]
#[macro_export]
macro_rules! __log_limited {
    ($level:expr, $limit:expr, $($arg:tt)+) => {{
        use $crate::ratelimit::__tracing;
        if __tracing::enabled!($level) {
            static LIMIT: $crate::ratelimit::RateLimit = $limit;
            match LIMIT.check() {
                $crate::ratelimit::Verdict::Log { suppressed: 0 } => {
                    __tracing::event!($level, $($arg)+)
                }
                $crate::ratelimit::Verdict::Log { suppressed } => __tracing::event!(
                    $level,
                    "{} ({} similar messages suppressed)",
                    format_args!($($arg)+),
                    suppressed
                ),
                $crate::ratelimit::Verdict::Suppress => {}
            }
        }
    }};
}

/// `tracing::error!` limited per call site; see [`warn_limited!`].
#[macro_export]
macro_rules! error_limited {
    (limit: ($n:expr, $w:expr), $($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::ERROR,
            $crate::ratelimit::RateLimit::new($n, $w),
            $($arg)+
        )
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::ERROR,
            $crate::ratelimit::RateLimit::default_limit(),
            $($arg)+
        )
    };
}

/// `tracing::warn!` limited per call site: [`BURST`] per [`WINDOW`], or
/// `warn_limited!(limit: (n, window), "...")`. Takes a format string and
/// its arguments (no fields).
#[macro_export]
macro_rules! warn_limited {
    (limit: ($n:expr, $w:expr), $($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::WARN,
            $crate::ratelimit::RateLimit::new($n, $w),
            $($arg)+
        )
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::WARN,
            $crate::ratelimit::RateLimit::default_limit(),
            $($arg)+
        )
    };
}

/// `tracing::info!` limited per call site; see [`warn_limited!`].
#[macro_export]
macro_rules! info_limited {
    (limit: ($n:expr, $w:expr), $($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::INFO,
            $crate::ratelimit::RateLimit::new($n, $w),
            $($arg)+
        )
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::INFO,
            $crate::ratelimit::RateLimit::default_limit(),
            $($arg)+
        )
    };
}

/// `tracing::debug!` limited per call site; see [`warn_limited!`].
#[macro_export]
macro_rules! debug_limited {
    (limit: ($n:expr, $w:expr), $($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::DEBUG,
            $crate::ratelimit::RateLimit::new($n, $w),
            $($arg)+
        )
    };
    ($($arg:tt)+) => {
        $crate::__log_limited!(
            $crate::ratelimit::__tracing::Level::DEBUG,
            $crate::ratelimit::RateLimit::default_limit(),
            $($arg)+
        )
    };
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn burst_then_suppressed_then_reported() {
        let l = RateLimit::new(3, Duration::from_secs(10));
        for t in [0, 1, 2] {
            assert_eq!(l.check_at(t), Verdict::Log { suppressed: 0 });
        }
        for t in 3..10 {
            assert_eq!(l.check_at(t), Verdict::Suppress);
        }
        // Still inside the window.
        assert_eq!(l.check_at(9_999), Verdict::Suppress);
        // The next window's first event reports the 8 dropped ones.
        assert_eq!(l.check_at(10_000), Verdict::Log { suppressed: 8 });
        assert_eq!(l.check_at(10_001), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check_at(10_002), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check_at(10_003), Verdict::Suppress);
        // A quiet window: nothing was dropped in it after the one above.
        assert_eq!(l.check_at(50_000), Verdict::Log { suppressed: 1 });
        assert_eq!(l.check_at(90_000), Verdict::Log { suppressed: 0 });
    }

    #[test]
    fn zero_limits_still_log_one() {
        let l = RateLimit::new(0, Duration::ZERO);
        assert_eq!(l.check_at(5), Verdict::Log { suppressed: 0 });
        assert_eq!(l.check_at(6), Verdict::Log { suppressed: 0 });
    }

    /// Many threads at once within one window: exactly `burst` log.
    #[test]
    fn concurrent_callers_share_one_budget() {
        static L: RateLimit = RateLimit::new(10, Duration::from_secs(3600));
        let logged = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let logged = logged.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        if let Verdict::Log { .. } = L.check_at(7) {
                            logged.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(logged.load(Ordering::Relaxed), 10);
        assert_eq!(
            L.check_at(7 + 3_600_000),
            Verdict::Log {
                suppressed: 8000 - 10
            }
        );
    }

    /// Collects the messages of events, for the macro test.
    struct Messages(Arc<Mutex<Vec<String>>>);

    struct Visit<'a>(&'a mut String);

    impl tracing::field::Visit for Visit<'_> {
        fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
            if field.name() == "message" {
                *self.0 = format!("{value:?}");
            }
        }
    }

    impl tracing::Subscriber for Messages {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut m = String::new();
            event.record(&mut Visit(&mut m));
            self.0.lock().unwrap().push(m);
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    #[test]
    fn macros_limit_per_call_site() {
        let got = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Messages(got.clone()), || {
            for i in 0..25 {
                crate::warn_limited!("file {i} vanished");
                crate::info_limited!(limit: (2, Duration::from_secs(3600)), "info {}", i);
            }
            crate::debug_limited!("once");
        });
        let got = got.lock().unwrap();
        let warns = got.iter().filter(|m| m.starts_with("file ")).count();
        let infos: Vec<_> = got.iter().filter(|m| m.starts_with("info ")).collect();
        assert_eq!(warns, BURST as usize, "{got:?}");
        assert_eq!(infos, ["info 0", "info 1"], "{got:?}");
        assert!(got.iter().any(|m| m == "once"), "{got:?}");
    }

    #[test]
    fn the_suppressed_count_joins_the_message() {
        let got = Arc::new(Mutex::new(Vec::new()));
        tracing::subscriber::with_default(Messages(got.clone()), || {
            for i in 0..4 {
                crate::warn_limited!(limit: (1, Duration::from_millis(1)), "tick {i}");
                if i == 2 {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        });
        let got = got.lock().unwrap();
        // tick 0 logs; 1 and 2 (within 1 ms) may be dropped; tick 3 comes
        // after the window and reports however many were.
        assert_eq!(got[0], "tick 0", "{got:?}");
        let last = got.last().unwrap();
        assert!(last.starts_with("tick 3"), "{got:?}");
        let dropped = 4 - got.len();
        if dropped > 0 {
            assert_eq!(
                *last,
                format!("tick 3 ({dropped} similar messages suppressed)"),
                "{got:?}"
            );
        }
    }
}
