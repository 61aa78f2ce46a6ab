//! NUMA memory-policy syscalls: `mbind`, `set_mempolicy`, `move_pages`
//! (query, and moving pages to one node) and `get_mempolicy`. libc has the syscall numbers but no
//! wrappers, so each is one raw `syscall()`; the constants come from
//! `linux_raw_sys::mempolicy`.
//! Every function returns `io::Result`.
//!
//! None of these calls reads or writes memory through the addresses they are
//! given: the kernel looks the addresses up in the process's page tables and
//! reports or changes policy, so a wrong address is an error (`EFAULT`,
//! `ENOMEM`, a negative status), never undefined behaviour. That is why the
//! wrappers are safe functions that take raw pointers.

use std::io;

use linux_raw_sys::mempolicy as mp;

/// `MPOL_MF_STRICT`: fail if pages already in the range break the policy.
pub const MF_STRICT: u32 = mp::MPOL_MF_STRICT;
/// `MPOL_MF_MOVE`: migrate pages already in the range that break the policy.
pub const MF_MOVE: u32 = mp::MPOL_MF_MOVE;

/// `MPOL_MF_MOVE_ALL`: move pages other processes map too (needs
/// `CAP_SYS_NICE`). libc lacks it; linux-raw-sys has it (`1 << 2`).
pub const MF_MOVE_ALL: u32 = mp::MPOL_MF_MOVE_ALL;

/// Bits per word of a kernel node mask.
const WORD_BITS: usize = libc::c_ulong::BITS as usize;

/// A node mask with only `node` set, and the `maxnode` to pass with it.
/// The kernel reads `maxnode - 1` bits (a historic off-by-one that libnuma
/// also compensates for), so `maxnode` is one more than the mask's bits.
fn single_node_mask(node: u32) -> (Vec<libc::c_ulong>, libc::c_ulong) {
    let node = node as usize;
    let words = node / WORD_BITS + 1;
    let mut mask = vec![0 as libc::c_ulong; words];
    mask[node / WORD_BITS] |= 1 << (node % WORD_BITS);
    (mask, (words * WORD_BITS + 1) as libc::c_ulong)
}

fn cvt(rc: libc::c_long) -> io::Result<libc::c_long> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Bind `[addr, addr + len)` to `node` (`MPOL_BIND`). `flags` is a mix of
/// [`MF_STRICT`] and [`MF_MOVE`]. On a shared mapping of a tmpfs file or
/// memfd this sets the file's shared policy, so every page later allocated
/// for that range of the file (by a fault or by `write`) comes from `node`.
/// `addr` must be page-aligned.
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the kernel looks the address up in our page tables; nothing dereferences it"
)]
pub fn mbind(addr: *mut libc::c_void, len: usize, node: u32, flags: u32) -> io::Result<()> {
    let (mask, maxnode) = single_node_mask(node);
    // SAFETY: mbind only changes the memory policy of the caller's own
    // mappings in the range (an unmapped range is EFAULT); `mask` is a valid
    // buffer of `maxnode - 1` bits that outlives the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_mbind,
            addr,
            len as libc::c_ulong,
            mp::MPOL_BIND as libc::c_ulong,
            mask.as_ptr(),
            maxnode,
            flags as libc::c_ulong,
        )
    })
    .map(drop)
}

/// Prefer `node` for the calling thread's future allocations
/// (`set_mempolicy(MPOL_PREFERRED)`): pages come from `node` while it has
/// free memory and from other nodes after, so the policy never makes the
/// thread run out of memory. Children and `exec` inherit it.
pub fn set_preferred(node: u32) -> io::Result<()> {
    let (mask, maxnode) = single_node_mask(node);
    // SAFETY: set_mempolicy only changes the calling thread's policy; `mask`
    // is a valid buffer of `maxnode - 1` bits that outlives the call.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_set_mempolicy,
            mp::MPOL_PREFERRED as libc::c_int,
            mask.as_ptr(),
            maxnode,
        )
    })
    .map(drop)
}

/// The node of the page at each of `addrs` in this process (`move_pages`
/// with `nodes = NULL`: nothing moves). A negative value is `-errno` for that
/// page: `-ENOENT` not present, `-EFAULT` not mapped, and so on.
pub fn page_nodes(addrs: &[*const libc::c_void]) -> io::Result<Vec<i32>> {
    let mut status = vec![0 as libc::c_int; addrs.len()];
    if addrs.is_empty() {
        return Ok(status);
    }
    // SAFETY: pid 0 is this process; `addrs` and `status` each hold
    // `addrs.len()` elements and outlive the call; a NULL `nodes` array makes
    // move_pages only report where each page is. The kernel does not
    // dereference the page addresses from userspace.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            std::ptr::null::<libc::c_int>(),
            status.as_mut_ptr(),
            0 as libc::c_int,
        )
    })?;
    Ok(status)
}

