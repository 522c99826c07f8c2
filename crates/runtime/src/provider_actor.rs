//! TODO(#2): filled by the owning change.
