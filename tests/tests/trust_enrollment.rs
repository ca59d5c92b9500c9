//! Trust model: enrollment.
