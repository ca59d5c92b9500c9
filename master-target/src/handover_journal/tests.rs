//! The hand-over journal at the MT: made at hand-over (and not emptied by a
//! re-run), named to the hooks, PowerOff (hook, fence, restore, delete),
//! the refusals while the machine's writes are in the replica, and commit.

use crate::config::HooksConfig;
use crate::error::MtError;
use crate::replication::Replication;
use crate::tests::{applied_history, check_latest, open_store, Gen, SIZES};
use rebound_common::handover_journal::{
    has_records, read_state, JournalError, JournalState, JournalWriter,
};
use std::os::unix::fs::FileExt;
use std::time::Duration;

fn hooks(power_on: &str, power_off: &str, timeout: u64) -> HooksConfig {
    HooksConfig {
        power_on: power_on.into(),
        power_off: power_off.into(),
        hook_timeout_secs: timeout,
        ..HooksConfig::default()
    }
}

/// The failed-over machine's agent on disk `disk`: opens its journal.
fn agent(r: &Replication, disk: u32) -> JournalWriter {
    let path = r.handover_journal_path(&format!("disk{disk}"));
    JournalWriter::open(&path, SIZES[disk as usize]).unwrap()
}

/// The machine writes `len` bytes of `byte` at `offset`, as its agent
/// does: pre-images first.
fn machine_writes(
    r: &Replication,
    w: &mut JournalWriter,
    disk: u32,
    offset: u64,
    len: usize,
    byte: u8,
) {
    let path = r.root().join(format!("replica/disk{disk}.img"));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    w.save_before_write(&f, offset, len as u64).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
}

fn state(r: &Replication, disk: u32) -> JournalState {
    read_state(&r.handover_journal_path(&format!("disk{disk}")))
        .unwrap()
        .0
}

/// An agent started now on disk `disk` is refused: its journal is not open.
fn agent_refused(r: &Replication, disk: u32) {
    let path = r.handover_journal_path(&format!("disk{disk}"));
    let e = JournalWriter::open(&path, SIZES[disk as usize]).unwrap_err();
    assert!(matches!(e, JournalError::NotOpen { .. }), "{e}");
}

fn is_precondition(e: &MtError, has: &str) {
    assert!(matches!(e, MtError::FailedPrecondition(_)), "{e:?}");
    assert!(e.to_string().contains(has), "{e}");
}

#[test]
fn change_point_after_the_machine_wrote_is_exact() {
    let (g, dir, _s, r) = applied_history(11, 40);
    r.rollback("p2").unwrap();
    let env_file = dir.path().join("env");
    let h = hooks(
        "exit 0",
        &format!(
            "env | grep ^REBOUND_ | LC_ALL=C sort > {}",
            env_file.display()
        ),
        5,
    );
    r.hand_over(true, &h).unwrap();
    let j0 = r.handover_journal_path("disk0");
    let j1 = r.handover_journal_path("disk1");
    assert!(j0.exists() && j1.exists());
    assert!(!has_records(&j0).unwrap());
    // The machine runs and writes both disks (twice over one block).
    let (mut w0, mut w1) = (agent(&r, 0), agent(&r, 1));
    machine_writes(&r, &mut w0, 0, 4096, 3 * 4096, 0xAA);
    machine_writes(&r, &mut w0, 0, 8192, 4096, 0xBB);
    machine_writes(&r, &mut w1, 1, 0, 4096, 0xCC);
    // A re-run of the hand-over keeps what the journals hold.
    r.hand_over(true, &h).unwrap();
    assert!(has_records(&j0).unwrap());
    // Views refuse; undoing the hand-over refuses while the agent holds its
    // journals.
    let mut buf = vec![0u8; 4096];
    is_precondition(
        &r.read_at_point(0, 0, &mut buf, Some("p1")).unwrap_err(),
        "power the machine off",
    );
    is_precondition(
        &r.chunk_hashes_at_point("p1", 1, 0, 4096, 1).unwrap_err(),
        "power the machine off",
    );
    is_precondition(
        &r.restore_pre_images().unwrap_err(),
        "still runs on its replica",
    );
    assert!(r.handed_over().is_some());
    // The agent stops (released by the power_off hook in real life).
    drop((w0, w1));
    is_precondition(&r.restore_pre_images().unwrap_err(), "run PowerOff first");
    let rep = r.power_off(&h).unwrap();
    assert_eq!(rep.blocks_restored, 4);
    assert!(rep.power_off.unwrap().success);
    // Fenced, not deleted: an agent started now refuses.
    assert_eq!(
        (state(&r, 0), state(&r, 1)),
        (JournalState::Fenced, JournalState::Fenced)
    );
    agent_refused(&r, 0);
    let env = std::fs::read_to_string(&env_file).unwrap();
    assert!(
        env.contains(&format!(
            "REBOUND_JOURNALS={} {}\n",
            j0.display(),
            j1.display()
        )),
        "{env}"
    );
    assert!(
        env.contains(&format!("REBOUND_JOURNAL_DISK1={}\n", j1.display())),
        "{env}"
    );
    assert!(env.contains("REBOUND_POINT=p2\n"), "{env}");
    check_latest(&r, g.snap("p2"));
    // Idempotent.
    assert_eq!(r.power_off(&h).unwrap().blocks_restored, 0);
    // Then change-point as before: restore, another point, hand over.
    r.restore_pre_images().unwrap();
    check_latest(&r, &g.disks);
    assert_eq!(state(&r, 1), JournalState::Fenced);
    agent_refused(&r, 1);
    r.rollback("p1").unwrap();
    r.hand_over(true, &h).unwrap();
    assert_eq!(state(&r, 0), JournalState::Open);
    assert!(!has_records(&j0).unwrap());
    check_latest(&r, g.snap("p1"));
}

