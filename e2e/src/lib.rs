//! Whole-system tests (in `tests/`): each backing service really round-trips data, the
//! deployment files agree with the binaries, and (with later issues) the real binaries
//! serve clients end to end. This library holds only the helpers those tests share.

pub mod private;
pub mod stack;

use std::sync::Once;

/// Loads `.local/chatify.env` (written by `scripts/services.sh up`) once and returns the
/// value of `variable`. Panics with the fix when the services were never brought up: a
/// test against a real service must fail, not skip, when the service is missing.
pub fn service_env(variable: &str) -> String {
    static LOAD: Once = Once::new();
    LOAD.call_once(|| {
        if let Err(error) = chatify_core::config::load_repo_env(env!("CARGO_MANIFEST_DIR").as_ref())
        {
            panic!("{error}");
        }
    });
    std::env::var(variable)
        .unwrap_or_else(|_| panic!("{variable} is not set in .local/chatify.env"))
}

/// A name no other test run uses (topics, groups, keys, databases).
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid_like())
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_nanos())
        .unwrap_or_default();
    format!("{}-{nanos:x}", std::process::id())
}

/// A plain HTTP/1.1 GET, enough for the admin endpoints: (status, body).
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let timeout = std::time::Duration::from_secs(5);
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an http response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// A loopback address with a port that was free a moment ago.
pub fn free_local_addr() -> std::net::SocketAddr {
    let [addr] = free_local_addrs();
    addr
}

/// `N` loopback addresses with ports free a moment ago, all different (the listeners are
/// held together, so one port is never handed out twice).
pub fn free_local_addrs<const N: usize>() -> [std::net::SocketAddr; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("local addr"))
}

/// Path of a workspace binary built next to the running test, in the same profile
/// (`scripts/dev test` runs `cargo build --workspace --bins` before the tests).
pub fn workspace_binary(name: &str) -> std::path::PathBuf {
    let test_exe = std::env::current_exe().expect("test executable path");
    let profile_dir = test_exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/dev test does)",
        path.display()
    );
    path
}

/// A TCP proxy on loopback in front of a real service, for fault injection: `set_down`
/// cuts every proxied connection and refuses new ones (as a stopped server would), `set_up`
/// lets them through again. The service itself keeps running for the other tests. It
/// counts the reads it takes from its clients ([`TcpProxy::client_reads`]).
#[derive(Debug)]
pub struct TcpProxy {
    addr: std::net::SocketAddr,
    up: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
    accept: tokio::task::JoinHandle<()>,
    client_reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl TcpProxy {
    /// Starts proxying a fresh loopback port to `upstream` (host:port).
    pub async fn start(upstream: &str) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (up, _) = tokio::sync::watch::channel(true);
        let up = std::sync::Arc::new(up);
        let upstream = upstream.to_owned();
        let state = std::sync::Arc::clone(&up);
        let client_reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let reads = std::sync::Arc::clone(&client_reads);
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !*state.borrow() {
                    drop(client);
                    continue;
                }
                let mut down = state.subscribe();
                let upstream = upstream.clone();
                let mut client = ReadCounted {
                    stream: client,
                    reads: std::sync::Arc::clone(&reads),
                };
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(&upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = down.wait_for(|up| !*up) => {}
                    }
                });
            }
        });
        Ok(Self {
            addr,
            up,
            accept,
            client_reads,
        })
    }

    /// Starts proxying to the host and port of `service_url` (a store's URL).
    pub async fn in_front_of(service_url: &str) -> std::io::Result<Self> {
        let url = url::Url::parse(service_url).map_err(std::io::Error::other)?;
        let host = url
            .host_str()
            .ok_or_else(|| std::io::Error::other(format!("{service_url} names no host")))?;
        let port = url
            .port_or_known_default()
            .ok_or_else(|| std::io::Error::other(format!("{service_url} names no port")))?;
        Self::start(&format!("{host}:{port}")).await
    }

    /// `service_url` with its port replaced by the proxy's (both are on loopback).
    pub fn url_for(&self, service_url: &str) -> String {
        let mut url = url::Url::parse(service_url).expect("a service URL");
        url.set_port(Some(self.addr.port()))
            .expect("the URL takes a port");
        url.to_string()
    }

    /// `127.0.0.1:port` of the proxy.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Reads the proxy has taken from its clients so far, over all connections: a client's
    /// one write arrives as one read when it is small.
    pub fn client_reads(&self) -> usize {
        self.client_reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Cuts every connection and refuses new ones until [`TcpProxy::set_up`].
    pub fn set_down(&self) {
        self.up.send_replace(false);
    }

    pub fn set_up(&self) {
        self.up.send_replace(true);
    }
}

/// A client socket of [`TcpProxy`] that counts the reads that returned bytes.
struct ReadCounted {
    stream: tokio::net::TcpStream,
    reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl tokio::io::AsyncRead for ReadCounted {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let poll = std::pin::Pin::new(&mut self.stream).poll_read(context, buf);
        if buf.filled().len() > before {
            self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        poll
    }
}

impl tokio::io::AsyncWrite for ReadCounted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(context, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(context)
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.set_down();
        self.accept.abort();
    }
}
