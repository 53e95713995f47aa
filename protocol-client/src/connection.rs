//! One TCP connection to one broker.
//!
//! ```text
//!  callers ──encode──► mpsc ──► writer task ──► socket ──► broker
//!     ▲                                                      │
//!     └── oneshot ◄── pending[correlation id] ◄── reader task ◄┘
//! ```
//!
//! Requests are encoded by the caller and handed to a writer task, so a frame is
//! always written whole even when the caller's future is dropped halfway. One reader
//! task splits the byte stream into size-prefixed frames and routes each to the
//! waiter registered under its correlation id; many requests are in flight at once.
//! A framing error, an I/O error or a timed-out request closes the connection and
//! fails every waiter with the same error (a lost response leaves the stream's
//! state unknown, so the connection cannot be trusted afterwards). The pool in
//! [`crate::cluster`] then opens a new one.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::*;
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, Message, StrBytes};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, trace};

use crate::error::{Error, Result};
use crate::security::{self, Security};

/// Largest response frame accepted; anything larger is treated as corruption.
const MAX_FRAME_SIZE: usize = 256 * 1024 * 1024;

/// A byte stream to a broker that a [`Connector`] opens: TLS over TCP, a
/// tunnel, or an in-memory broker in tests.
pub trait Transport: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Transport for T {}

/// The future a [`Connector`] returns.
pub type ConnectFuture = Pin<Box<dyn Future<Output = std::io::Result<Box<dyn Transport>>> + Send>>;

/// Opens the byte stream to a broker address (`host:port`) in place of a
/// plain TCP connection.
pub type Connector = Arc<dyn Fn(&str) -> ConnectFuture + Send + Sync>;

/// Settings of a connection.
#[derive(Clone)]
pub struct ConnectionConfig {
    /// Sent as `client_id` in every request header. Default `"strom"`.
    pub client_id: String,
    /// How long opening the connection may take. Default 10 s.
    pub connect_timeout: Duration,
    /// How long a request may wait for its response. Default 30 s (Java's
    /// `request.timeout.ms`).
    pub request_timeout: Duration,
    /// Opens connections instead of plain TCP; `None` (the default) connects
    /// with TCP, Nagle off.
    pub connector: Option<Connector>,
    /// TLS and SASL (`security.protocol`, `ssl.*`, `sasl.*`). Default plain
    /// TCP, no authentication.
    pub security: Security,
}

impl std::fmt::Debug for ConnectionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectionConfig")
            .field("client_id", &self.client_id)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("connector", &self.connector.as_ref().map(|_| "custom"))
            .field("security", &self.security)
            .finish()
    }
}

impl Default for ConnectionConfig {
    fn default() -> Self {
        ConnectionConfig {
            client_id: "strom".to_owned(),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(30),
            connector: None,
            security: Security::default(),
        }
    }
}

/// A request message this client sends, with its API key and response type.
///
/// `kafka_protocol::protocol::Request` plays this role but exists only when the
/// crate's broker half is compiled too; this trait keeps the build to the client half.
pub trait Request: Message + Encodable + HeaderVersion {
    /// The API this request belongs to.
    const API: ApiKey;
    /// The response message.
    type Response: Decodable + HeaderVersion;
}

macro_rules! requests {
    ($($req:ident => $resp:ident: $api:ident),* $(,)?) => {
        $(impl Request for $req {
            const API: ApiKey = ApiKey::$api;
            type Response = $resp;
        })*
    };
}

