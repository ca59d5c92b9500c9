//! Retention: points older than the window disappear; the size cap shrinks
//! the window and says so in the log. Older points that remain stay exact.

use rebound_lab::*;
use std::time::Duration;

/// Waits up to 30 s for retention to drop point `id` (`what` names the wait
/// in the failure).
fn wait_point_dropped(lab: &Lab, id: &str, what: &str) {
    wait_until(what, Duration::from_secs(30), || {
        lab.points()
            .map(|(p, _)| !p.iter().any(|p| p.id == id))
            .unwrap_or(false)
    })
    .unwrap();
}

#[test]
fn window_drops_old_points() {
    let mut lab = Lab::new(LabOptions {
        retention: RetentionConfig {
            window_secs: 3,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    lab.start_all().unwrap();
    let uri = lab.agent_uri("disk0");
    let mut rng = Rng::new(1);
    qemu_io(&uri, &random_writes(&mut rng, 64 << 20, 20)).unwrap();
    let (old, s) = lab.tag("crash").unwrap();
    lab.wait_applied(s, Duration::from_secs(60)).unwrap();
    assert!(lab.points().unwrap().0.iter().any(|p| p.id == old));
    std::thread::sleep(Duration::from_secs(4));
    qemu_io(&uri, &random_writes(&mut rng, 64 << 20, 20)).unwrap();
    let (new, s, h) = lab.tag_hash("crash").unwrap();
    lab.wait_applied(s, Duration::from_secs(60)).unwrap();
    wait_point_dropped(&lab, &old, "the old point to leave the window");
    assert_eq!(lab.point_hash("disk0", &new).unwrap(), h);
}

#[test]
fn size_cap_shrinks_the_window_and_logs_it() {
    let mut lab = Lab::new(LabOptions {
        retention: RetentionConfig {
            max_bytes: 6 << 20,
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    lab.start_all().unwrap();
    let uri = lab.agent_uri("disk0");
    let mut ids = Vec::new();
    let mut hashes = Vec::new();
    for i in 0..6u64 {
        // 4 MiB of overwrites per interval → ~4 MiB of undo each.
        let cmds: Vec<String> = (0..4)
            .map(|k| format!("write -P {} {} 1048576", i + 1, k << 20))
            .collect();
        qemu_io(&uri, &cmds).unwrap();
        let (id, _) = lab.tag("crash").unwrap();
        ids.push(id);
        hashes.push(lab.source_hash(0).unwrap());
    }
    let (_, s) = lab.tag("crash").unwrap();
    lab.wait_applied(s, Duration::from_secs(60)).unwrap();
    wait_point_dropped(&lab, &ids[0], "the size cap to drop old points");
    let log = lab.log(Component::Mt);
    assert!(
        log.contains("window shrank"),
        "MT log should say the window shrank:\n{}",
        lab.log_tail(Component::Mt, 20)
    );
    // Whatever survived is still exact.
    let (points, _) = lab.points().unwrap();
    let mut kept = 0;
    for (id, h) in ids.iter().zip(&hashes) {
        if points.iter().any(|p| &p.id == id) {
            assert_eq!(
                &lab.point_hash("disk0", id).unwrap(),
                h,
                "surviving point {id}"
            );
            kept += 1;
        }
    }
    assert!(kept >= 1, "the cap should keep the newest points");
}
