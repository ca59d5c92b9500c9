//! The master target: apply, retention journal, recovery points, views, rollback
