// Shared by the readers (included with `include!`): a SIGBUS handler for
// faults on the data file itself (a writer truncating it under a reader).
// With the shim, faults in ranges it moved onto replicas are its own; every
// other fault is chained here.

/// Set by our SIGBUS handler when the file itself was cut short under us
/// (a writer truncating it): the read of this round is torn, not wrong.
static TORN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let addr = unsafe { (*info).si_addr() } as usize & !(PAGE - 1);
    // Put a zero page over the faulting page so the load completes; the
    // round is discarded because TORN is set.
    // SAFETY: replaces one page of our own mapping of the data file.
    unsafe {
        libc::mmap(
            addr as *mut libc::c_void,
            PAGE,
            libc::PROT_READ,
            libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
    }
    TORN.store(true, Ordering::SeqCst);
}

fn install_sigbus() {
    // SAFETY: installing a handler that only calls mmap and stores an atomic.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut());
    }
}
