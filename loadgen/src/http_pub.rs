//! Publishing over HTTP for raw-ws fan-out (`fanout --publish-url`): servers such as
//! nchan take a room's messages as `POST <url>/<room>` while their members listen on
//! WebSockets.
//!
//! Each publisher holds one keep-alive connection. Requests go out in schedule order
//! without waiting for the previous answer (HTTP/1.1 pipelining), and answers come back
//! in the same order: a 2xx answer acknowledges the oldest unanswered message, any
//! other status is an error named `http_<status>`. Bytes the socket does not take at
//! once wait in a queue that the publisher's task writes.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;

use monoio::net::TcpStream;

use crate::cli::WsUrl;
use crate::conn::{flush_queue, read_available, send_or_mark_broken, Notify};

/// Largest answer head or body we accept.
const ANSWER_MAX: usize = 64 * 1024;

/// One answered request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// When the request was scheduled.
    pub scheduled_ns: u64,
    pub status: u16,
}

/// One publisher's connection.
pub struct HttpPublisher {
    fd: RawFd,
    /// `Host` header.
    host: String,
    /// Path prefix of the rooms, without a trailing `/`.
    path: String,
    out: RefCell<Vec<u8>>,
    wake: Notify,
    /// Scheduled times of the requests not answered yet, oldest first.
    pending: RefCell<VecDeque<u64>>,
    broken: Cell<bool>,
    closing: Cell<bool>,
}

impl HttpPublisher {
    /// Connects to `url`'s server. Run [`HttpPublisher::run`] with the stream.
    pub async fn connect(url: &WsUrl) -> io::Result<(Rc<HttpPublisher>, TcpStream)> {
        let stream = TcpStream::connect(url.addr).await?;
        stream.set_nodelay(true)?;
        let publisher = Rc::new(HttpPublisher {
            fd: stream.as_raw_fd(),
            host: url.host.clone(),
            path: url.path.trim_end_matches('/').to_string(),
            out: RefCell::new(Vec::new()),
            wake: Notify::default(),
            pending: RefCell::new(VecDeque::new()),
            broken: Cell::new(false),
            closing: Cell::new(false),
        });
        Ok((publisher, stream))
    }

    /// Requests not answered yet.
    pub fn unanswered(&self) -> usize {
        self.pending.borrow().len()
    }

    /// Requests an answer may still come for: none once the connection broke.
    pub fn awaited(&self) -> usize {
        if self.broken.get() {
            0
        } else {
            self.unanswered()
        }
    }

    /// Sends `POST <path>/<room>` with `body`. False when the connection is broken.
    pub fn publish(&self, room: &str, body: &str, scheduled_ns: u64) -> bool {
        if self.broken.get() {
            return false;
        }
        let request = format!(
            "POST {}/{room} HTTP/1.1\r\nHost: {}\r\nContent-Type: text/plain\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.path,
            self.host,
            body.len()
        );
        self.pending.borrow_mut().push_back(scheduled_ns);
        send_or_mark_broken(
            self.fd,
            &self.out,
            &self.wake,
            &self.broken,
            request.as_bytes(),
        )
    }

    /// Asks the task to end once every request is answered (or the connection breaks).
    pub fn close(&self) {
        self.closing.set(true);
        self.wake.notify();
    }

