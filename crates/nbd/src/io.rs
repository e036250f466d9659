//! The byte stream a session runs over. Boxed so that a plain socket can be
//! swapped for a TLS stream in the middle of the handshake (STARTTLS).

use tokio::io::{AsyncRead, AsyncWrite};

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

pub type BoxIo = Box<dyn Io>;
