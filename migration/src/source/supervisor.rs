//! The link supervisor: connects, reconnects with backoff, and runs each connection.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cas_store::{DiskId, Store};
use parking_lot::Mutex;
use tokio::sync::mpsc;

use super::*;
use crate::compress::RecordLayout;
use crate::link::{Backoff, Connector, LinkStream};
use crate::protocol::{DestReport, Hello, Message};
use crate::wire::{exchange_greetings, read_message};
use crate::MigrationError;

/// Events the link passes to the main task.
#[derive(Debug)]
pub(crate) enum Event {
    RoundDone(u32),
    Switched(DestReport),
    Complete(DestReport),
    /// The destination asked for (or the source needs) a fresh listing; `epoch` is the
    /// outbox's new epoch.
    Rebuild {
        epoch: u64,
    },
    /// The connection dropped; the link reconnects.
    LinkDown,
    /// The link cannot go on (the destination refused, or broke the protocol).
    Fatal(MigrationError),
}

/// Owns the connection: connects (again after a lost link, with backoff), resumes where the
/// destination stands, and runs the reader, writer and data sender of each connection.
pub(crate) struct LinkSupervisor {
    pub(crate) connector: Arc<dyn Connector>,
    pub(crate) hello: Hello,
    /// The first HELLO asks for a fresh listing (a restarted source lost its dirty bitmap).
    pub(crate) ask_rebuild: bool,
    pub(crate) outbox: Arc<Outbox>,
    pub(crate) events: mpsc::UnboundedSender<Event>,
    pub(crate) store: Arc<Store>,
    pub(crate) disk_id: DiskId,
    pub(crate) config: SourceConfig,
    pub(crate) status: Arc<MigrationStatus>,
    pub(crate) stop: tokio::sync::watch::Receiver<bool>,
    /// Fingerprints sent lately on any connection (to count what a lost link made us resend).
    pub(crate) ever_sent: Arc<Mutex<RecentFingerprints>>,
    /// A connection was accepted once (later failures are lost links, not a bad address).
    pub(crate) ever_connected: bool,
}

pub(crate) enum SessionEnd {
    Stopped,
    Lost(MigrationError),
    Fatal(MigrationError),
}

impl LinkSupervisor {
    pub(crate) fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    pub(crate) async fn run(mut self) {
        let mut first = true;
        loop {
            let Some(stream) = self.connect().await else {
                return;
            };
            if !first {
                self.status.traffic.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            match self.session(stream, first).await {
                (SessionEnd::Stopped, _) => return,
                (SessionEnd::Fatal(e), _) => {
                    let _ = self.events.send(Event::Fatal(e));
                    return;
                }
                (SessionEnd::Lost(e), accepted) => {
                    if self.stopping() {
                        return;
                    }
                    tracing::warn!(error = %e, "migration link lost; reconnecting");
                    self.status.link_down(&e.to_string());
                    let _ = self.events.send(Event::LinkDown);
                    if accepted {
                        self.ever_connected = true;
                        first = false;
                        self.ask_rebuild = false;
                        self.hello.resume = true;
                    }
                }
            }
        }
    }

    /// Connects, retrying with backoff; past the reconnect window the migration is
    /// interrupted until an operator resumes it (or it is stopped). None when stopped.
    pub(crate) async fn connect(&mut self) -> Option<LinkStream> {
        let mut backoff = Backoff::default();
        let mut since = Instant::now();
        let window = Duration::from_secs(self.config.reconnect_window_secs);
        loop {
            if self.stopping() {
                return None;
            }
            let attempt = tokio::select! {
                r = tokio::time::timeout(Duration::from_secs(30), self.connector.connect()) => r,
                _ = self.stop.changed() => return None,
            };
            let err = match attempt {
                Ok(Ok(s)) => return Some(s),
                Ok(Err(e)) => e.to_string(),
                Err(_) => "connecting timed out".to_string(),
            };
            tracing::warn!(error = %err, "cannot reach the destination");
            self.status.link_down(&err);
            if window.is_zero() || (!self.hello.resume && self.status.traffic.reconnects.load(Ordering::Relaxed) == 0 && !self.ever_connected) {
                // No reconnecting (a one-shot link), or a new migration whose destination
                // cannot be reached at all: fail now.
                let _ = self.events.send(Event::Fatal(MigrationError::Io(std::io::Error::new(std::io::ErrorKind::NotConnected, err))));
                return None;
            }
            if since.elapsed() >= window {
                tracing::error!(window_secs = window.as_secs(), "gave up reconnecting; the migration is interrupted until it is resumed");
                self.status.interrupt(&err);
                tokio::select! {
                    _ = self.status.kick.notified() => {}
                    _ = self.stop.changed() => return None,
                }
                backoff = Backoff::default();
                since = Instant::now();
                continue;
            }
            let delay = backoff.next_delay();
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.status.kick.notified() => {}
                _ = self.stop.changed() => return None,
            }
        }
    }

