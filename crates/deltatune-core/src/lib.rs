//! deltatune-core
