//! Trust model: roles.
