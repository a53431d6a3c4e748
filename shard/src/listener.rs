//! Per-shard listening sockets. Every shard binds its own socket to the same address
//! with `SO_REUSEPORT`, so the kernel spreads new connections between shards and no
//! shard ever touches another's accept queue.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Binds `count` TCP listeners to `addr` with `SO_REUSEPORT`. When `addr` has port 0,
/// the first socket picks a port and the others join it.
pub fn reuseport_tcp(
    addr: SocketAddr,
    count: usize,
    backlog: i32,
) -> io::Result<Vec<std::net::TcpListener>> {
    assert!(count > 0, "at least one listener");
    let mut out = Vec::with_capacity(count);
    let mut bound = addr;
    for _ in 0..count {
        let socket = Socket::new(
            Domain::for_address(bound),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&bound.into())?;
        socket.listen(backlog)?;
        let listener: std::net::TcpListener = socket.into();
        bound = listener.local_addr()?;
        out.push(listener);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_share_one_port() {
        let ls = reuseport_tcp("127.0.0.1:0".parse().unwrap(), 3, 128).unwrap();
        let port = ls[0].local_addr().unwrap().port();
        assert_ne!(port, 0);
        assert!(ls.iter().all(|l| l.local_addr().unwrap().port() == port));
    }
}
