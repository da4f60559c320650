//! deltatune-methods
