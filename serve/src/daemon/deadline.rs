//! Deadlines that bound whole messages, not single system calls: before each read or write the
//! socket's timeout is set to what is left, so a peer that trickles a byte at a time cannot
//! stretch a deadline (SO_RCVTIMEO / SO_SNDTIMEO alone restart with every call).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

fn timed_out(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{what} deadline passed"))
}

/// The time left until `deadline` (an error once it has passed).
fn left(deadline: Instant, what: &str) -> std::io::Result<Duration> {
    deadline.checked_duration_since(Instant::now()).filter(|d| !d.is_zero()).ok_or_else(|| timed_out(what))
}

/// The read side of a connection: an idle deadline until the next message's first bytes
/// arrive, then a deadline for the rest of that message.
pub struct ReadDeadline {
    stream: UnixStream,
    /// Deadline for the first bytes of the next message (`None`: wait forever).
    idle: Option<Instant>,
    /// How long a message may take once it has started.
    message: Duration,
    /// Deadline of the message in progress.
    current: Option<Instant>,
}

impl ReadDeadline {
    /// Wraps `stream`; a message may take `message` once started.
    pub fn new(stream: UnixStream, message: Duration) -> Self {
        Self { stream, idle: None, message, current: None }
    }

    /// Starts waiting for the next message: its first bytes must come by `idle` (`None`: no
    /// limit), and all of it within the message time after that. `whole`, when given, bounds
    /// the whole message from now (the handshake).
    pub fn next_message(&mut self, idle: Option<Instant>, whole: Option<Instant>) {
        self.idle = idle;
        self.current = whole;
    }

    /// Whether the bytes of a message have started to arrive.
    pub fn in_message(&self) -> bool {
        self.current.is_some()
    }

    /// The underlying stream.
    pub fn get_ref(&self) -> &UnixStream {
        &self.stream
    }
}

impl Read for ReadDeadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let deadline = self.current.or(self.idle);
        let timeout = match deadline {
            Some(d) => Some(left(d, if self.current.is_some() { "message" } else { "idle" })?),
            None => None,
        };
        self.stream.set_read_timeout(timeout)?;
        let n = self.stream.read(buf)?;
        if n > 0 && self.current.is_none() {
            self.current = Some(Instant::now() + self.message);
        }
        Ok(n)
    }
}

/// A writer whose every call shares one deadline (a whole frame must go out in time).
pub struct WriteDeadline<'a> {
    stream: &'a mut UnixStream,
    deadline: Instant,
}

impl<'a> WriteDeadline<'a> {
    /// Writes to `stream` until `timeout` from now.
    pub fn new(stream: &'a mut UnixStream, timeout: Duration) -> Self {
        Self { stream, deadline: Instant::now() + timeout }
    }

    fn arm(&mut self) -> std::io::Result<()> {
        let t = left(self.deadline, "write")?;
        self.stream.set_write_timeout(Some(t))
    }
}

impl Write for WriteDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write(buf)
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.arm()?;
        self.stream.write_vectored(bufs)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.stream.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trickle_cannot_stretch_a_read_deadline() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = ReadDeadline::new(a, Duration::from_millis(300));
        r.next_message(None, Some(Instant::now() + Duration::from_millis(300)));
        let writer = std::thread::spawn(move || {
            for _ in 0..20 {
                if b.write_all(b"x").is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        let t = Instant::now();
        let mut buf = [0u8; 64];
        let mut got = 0;
        let err = loop {
            match r.read(&mut buf) {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        assert!(matches!(err.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock), "{err}");
        assert!(t.elapsed() < Duration::from_millis(600), "bounded by the deadline, not per read");
        assert!(got >= 2);
        drop(r);
        writer.join().unwrap();
    }

    #[test]
    fn the_message_deadline_starts_with_its_first_bytes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut r = ReadDeadline::new(a, Duration::from_millis(200));
        r.next_message(Some(Instant::now() + Duration::from_millis(200)), None);
        let mut buf = [0u8; 8];
        let e = r.read(&mut buf).unwrap_err();
        assert!(matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock));
        r.next_message(None, None);
        b.write_all(b"ab").unwrap();
        assert_eq!(r.read(&mut buf).unwrap(), 2);
        let t = Instant::now();
        assert!(r.read(&mut buf).is_err(), "the rest of the message is due within 200 ms");
        assert!(t.elapsed() < Duration::from_millis(400));
    }
}