requests! {
    ProduceRequest => ProduceResponse: Produce,
    FetchRequest => FetchResponse: Fetch,
    ListOffsetsRequest => ListOffsetsResponse: ListOffsets,
    MetadataRequest => MetadataResponse: Metadata,
    ApiVersionsRequest => ApiVersionsResponse: ApiVersions,
    CreateTopicsRequest => CreateTopicsResponse: CreateTopics,
    CreatePartitionsRequest => CreatePartitionsResponse: CreatePartitions,
    DeleteTopicsRequest => DeleteTopicsResponse: DeleteTopics,
    FindCoordinatorRequest => FindCoordinatorResponse: FindCoordinator,
    JoinGroupRequest => JoinGroupResponse: JoinGroup,
    SyncGroupRequest => SyncGroupResponse: SyncGroup,
    HeartbeatRequest => HeartbeatResponse: Heartbeat,
    LeaveGroupRequest => LeaveGroupResponse: LeaveGroup,
    OffsetCommitRequest => OffsetCommitResponse: OffsetCommit,
    OffsetFetchRequest => OffsetFetchResponse: OffsetFetch,
    InitProducerIdRequest => InitProducerIdResponse: InitProducerId,
    AddPartitionsToTxnRequest => AddPartitionsToTxnResponse: AddPartitionsToTxn,
    AddOffsetsToTxnRequest => AddOffsetsToTxnResponse: AddOffsetsToTxn,
    TxnOffsetCommitRequest => TxnOffsetCommitResponse: TxnOffsetCommit,
    EndTxnRequest => EndTxnResponse: EndTxn,
    SaslHandshakeRequest => SaslHandshakeResponse: SaslHandshake,
    SaslAuthenticateRequest => SaslAuthenticateResponse: SaslAuthenticate,
}

/// The highest version of each API this client's code is written for. The version
/// used is min(this, the broker's max), and must not fall below the broker's min.
fn our_max_version(api: ApiKey) -> Option<i16> {
    Some(match api {
        // v13 of Produce and Fetch address topics by id only.
        ApiKey::Produce => 11,
        ApiKey::Fetch => 12,
        ApiKey::ApiVersions => 3,
        ApiKey::Metadata => 12,
        ApiKey::ListOffsets => 8,
        ApiKey::CreateTopics => 7,
        ApiKey::CreatePartitions => 3,
        ApiKey::DeleteTopics => 6,
        // v4+ batch coordinator keys; v8+ of OffsetFetch batch groups; v9 of
        // OffsetCommit belongs to the KIP-848 protocol.
        ApiKey::FindCoordinator => 3,
        ApiKey::OffsetFetch => 7,
        ApiKey::OffsetCommit => 8,
        // Later versions of the transaction APIs belong to KIP-890's protocol.
        ApiKey::InitProducerId => 4,
        ApiKey::AddPartitionsToTxn => 3,
        ApiKey::AddOffsetsToTxn => 3,
        ApiKey::TxnOffsetCommit => 3,
        ApiKey::EndTxn => 3,
        ApiKey::SaslHandshake => 1,
        ApiKey::SaslAuthenticate => 2,
        _ => return None,
    })
}

/// What this client can speak of `R`: the crate's versions capped by ours.
fn our_versions<R: Request>(api: ApiKey) -> (i16, i16) {
    let max = our_max_version(api).unwrap_or(R::VERSIONS.max);
    (R::VERSIONS.min, max.min(R::VERSIONS.max))
}

type Waiter = oneshot::Sender<Result<Bytes>>;

struct Pending {
    tx: Waiter,
    /// Response header version (0: correlation id; 1: plus tagged fields).
    header_version: i16,
}

enum State {
    Open(HashMap<i32, Pending>),
    Closed(Error),
}

struct Shared {
    broker: String,
    state: Mutex<State>,
}

impl Shared {
    /// Closes the connection: every waiter gets `err`, later requests fail at once.
    fn close(&self, err: Error) {
        let mut state = lock(&self.state);
        if let State::Open(pending) = std::mem::replace(&mut *state, State::Closed(err.clone())) {
            crate::health::connection_ended(&self.broker, &err, pending.len());
            for (_, p) in pending {
                let _ = p.tx.send(Err(err.clone()));
            }
        }
    }
}

