//! TCP or Unix stream sockets behind one type, and the addresses (UDP ones too: `udp.rs`).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;

#[derive(Clone, Debug)]
pub enum Addr {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// A UDP address: served and loaded by `udp.rs`; not a stream.
    Udp(SocketAddr),
}

impl Addr {
    pub fn tcp(spec: &str) -> Result<Addr, String> {
        spec.to_socket_addrs()
            .map_err(|e| format!("bad TCP address {spec:?}: {e}"))?
            .next()
            .map(Addr::Tcp)
            .ok_or_else(|| format!("TCP address {spec:?} resolves to nothing"))
    }

    pub fn udp(spec: &str) -> Result<Addr, String> {
        match Addr::tcp(spec) {
            Ok(Addr::Tcp(a)) => Ok(Addr::Udp(a)),
            _ => Err(format!("bad UDP address {spec:?}")),
        }
    }

    fn not_a_stream() -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, "a UDP address is not a stream")
    }

    pub fn connect(&self) -> io::Result<Stream> {
        match self {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a)?;
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(Stream::Tcp(s))
            }
            Addr::Unix(p) => {
                let s = UnixStream::connect(p)?;
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(s))
            }
            Addr::Udp(_) => Err(Addr::not_a_stream()),
        }
    }

    pub fn listen(&self) -> io::Result<Listener> {
        let l = match self {
            Addr::Tcp(a) => Listener::Tcp(TcpListener::bind(a)?),
            Addr::Unix(p) => {
                let _ = std::fs::remove_file(p);
                Listener::Unix(UnixListener::bind(p)?)
            }
            Addr::Udp(_) => return Err(Addr::not_a_stream()),
        };
        match &l {
            Listener::Tcp(t) => t.set_nonblocking(true)?,
            Listener::Unix(u) => u.set_nonblocking(true)?,
        }
        Ok(l)
    }
}

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Accepts one pending connection (non-blocking, TCP_NODELAY); `Ok(None)` when none is.
    pub fn accept(&self) -> io::Result<Option<Stream>> {
        let res = match self {
            Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                s.set_nodelay(true)?;
                s.set_nonblocking(true)?;
                Ok(Stream::Tcp(s))
            }),
            Listener::Unix(l) => l.accept().and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                Ok(Stream::Unix(s))
            }),
        };
        match res {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The bound port (TCP) or 0 (Unix).
    pub fn port(&self) -> u16 {
        match self {
            Listener::Tcp(l) => l.local_addr().map(|a| a.port()).unwrap_or(0),
            Listener::Unix(_) => 0,
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
        }
    }
}
