//! Transports: the per-connection, per-byte paths in Rust. Each module mirrors an asyncio
//! transport class; the Python side (`python/ferroloop/_transports.py`) adds the rare paths.

pub mod accept;
pub mod addr;
pub mod datagram;
pub mod stream;
pub mod stream_reader;
pub mod write_method;
