//! Trust model: nbd.
