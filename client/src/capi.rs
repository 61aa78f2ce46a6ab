//! C ABI. STUB: replaced by the real implementation.
