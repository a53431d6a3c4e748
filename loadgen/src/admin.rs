//! A minimal blocking HTTP/1.1 client for the admin API calls a scenario needs
//! (PROTOCOL.md §8), run before the workers start.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(15);

/// Sends one request with a JSON body and returns the status code and body.
pub fn request(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    token: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let mut s =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("admin API {addr}: {e}"))?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .map_err(|e| format!("admin API {addr}: {e}"))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .map_err(|e| format!("admin API {addr}: {e}"))?;
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(&resp) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return Err(format!("admin API {addr}: not an HTTP answer")),
    };
    let code = r.code.ok_or("admin API: no status")?;
    Ok((code, String::from_utf8_lossy(&resp[head..]).into_owned()))
}

/// `PUT /v1/groups/{group}` with `members`: 204 expected.
pub fn put_group(
    addr: SocketAddr,
    host: &str,
    token: &str,
    group: &str,
    members: &[String],
) -> Result<(), String> {
    let body = serde_json::json!({ "members": members }).to_string();
    let (code, text) = request(
        addr,
        host,
        "PUT",
        &format!("/v1/groups/{group}"),
        token,
        &body,
    )?;
    if code == 204 || code == 200 {
        Ok(())
    } else {
        Err(format!("PUT /v1/groups/{group} answered {code}: {text}"))
    }
}
