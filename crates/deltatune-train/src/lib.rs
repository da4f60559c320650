//! deltatune-train
