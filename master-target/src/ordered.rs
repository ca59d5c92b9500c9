//! Ordered parallel work for the rollback (DESIGN.md §7 "Rollback").
//!
//! A rollback is one long sequential job that is mostly CPU: each window of
//! blocks is read and checksummed (blake3 over every 4 KiB undo record),
//! then written. Apply is stopped meanwhile, so the MT has its cores to
//! itself. [`ordered`] runs the reading and checksumming of the windows on
//! worker threads and hands the finished windows to the calling thread in
//! window order, so the files are written exactly as a single thread would
//! write them, and the crash-safety order (which writes come before which
//! fsync) is unchanged.
//!
//! The windows' buffers (MiBs each) go round through a [`BufferPool`]: the
//! MT maps every buffer that large on its own (see
//! `rebound_common::alloc`), so a fresh one per window would cost a page
//! fault per 4 KiB of every byte rolled back.

use rebound_common::alloc::BufferPool;
use std::sync::mpsc::sync_channel;

/// A pool for the buffers of one [`ordered`] run over [`WORKERS`] threads:
/// each worker's own buffers and the two results per worker in flight.
pub fn window_buffers() -> BufferPool {
    BufferPool::new(4 * WORKERS + 1)
}

/// Threads doing the reading and checksumming of one rollback: the 2 cores
/// of the reference machine (the calling thread only writes).
pub const WORKERS: usize = 2;

/// Runs `work` over `items` on up to `threads` scoped threads and `sink`
/// over the results on the calling thread, in item order. At most two
/// results per thread exist at once (one being made, one waiting). Stops at
/// the first error of `work` (in item order) or of `sink`, and returns it;
/// the workers then stop after the item they are on.
pub fn ordered<T, R, E>(
    items: Vec<T>,
    threads: usize,
    work: impl Fn(T) -> Result<R, E> + Sync,
    mut sink: impl FnMut(R) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
    R: Send,
    E: Send,
{
    let total = items.len();
    let threads = threads.clamp(1, total.max(1));
    if threads == 1 {
        for it in items {
            sink(work(it)?)?;
        }
        return Ok(());
    }
    // Worker i takes items i, i + threads, …: its channel yields them in
    // order, so reading the channels in turn restores the item order.
    let mut lists: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, it) in items.into_iter().enumerate() {
        lists[i % threads].push(it);
    }
    let work = &work;
    std::thread::scope(|s| {
        let mut results = Vec::with_capacity(threads);
        for list in lists {
            let (tx, rx) = sync_channel::<Result<R, E>>(1);
            s.spawn(move || {
                for it in list {
                    let r = work(it);
                    let failed = r.is_err();
                    // A closed channel: the caller stopped.
                    if tx.send(r).is_err() || failed {
                        return;
                    }
                }
            });
            results.push(rx);
        }
        for i in 0..total {
            // A worker ends early only after sending an error, which stops
            // this loop first; a panic in `work` surfaces when the scope
            // joins it.
            let Ok(r) = results[i % threads].recv() else {
                break;
            };
            sink(r?)?;
        }
        // Dropping the receivers stops the workers before the scope joins.
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn results_come_in_item_order() {
        for threads in [1, 2, 3, 8] {
            let mut seen = Vec::new();
            let r: Result<(), ()> = ordered(
                (0..25u64).collect(),
                threads,
                |i| {
                    // Later items finish first on some threads.
                    std::thread::sleep(std::time::Duration::from_micros((25 - i) * 50));
                    Ok(i * 10)
                },
                |v| {
                    seen.push(v);
                    Ok(())
                },
            );
            assert!(r.is_ok());
            assert_eq!(
                seen,
                (0..25).map(|i| i * 10).collect::<Vec<_>>(),
                "{threads} threads"
            );
        }
    }

    #[test]
    fn the_first_error_stops_everything() {
        let worked = AtomicUsize::new(0);
        let mut sunk = Vec::new();
        let r = ordered(
            (0..100u32).collect(),
            2,
            |i| {
                worked.fetch_add(1, Ordering::Relaxed);
                if i == 7 {
                    Err(format!("item {i}"))
                } else {
                    Ok(i)
                }
            },
            |v| {
                sunk.push(v);
                Ok(())
            },
        );
        assert_eq!(r, Err("item 7".to_string()));
        assert_eq!(
            sunk,
            (0..7).collect::<Vec<_>>(),
            "nothing after the error is written"
        );
        assert!(worked.load(Ordering::Relaxed) < 100, "the workers stopped");

        let mut sunk = Vec::new();
        let r = ordered((0..100u32).collect(), 2, Ok::<u32, String>, |v| {
            if v == 3 {
                return Err("sink 3".into());
            }
            sunk.push(v);
            Ok(())
        });
        assert_eq!(r, Err("sink 3".to_string()));
        assert_eq!(sunk, vec![0, 1, 2]);
    }
}
