//! A bare HTTP/1.1 GET over its own connection, for the scale scenario: a thousand
//! answers arrive at once there, and a general-purpose client's work per answer (pool,
//! timers, header maps, task hand-offs) would be counted in every wake-up after it. This
//! reads exactly one answer, with `Content-Length` or chunked, and nothing more.
//!
//! Each answer's arrival is the time the kernel received its last segment
//! (`SO_TIMESTAMPNS`), not the time this process got round to reading it: the request
//! can be sent first and its answer read later, once the server has written them all,
//! so that the reading does not take the cores the server is answering on.

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail, ensure};
use tokio::{
    io::{AsyncWriteExt, Interest},
    net::TcpStream,
};

/// One connection to a server given by a plain `http://host:port` base URL.
pub struct Connection {
    stream: TcpStream,
    host: String,
    /// The kernel's receive time of the last segment read so far.
    arrived: Option<SystemTime>,
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
        stamp_arrivals(stream.as_raw_fd())?;
        Ok(Connection {
            stream,
            host,
            arrived: None,
        })
    }

    /// Send a GET without waiting for its answer: [`Connection::answer`] reads it.
    pub async fn send_get(&mut self, path: &str, token: &str) -> anyhow::Result<()> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {token}\r\n\r\n",
            self.host
        );
        self.stream.write_all(request.as_bytes()).await?;
        Ok(())
    }

    /// Take the connection off the event loop while its answer is awaited: the kernel
    /// still receives and stamps the answer, but nothing in this process wakes for it
    /// until [`Parked::resume`].
    pub fn park(self) -> io::Result<Parked> {
        Ok(Parked {
            stream: self.stream.into_std()?,
            host: self.host,
        })
    }

    /// Read the answer to the request sent last (`path` names it in errors): the
    /// moment the kernel had received all of it, and the body of a successful answer.
    /// The connection stays open: closing it would put the server's and the kernel's
    /// work for that into the time of the answers still on their way.
    pub async fn answer(&mut self, path: &str) -> anyhow::Result<(SystemTime, Vec<u8>)> {
        self.arrived = None;
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
        // A kernel without receive timestamps leaves the time it was read.
        let arrived = self.arrived.unwrap_or_else(SystemTime::now);
        ensure!(
            (200..300).contains(&status),
            "{path}: HTTP {status}: {}",
            String::from_utf8_lossy(&body)
        );
        Ok((arrived, body))
    }

    async fn read_more(&mut self, buf: &mut Vec<u8>) -> anyhow::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let fd = self.stream.as_raw_fd();
        let (n, stamp) = loop {
            self.stream.readable().await?;
            match self
                .stream
                .try_io(Interest::READABLE, || recv_stamped(fd, &mut chunk))
            {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                read => break read?,
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(t) = stamp {
            self.arrived = Some(self.arrived.map_or(t, |a| a.max(t)));
        }
        Ok(n)
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

/// A connection off the event loop (see [`Connection::park`]).
pub struct Parked {
    stream: std::net::TcpStream,
    host: String,
}

impl Parked {
    /// Back on the event loop, to read the answer.
    pub fn resume(self) -> io::Result<Connection> {
        Ok(Connection {
            stream: TcpStream::from_std(self.stream)?,
            host: self.host,
            arrived: None,
        })
    }
}

/// Ask the kernel to stamp every segment the socket receives with the time it arrived.
fn stamp_arrivals(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is an open socket, and the option value is a live c_int of the size
    // given.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One `recvmsg` into `buf`: the bytes read, and the receive time of the last segment
/// they came from when the kernel gave one.
fn recv_stamped(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Option<SystemTime>)> {
    // Room for a few control messages; u64s keep it aligned for their headers.
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; every pointer put in it refers
    // to a buffer that outlives the call, with its true length.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: as above.
    let n = unsafe { libc::recvmsg(fd, &raw mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut stamp = None;
    // SAFETY: the control messages are walked with the kernel's own macros over the
    // length it reported, and a timestamp's data is a timespec (read unaligned).
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(
                    SystemTime::UNIX_EPOCH + Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32),
                );
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    Ok((n as usize, stamp))
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
    use tokio::{io::AsyncReadExt, net::TcpListener};

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
        let mut c = Connection::open(&base).await?;
        c.send_get("/x", "t").await?;
        Ok(c.answer("/x").await?.1)
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
    async fn an_answer_read_late_keeps_the_time_it_arrived() {
        let base = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").await;
        let mut c = Connection::open(&base).await.unwrap();
        // The kernel turns receive timestamps on a moment after the first socket asks
        // (segments that arrive before then are stamped when read).
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = SystemTime::now();
        c.send_get("/x", "t").await.unwrap();
        let parked = c.park().unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reading = SystemTime::now();
        let (arrived, body) = parked.resume().unwrap().answer("/x").await.unwrap();
        assert_eq!(body, b"{}");
        assert!(
            sent <= arrived && arrived < reading,
            "arrived {arrived:?}, sent {sent:?}, read from {reading:?}"
        );
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
