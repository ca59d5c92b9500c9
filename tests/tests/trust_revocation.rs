//! Trust model: revocation.
