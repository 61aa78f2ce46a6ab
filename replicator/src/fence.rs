//! Write fence. STUB.
