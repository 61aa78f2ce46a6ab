//! The C ABI over [`crate::map`], declared in `client/include/replicad.h`.
//!
//! ```text
//!  struct replicad_mapping m;
//!  replicad_map("/data/index.seg", &m)  ->  0 | -errno
//!  ... read m.addr[0 .. m.len) ...           replicad_on_replica(&m) -> 1 | 0
//!  replicad_unmap(&m)                      (idempotent; zeroes m)
//! ```
//!
//! No function unwinds into C: every body runs under `catch_unwind`, and a
//! panic reads as `-EIO` (or nothing, for the functions without a result).

use std::ffi::{c_char, c_int, c_void, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::Duration;

use crate::{Backing, Error, MapOptions, Mapping};

/// `struct replicad_mapping` (see `replicad.h`).
#[repr(C)]
#[derive(Debug)]
pub struct ReplicadMapping {
    /// First byte of the mapping (read-only).
    pub addr: *const c_void,
    /// Length in bytes (the file's size when it was mapped).
    pub len: usize,
    /// 1 if the replica backed the mapping when it was made, else 0. Use
    /// [`replicad_on_replica`] for the current state.
    pub on_replica: c_int,
    /// The replica's node (0 when the file itself is mapped).
    pub node: u32,
    /// The replica's generation (0 when the file itself is mapped).
    pub generation: u64,
    /// Owned by the library; NULL after `replicad_unmap`.
    pub handle: *mut c_void,
}

fn errno_of(e: &Error) -> c_int {
    match e {
        Error::Open { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
        Error::Map { source, .. } => source.raw_os_error().unwrap_or(libc::ENOMEM),
        Error::Empty { .. } => libc::ENODATA,
        Error::NotRegularFile { .. } => libc::ENODEV,
        _ => libc::EIO,
    }
}

fn zero(out: &mut ReplicadMapping) {
    *out = ReplicadMapping {
        addr: std::ptr::null(),
        len: 0,
        on_replica: 0,
        node: 0,
        generation: 0,
        handle: std::ptr::null_mut(),
    };
}

fn fill(out: &mut ReplicadMapping, m: Mapping) {
    let (node, generation) = match m.backing() {
        Backing::Replica { node, generation } => (*node, *generation),
        Backing::File { .. } => (0, 0),
    };
    out.addr = m.as_ptr().cast();
    out.len = m.len();
    out.on_replica = c_int::from(m.on_replica());
    out.node = node;
    out.generation = generation;
    out.handle = Box::into_raw(Box::new(m)).cast();
}

/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or valid for a
/// write of a `ReplicadMapping`.
unsafe fn map_into(path: *const c_char, out: *mut ReplicadMapping, opts: &MapOptions) -> c_int {
    if out.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: out is non-null and, by the caller's contract, writable.
    let out = unsafe { &mut *out };
    zero(out);
    if path.is_null() {
        return -libc::EINVAL;
    }
    // SAFETY: path is non-null and, by the caller's contract, NUL-terminated.
    let path = PathBuf::from(OsStr::from_bytes(
        unsafe { CStr::from_ptr(path) }.to_bytes(),
    ));
    match crate::map_with(&path, opts) {
        Ok(m) => {
            fill(out, m);
            0
        }
        Err(e) => -errno_of(&e),
    }
}

/// Map the file at `path` read-only, backed by the caller's node replica
/// when replicad has one, else by the file itself. Returns 0 and fills
/// `*out`, or a negative errno (`-ENOENT`, `-EACCES`, ... from open;
/// `-ENODEV` not a regular file; `-ENODATA` empty file; `-EINVAL` NULL
/// argument; `-EIO` internal error) with `*out` zeroed.
///
/// # Safety
/// `path` must be NULL or point to a NUL-terminated string; `out` must be
/// NULL or point to writable memory for one `struct replicad_mapping`. A
/// filled `*out` must be released with [`replicad_unmap`] exactly once
/// (further calls on the zeroed struct are no-ops) and not copied to be
/// unmapped twice.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn replicad_map(path: *const c_char, out: *mut ReplicadMapping) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: forwarded from this function's contract.
        unsafe { map_into(path, out, &MapOptions::default()) }
    }))
    .unwrap_or(-libc::EIO)
}

