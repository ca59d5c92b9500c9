//! The sender's end of the change stream (DESIGN.md §4; INTERFACES.md
//! "Seq, resume, durability"): frames out of the change buffer, the PS's
//! resume point and durable seq in.

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
            ResumeOutcome::Fresh
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
        drop(st);
        self.0.durable.send_replace(d);
    }
}
