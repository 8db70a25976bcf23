//! A connection's replies, written in batches by whichever of its threads finds the socket
//! free (flat combining).
//!
//! At queue depth 32 a connection has up to 32 threads finishing requests at once. With one
//! lock around the socket, each waited for the others' `send` calls, spinning and yielding in
//! the lock (a quarter of the server's CPU in 4 KiB random writes was `sched_yield` from that
//! lock). Here a thread queues its reply and, if no thread is writing, writes everything
//! queued (its own reply and what others queue meanwhile) with one vectored write per batch;
//! otherwise it returns at once and the writing thread sends its reply. Replies still leave
//! whole and in the order they were queued.

use std::io::{self, IoSlice, Write};

use parking_lot::Mutex;

use super::reply::Frame;

/// Frames per vectored write (Linux's `IOV_MAX` is 1024).
const MAX_FRAMES_PER_WRITE: usize = 256;
/// Bytes per vectored write, past its first frame: READ replies' budget grants go back after
/// each write, not after a whole batch of large replies.
const MAX_BYTES_PER_WRITE: usize = 256 << 10;

/// The write side of a connection's socket and the replies waiting for it. `H` is what a
/// reply holds until it is on the socket (its request's budget grants).
pub(super) struct ReplyWriter<W, H> {
    /// Locked only by the thread that is writing, so never contended.
    socket: Mutex<W>,
    queue: Mutex<Queue<H>>,
}

struct Queue<H> {
    ready: Vec<(Frame, H)>,
    /// A thread is writing: it takes whatever is queued before it stops.
    writing: bool,
}

impl<W: Write, H> ReplyWriter<W, H> {
    pub(super) fn new(socket: W) -> Self {
        ReplyWriter { socket: Mutex::new(socket), queue: Mutex::new(Queue { ready: Vec::new(), writing: false }) }
    }

    /// Queues a reply, and writes the queue if no other thread is writing it. `hold` is
    /// dropped once its frame is on the socket, or when a write failed. An error is the
    /// socket's: the frames of the failed batch and those queued behind it are dropped, as
    /// the connection is over.
    pub(super) fn send(&self, frame: Frame, hold: H) -> io::Result<()> {
        let mut queue = self.queue.lock();
        queue.ready.push((frame, hold));
        if queue.writing {
            return Ok(());
        }
        queue.writing = true;
        let mut batch = Vec::new();
        loop {
            std::mem::swap(&mut batch, &mut queue.ready);
            if batch.is_empty() {
                queue.writing = false;
                return Ok(());
            }
            drop(queue);
            let written = self.write_batch(&mut batch);
            queue = self.queue.lock();
            if let Err(e) = written {
                queue.ready.clear();
                queue.writing = false;
                return Err(e);
            }
        }
    }
}

impl<W: Write, H> ReplyWriter<W, H> {
    /// Writes and empties `batch`, each frame whole and in order, dropping each group's holds
    /// (outside the queue's lock) as soon as the group is on the socket.
    fn write_batch(&self, batch: &mut Vec<(Frame, H)>) -> io::Result<()> {
        let mut socket = self.socket.lock();
        let result = loop {
            let Some((first, _)) = batch.first() else { break Ok(()) };
            let mut end = 1;
            let mut bytes = first.bytes().len();
            while end < batch.len()
                && end < MAX_FRAMES_PER_WRITE
                && bytes + batch[end].0.bytes().len() <= MAX_BYTES_PER_WRITE
            {
                bytes += batch[end].0.bytes().len();
                end += 1;
            }
            if let Err(e) = write_frames(&mut *socket, &batch[..end]) {
                break Err(e);
            }
            drop(batch.drain(..end));
        };
        batch.clear();
        result
    }
}

/// Writes every frame whole, in order, in as few system calls as the socket allows.
fn write_frames<W: Write, H>(out: &mut W, frames: &[(Frame, H)]) -> io::Result<()> {
    let mut slices: Vec<IoSlice<'_>> = frames.iter().map(|(f, _)| IoSlice::new(f.bytes())).collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        match out.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Counts holds dropped, as the budgets count slots given back.
    struct Hold(Arc<AtomicUsize>);

    impl Drop for Hold {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn replies_of_many_threads_arrive_whole_and_every_hold_is_released() {
        const THREADS: usize = 8;
        const PER_THREAD: usize = 500;
        let (ours, mut client) = UnixStream::pair().unwrap();
        let writer = Arc::new(ReplyWriter::new(ours));
        let released = Arc::new(AtomicUsize::new(0));
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            client.read_to_end(&mut all).unwrap();
            all
        });
        let senders: Vec<_> = (0..THREADS)
            .map(|t| {
                let (writer, released) = (Arc::clone(&writer), Arc::clone(&released));
                std::thread::spawn(move || {
                    for i in 0..PER_THREAD {
                        // Each frame: 16 bytes naming its thread and number, then (for some)
                        // a long tail, so partial writes happen.
                        let mut bytes = [[t as u8; 8], (i as u64).to_le_bytes()].concat();
                        if i % 7 == 0 {
                            bytes.extend(std::iter::repeat_n(t as u8, 64 << 10));
                        }
                        writer.send(Frame::Bytes(bytes), Hold(Arc::clone(&released))).unwrap();
                    }
                })
            })
            .collect();
        senders.into_iter().for_each(|s| s.join().unwrap());
        assert_eq!(released.load(Ordering::SeqCst), THREADS * PER_THREAD);
        drop(writer);
        let all = reader.join().unwrap();
        // Walk the stream: frames whole, each thread's in its own order.
        let mut next = [0u64; THREADS];
        let mut at = 0;
        while at < all.len() {
            let t = all[at] as usize;
            assert!(all[at..at + 8].iter().all(|&b| b as usize == t), "a frame was cut into at {at}");
            let i = u64::from_le_bytes(all[at + 8..at + 16].try_into().unwrap());
            assert_eq!(i, next[t], "thread {t}'s frames out of order");
            next[t] += 1;
            at += 16;
            if i % 7 == 0 {
                assert!(all[at..at + (64 << 10)].iter().all(|&b| b as usize == t), "a tail was cut into");
                at += 64 << 10;
            }
        }
        assert_eq!(next, [PER_THREAD as u64; THREADS]);
    }

    #[test]
    fn a_failed_write_is_reported_and_releases_what_was_queued() {
        let (ours, client) = UnixStream::pair().unwrap();
        drop(client);
        let writer = ReplyWriter::new(ours);
        let released = Arc::new(AtomicUsize::new(0));
        let err = writer.send(Frame::Bytes(vec![1; 16]), Hold(Arc::clone(&released))).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(released.load(Ordering::SeqCst), 1);
    }
}