/// [`replicad_map`] with options: `socket` (NULL: `$REPLICAD_SOCKET` or the
/// default path), `node` (negative: the caller's home node), `timeout_ms`
/// (0: the default of 2 s).
///
/// # Safety
/// As for [`replicad_map`]; `socket` must be NULL or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn replicad_map_with(
    path: *const c_char,
    socket: *const c_char,
    node: i64,
    timeout_ms: u32,
    out: *mut ReplicadMapping,
) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        let mut opts = MapOptions::default();
        if !socket.is_null() {
            // SAFETY: socket is non-null and, by the contract, NUL-terminated.
            let s = unsafe { CStr::from_ptr(socket) };
            opts.socket = PathBuf::from(OsStr::from_bytes(s.to_bytes()));
        }
        opts.node = u32::try_from(node).ok();
        if timeout_ms > 0 {
            opts.timeout = Duration::from_millis(u64::from(timeout_ms));
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { map_into(path, out, &opts) }
    }))
    .unwrap_or(-libc::EIO)
}

/// 1 while the replica backs the mapping, 0 once a revoke made it fall back
/// to the file (or if it never was on a replica, or `m` is NULL/unmapped).
///
/// # Safety
/// `m` must be NULL or point to a `struct replicad_mapping` that
/// [`replicad_map`] filled (or zeroed) and that is not being unmapped
/// concurrently.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn replicad_on_replica(m: *const ReplicadMapping) -> c_int {
    catch_unwind(AssertUnwindSafe(|| {
        if m.is_null() {
            return 0;
        }
        // SAFETY: m is non-null and, by the contract, a readable struct.
        let handle = unsafe { (*m).handle };
        if handle.is_null() {
            return 0;
        }
        // SAFETY: a non-null handle is the Box<Mapping> that fill() leaked
        // and that replicad_unmap has not freed yet.
        let mapping = unsafe { &*handle.cast::<Mapping>() };
        c_int::from(mapping.on_replica())
    }))
    .unwrap_or(0)
}

/// Unmap and zero `*m`. NULL or an already zeroed struct is a no-op.
///
/// # Safety
/// `m` must be NULL or point to a writable `struct replicad_mapping` that
/// [`replicad_map`] filled (or zeroed). No thread may read the mapping's
/// bytes during or after this call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn replicad_unmap(m: *mut ReplicadMapping) {
    let _ = catch_unwind(AssertUnwindSafe(|| {
        if m.is_null() {
            return;
        }
        // SAFETY: m is non-null and, by the contract, a writable struct.
        let m = unsafe { &mut *m };
        let handle = m.handle;
        zero(m);
        if !handle.is_null() {
            // SAFETY: the handle is the Box<Mapping> that fill() leaked; the
            // struct now says NULL, so it is freed once.
            drop(unsafe { Box::from_raw(handle.cast::<Mapping>()) });
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

    #[test]
    fn map_unmap_round_trip_without_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, b"hello from C").unwrap();
        let path = CString::new(p.as_os_str().as_bytes()).unwrap();
        let sock = CString::new(dir.path().join("none.sock").as_os_str().as_bytes()).unwrap();
        let mut m = ReplicadMapping {
            addr: std::ptr::null(),
            len: 0,
            on_replica: 7,
            node: 0,
            generation: 0,
            handle: std::ptr::null_mut(),
        };
        // SAFETY: valid C strings and a writable struct.
        let rc = unsafe { replicad_map_with(path.as_ptr(), sock.as_ptr(), -1, 200, &mut m) };
        assert_eq!(rc, 0);
        assert_eq!(m.len, 12);
        assert_eq!(m.on_replica, 0);
        // SAFETY: addr/len describe the live mapping just made.
        let bytes = unsafe { std::slice::from_raw_parts(m.addr.cast::<u8>(), m.len) };
        assert_eq!(bytes, b"hello from C");
        // SAFETY: m was filled by replicad_map_with.
        assert_eq!(unsafe { replicad_on_replica(&m) }, 0);
        // SAFETY: as above; the second call sees a zeroed struct.
        unsafe {
            replicad_unmap(&mut m);
            replicad_unmap(&mut m);
            replicad_unmap(std::ptr::null_mut());
        }
        assert!(m.handle.is_null() && m.addr.is_null());
    }

    #[test]
    fn errors_are_negative_errno() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CString::new(dir.path().join("x").as_os_str().as_bytes()).unwrap();
        let d = CString::new(dir.path().as_os_str().as_bytes()).unwrap();
        let mut m = std::mem::MaybeUninit::<ReplicadMapping>::uninit();
        // SAFETY: valid C strings; m is writable.
        unsafe {
            assert_eq!(
                replicad_map(missing.as_ptr(), m.as_mut_ptr()),
                -libc::ENOENT
            );
            assert_eq!(replicad_map(d.as_ptr(), m.as_mut_ptr()), -libc::ENODEV);
            assert_eq!(
                replicad_map(std::ptr::null(), m.as_mut_ptr()),
                -libc::EINVAL
            );
            assert_eq!(
                replicad_map(d.as_ptr(), std::ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(replicad_on_replica(std::ptr::null()), 0);
        }
    }
}