/// A poisoned mutex only means another thread panicked while holding it; the
/// state inside is still consistent (every operation on it is a single call,
/// and nothing in the crate panics while holding one).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes a pending entry if the request's future is dropped before its response.
struct PendingGuard<'a> {
    shared: &'a Shared,
    correlation_id: i32,
    armed: bool,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let State::Open(map) = &mut *lock(&self.shared.state) {
                map.remove(&self.correlation_id);
            }
        }
    }
}

/// One connection to one broker, with negotiated API versions.
///
/// Cheap to share behind an `Arc`: any number of tasks may send requests on it
/// concurrently and their responses are matched by correlation id.
pub struct Connection {
    shared: Arc<Shared>,
    writer: mpsc::Sender<Bytes>,
    versions: HashMap<i16, (i16, i16)>,
    correlation: AtomicI32,
    client_id: StrBytes,
    request_timeout: Duration,
    reader: JoinHandle<()>,
    /// When a SASL session ends soon, so the connection is to be replaced.
    retire_at: Option<Instant>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("broker", &self.shared.broker)
            .field("closed", &self.is_closed())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl Connection {
    /// Opens a connection to `broker` (`host:port`) and negotiates API versions.
    ///
    /// Cancel-safe: dropping the future closes the half-open socket.
    pub async fn connect(broker: &str, config: &ConnectionConfig) -> Result<Connection> {
        let tls = config.security.tls_client_config()?;
        Connection::open(broker, config, tls).await
    }

    /// [`Connection::connect`] with the TLS configuration already read
    /// (`Some` exactly when `config.security` asks for TLS).
    pub(crate) async fn open(
        broker: &str,
        config: &ConnectionConfig,
        tls: Option<security::TlsClientConfig>,
    ) -> Result<Connection> {
        let timed_out = |_| Error::ConnectTimeout {
            broker: broker.to_owned(),
            after: config.connect_timeout,
        };
        let security = &config.security;
        // Plain TCP keeps its own halves; anything else (TLS, a custom
        // connector) is split generically.
        let stream: Box<dyn Transport> = match &config.connector {
            None => {
                let stream =
                    tokio::time::timeout(config.connect_timeout, TcpStream::connect(broker))
                        .await
                        .map_err(timed_out)?
                        .map_err(|e| Error::io(broker, e))?;
                stream.set_nodelay(true).map_err(|e| Error::io(broker, e))?;
                if tls.is_none() {
                    let (read, write) = stream.into_split();
                    let conn = Connection::start(read, write, broker, config);
                    return conn.ready(config, timed_out).await;
                }
                Box::new(stream)
            }
            Some(connect) => tokio::time::timeout(config.connect_timeout, connect(broker))
                .await
                .map_err(timed_out)?
                .map_err(|e| Error::io(broker, e))?,
        };
        let stream: Box<dyn Transport> = if let Some(tls) = tls {
            let handshake = security::handshake(stream, broker, &security.tls, tls);
            Box::new(
                tokio::time::timeout(config.connect_timeout, handshake)
                    .await
                    .map_err(timed_out)??,
            )
        } else {
            stream
        };
        let (read, write) = tokio::io::split(stream);
        let conn = Connection::start(read, write, broker, config);
        conn.ready(config, timed_out).await
    }

    /// Negotiates API versions and authenticates a started connection.
    async fn ready(
        mut self,
        config: &ConnectionConfig,
        timed_out: impl Fn(tokio::time::error::Elapsed) -> Error,
    ) -> Result<Connection> {
        let security = &config.security;
        self.negotiate_versions().await?;
        if let (true, Some(sasl)) = (security.protocol.sasl(), &security.sasl) {
            let lifetime =
                tokio::time::timeout(config.connect_timeout, security::authenticate(&self, sasl))
                    .await
                    .map_err(timed_out)??;
            // Retire the connection well before the broker would end the
            // session (KIP-368): the pool opens a new, authenticated one.
            self.retire_at = lifetime.map(|l| Instant::now() + l.mul_f64(0.85));
        }
        Ok(self)
    }

    /// Starts the reader and writer tasks on the two halves of a stream.
    fn start<R, W>(read: R, write: W, broker: &str, config: &ConnectionConfig) -> Connection
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let shared = Arc::new(Shared {
            broker: broker.to_owned(),
            state: Mutex::new(State::Open(HashMap::new())),
        });
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(write_loop(write, rx, shared.clone()));
        let reader = tokio::spawn(read_loop(read, shared.clone()));
        Connection {
            shared,
            writer: tx,
            versions: HashMap::new(),
            correlation: AtomicI32::new(0),
            client_id: StrBytes::from_string(config.client_id.clone()),
            request_timeout: config.request_timeout,
            reader,
            retire_at: None,
        }
    }

