//! The guest console's way out: a bounded buffer that a writer thread drains
//! into the real sink (stdout or a file), so a vCPU never waits for the reader.
//!
//! A vCPU that writes a byte to the UART only appends it here. When the reader
//! is slow the buffer absorbs bursts (a whole kernel boot log fits many times);
//! when it is full, or the reader is gone (a closed pipe), bytes are dropped and
//! counted instead of stalling the guest. [`Console::finish`] gives the writer a
//! bounded time to drain at the end of a run and says what was written and lost.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

/// Default buffer size: 4 MiB.
pub const DEFAULT_CAPACITY: usize = 4 << 20;
/// Most bytes one write to the sink carries.
const CHUNK: usize = 64 << 10;

/// What the console did over a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ConsoleStats {
    /// Bytes the sink accepted.
    pub bytes_written: u64,
    /// Bytes dropped: the buffer was full, the sink failed, or it had not taken
    /// them when the run ended.
    pub bytes_dropped: u64,
    /// The sink's error, if it failed (e.g. a closed pipe).
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    buf: VecDeque<u8>,
    /// Bytes the writer took out of `buf` and is writing now.
    in_flight: usize,
    capacity: usize,
    stats: ConsoleStats,
    /// No more bytes will come.
    closed: bool,
    /// The writer thread has ended.
    done: bool,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The writer side a vCPU uses: [`Write`] that never blocks on the sink.
#[derive(Debug, Clone)]
pub struct ConsoleWriter(Arc<Shared>);

impl Write for ConsoleWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut st = self.0.lock();
        if st.closed || st.stats.error.is_some() {
            st.stats.bytes_dropped += bytes.len() as u64;
            return Ok(bytes.len());
        }
        let room = st.capacity.saturating_sub(st.buf.len() + st.in_flight);
        let take = room.min(bytes.len());
        st.buf.extend(&bytes[..take]);
        st.stats.bytes_dropped += (bytes.len() - take) as u64;
        drop(st);
        self.0.cv.notify_all();
        Ok(bytes.len())
    }

    /// Does not wait for the sink: [`Console::finish`] does, with a bound.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The console: owns the writer thread.
#[derive(Debug)]
pub struct Console {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Console {
    /// Start the writer thread over `sink` with a buffer of `capacity` bytes.
    pub fn spawn(
        sink: Box<dyn Write + Send>,
        capacity: usize,
    ) -> io::Result<(Console, ConsoleWriter)> {
        let shared = Arc::new(Shared::default());
        shared.lock().capacity = capacity.max(1);
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || drain(&s, sink))?;
        Ok((
            Console {
                shared: shared.clone(),
                thread: Some(thread),
            },
            ConsoleWriter(shared),
        ))
    }

