//! A raw-ws room server for the `--target raw-ws` runs: the contract of
//! `flare_loadgen::raw` (rooms by path, every text message to every connection of its
//! room, the sender included), served with `tungstenite` so its WebSocket side shares
//! no code with the load generator. Like nchan, it also takes a room's messages over
//! HTTP (`POST /pub/<room>`, answered `202` once queued, keep-alive and pipelined) on
//! a second port. One thread, non-blocking sockets, polled; stopped and joined on drop.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tungstenite::handshake::server::{Request, Response};
use tungstenite::{Message, WebSocket};

pub struct RoomServer {
    pub addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

struct Client {
    ws: WebSocket<TcpStream>,
    room: String,
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(io) if io.kind() == ErrorKind::WouldBlock)
}

impl RoomServer {
    pub fn start() -> RoomServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let http = TcpListener::bind("127.0.0.1:0").expect("bind");
        http.set_nonblocking(true).expect("nonblocking");
        let http_addr = http.local_addr().expect("addr");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(listener, http, &flag));
        RoomServer {
            addr,
            http_addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// The base of the HTTP publish URLs: `POST <this>/<room>`.
    pub fn publish_url(&self) -> String {
        format!("http://{}/pub", self.http_addr)
    }
}

impl Drop for RoomServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// The callback's `Result<Response, ErrorResponse>` is tungstenite's signature.
#[allow(clippy::result_large_err)]
fn accept(stream: TcpStream) -> Option<Client> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut path = String::new();
    let ws = tungstenite::accept_hdr(stream, |req: &Request, resp: Response| {
        path = req.uri().path().to_string();
        Ok(resp)
    })
    .ok()?;
    ws.get_ref().set_nonblocking(true).ok()?;
    let room = path.strip_prefix("/ws/")?.to_string();
    Some(Client { ws, room })
}

/// An HTTP publisher's connection and the bytes of its unfinished request.
struct Publisher {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Publisher {
    /// Reads what arrived and answers every complete request, in order; the messages
    /// go to `inbound`. False when the connection is over.
    fn serve(&mut self, inbound: &mut Vec<(String, String)>) -> bool {
        let mut chunk = [0u8; 8192];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return false,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return false,
            }
        }
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 16];
            let mut req = httparse::Request::new(&mut headers);
            let Ok(httparse::Status::Complete(head)) = req.parse(&self.buf) else {
                return true;
            };
            let len = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                .unwrap_or(0usize);
            if self.buf.len() < head + len {
                return true;
            }
            let room = (req.method == Some("POST"))
                .then_some(req.path)
                .flatten()
                .and_then(|p| p.strip_prefix("/pub/"))
                .map(str::to_string);
            let body = String::from_utf8_lossy(&self.buf[head..head + len]).into_owned();
            self.buf.drain(..head + len);
            let answer: &[u8] = match room {
                Some(room) => {
                    inbound.push((room, body));
                    b"HTTP/1.1 202 Accepted\r\nContent-Length: 7\r\n\r\nqueued\n"
                }
                None => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
            };
            // Small answers: a full socket buffer here would be a stuck test client.
            self.stream.set_nonblocking(false).ok();
            let written = self.stream.write_all(answer);
            self.stream.set_nonblocking(true).ok();
            if written.is_err() {
                return false;
            }
        }
    }
}

fn serve(listener: TcpListener, http: TcpListener, stop: &AtomicBool) {
    let mut clients: HashMap<u64, Client> = HashMap::new();
    let mut publishers: Vec<Publisher> = Vec::new();
    let mut next_id = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut busy = false;
        while let Ok((stream, _)) = listener.accept() {
            busy = true;
            if let Some(c) = accept(stream) {
                clients.insert(next_id, c);
                next_id += 1;
            }
        }
        while let Ok((stream, _)) = http.accept() {
            busy = true;
            if stream.set_nonblocking(true).is_ok() {
                publishers.push(Publisher {
                    stream,
                    buf: Vec::new(),
                });
            }
        }
        let mut inbound: Vec<(String, String)> = Vec::new();
        publishers.retain_mut(|p| p.serve(&mut inbound));
        busy |= !inbound.is_empty();
        let mut gone = Vec::new();
        for (&id, c) in clients.iter_mut() {
            loop {
                match c.ws.read() {
                    Ok(Message::Text(t)) => inbound.push((c.room.clone(), t)),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => break,
                    Err(_) => {
                        gone.push(id);
                        break;
                    }
                }
                busy = true;
            }
        }
        for id in gone {
            clients.remove(&id);
        }
        for (room, text) in inbound {
            for c in clients.values_mut().filter(|c| c.room == room) {
                // A full socket buffer keeps the rest queued in tungstenite.
                let _ = c.ws.write(Message::Text(text.clone()));
            }
        }
        for c in clients.values_mut() {
            let _ = c.ws.flush();
        }
        if !busy {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
