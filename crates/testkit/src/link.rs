//! A TCP link in front of a server, which a test can break in the middle of a stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Forwards every connection made to [`TcpLink::addr`] to the server behind it, until told to
/// break: then, after a given number of bytes from the clients, it drops every connection at
/// once, with the bytes it has read but not forwarded. A client sees what a network failure
/// looks like: what it had written into the socket is partly lost, and the connection is reset.
/// New connections are forwarded again (a client's reconnection works).
pub struct TcpLink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

#[derive(Default)]
struct Shared {
    /// Bytes from clients still to forward before the break, when one is armed.
    armed: Mutex<Option<u64>>,
    /// Increases at every break; each connection ends when it changes.
    breaks: AtomicU64,
    broken: tokio::sync::Notify,
}

impl Shared {
    /// Takes `n` bytes read from a client: how many of them to forward, and whether the link
    /// breaks after them.
    fn take(&self, n: usize) -> (usize, bool) {
        let mut armed = self.armed.lock().unwrap_or_else(|e| e.into_inner());
        match *armed {
            Some(left) if (n as u64) >= left => {
                *armed = None;
                self.breaks.fetch_add(1, Ordering::SeqCst);
                self.broken.notify_waiters();
                (usize::try_from(left).unwrap_or(n), true)
            }
            Some(left) => {
                *armed = Some(left - n as u64);
                (n, false)
            }
            None => (n, false),
        }
    }
}

impl TcpLink {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the link's port")?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        let accept = tokio::spawn(accept(listener, upstream, shared.clone()));
        Ok(Self {
            addr,
            shared,
            accept,
        })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `scheme://127.0.0.1:<port>`.
    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://{}", self.addr)
    }

    /// Breaks every connection once `bytes` more bytes have come from the clients; the bytes
    /// past that count, and any the clients send after, are dropped.
    pub fn break_after(&self, bytes: u64) {
        *self.shared.armed.lock().unwrap_or_else(|e| e.into_inner()) = Some(bytes);
    }

    /// How many times the link has broken.
    pub fn breaks(&self) -> u64 {
        self.shared.breaks.load(Ordering::SeqCst)
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn accept(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    while let Ok((client, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                forward(client, server, &shared).await;
            }
        });
    }
}

/// Forwards both ways until either side closes or the link breaks; dropping the sockets then
/// resets the client's connection (the link leaves bytes unread) and closes the server's.
async fn forward(client: TcpStream, server: TcpStream, shared: &Shared) {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let generation = shared.breaks.load(Ordering::SeqCst);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let up = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let (forward, broke) = shared.take(n);
            if to_server.write_all(&buf[..forward]).await.is_err() || broke {
                return;
            }
        }
    };
    let down = tokio::io::copy(&mut from_server, &mut to_client);
    let broken = async {
        let notified = shared.broken.notified();
        if shared.breaks.load(Ordering::SeqCst) == generation {
            notified.await;
        }
    };
    tokio::select! {
        () = up => {}
        _ = down => {}
        () = broken => {}
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn forwards_until_broken_then_accepts_again() {
        let link = TcpLink::start(echo_server().await).await.unwrap();
        let mut client = TcpStream::connect(link.addr()).await.unwrap();
        client.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");

        link.break_after(3);
        client.write_all(b"abcdef").await.unwrap();
        let mut got = Vec::new();
        // At most the bytes before the break come back, then the connection ends.
        let _ = client.read_to_end(&mut got).await;
        assert!(b"abc".starts_with(&got), "{got:?}");
        assert_eq!(link.breaks(), 1);

        let mut again = TcpStream::connect(link.addr()).await.unwrap();
        again.write_all(b"back").await.unwrap();
        let mut buf = [0u8; 4];
        again.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"back");
    }
}
