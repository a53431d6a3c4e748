//! A raw-ws room server for the `--target raw-ws` runs: the contract of
//! `flare_loadgen::raw` (rooms by path, every text message to every connection of its
//! room, the sender included), served with `tungstenite` so its WebSocket side shares
//! no code with the load generator. One thread, non-blocking sockets, polled; stopped
//! and joined on drop.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tungstenite::handshake::server::{Request, Response};
use tungstenite::{Message, WebSocket};

pub struct RoomServer {
    pub addr: SocketAddr,
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
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || serve(listener, &flag));
        RoomServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("ws://{}/ws", self.addr)
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

fn serve(listener: TcpListener, stop: &AtomicBool) {
    let mut clients: HashMap<u64, Client> = HashMap::new();
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
        let mut inbound: Vec<(String, String)> = Vec::new();
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
