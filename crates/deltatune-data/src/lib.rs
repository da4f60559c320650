//! deltatune-data
