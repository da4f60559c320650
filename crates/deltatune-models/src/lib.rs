//! deltatune-models
