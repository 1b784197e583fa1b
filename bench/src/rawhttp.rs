//! A bare HTTP/1.1 GET over its own connection, for the scale scenario: a thousand
//! answers arrive at once there, and a general-purpose client's work per answer (pool,
//! timers, header maps, task hand-offs) would be counted in every wake-up after it. This
//! reads exactly one answer, with `Content-Length` or chunked, and nothing more.

use std::time::Instant;

use anyhow::{Context, bail, ensure};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// One connection to a server given by a plain `http://host:port` base URL.
pub struct Connection {
    stream: TcpStream,
    host: String,
}

impl Connection {
    pub async fn open(base: &str) -> anyhow::Result<Connection> {
        let host = base
            .strip_prefix("http://")
            .context("the scale scenario speaks plain http:// only")?
            .trim_end_matches('/')
            .to_owned();
        let stream = TcpStream::connect(&host).await?;
        stream.set_nodelay(true)?;
        Ok(Connection { stream, host })
    }

    /// Send a GET and return the moment its whole answer had arrived, with the body of
    /// a successful answer (an error answer is an error). The connection stays open:
    /// closing it would put the server's and the kernel's work for that into the time of
    /// the answers still on their way.
    pub async fn get(&mut self, path: &str, token: &str) -> anyhow::Result<(Instant, Vec<u8>)> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            self.host
        );
        self.stream.write_all(request.as_bytes()).await?;
        let mut buf = Vec::with_capacity(4096);
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if self.read_more(&mut buf).await? == 0 {
                return Err(Closed("before the answer's head").into());
            }
        };
        let head = std::str::from_utf8(&buf[..head_end]).context("answer head not UTF-8")?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status in the answer")?;
        let header = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
            })
        };
        let body = if let Some(len) = header("content-length") {
            let len: usize = len.parse().context("bad Content-Length")?;
            while buf.len() < head_end + len {
                if self.read_more(&mut buf).await? == 0 {
                    return Err(Closed("inside the answer's body").into());
                }
            }
            buf[head_end..head_end + len].to_vec()
        } else if header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
            self.read_chunked(buf, head_end).await?
        } else {
            bail!("an answer with neither Content-Length nor chunked encoding");
        };
        let arrived = Instant::now();
        ensure!(
            (200..300).contains(&status),
            "{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok((arrived, body))
    }

    async fn read_more(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
        buf.reserve(16 * 1024);
        Ok(self.stream.read_buf(buf).await?)
    }

    async fn read_chunked(&mut self, mut buf: Vec<u8>, mut at: usize) -> anyhow::Result<Vec<u8>> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = find(&buf[at..], b"\r\n") {
                    break at + i;
                }
                if self.read_more(&mut buf).await? == 0 {
                    return Err(Closed("inside a chunk header").into());
                }
            };
            let size_text = std::str::from_utf8(&buf[at..line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .context("bad chunk size")?;
            let data = line_end + 2;
            while buf.len() < data + size + 2 {
                if self.read_more(&mut buf).await? == 0 {
                    return Err(Closed("inside a chunk").into());
                }
            }
            if size == 0 {
                return Ok(body);
            }
            body.extend_from_slice(&buf[data..data + size]);
            at = data + size + 2;
        }
    }
}

/// The server closed the connection before the whole answer was there.
#[derive(Debug)]
struct Closed(&'static str);

impl std::fmt::Display for Closed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the connection closed {}", self.0)
    }
}

impl std::error::Error for Closed {}

/// Whether an error is the connection's (refused, reset, closed early) rather than an
/// answer's: worth another try on a new connection.
pub fn is_connection_error(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some() || e.downcast_ref::<Closed>().is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A one-shot server that answers any request with `answer`.
    async fn serve_once(answer: &'static [u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            while find(&req, b"\r\n\r\n").is_none() {
                let mut b = [0u8; 1024];
                let n = s.read(&mut b).await.unwrap();
                req.extend_from_slice(&b[..n]);
            }
            assert!(req.starts_with(b"GET /x HTTP/1.1\r\n"));
            // In pieces, so that the reader has to come back for more.
            for piece in answer.chunks(7) {
                s.write_all(piece).await.unwrap();
                s.flush().await.unwrap();
            }
        });
        format!("http://{addr}")
    }

    /// One GET against a server that answers `answer`.
    async fn get_once(answer: &'static [u8]) -> anyhow::Result<Vec<u8>> {
        let base = serve_once(answer).await;
        let (_, body) = Connection::open(&base).await?.get("/x", "t").await?;
        Ok(body)
    }

    #[tokio::test]
    async fn reads_a_content_length_answer() {
        let body = get_once(b"HTTP/1.1 200 OK\r\ncontent-length: 11\r\n\r\n{\"a\":12345}").await;
        assert_eq!(body.unwrap(), b"{\"a\":12345}");
    }

    #[tokio::test]
    async fn reads_a_chunked_answer() {
        let body = get_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n6;x=y\r\n:12345\r\n1\r\n}\r\n0\r\n\r\n",
        )
        .await;
        assert_eq!(body.unwrap(), b"{\"a\":12345}");
    }

    #[tokio::test]
    async fn a_connection_closed_early_is_a_connection_error() {
        let err = get_once(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{")
            .await
            .unwrap_err();
        assert!(is_connection_error(&err), "{err}");
    }

    #[tokio::test]
    async fn an_error_answer_is_an_error() {
        let err = get_once(
            b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 25\r\n\r\n{\"errcode\":\"M_FORBIDDEN\"}",
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("401"), "{err}");
        assert!(!is_connection_error(&err));
    }
}
