//! A seeded fault proxy between agent and PS and between PS and MT cuts,
//! stalls, delays and truncates the links under load: replication resumes by
//! itself and every point stays exact.