    /// One connection; also says whether the destination accepted it.
    pub(crate) async fn session(&mut self, mut stream: LinkStream, first: bool) -> (SessionEnd, bool) {
        let traffic = &self.status.traffic;
        let handshake = async {
            exchange_greetings(&mut stream, traffic).await?;
            let hello = Hello { rebuild: self.ask_rebuild, ..self.hello.clone() };
            crate::wire::write_message(&mut stream, &Message::Hello(hello), traffic).await?;
            match read_message(&mut stream, traffic).await? {
                Some(Message::Accept(info)) => Ok(info),
                Some(Message::Error(e)) => Err(MigrationError::Refused(e.message)),
                Some(other) => Err(MigrationError::Unexpected(other.name())),
                None => Err(MigrationError::Closed),
            }
        };
        let info = match tokio::time::timeout(Duration::from_secs(60), handshake).await {
            Ok(Ok(info)) => info,
            // A destination that refuses the very first connection of a new migration is
            // not a lost link: fail at once. A resumed one may be restarting: retry.
            Ok(Err(e)) if is_link_error(&e) && (!first || self.hello.resume) => return (SessionEnd::Lost(e), false),
            Ok(Err(e)) => return (SessionEnd::Fatal(e), false),
            Err(_) => return (SessionEnd::Lost(MigrationError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"))), false),
        };
        let cursor = if info.rebuild {
            let epoch = self.outbox.restart();
            let _ = self.events.send(Event::Rebuild { epoch });
            0
        } else {
            if let Err(e) = self.outbox.ack(info.processed) {
                return (SessionEnd::Fatal(e), true);
            }
            info.processed
        };
        if !first {
            tracing::info!(processed = info.processed, switched = info.switched, rebuild = info.rebuild, "migration link resumed");
        }
        self.status.link_up();

        let (reader, writer) = tokio::io::split(stream);
        let (urgent_tx, urgent_rx) = mpsc::channel::<DataFrame>(16);
        let (low_tx, low_rx) = mpsc::channel::<DataFrame>(4);
        let (work_tx, work_rx) = mpsc::unbounded_channel::<SendWork>();
        let mut writer_task = tokio::spawn(run_writer(writer, self.outbox.clone(), cursor, urgent_rx, low_rx, self.status.clone(), self.ever_sent.clone()));
        let reads = ReadServer::new(self.store.clone(), self.disk_id, urgent_tx.clone());
        let mut reader_task = tokio::spawn(run_reader(reader, self.events.clone(), work_tx, reads, self.outbox.clone(), self.status.clone()));
        let sender_task = tokio::spawn(run_data_sender(
            self.store.clone(),
            work_rx,
            urgent_tx,
            low_tx,
            self.config.clone(),
            self.status.clone(),
            DataFeatures {
                streaming: self.hello.data_stream && info.data_stream,
                delta: self.hello.delta && info.delta,
                layout: RecordLayout::agreed(self.hello.unnamed_blocks && info.unnamed_blocks),
            },
        ));
        let mut writer_done = false;
        let end = tokio::select! {
            r = &mut reader_task => match r {
                Ok(Ok(())) if self.stopping() => SessionEnd::Stopped,
                Ok(Ok(())) => SessionEnd::Lost(MigrationError::Closed),
                Ok(Err(e)) if is_link_error(&e) => SessionEnd::Lost(e),
                Ok(Err(e)) => SessionEnd::Fatal(e),
                Err(_) => SessionEnd::Lost(MigrationError::Closed),
            },
            w = &mut writer_task => {
                writer_done = true;
                match w {
                Ok(Ok(())) if self.stopping() => SessionEnd::Stopped,
                Ok(Ok(())) => SessionEnd::Lost(MigrationError::Closed),
                Ok(Err(e)) if is_link_error(&e) => SessionEnd::Lost(e),
                Ok(Err(e)) => SessionEnd::Fatal(e),
                Err(_) => SessionEnd::Lost(MigrationError::Closed),
                }
            }
            _ = self.stop.changed() => SessionEnd::Stopped,
        };
        if matches!(end, SessionEnd::Stopped) && !writer_done && !self.outbox.all_written() {
            // Let the writer finish what is queued (BYE, ERROR) before closing. Nothing
            // queued (the usual end: BYE was written before the stop): close at once, as the
            // writer never ends on its own (this wait cost every migration half a second).
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut writer_task).await;
        }
        sender_task.abort();
        reader_task.abort();
        writer_task.abort();
        (end, true)
    }
}

/// Errors that a new connection may cure. A TLS alert (the peer refused our certificate, or
/// sent garbage) is not one of them.
pub(crate) fn is_link_error(e: &MigrationError) -> bool {
    match e {
        MigrationError::Io(io) => io.kind() != std::io::ErrorKind::InvalidData,
        MigrationError::Closed => true,
        _ => false,
    }
}
