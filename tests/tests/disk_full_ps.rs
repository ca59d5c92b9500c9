//! ENOSPC at the process server's cache: an event, backpressure, nothing
//! acknowledged lost, and replication resumes by itself when space returns.
//!
//! The PS's cache directory is a 16 MiB tmpfs (the test needs root to mount
//! it), filled with a ballast file until almost nothing is free; the agent
//! keeps writing. The PS must then stop reading the agent's stream (no
//! refusals, no acknowledgement of what it could not store) so the agent
//! falls back to bitmap mode, say why (`disk-full`, naming the replication
//! and the path), and resume once the ballast is deleted.

use crate::support::{fill_leaving, lines_with, Tmpfs};
use rebound_lab::*;
use std::time::Duration;

/// Waits until the agent's mode is `mode` ("bitmap", "data").
fn wait_mode(lab: &Lab, mode: &str, within: Duration) {
    wait_until(&format!("the agent in {mode} mode"), within, || {
        lab.agent_status()
            .map(|s| s["mode"] == mode)
            .unwrap_or(false)
    })
    .unwrap();
}

#[test]
fn ps_cache_enospc_backpressure_then_resume() {
    let mut lab = Lab::new(LabOptions {
        agent_buffer_bytes: 8 << 20,
        ..LabOptions::default()
    })
    .unwrap();
    // Frames stored raw, so the writes below take their size in the cache.
    let ps_toml = lab.config_path(Component::Ps);
    let config = std::fs::read_to_string(&ps_toml).unwrap();
    assert!(config.contains("compression_level = 1"), "{config}");
    std::fs::write(
        &ps_toml,
        config.replace("compression_level = 1", "compression_level = 0"),
    )
    .unwrap();
    let cache = lab.path("ps-cache");
    let _tmpfs = Tmpfs::mount(&cache, "16m", "a small, fillable PS cache disk");
    lab.start_all().unwrap();
    let (before_id, before_seq, before_hash) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(before_seq, Duration::from_secs(60))
        .unwrap();

    // The cache's disk fills while the MT applies nothing new (stopped),
    // so no trimming frees space either.
    lab.stop(Component::Mt).unwrap();
    let ballast = cache.join("ballast");
    fill_leaving(&ballast, 256 << 10);
    let refused_before = lines_with(&lab.log(Component::Ps), "agent stream refused");
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(7);
    // ~20 MiB of writes: far more than the free space and the agent's buffer.
    for _ in 0..5 {
        qemu_io(&uri, &random_writes(&mut rng, 64 << 20, 32)).unwrap();
    }
    wait_until(
        "the PS reports its full disk",
        Duration::from_secs(30),
        || lab.log(Component::Ps).contains("disk-full"),
    )
    .unwrap_or_else(|e| panic!("{e}; PS log tail:\n{}", lab.log_tail(Component::Ps, 30)));
    wait_mode(&lab, "bitmap", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let log = lab.log(Component::Ps);
    assert_eq!(
        lines_with(&log, "agent stream refused"),
        refused_before,
        "the PS refused the agent's stream on a full disk instead of pausing it; PS log tail:\n{}",
        lab.log_tail(Component::Ps, 30)
    );
    let line = log
        .lines()
        .find(|l| l.contains("disk-full"))
        .unwrap()
        .to_string();
    assert!(
        line.contains(&cache.display().to_string()) && line.contains("replication"),
        "the disk-full report names neither the cache path nor the replication: {line}"
    );
    eprintln!("the PS on a full cache disk: {line}");

    // Space returns: the PS stores what it held back by itself (the MT is
    // still down), and once the MT is back nothing was lost.
    std::fs::remove_file(&ballast).unwrap();
    wait_until(
        "the PS storing again once space returned",
        Duration::from_secs(30),
        || lab.log(Component::Ps).contains("disk space returned"),
    )
    .unwrap_or_else(|e| panic!("{e}; PS log tail:\n{}", lab.log_tail(Component::Ps, 30)));
    lab.start(Component::Mt).unwrap();
    wait_mode(&lab, "data", Duration::from_secs(120));
    let (id, seq, h) = lab.tag_hash("crash").unwrap();
    assert_eq!(
        lab.applied_point_hash(&id, seq, Duration::from_secs(120))
            .unwrap(),
        h,
        "the point after the full disk differs from the source"
    );
    assert_eq!(
        lab.point_hash("disk0", &before_id).unwrap(),
        before_hash,
        "the point before the full disk changed"
    );
}