    /// No more output: let the writer drain for at most `timeout`, then count
    /// whatever it has not written as dropped.
    pub fn finish(mut self, timeout: Duration) -> ConsoleStats {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.closed = true;
        self.shared.cv.notify_all();
        while !st.done {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            st = self
                .shared
                .cv
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        let done = st.done;
        // From here the writer thread, if it ever returns, adds nothing.
        st.done = true;
        let left = (st.buf.len() + st.in_flight) as u64;
        st.buf.clear();
        st.stats.bytes_dropped += left;
        let stats = st.stats.clone();
        drop(st);
        if done {
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
        } else {
            log::warn!(
                "the console's reader did not take the last {left} bytes within {timeout:?}; dropped"
            );
        }
        stats
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.cv.notify_all();
        // The thread ends once the buffer is empty; it is not waited for here:
        // a stuck reader must not hold up the VMM.
    }
}

/// The writer thread: take up to [`CHUNK`] bytes at a time and write them out
/// with the lock released.
fn drain(s: &Shared, mut sink: Box<dyn Write + Send>) {
    let mut chunk = Vec::with_capacity(CHUNK);
    loop {
        let mut st = s.lock();
        while st.buf.is_empty() && !st.closed {
            st = s.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        if st.buf.is_empty() {
            st.done = true;
            drop(st);
            s.cv.notify_all();
            let _ = sink.flush();
            return;
        }
        let n = st.buf.len().min(CHUNK);
        chunk.clear();
        chunk.extend(st.buf.drain(..n));
        st.in_flight = n;
        drop(st);
        let r = sink.write_all(&chunk).and_then(|_| sink.flush());
        let mut st = s.lock();
        if st.done {
            // `finish` gave up on this chunk and counted it as dropped.
            return;
        }
        st.in_flight = 0;
        match r {
            Ok(()) => st.stats.bytes_written += n as u64,
            Err(e) => {
                // The reader is gone: count this chunk and everything after it as dropped.
                st.stats.bytes_dropped += (n + st.buf.len()) as u64;
                st.buf.clear();
                st.stats.error = Some(e.to_string());
                st.done = true;
                drop(st);
                s.cv.notify_all();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// A sink that blocks until `release` is dropped or sent to, then fails or keeps the bytes.
    struct Blocking {
        release: mpsc::Receiver<()>,
        got: Arc<Mutex<Vec<u8>>>,
    }
    impl Write for Blocking {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _ = self.release.recv();
            self.got.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Broken;
    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_reader_never_blocks_the_writer() {
        let (tx, rx) = mpsc::channel();
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = Blocking {
            release: rx,
            got: got.clone(),
        };
        let (console, w) = Console::spawn(Box::new(sink), 64 << 10).unwrap();
        // 1 MiB written while the reader takes nothing: every write returns.
        let (done_tx, done_rx) = mpsc::channel();
        let mut w2 = w.clone();
        std::thread::spawn(move || {
            for _ in 0..1024 {
                w2.write_all(&[b'x'; 1024]).unwrap();
            }
            done_tx.send(()).unwrap();
        });
        done_rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the guest side blocked on a stalled reader");
        // The reader wakes up: what was buffered arrives, the overflow was counted.
        for _ in 0..64 {
            let _ = tx.send(());
        }
        drop(tx);
        let stats = console.finish(Duration::from_secs(10));
        let written = got.lock().unwrap().len() as u64;
        assert_eq!(stats.bytes_written, written);
        assert_eq!(stats.bytes_written + stats.bytes_dropped, 1 << 20);
        assert!(stats.bytes_dropped >= (1 << 20) - (64 << 10) - CHUNK as u64);
        assert!(stats.bytes_written > 0);
    }

    #[test]
    fn everything_arrives_in_order_when_the_reader_keeps_up() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        drop(tx); // recv() fails at once: the sink never waits
        let sink = Blocking {
            release: rx,
            got: got.clone(),
        };
        let (console, mut w) = Console::spawn(Box::new(sink), DEFAULT_CAPACITY).unwrap();
        let text: Vec<u8> = (0..200_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        for piece in text.chunks(7) {
            w.write_all(piece).unwrap();
        }
        let stats = console.finish(Duration::from_secs(10));
        assert_eq!(stats.bytes_dropped, 0);
        assert_eq!(stats.bytes_written, text.len() as u64);
        assert_eq!(*got.lock().unwrap(), text);
    }

    #[test]
    fn a_gone_reader_is_counted_not_fatal() {
        let (console, mut w) = Console::spawn(Box::new(Broken), 1024).unwrap();
        w.write_all(b"hello\n").unwrap();
        // Wait for the writer to meet the error, then keep writing.
        while console.shared.lock().stats.error.is_none() {
            std::thread::sleep(Duration::from_millis(1));
        }
        w.write_all(&[0; 5000]).unwrap();
        let stats = console.finish(Duration::from_secs(5));
        assert_eq!(stats.bytes_written, 0);
        assert_eq!(stats.bytes_dropped, 5006);
        assert!(stats.error.unwrap().contains("pipe"));
    }

    #[test]
    fn finish_is_bounded_when_the_reader_never_returns() {
        let (_tx, rx) = mpsc::channel::<()>();
        let sink = Blocking {
            release: rx,
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let (console, mut w) = Console::spawn(Box::new(sink), 1 << 20).unwrap();
        w.write_all(&[1; 100_000]).unwrap();
        let stats = console.finish(Duration::from_millis(200));
        assert_eq!(stats.bytes_written, 0);
        // The chunk the writer holds and what stayed buffered.
        assert_eq!(stats.bytes_dropped, 100_000);
    }
}
