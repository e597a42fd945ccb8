//! Request framing: one line per request, with a hard length limit. A line
//! longer than the limit is refused whole, once (never cut into pieces that
//! each run as a request).

use std::io::{BufRead, ErrorKind};

/// One read from a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete line (without its newline).
    Line(Vec<u8>),
    /// The line grew past the limit before its newline.
    TooLong,
    /// The peer closed the connection (a last line without newline is
    /// returned as `Line` first).
    Eof,
}

/// Read one line of at most `max` bytes (newline excluded) from `r`.
pub fn read_frame(r: &mut impl BufRead, max: usize) -> std::io::Result<Frame> {
    let mut line = Vec::new();
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok(if line.is_empty() {
                Frame::Eof
            } else {
                Frame::Line(line)
            });
        }
        let (take, done) = match buf.iter().position(|b| *b == b'\n') {
            Some(i) => (i, true),
            None => (buf.len(), false),
        };
        if line.len() + take > max {
            return Ok(Frame::TooLong);
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(if done { take + 1 } else { take });
        if done {
            return Ok(Frame::Line(line));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufReader, Cursor};

    #[test]
    fn lines_eof_and_too_long() {
        let mut r = BufReader::with_capacity(7, Cursor::new(b"ab\n\ncdef\nghi".to_vec()));
        assert_eq!(read_frame(&mut r, 4).unwrap(), Frame::Line(b"ab".to_vec()));
        assert_eq!(read_frame(&mut r, 4).unwrap(), Frame::Line(vec![]));
        assert_eq!(
            read_frame(&mut r, 4).unwrap(),
            Frame::Line(b"cdef".to_vec())
        );
        assert_eq!(read_frame(&mut r, 4).unwrap(), Frame::Line(b"ghi".to_vec()));
        assert_eq!(read_frame(&mut r, 4).unwrap(), Frame::Eof);
        let mut long = vec![b' '; 100];
        long.extend_from_slice(b"{\"cmd\":\"pause\"}\n");
        let mut r = BufReader::with_capacity(16, Cursor::new(long));
        assert_eq!(read_frame(&mut r, 64).unwrap(), Frame::TooLong);
    }
}
