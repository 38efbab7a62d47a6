//! Socket addresses kept as plain data: an idle connection holds its `sockname` and `peername`
//! in 28 bytes each instead of a tuple, a `str` and an `int` apiece; the Python form is built
//! when `get_extra_info` first asks for it.

use pyo3::prelude::*;

use crate::sys::{self, PeerAddr};

/// An IPv4 or IPv6 socket address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum InetAddr {
    V4([u8; 4], u16),
    /// Address, port, flow info, scope id.
    V6([u8; 16], u16, u32, u32),
}

impl InetAddr {
    /// The IPv4 / IPv6 addresses; `None` for other families.
    pub(crate) fn from_sys(addr: &PeerAddr) -> Option<Self> {
        match *addr {
            PeerAddr::V4(ip, port) => Some(Self::V4(ip, port)),
            PeerAddr::V6(ip, port, flow, scope) => Some(Self::V6(ip, port, flow, scope)),
            _ => None,
        }
    }

    /// The same address as `sys` takes it.
    pub(crate) fn to_sys(self) -> PeerAddr {
        match self {
            Self::V4(ip, port) => PeerAddr::V4(ip, port),
            Self::V6(ip, port, flow, scope) => PeerAddr::V6(ip, port, flow, scope),
        }
    }

    /// The socket's own name (`local`) or its peer's, when it is an IPv4 / IPv6 address.
    pub(crate) fn of_socket(fd: std::os::fd::RawFd, peer: bool) -> std::io::Result<Option<Self>> {
        sys::socket_name(fd, peer).map(|a| Self::from_sys(&a))
    }

    /// The form Python's `socket` module gives: `(host, port)` or `(host, port, flowinfo,
    /// scope_id)`.
    pub(crate) fn to_py<'py>(self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Ok(match self {
            Self::V4(ip, port) => (std::net::Ipv4Addr::from(ip).to_string(), port).into_pyobject(py)?.into_any(),
            Self::V6(ip, port, flow, scope) => {
                (sys::ipv6_to_string(&ip), port, flow, scope).into_pyobject(py)?.into_any()
            }
        })
    }
}

/// An accepted connection's peer address, handed from the accept loop to the new transport's
/// `StreamCore` (which keeps it as plain data).
#[pyclass(frozen, module = "ferroloop._ferroloop")]
pub struct SockAddr(pub(crate) InetAddr);

#[pymethods]
impl SockAddr {
    /// The address in Python's form.
    #[getter]
    fn value<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        self.0.to_py(py)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        Ok(format!("<SockAddr {}>", self.0.to_py(py)?.repr()?))
    }
}
