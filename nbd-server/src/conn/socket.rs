//! The socket transmission runs on: a blocking TCP or Unix stream, taken over from tokio once
//! negotiation is done, or one end of a socket pair bridged to a stream that is not a socket
//! (TLS, an in-memory duplex in tests).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::task::JoinHandle;

/// A connected stream socket in blocking mode.
#[derive(Debug)]
pub(crate) enum BlockingSocket {
    Tcp(std::net::TcpStream),
    Unix(StdUnixStream),
}

impl BlockingSocket {
    /// Another handle to the same socket (for the read side, the write side, shutdown).
    pub(crate) fn try_clone(&self) -> io::Result<BlockingSocket> {
        Ok(match self {
            BlockingSocket::Tcp(s) => BlockingSocket::Tcp(s.try_clone()?),
            BlockingSocket::Unix(s) => BlockingSocket::Unix(s.try_clone()?),
        })
    }

    /// Ends reads, writes or both on every handle: blocked calls return at once.
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            BlockingSocket::Tcp(s) => s.shutdown(how),
            BlockingSocket::Unix(s) => s.shutdown(how),
        }
    }

    /// Whether bytes (or EOF) wait to be read, without waiting: one `poll` call.
    pub(crate) fn has_pending_input(&self) -> bool {
        let fd = match self {
            BlockingSocket::Tcp(s) => s.as_raw_fd(),
            BlockingSocket::Unix(s) => s.as_raw_fd(),
        };
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd for the duration of the call; the descriptor is owned by
        // `self`, which outlives it. A zero timeout never blocks.
        let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
        // On error, say yes: the caller then lets another thread read, which is always safe.
        ready != 0
    }

    /// A receive timeout (None: wait for ever). Shared by every handle of the socket.
    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            BlockingSocket::Tcp(s) => s.set_read_timeout(timeout),
            BlockingSocket::Unix(s) => s.set_read_timeout(timeout),
        }
    }
}

impl Read for BlockingSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            BlockingSocket::Tcp(s) => s.read(buf),
            BlockingSocket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for BlockingSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            BlockingSocket::Tcp(s) => s.write(buf),
            BlockingSocket::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            BlockingSocket::Tcp(s) => s.write_vectored(bufs),
            BlockingSocket::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A stream that can leave the tokio reactor as a blocking socket (sockets can; an
/// in-memory duplex cannot and is bridged instead).
pub(crate) trait IntoBlockingSocket: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// The socket in blocking mode, or the stream back if it is not a socket.
    fn into_blocking(self) -> Result<io::Result<BlockingSocket>, Self>;
}

impl IntoBlockingSocket for tokio::net::TcpStream {
    fn into_blocking(self) -> Result<io::Result<BlockingSocket>, Self> {
        Ok(self.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(BlockingSocket::Tcp(s))
        }))
    }
}

impl IntoBlockingSocket for tokio::net::UnixStream {
    fn into_blocking(self) -> Result<io::Result<BlockingSocket>, Self> {
        Ok(self.into_std().and_then(|s| {
            s.set_nonblocking(false)?;
            Ok(BlockingSocket::Unix(s))
        }))
    }
}

/// Any other stream (an in-memory duplex in tests, a tunnel): always bridged.
pub(crate) struct NotASocket<S>(pub(crate) S);

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> IntoBlockingSocket for NotASocket<S> {
    fn into_blocking(self) -> Result<io::Result<BlockingSocket>, Self> {
        Err(self)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for NotASocket<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for NotASocket<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Bytes copied per direction and call by a bridge.
const BRIDGE_BUFFER: usize = 256 * 1024;

/// Connects `stream` to a new socket pair: returns the blocking end, and the task that copies
/// between the stream and the other end until both directions are closed. TLS costs this
/// copy (and a hand-off per direction); plain sockets are served directly.
pub(crate) fn bridge<T>(stream: T) -> io::Result<(BlockingSocket, JoinHandle<()>)>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (ours, theirs) = StdUnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    let mut theirs = tokio::net::UnixStream::from_std(theirs)?;
    let mut stream = stream;
    let copier = tokio::spawn(async move {
        let copied =
            tokio::io::copy_bidirectional_with_sizes(&mut stream, &mut theirs, BRIDGE_BUFFER, BRIDGE_BUFFER).await;
        if let Err(e) = copied {
            tracing::debug!("bridged stream ended: {e}");
        }
    });
    Ok((BlockingSocket::Unix(ours), copier))
}