    /// `host:port` of the broker.
    pub fn broker(&self) -> &str {
        &self.shared.broker
    }

    /// Whether the connection has failed or been closed (a closed connection
    /// fails every request at once), or its authenticated session is about
    /// to end: either way the pool replaces it.
    pub fn is_closed(&self) -> bool {
        self.retire_at.is_some_and(|at| Instant::now() >= at)
            || matches!(*lock(&self.shared.state), State::Closed(_))
    }

    async fn negotiate_versions(&mut self) -> Result<()> {
        let (_, ours) = our_versions::<ApiVersionsRequest>(ApiKey::ApiVersions);
        let req = ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("strom"))
            .with_client_software_version(StrBytes::from_static_str(env!("CARGO_PKG_VERSION")));
        let mut resp: ApiVersionsResponse = self.send_raw(&req, ours).await?;
        if resp.error_code == 35 {
            // UNSUPPORTED_VERSION: the broker answered in v0; ask again in v0.
            resp = self.send_raw(&ApiVersionsRequest::default(), 0).await?;
        }
        crate::error::check_code(ApiKey::ApiVersions, resp.error_code, None, None, None)?;
        self.versions = resp
            .api_keys
            .iter()
            .map(|k| (k.api_key, (k.min_version, k.max_version)))
            .collect();
        debug!(broker = %self.shared.broker, apis = self.versions.len(), "negotiated API versions");
        Ok(())
    }

    /// The version of `R` to use with this broker: min(broker's max, ours).
    pub fn version<R: Request>(&self) -> Result<i16> {
        let api = api_key::<R>();
        let (ours_min, ours_max) = our_versions::<R>(api);
        let (broker_min, broker_max) = self
            .versions
            .get(&(R::API as i16))
            .copied()
            .unwrap_or((-1, -1));
        let v = ours_max.min(broker_max);
        if broker_max < 0 || v < ours_min.max(broker_min) {
            return Err(Error::UnsupportedVersion {
                broker: self.shared.broker.clone(),
                api,
                broker_min,
                broker_max,
                ours_min,
                ours_max,
            });
        }
        Ok(v)
    }

    /// Sends `req` at the negotiated version and waits for its response.
    ///
    /// Cancel-safe: if the future is dropped, the request (if already queued) is
    /// still written whole and its response is discarded when it arrives.
    pub async fn send<R: Request>(&self, req: &R) -> Result<R::Response> {
        let version = self.version::<R>()?;
        self.send_raw(req, version).await
    }

    /// Like [`Connection::send`] with a timeout other than the configured one
    /// (for requests the broker may hold, such as a long-poll Fetch).
    pub async fn send_with_timeout<R: Request>(
        &self,
        req: &R,
        timeout: Duration,
    ) -> Result<R::Response> {
        let version = self.version::<R>()?;
        self.request(req, version, timeout).await
    }

    /// Sends `req` at `version` (not checked against the broker's versions).
    pub async fn send_raw<R: Request>(&self, req: &R, version: i16) -> Result<R::Response> {
        self.request(req, version, self.request_timeout).await
    }

    async fn request<R: Request>(
        &self,
        req: &R,
        version: i16,
        timeout: Duration,
    ) -> Result<R::Response> {
        let api = api_key::<R>();
        let correlation_id = self.next_correlation_id();
        let frame = self.encode(req, version, correlation_id)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut state = lock(&self.shared.state);
            match &mut *state {
                State::Closed(e) => return Err(e.clone()),
                State::Open(map) => {
                    map.insert(
                        correlation_id,
                        Pending {
                            tx,
                            header_version: R::Response::header_version(version),
                        },
                    );
                }
            }
        }
        let mut guard = PendingGuard {
            shared: &self.shared,
            correlation_id,
            armed: true,
        };
        trace!(broker = %self.shared.broker, ?api, version, correlation_id, "send");
        if self.writer.send(frame).await.is_err() {
            return Err(self.closed_error());
        }
        let body = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => {
                guard.armed = false;
                result?
            }
            Ok(Err(_)) => return Err(self.closed_error()),
            Err(_) => {
                let err = Error::RequestTimeout {
                    broker: self.shared.broker.clone(),
                    api,
                    after: timeout,
                };
                self.shared.close(err.clone());
                return Err(err);
            }
        };
        decode_response::<R::Response>(&self.shared.broker, body, api, version)
    }

    /// Sends a request that gets no response (Produce with acks=0). Returns once
    /// the frame is queued for writing.
    pub async fn send_without_response<R: Request>(&self, req: &R) -> Result<()> {
        let version = self.version::<R>()?;
        if let State::Closed(e) = &*lock(&self.shared.state) {
            return Err(e.clone());
        }
        let frame = self.encode(req, version, self.next_correlation_id())?;
        self.writer
            .send(frame)
            .await
            .map_err(|_| self.closed_error())
    }

    fn next_correlation_id(&self) -> i32 {
        self.correlation.fetch_add(1, Ordering::Relaxed) & i32::MAX
    }

    fn closed_error(&self) -> Error {
        match &*lock(&self.shared.state) {
            State::Closed(e) => e.clone(),
            State::Open(_) => Error::Disconnected {
                broker: self.shared.broker.clone(),
                reason: "connection tasks stopped".into(),
            },
        }
    }

    fn encode<R: Request>(&self, req: &R, version: i16, correlation_id: i32) -> Result<Bytes> {
        let header = RequestHeader::default()
            .with_request_api_key(R::API as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation_id)
            .with_client_id(Some(self.client_id.clone()));
        let header_version = R::header_version(version);
        let size = header
            .compute_size(header_version)
            .and_then(|h| req.compute_size(version).map(|b| h + b))
            .map_err(|e| self.encode_error::<R>(version, e))?;
        let mut buf = BytesMut::with_capacity(4 + size);
        buf.put_i32(size as i32);
        header
            .encode(&mut buf, header_version)
            .and_then(|()| req.encode(&mut buf, version))
            .map_err(|e| self.encode_error::<R>(version, e))?;
        Ok(buf.freeze())
    }

    fn encode_error<R: Request>(&self, version: i16, e: impl std::fmt::Display) -> Error {
        Error::Protocol {
            broker: self.shared.broker.clone(),
            what: format!("cannot encode {:?} v{version}: {e}", api_key::<R>()),
        }
    }
}

