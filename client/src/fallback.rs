//! SIGBUS fallback. STUB: replaced by the real implementation.
