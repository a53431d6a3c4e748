//! A WebSocket room broadcast server on tokio + tokio-tungstenite: the "tokio-ws" peer of
//! `bench/compare`, written the way a competent tokio user would write one.
//!
//! Contract (the "raw-ws room" contract, see `bench/peers/README.md`): a client opens
//! `ws://HOST:PORT/ws/<room>`; every text message it sends goes, unchanged, to every
//! connection currently in that room, the sender included, in the order it was received.
//!
//! Model: a multi-thread runtime with one worker per core. Rooms are one
//! `Mutex<HashMap<room, Vec<(conn id, Sender)>>>`; the lock is held only to clone a
//! message into each member's bounded channel (`try_send`, never awaited). Each
//! connection has a reader task (reads frames, broadcasts text) and a writer task
//! (drains its channel into the socket, flushing once the channel is empty).
//!
//! Bounds: a member whose channel is full (`OUTBOUND_MSGS_MAX` queued messages, each at
//! most `MESSAGE_BYTES_MAX`) is removed from its room and closed with 1008; incoming
//! messages and frames are capped at `MESSAGE_BYTES_MAX`.
//!
//! Usage: `tokio-ws-peer [PORT]` (or env `PORT`, default 8081); listens on 127.0.0.1
//! (env `BIND` to change the address), prints `tokio-ws listening on ADDR` when ready,
//! exits on SIGTERM / SIGINT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;

/// Messages queued for one connection before it counts as too slow and is closed.
const OUTBOUND_MSGS_MAX: usize = 1024;
/// Largest message (and frame) accepted from a client, so the outbound bound of a
/// connection is at most `OUTBOUND_MSGS_MAX * MESSAGE_BYTES_MAX` = 64 MiB (the benchmark's
/// 64-byte bodies: about 100 KiB).
const MESSAGE_BYTES_MAX: usize = 64 << 10;
/// tungstenite's read buffer is allocated per connection (128 KiB by default); its docs
/// suggest a small one for servers holding many mostly idle connections.
const READ_BUFFER_BYTES: usize = 4 << 10;

type Outbox = mpsc::Sender<Message>;

#[derive(Default)]
struct Rooms {
    by_name: Mutex<HashMap<String, Vec<(u64, Outbox)>>>,
}

impl Rooms {
    fn join(&self, room: &str, id: u64, outbox: Outbox) {
        let mut rooms = self.by_name.lock().unwrap();
        rooms.entry(room.to_owned()).or_default().push((id, outbox));
    }

    fn leave(&self, room: &str, id: u64) {
        let mut rooms = self.by_name.lock().unwrap();
        if let Some(members) = rooms.get_mut(room) {
            members.retain(|(m, _)| *m != id);
            if members.is_empty() {
                rooms.remove(room);
            }
        }
    }

    /// Queues `msg` for every member of `room`. A member whose queue is full is dropped
    /// from the room; dropping its sender tells its writer to close the connection.
    fn broadcast(&self, room: &str, msg: Message) {
        let mut rooms = self.by_name.lock().unwrap();
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        // Message::Text holds `Utf8Bytes` (reference-counted): the clone is cheap.
        members.retain(|(_, outbox)| match outbox.try_send(msg.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) | Err(TrySendError::Closed(_)) => false,
        });
        if members.is_empty() {
            rooms.remove(room);
        }
    }
}

/// The room of a request path `/ws/<room>`, `<room>` being `[A-Za-z0-9_.@:-]+`.
fn room_of(path: &str) -> Option<&str> {
    let room = path.strip_prefix("/ws/")?;
    let ok = !room.is_empty()
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.@:-".contains(&b));
    ok.then_some(room)
}

async fn serve_conn(rooms: Arc<Rooms>, id: u64, tcp: TcpStream) {
    let _ = tcp.set_nodelay(true);
    let mut room = None;
    // The error type is tungstenite's `Callback` contract, not ours to shrink.
    #[allow(clippy::result_large_err)]
    let pick_room = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        match room_of(req.uri().path()) {
            Some(r) => {
                room = Some(r.to_owned());
                Ok(resp)
            }
            None => {
                let mut err = ErrorResponse::new(Some("expected /ws/<room>\n".into()));
                *err.status_mut() = StatusCode::NOT_FOUND;
                Err(err)
            }
        }
    };
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(Some(MESSAGE_BYTES_MAX))
        .max_frame_size(Some(MESSAGE_BYTES_MAX));
    let ws =
        match tokio_tungstenite::accept_hdr_async_with_config(tcp, pick_room, Some(config)).await {
            Ok(ws) => ws,
            Err(_) => return,
        };
    let room = room.expect("the handshake callback ran and accepted a room");
    let (mut sink, mut stream) = ws.split();
    let (outbox, mut inbox) = mpsc::channel::<Message>(OUTBOUND_MSGS_MAX);
    rooms.join(&room, id, outbox);

    let mut writer = tokio::spawn(async move {
        while let Some(msg) = inbox.recv().await {
            if inbox.is_closed() {
                // Removed from the room: too slow, or the reader is gone.
                break;
            }
            if sink.feed(msg).await.is_err() {
                return;
            }
            while let Ok(msg) = inbox.try_recv() {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let close = CloseFrame {
            code: CloseCode::Policy,
            reason: "outbound queue full".into(),
        };
        // Fails harmlessly when the client already closed.
        let _ = sink.send(Message::Close(Some(close))).await;
    });

    // Reader. Pings and the close reply are answered by tungstenite while reading; the
    // stream ends once the close handshake is done or the socket fails.
    let writer_done = loop {
        tokio::select! {
            frame = stream.next() => match frame {
                Some(Ok(msg @ Message::Text(_))) => rooms.broadcast(&room, msg),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break false,
            },
            _ = &mut writer => break true,
        }
    };
    rooms.leave(&room, id);
    if !writer_done {
        // Our sender is gone with the room entry, so the writer ends on its own.
        let _ = writer.await;
    }
}

fn main() -> std::io::Result<()> {
    let port: u16 = std::env::args()
        .nth(1)
        .or_else(|| std::env::var("PORT").ok())
        .map(|p| p.parse().expect("PORT must be a port number"))
        .unwrap_or(8081);
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1".into());
    let addr: SocketAddr = format!("{bind}:{port}").parse().expect("BIND:PORT address");
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(addr).await?;
            println!("tokio-ws listening on {}", listener.local_addr()?);
            let rooms = Arc::new(Rooms::default());
            let next_id = AtomicU64::new(0);
            let mut term = signal(SignalKind::terminate())?;
            let mut int = signal(SignalKind::interrupt())?;
            loop {
                tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((tcp, _)) => {
                            let id = next_id.fetch_add(1, Ordering::Relaxed);
                            tokio::spawn(serve_conn(rooms.clone(), id, tcp));
                        }
                        // Out of file descriptors and the like: keep serving the others.
                        Err(e) => {
                            eprintln!("accept: {e}");
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    },
                    _ = term.recv() => break,
                    _ = int.recv() => break,
                }
            }
            Ok(())
        })
}
