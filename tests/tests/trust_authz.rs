//! Trust model: authz.