/// Decodes a response body (after its header) as `T` of `version`; bytes left
/// over are a protocol error too, naming `broker`.
pub(crate) fn decode_response<T: Decodable>(
    broker: &str,
    mut body: Bytes,
    api: ApiKey,
    version: i16,
) -> Result<T> {
    let resp = T::decode(&mut body, version).map_err(|e| Error::Protocol {
        broker: broker.to_owned(),
        what: format!("cannot decode {api:?} v{version} response: {e}"),
    })?;
    if body.has_remaining() {
        return Err(Error::Protocol {
            broker: broker.to_owned(),
            what: format!(
                "{} bytes left over after decoding {api:?} v{version} response",
                body.remaining()
            ),
        });
    }
    Ok(resp)
}

fn api_key<R: Request>() -> ApiKey {
    R::API
}

async fn write_loop<W: AsyncWrite + Unpin>(
    write: W,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) {
    let mut w = BufWriter::with_capacity(64 * 1024, write);
    while let Some(frame) = rx.recv().await {
        let mut result = w.write_all(&frame).await;
        // Write out whatever else is queued before flushing: one syscall for many.
        while result.is_ok() {
            match rx.try_recv() {
                Ok(frame) => result = w.write_all(&frame).await,
                Err(_) => break,
            }
        }
        if let Err(e) = result.and(w.flush().await) {
            shared.close(Error::io(&shared.broker, e));
            return;
        }
    }
    // Every sender is gone: the connection was dropped.
    let _ = w.shutdown().await;
}

