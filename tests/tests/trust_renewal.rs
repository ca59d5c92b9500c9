//! Trust model: renewal.