/// Move the page at each of `addrs` in this process to `node`
/// (`move_pages` with every entry of `nodes` set to `node`); `flags` is
/// [`MF_MOVE_ALL`] or 0. Per page the status is the node the page is on
/// after the call (`node` both for a page moved and for one that was there
/// already) or `-errno` (`-EBUSY` in use, `-ENOENT` not present, `-EFAULT`
/// not mapped, `-ENOMEM` no room on `node`).
pub fn move_pages_to(addrs: &[*const libc::c_void], node: u32, flags: u32) -> io::Result<Vec<i32>> {
    let mut status = vec![0 as libc::c_int; addrs.len()];
    if addrs.is_empty() {
        return Ok(status);
    }
    let node =
        libc::c_int::try_from(node).map_err(|_| io::Error::from_raw_os_error(libc::ENODEV))?;
    let nodes = vec![node; addrs.len()];
    // SAFETY: pid 0 is this process; `addrs`, `nodes` and `status` each hold
    // `addrs.len()` elements and outlive the call. The kernel looks the page
    // addresses up in our page tables and never dereferences them from
    // userspace; moving a page changes where it lives, not its contents.
    cvt(unsafe {
        libc::syscall(
            libc::SYS_move_pages,
            0 as libc::pid_t,
            addrs.len() as libc::c_ulong,
            addrs.as_ptr(),
            nodes.as_ptr(),
            status.as_mut_ptr(),
            flags as libc::c_int,
        )
    })?;
    Ok(status)
}

/// The node holding the page at `addr` (`get_mempolicy` with
/// `MPOL_F_NODE | MPOL_F_ADDR`). The page is faulted in if it is not
/// present, as the kernel does for this query.
#[allow(
    clippy::not_unsafe_ptr_arg_deref,
    reason = "the kernel looks the address up in our page tables; nothing dereferences it"
)]
pub fn node_of(addr: *const libc::c_void) -> io::Result<i32> {
    let mut node: libc::c_int = -1;
    // SAFETY: `node` is valid for writes of one int; a NULL node mask with
    // maxnode 0 asks for no mask; the kernel looks `addr` up in our page
    // tables (EFAULT if unmapped).
    cvt(unsafe {
        libc::syscall(
            libc::SYS_get_mempolicy,
            &mut node as *mut libc::c_int,
            std::ptr::null_mut::<libc::c_ulong>(),
            0 as libc::c_ulong,
            addr,
            (mp::MPOL_F_NODE | mp::MPOL_F_ADDR) as libc::c_ulong,
        )
    })?;
    Ok(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Anon {
        ptr: *mut libc::c_void,
        len: usize,
    }

    impl Anon {
        fn new(len: usize) -> Anon {
            // SAFETY: a fresh private anonymous mapping; no existing memory
            // is affected.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Anon { ptr, len }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: the mapping was made by Anon::new and is unmapped once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }

    #[test]
    fn mask_and_maxnode() {
        assert_eq!(single_node_mask(0), (vec![1], 65));
        assert_eq!(single_node_mask(3), (vec![8], 65));
        assert_eq!(single_node_mask(64), (vec![0, 1], 129));
    }

    #[test]
    fn bind_then_query_node0() {
        let page = 4096;
        let a = Anon::new(4 * page);
        match mbind(a.ptr, a.len, 0, MF_STRICT | MF_MOVE) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                eprintln!("SKIP bind_then_query_node0: kernel without NUMA: {e}");
                return;
            }
            Err(e) => panic!("mbind: {e}"),
        }
        let addrs: Vec<*const libc::c_void> = (0..4)
            .map(|i| {
                a.ptr
                    .cast::<u8>()
                    .wrapping_add(i * page)
                    .cast_const()
                    .cast()
            })
            .collect();
        // Nothing touched yet: not present.
        let before = page_nodes(&addrs).unwrap();
        assert!(before.iter().all(|&s| s < 0), "{before:?}");
        for &p in &addrs[..3] {
            // SAFETY: p is inside our writable mapping.
            unsafe { p.cast_mut().cast::<u8>().write_volatile(1) };
        }
        let after = page_nodes(&addrs).unwrap();
        assert_eq!(&after[..3], &[0, 0, 0]);
        assert_eq!(after[3], -libc::ENOENT, "untouched page");
        assert_eq!(node_of(addrs[0]).unwrap(), 0);
        assert!(page_nodes(&[]).unwrap().is_empty());
        // Moving pages to the node they are on: the status is that node,
        // as for a moved page; a page not present is -ENOENT.
        let moved = move_pages_to(&addrs, 0, MF_MOVE_ALL).unwrap();
        assert_eq!(moved, [0, 0, 0, -libc::ENOENT]);
        let e = move_pages_to(&addrs, 1000, MF_MOVE_ALL).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV), "{e}");
        assert!(move_pages_to(&[], 0, 0).unwrap().is_empty());
    }

    #[test]
    fn prefer_a_node() {
        // The policy is per thread: set it in a thread of our own.
        std::thread::spawn(|| {
            match set_preferred(0) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                    eprintln!("SKIP prefer_a_node: kernel without NUMA: {e}");
                    return;
                }
                Err(e) => panic!("set_mempolicy: {e}"),
            }
            let mut mode: libc::c_int = -1;
            // SAFETY: `mode` is valid for one int; no mask, no address.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_get_mempolicy,
                    &mut mode as *mut libc::c_int,
                    std::ptr::null_mut::<libc::c_ulong>(),
                    0 as libc::c_ulong,
                    std::ptr::null::<libc::c_void>(),
                    0 as libc::c_ulong,
                )
            };
            assert_eq!(rc, 0);
            assert_eq!(mode, mp::MPOL_PREFERRED as libc::c_int);
            assert!(set_preferred(1000).is_err());
        })
        .join()
        .unwrap();
    }

    #[test]
    fn bind_to_missing_node_fails() {
        let a = Anon::new(4096);
        assert!(mbind(a.ptr, a.len, 1000, 0).is_err());
        assert!(node_of(std::ptr::null()).is_err());
    }
}