#[test]
fn power_off_fences_a_running_agent() {
    let (_g, _dir, _s, r) = applied_history(12, 40);
    r.hand_over(false, &hooks("", "", 1)).unwrap();
    let mut w = agent(&r, 0);
    machine_writes(&r, &mut w, 0, 0, 4096, 1);
    // The hook does not stop the agent: the fence times out, nothing changes.
    let e = r
        .power_off(&hooks("", "echo cannot reach the hypervisor; exit 1", 1))
        .unwrap_err();
    is_precondition(&e, "the machine still runs on its replica");
    assert!(
        e.to_string()
            .contains(&r.handover_journal_path("disk0").display().to_string()),
        "{e}"
    );
    assert!(e.to_string().contains("cannot reach the hypervisor"), "{e}");
    assert!(e.to_string().contains("fix the power_off hook"), "{e}");
    assert!(has_records(&r.handover_journal_path("disk0")).unwrap());
    // An agent that stops while the MT waits is fenced.
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        drop(w);
    });
    assert_eq!(
        r.power_off(&hooks("", "true", 10)).unwrap().blocks_restored,
        1
    );
    t.join().unwrap();
}

#[test]
fn commit_keeps_what_the_machine_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let (s, r) = open_store(dir.path());
    let mut g = Gen::new(5);
    g.write(0, 0, SIZES[0], false);
    g.tag("p0");
    crate::tests::apply_range(&r, &g, 1, g.seq(), 10);
    r.hand_over(false, &HooksConfig::default()).unwrap();
    let mut w = agent(&r, 0);
    machine_writes(&r, &mut w, 0, 0, 4096, 0x5A);
    s.end_replication(r.id(), true).unwrap();
    assert_eq!(state(&r, 0), JournalState::Committed);
    assert!(!has_records(&r.handover_journal_path("disk0")).unwrap());
    // The running agent notices its journal was replaced by a committed one.
    assert!(!w.is_at_path().unwrap());
    agent_refused(&r, 0);
    let mut want = g.disks.clone();
    want[0][..4096].fill(0x5A);
    let got = std::fs::read(r.root().join("replica/disk0.img")).unwrap();
    assert_eq!(got, want[0]);
}

#[test]
fn power_off_is_a_no_op_when_not_handed_over_so_a_change_point_can_be_retried() {
    let (g, _dir, _s, r) = applied_history(13, 40);
    let h = hooks("", "echo ran >&2; exit 1", 1);
    // Never handed over: nothing to power off, no hook.
    let rep = r.power_off(&h).unwrap();
    assert_eq!((rep.blocks_restored, rep.power_off), (0, None));
    r.rollback("p2").unwrap();
    r.hand_over(false, &h).unwrap();
    let mut w = agent(&r, 0);
    machine_writes(&r, &mut w, 0, 0, 4096, 0x11);
    drop(w);
    assert_eq!(r.power_off(&h).unwrap().blocks_restored, 1);
    // Twice, and again after RestorePreImages (a change-point retried after
    // it failed later on): ok, nothing more to restore.
    assert_eq!(r.power_off(&h).unwrap().blocks_restored, 0);
    r.restore_pre_images().unwrap();
    let rep = r.power_off(&h).unwrap();
    assert_eq!((rep.blocks_restored, rep.power_off), (0, None));
    check_latest(&r, &g.disks);
    assert_eq!(state(&r, 0), JournalState::Fenced);
}

#[test]
fn views_are_refused_when_a_journal_cannot_be_read() {
    let (_g, _dir, _s, r) = applied_history(14, 40);
    r.hand_over(false, &hooks("", "", 1)).unwrap();
    let mut buf = vec![0u8; 4096];
    r.read_at_point(0, 0, &mut buf, Some("p1")).unwrap();
    std::fs::write(r.handover_journal_path("disk1"), b"garbage").unwrap();
    is_precondition(
        &r.read_at_point(0, 0, &mut buf, Some("p1")).unwrap_err(),
        "cannot be read",
    );
}

#[test]
fn power_off_of_a_journal_damaged_before_its_tail_is_data_loss() {
    let (_g, _dir, _s, r) = applied_history(15, 40);
    r.hand_over(false, &hooks("", "", 1)).unwrap();
    let mut w = agent(&r, 0);
    machine_writes(&r, &mut w, 0, 0, 4096, 0x21);
    machine_writes(&r, &mut w, 0, 65536, 4096, 0x22);
    drop(w);
    let j = r.handover_journal_path("disk0");
    let f = std::fs::OpenOptions::new().write(true).open(&j).unwrap();
    let at = rebound_common::handover_journal::HEADER_LEN + 60;
    f.write_all_at(&[0xEE], at).unwrap();
    let e = r.power_off(&hooks("", "", 1)).unwrap_err();
    assert!(matches!(e, MtError::DataLoss(_)), "{e:?}");
    let msg = e.to_string();
    assert!(
        msg.contains(&j.display().to_string()) && msg.contains("cannot be restored exactly"),
        "{msg}"
    );
    assert_eq!(
        state(&r, 0),
        JournalState::Open,
        "nothing fenced over a damaged journal"
    );
}
