//! A loopback TCP forwarder between fm and the test broker that can play a broker that is down,
//! hung, or far away.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// Bytes flow both ways.
    Forward,
    /// Connections stay open, nothing flows (a broker that hangs).
    Frozen,
    /// Every connection is closed and new ones are refused (a broker that is down).
    Down,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
}

impl Proxy {
    /// A proxy to `target_port` on loopback that forwards at once.
    pub async fn start(target_port: u16) -> Proxy {
        Proxy::with_latency(target_port, Duration::ZERO).await
    }

    /// A proxy that holds every chunk the server sends for `latency` before passing it on: each
    /// request/answer round trip then takes at least that long (a far-away broker).
    pub async fn with_latency(target_port: u16, latency: Duration) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, _) = watch::channel(Mode::Forward);
        let mut rx = mode.subscribe();
        tokio::spawn(async move {
            let mut listener = Some(listener);
            loop {
                let Some(l) = listener.as_ref() else {
                    // Down: wait to be brought back, then listen on the same port again.
                    if rx.changed().await.is_err() {
                        return;
                    }
                    if *rx.borrow() != Mode::Down {
                        listener = Some(
                            TcpListener::bind(("127.0.0.1", port))
                                .await
                                .expect("listening again on the proxy's port"),
                        );
                    }
                    continue;
                };
                tokio::select! {
                    changed = rx.changed() => {
                        if changed.is_err() { return; }
                        if *rx.borrow() == Mode::Down { listener = None; }
                    }
                    accepted = l.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        let Ok(server) = TcpStream::connect(("127.0.0.1", target_port)).await else {
                            continue;
                        };
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        tokio::spawn(pump(cr, sw, rx.clone(), Duration::ZERO));
                        tokio::spawn(pump(sr, cw, rx.clone(), latency));
                    }
                }
            }
        });
        Proxy { port, mode }
    }

    /// `url` (a URL of the broker behind the proxy) with the proxy's port instead.
    pub fn url_for(&self, url: &str, target_port: u16) -> String {
        url.replacen(&format!(":{target_port}/"), &format!(":{}/", self.port), 1)
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }
}

/// Copy one direction while the mode allows; return (closing both halves) when Down.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    latency: Duration,
) {
    // With a latency, a writer of its own passes each chunk on `latency` after it arrived, so
    // that chunks in a row are delayed together, not one after the other.
    let (delayed, mut queued) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let mut to = if latency.is_zero() {
        Some(to)
    } else {
        tokio::spawn(async move {
            while let Some((due, chunk)) = queued.recv().await {
                tokio::time::sleep_until(due.into()).await;
                if to.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        });
        None
    };
    let mut buf = vec![0u8; 16384];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == Mode::Down { return; }
                continue;
            }
        };
        loop {
            let now = *mode.borrow_and_update();
            match now {
                Mode::Down => return,
                Mode::Forward => break,
                Mode::Frozen => {
                    if mode.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        match to.as_mut() {
            Some(to) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            None => {
                if delayed
                    .send((Instant::now() + latency, buf[..n].to_vec()))
                    .is_err()
                {
                    return;
                }
            }
        }
    }
}