    /// Writes queued requests and reads answers until [`close`](Self::close) and every
    /// answer is in, or the connection breaks. Returns why it broke, if it did.
    pub async fn run(
        &self,
        stream: TcpStream,
        mut on_answer: impl FnMut(Answer),
    ) -> Option<String> {
        let mut answers = AnswerReader::default();
        let result: io::Result<()> = async {
            loop {
                if self.broken.get() {
                    return Err(io::Error::new(io::ErrorKind::BrokenPipe, "send failed"));
                }
                if self.closing.get() && self.pending.borrow().is_empty() {
                    return Ok(());
                }
                let writing = !self.out.borrow().is_empty();
                monoio::select! {
                    r = stream.readable(false) => {
                        r?;
                        if !self.read(&mut answers, &mut on_answer)? {
                            return Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "closed by the server",
                            ));
                        }
                    }
                    r = stream.writable(false), if writing => {
                        r?;
                        flush_queue(self.fd, &mut self.out.borrow_mut())?;
                    }
                    _ = self.wake.notified() => {}
                }
            }
        }
        .await;
        let broke = result.err().map(|e| match e.kind() {
            io::ErrorKind::InvalidData => format!("bad_answer: {e}"),
            io::ErrorKind::UnexpectedEof => "closed".to_string(),
            _ => crate::conn::io_reason(&e),
        });
        if broke.is_some() {
            self.broken.set(true);
        }
        broke
    }

    /// Reads what the socket has. Ok(false) at end of stream.
    fn read(
        &self,
        answers: &mut AnswerReader,
        on_answer: &mut impl FnMut(Answer),
    ) -> io::Result<bool> {
        let mut failed = None;
        let open = read_available(self.fd, |bytes| {
            answers.feed(bytes);
            match self.take_answers(answers, on_answer) {
                Ok(()) => true,
                Err(e) => {
                    failed = Some(e);
                    false
                }
            }
        })?;
        failed.map_or(Ok(open), Err)
    }

    /// Hands every complete answer in `answers` to `on_answer`, with its request's
    /// scheduled time.
    fn take_answers(
        &self,
        answers: &mut AnswerReader,
        on_answer: &mut impl FnMut(Answer),
    ) -> io::Result<()> {
        while let Some(status) = answers.next_status()? {
            let Some(scheduled_ns) = self.pending.borrow_mut().pop_front() else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "an answer to no request",
                ));
            };
            on_answer(Answer {
                scheduled_ns,
                status,
            });
        }
        Ok(())
    }
}

/// Splits a byte stream of HTTP/1.1 answers into their status codes. Bodies are
/// skipped by `Content-Length` or chunked transfer coding.
#[derive(Default)]
pub struct AnswerReader {
    buf: Vec<u8>,
}

impl AnswerReader {
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The status of the next complete answer, and drops it from the buffer.
    pub fn next_status(&mut self) -> io::Result<Option<u16>> {
        let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut answer = httparse::Response::new(&mut headers);
        let head = match answer.parse(&self.buf) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) if self.buf.len() > ANSWER_MAX => {
                return Err(bad("answer head too large"))
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(bad(&format!("not an HTTP answer: {e}"))),
        };
        let status = answer.code.ok_or_else(|| bad("no status"))?;
        let header = |name: &str| {
            answer
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
        };
        let end = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            match chunked_end(&self.buf[head..])? {
                Some(n) => head + n,
                None => return Ok(None),
            }
        } else {
            let len = match header("content-length") {
                Some(v) => v.parse::<usize>().map_err(|_| bad("bad Content-Length"))?,
                // 1xx, 204 and 304 have no body; we never send HEAD.
                None if status < 200 || status == 204 || status == 304 => 0,
                None => return Err(bad("an answer without Content-Length on a kept connection")),
            };
            if len > ANSWER_MAX {
                return Err(bad("answer body too large"));
            }
            if self.buf.len() < head + len {
                return Ok(None);
            }
            head + len
        };
        self.buf.drain(..end);
        Ok(Some(status))
    }
}

/// Length of a complete chunked body at the start of `b`, None if incomplete.
fn chunked_end(b: &[u8]) -> io::Result<Option<usize>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut at = 0;
    loop {
        let Some(eol) = b[at..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&b[at..at + eol]).map_err(|_| bad("bad chunk size"))?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        if size > ANSWER_MAX {
            return Err(bad("chunk too large"));
        }
        at += eol + 2;
        if size == 0 {
            // No trailers from the servers we drive: the empty line ends the body.
            return Ok((b.len() >= at + 2).then_some(at + 2));
        }
        if b.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pipelined_answers_fed_in_pieces() {
        let stream = b"HTTP/1.1 201 Created\r\nContent-Length: 5\r\n\r\nhelloHTTP/1.1 202 Accepted\r\n\
                       Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 403 Forbidden\r\n\
                       Content-Length: 0\r\n\r\n";
        for piece in [1, 7, stream.len()] {
            let mut r = AnswerReader::default();
            let mut got = Vec::new();
            for chunk in stream.chunks(piece) {
                r.feed(chunk);
                while let Some(s) = r.next_status().expect("valid") {
                    got.push(s);
                }
            }
            assert_eq!(got, vec![201, 202, 403], "pieces of {piece}");
        }
    }

    #[test]
    fn refuses_what_it_cannot_frame() {
        let mut r = AnswerReader::default();
        r.feed(b"HTTP/1.1 200 OK\r\n\r\n");
        assert!(r.next_status().is_err(), "no length on a kept connection");
        let mut r = AnswerReader::default();
        r.feed(b"SSH-2.0-OpenSSH\r\n\r\n");
        assert!(r.next_status().is_err());
    }
}
