//! The Debian packages and systemd units: what `cargo deb` builds lands
//! where docs/DEPLOY.md says, and every unit passes `systemd-analyze verify`.
