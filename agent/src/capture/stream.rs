//! The sender's end of the change stream (DESIGN.md §4; INTERFACES.md
//! "Seq, resume, durability"): frames out of the change buffer, the PS's
//! resume point and durable seq in. Every durable seq the PS acknowledges
//! is noted in the dirty-extent log (its durable mark) before dirty bits
//! are cleared for it, so a PS that later resumes below it is caught.

use std::sync::Arc;

use tokio::sync::{watch, Notify};
use tracing::error;

use super::change_buffer::PendingFrame;
use super::Capture;
use crate::frame_pool::FramePool;

/// How a reconnect's `resume_seq` fits the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeOutcome {
    /// First connection since start: the stream continues at resume + 1.
    Fresh,
    /// First connection since start, but the PS resumes below the durable
    /// seq it acknowledged before (`acknowledged`, the dirty-extent log's
    /// durable mark): it lost records whose dirty bits may be cleared
    /// already. The stream continues at resume + 1 and a full resync is
    /// queued.
    Lost { acknowledged: u64 },
    /// The buffer continues the PS's stream: re-send after resume.
    Continue,
    /// The PS's stream does not fit the buffer (it lost acknowledged data or
    /// is ahead of us): the buffer was dropped and a full resync is queued.
    Reset,
}

impl Capture {
    /// The change stream as the sender, drains and the resync driver see it.
    pub fn stream(&self) -> StreamEnd<'_> {
        StreamEnd(self)
    }
}

/// The change buffer's outlet and the PS's position in the stream.
pub struct StreamEnd<'a>(&'a Capture);

impl<'a> StreamEnd<'a> {
    /// Where the sender takes wire buffers and gives back the bodies of
    /// acknowledged frames.
    pub fn frame_pool(&self) -> &'a Arc<FramePool> {
        &self.0.pool
    }

    /// Notified when the sender has something to take.
    pub fn wake(&self) -> &'a Notify {
        &self.0.wake
    }

    /// The PS's durable seq, as it changes.
    pub fn durable_watch(&self) -> watch::Receiver<u64> {
        self.0.durable.subscribe()
    }

    /// Frames ready for the sender, plus the partial frame when it has been
    /// idle long enough (or `force`). The flag says a partial frame remains.
    pub fn take_frames(&self, force: bool) -> (Vec<PendingFrame>, bool) {
        self.0.lock().buffer.take(force)
    }

    /// Hands the partial frame over now (wait_durable, shutdown, resync).
    pub fn request_flush(&self) {
        self.0.lock().buffer.flush();
        self.0.wake.notify_one();
    }

    /// The seq up to which records have been handed to the stream.
    pub fn handed_over_seq(&self) -> u64 {
        self.0.lock().order.last()
    }

    pub fn buffer_bytes(&self) -> u64 {
        self.0.lock().buffer.bytes()
    }

    pub fn buffer_limit(&self) -> u64 {
        self.0.lock().buffer.limit()
    }

    /// The PS answered a hello with `resume`.
    pub fn on_resume(&self, resume: u64) -> ResumeOutcome {
        let cap = self.0;
        let mut guard = cap.lock();
        let st = &mut *guard;
        let outcome = if !st.order.is_known() {
            st.order.resume_at(resume);
            st.buffer.durable_seq = resume;
            let acknowledged = cap.dlog.durable_mark();
            if resume < acknowledged {
                st.modes.mark_need_all("ps-lost-records");
                ResumeOutcome::Lost { acknowledged }
            } else {
                ResumeOutcome::Fresh
            }
        } else if resume > st.order.last() || resume < st.buffer.durable_seq {
            error!(
                resume_seq = resume,
                durable_seq = st.buffer.durable_seq,
                last_seq = st.order.last(),
                "the process server's stream does not continue ours (it lost acknowledged records or is ahead); \
                 dropping the change buffer and resyncing every disk"
            );
            st.buffer.reset(resume);
            st.order.resume_at(resume);
            st.modes.drop_window();
            st.modes.mark_need_all("stream-gap");
            st.modes
                .enter_bitmap("the stream must restart with a full resync", 0);
            ResumeOutcome::Reset
        } else {
            if resume > st.buffer.durable_seq {
                st.buffer.set_durable(resume, st.order.next_seq);
            }
            ResumeOutcome::Continue
        };
        let durable = st.buffer.durable_seq;
        cap.dlog.note_durable(durable);
        drop(guard);
        cap.durable.send_replace(durable);
        outcome
    }

    /// The PS holds everything up to `durable`; `freed` bytes of frames are
    /// no longer needed.
    pub fn on_durable(&self, durable: u64, freed: u64) {
        let mut st = self.0.lock();
        st.buffer.free(freed);
        let next = st.order.next_seq;
        st.buffer.set_durable(durable, next);
        let d = st.buffer.durable_seq;
        // Under the lock: a clear that sees this durable seq finds it noted.
        self.0.dlog.note_durable(d);
        drop(st);
        self.0.durable.send_replace(d);
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{make_capture, start};
    use super::*;
    use crate::dirty_log::DirtyLog;

    /// A dirty log for one 4 MiB disk in `dir` whose durable mark is `mark`.
    fn log_with_mark(dir: &std::path::Path, mark: u64) {
        let (log, _) = DirtyLog::open(&dir.join("dirty.log"), &[4]).unwrap();
        log.note_durable(mark);
        log.persist().unwrap();
    }

    #[test]
    fn a_fresh_resume_below_the_durable_mark_resyncs_every_disk() {
        let dir = tempfile::tempdir().unwrap();
        log_with_mark(dir.path(), 80);
        let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
        assert_eq!(
            cap.stream().on_resume(50),
            ResumeOutcome::Lost { acknowledged: 80 }
        );
        let b = cap.resync().next_batch().unwrap();
        assert!(b.full);
        assert_eq!(b.reason, "ps-lost-records");
        assert_eq!(b.disks, vec![(0, vec![0, 1, 2, 3])]);
    }

    /// A switch to another replication starts a new stream whose seqs have
    /// nothing to do with the old mark: the new PS resuming low is not a
    /// loss, neither now nor after a restart.
    #[test]
    fn a_switch_forgets_the_old_replications_durable_mark() {
        let dir = tempfile::tempdir().unwrap();
        log_with_mark(dir.path(), 80);
        let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
        cap.switch_replication("r2");
        assert_eq!(cap.dirty_extents().log().durable_mark(), 0);
        let (reopened, _) = DirtyLog::open(&dir.path().join("dirty.log"), &[4]).unwrap();
        assert_eq!(reopened.durable_mark(), 0, "the reset is synced");
        drop(reopened);
        assert_eq!(cap.stream().on_resume(0), ResumeOutcome::Fresh);
        let b = cap.resync().next_batch().unwrap();
        assert_eq!(b.reason, "initial", "the switch's resync, not a loss");
    }

    #[test]
    fn durable_seqs_reach_the_mark() {
        let dir = tempfile::tempdir().unwrap();
        log_with_mark(dir.path(), 80);
        let cap = make_capture(dir.path(), &[4 << 20], 64 << 20);
        // At the mark: nothing was lost.
        start(&cap, 80);
        cap.write(0, 0, &[1u8; 512], false).unwrap();
        let last = cap.stream().handed_over_seq();
        assert_eq!(last, 81);
        cap.stream().on_durable(last, 0);
        let log = cap.dirty_extents().log().clone();
        assert_eq!(log.durable_mark(), 80, "noted, synced at the next clear");
        log.persist().unwrap();
        assert_eq!(log.durable_mark(), 81);
    }
}