async fn read_loop<R: AsyncRead + Unpin>(mut read: R, shared: Arc<Shared>) {
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let err = loop {
        match split_frame(&mut buf) {
            Ok(Some(frame)) => {
                dispatch(&shared, frame);
                continue;
            }
            Ok(None) => {}
            Err(what) => {
                break Error::Protocol {
                    broker: shared.broker.clone(),
                    what,
                }
            }
        }
        match read.read_buf(&mut buf).await {
            Ok(0) => {
                break Error::Disconnected {
                    broker: shared.broker.clone(),
                    reason: if buf.is_empty() {
                        "closed by the broker".into()
                    } else {
                        format!(
                            "closed by the broker inside a frame ({} bytes read)",
                            buf.len()
                        )
                    },
                }
            }
            Ok(_) => {}
            Err(e) => break Error::io(&shared.broker, e),
        }
    };
    shared.close(err);
}

/// Takes one complete size-prefixed frame off the front of `buf`: `Ok(None)` when
/// more bytes are needed, `Err` when the size prefix is impossible.
fn split_frame(buf: &mut BytesMut) -> std::result::Result<Option<Bytes>, String> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let size = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if size < 4 || size as usize > MAX_FRAME_SIZE {
        return Err(format!("impossible frame size {size}"));
    }
    let size = size as usize;
    if buf.len() < 4 + size {
        buf.reserve(4 + size - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    Ok(Some(buf.split_to(size).freeze()))
}

/// Hands a response frame to its waiter, after stripping the response header.
fn dispatch(shared: &Shared, mut frame: Bytes) {
    let correlation_id = frame.get_i32();
    let pending = match &mut *lock(&shared.state) {
        State::Open(map) => map.remove(&correlation_id),
        State::Closed(_) => None,
    };
    let Some(pending) = pending else {
        debug!(broker = %shared.broker, correlation_id, "response for a request nobody waits for");
        return;
    };
    let result = strip_header_rest(frame, pending.header_version).map_err(|what| Error::Protocol {
        broker: shared.broker.clone(),
        what,
    });
    let _ = pending.tx.send(result);
}

/// The body of a response frame whose correlation id was read: what follows
/// the rest of its header (tagged fields from header version 1 on).
pub(crate) fn strip_header_rest(
    mut frame: Bytes,
    header_version: i16,
) -> std::result::Result<Bytes, String> {
    if header_version >= 1 {
        skip_tagged_fields(&mut frame)?;
    }
    Ok(frame)
}

fn read_unsigned_varint(buf: &mut Bytes) -> std::result::Result<u64, String> {
    let mut v = 0u64;
    for i in 0..10 {
        if !buf.has_remaining() {
            return Err("truncated varint in response header".into());
        }
        let b = buf.get_u8();
        v |= ((b & 0x7f) as u64) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err("overlong varint in response header".into())
}

fn skip_tagged_fields(buf: &mut Bytes) -> std::result::Result<(), String> {
    let n = read_unsigned_varint(buf)?;
    for _ in 0..n {
        let _tag = read_unsigned_varint(buf)?;
        let len = read_unsigned_varint(buf)? as usize;
        if buf.remaining() < len {
            return Err("tagged field runs past the response header".into());
        }
        buf.advance(len);
    }
    Ok(())
}

/// A complete response frame as a broker would send it: size, response header
/// of the version `T` and `version` call for, body. For tests that play a broker.
#[cfg(any(test, feature = "testing"))]
pub(crate) fn response_frame<T: Encodable + HeaderVersion>(
    correlation_id: i32,
    version: i16,
    body: T,
) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i32(correlation_id);
    if T::header_version(version) >= 1 {
        b.put_u8(0); // no tagged fields
    }
    body.encode(&mut b, version)
        .unwrap_or_else(|e| panic!("test response does not encode: {e}"));
    let mut out = (b.len() as i32).to_be_bytes().to_vec();
    out.extend_from_slice(&b);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::{ApiVersionsResponse, MetadataRequest, MetadataResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A scripted broker: answers each request through `respond`, which gets the
    /// api key, version, correlation id and returns the raw frame to send back
    /// (or `None` to stay silent).
    async fn fake_broker<F>(respond: F) -> String
    where
        F: Fn(i16, i16, i32) -> Option<Vec<u8>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            loop {
                let Ok(len) = sock.read_i32().await else {
                    return;
                };
                let mut body = vec![0u8; len as usize];
                if sock.read_exact(&mut body).await.is_err() {
                    return;
                }
                let mut b = &body[..];
                let key = b.get_i16();
                let version = b.get_i16();
                let cid = b.get_i32();
                if let Some(out) = respond(key, version, cid) {
                    if sock.write_all(&out).await.is_err() {
                        return;
                    }
                }
            }
        });
        addr
    }

    fn versions_response(cid: i32) -> Vec<u8> {
        let keys = [(3i16, 0i16, 12i16), (18, 0, 3)]
            .into_iter()
            .map(|(k, min, max)| {
                kafka_protocol::messages::api_versions_response::ApiVersion::default()
                    .with_api_key(k)
                    .with_min_version(min)
                    .with_max_version(max)
            })
            .collect();
        response_frame(cid, 3, ApiVersionsResponse::default().with_api_keys(keys))
    }

    /// Responses that come back out of order reach the right callers.
    #[tokio::test]
    async fn pipelined_responses_are_matched_by_correlation_id() {
        use std::sync::Mutex as StdMutex;
        let held: Arc<StdMutex<Vec<i32>>> = Arc::default();
        let h = held.clone();
        let addr = fake_broker(move |key, _v, cid| {
            if key == 18 {
                return Some(versions_response(cid));
            }
            // Hold the first metadata request; answer both when the second arrives,
            // in reverse order, each carrying its own correlation id as throttle time.
            let mut held = h.lock().unwrap();
            held.push(cid);
            if held.len() < 2 {
                return None;
            }
            let mut out = vec![];
            for &c in held.iter().rev() {
                out.extend(response_frame(
                    c,
                    12,
                    MetadataResponse::default().with_throttle_time_ms(c),
                ));
            }
            Some(out)
        })
        .await;
        let conn = Arc::new(
            Connection::connect(&addr, &ConnectionConfig::default())
                .await
                .unwrap(),
        );
        let req = MetadataRequest::default();
        let (a, b) = tokio::join!(conn.send(&req), conn.send(&req));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_ne!(a.throttle_time_ms, b.throttle_time_ms);
        assert_eq!(conn.version::<MetadataRequest>().unwrap(), 12);
    }

    /// A request the broker never answers fails with a timeout naming the API, and
    /// the connection is closed rather than left in an unknown state.
    #[tokio::test]
    async fn silent_broker_times_out() {
        let addr = fake_broker(|key, _v, cid| (key == 18).then(|| versions_response(cid))).await;
        let config = ConnectionConfig {
            request_timeout: Duration::from_millis(200),
            ..Default::default()
        };
        let conn = Connection::connect(&addr, &config).await.unwrap();
        let err = conn.send(&MetadataRequest::default()).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::RequestTimeout {
                    api: ApiKey::Metadata,
                    ..
                }
            ),
            "{err}"
        );
        assert!(conn.is_closed());
        let again = conn.send(&MetadataRequest::default()).await.unwrap_err();
        assert!(again.is_retriable(), "{again}");
    }

    /// A frame with an impossible size prefix fails waiting requests with a protocol error.
    #[tokio::test]
    async fn malformed_frame_fails_waiters() {
        let addr = fake_broker(|key, _v, cid| {
            if key == 18 {
                Some(versions_response(cid))
            } else {
                Some((-7i32).to_be_bytes().to_vec())
            }
        })
        .await;
        let conn = Connection::connect(&addr, &ConnectionConfig::default())
            .await
            .unwrap();
        let err = conn.send(&MetadataRequest::default()).await.unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
        assert!(err.to_string().contains("frame size"), "{err}");
    }

    /// A response truncated by the broker closing the socket is an error, not a hang.
    #[tokio::test]
    async fn truncated_frame_then_close_is_an_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let len = sock.read_i32().await.unwrap();
            let mut body = vec![0u8; len as usize];
            sock.read_exact(&mut body).await.unwrap();
            let cid = i32::from_be_bytes([body[4], body[5], body[6], body[7]]);
            let full = versions_response(cid);
            sock.write_all(&full[..full.len() - 3]).await.unwrap();
        });
        let err = Connection::connect(&addr, &ConnectionConfig::default())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("inside a frame"), "{err}");
    }

    /// A body that does not decode as the expected response is a protocol error.
    #[tokio::test]
    async fn undecodable_body_is_a_protocol_error() {
        let addr = fake_broker(|key, _v, cid| {
            if key == 18 {
                Some(versions_response(cid))
            } else {
                let mut out = 9i32.to_be_bytes().to_vec();
                out.extend_from_slice(&cid.to_be_bytes());
                out.extend_from_slice(&[0, 0xff, 0xff, 0xff, 0xff]);
                Some(out)
            }
        })
        .await;
        let conn = Connection::connect(&addr, &ConnectionConfig::default())
            .await
            .unwrap();
        let err = conn.send(&MetadataRequest::default()).await.unwrap_err();
        assert!(matches!(err, Error::Protocol { .. }), "{err}");
    }

    /// An API the broker does not list gives a clear unsupported-version error.
    #[tokio::test]
    async fn missing_api_is_unsupported() {
        let addr = fake_broker(|key, _v, cid| (key == 18).then(|| versions_response(cid))).await;
        let conn = Connection::connect(&addr, &ConnectionConfig::default())
            .await
            .unwrap();
        let err = conn
            .version::<kafka_protocol::messages::ProduceRequest>()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::UnsupportedVersion {
                    api: ApiKey::Produce,
                    ..
                }
            ),
            "{err}"
        );
    }

    /// `split_frame` needs the whole frame and rejects negative sizes.
    #[test]
    fn split_frame_waits_for_whole_frame() {
        let mut buf = BytesMut::from(&[0u8, 0, 0, 6, 1, 2, 3][..]);
        assert_eq!(split_frame(&mut buf), Ok(None));
        buf.extend_from_slice(&[4, 5, 6, 9]);
        assert_eq!(
            split_frame(&mut buf).unwrap().unwrap(),
            Bytes::from_static(&[1, 2, 3, 4, 5, 6])
        );
        assert_eq!(&buf[..], &[9]);
        let mut bad = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff][..]);
        assert!(split_frame(&mut bad).is_err());
    }
}
