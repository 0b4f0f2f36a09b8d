//! The `lipsync serve` wire protocol (documented in `docs/protocol.md`).
//!
//! Every message is `u32 length (big-endian) | u8 type | payload`, where `length` counts the
//! type byte and the payload and may not exceed [`MAX_MESSAGE`]. Control payloads are JSON
//! objects; audio is raw PCM; frames are `u32 index | u32 pts_ms | u8 flags | JPEG bytes`.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const PROTOCOL_VERSION: u32 = 2;

/// Largest `length` accepted (type byte + payload): 16 MiB.
pub const MAX_MESSAGE: usize = 16 << 20;

/// Message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client -> server, first message: `{"protocol": 2, "client": "..."}`.
    Hello = 0x01,
    /// Server -> client: `{"protocol": 2, "server": "...", "max_message": N}`.
    Welcome = 0x02,
    /// Client -> server: open a session ([`OpenRequest`]).
    Open = 0x10,
    /// Server -> client: the session is open ([`Opened`]).
    Opened = 0x11,
    /// Client -> server: PCM audio in the session's format (whole sample frames).
    Audio = 0x12,
    /// Client -> server: end of the session's audio (a live session: of the current utterance).
    EndAudio = 0x13,
    /// Client -> server: stop the session now and close the connection.
    Close = 0x14,
    /// Client -> server, live sessions: drop the pending audio and unsent frames, back to
    /// idle at once.
    Interrupt = 0x15,
    /// Client -> server: end the session after its current utterance (a live session), or of its
    /// audio (like `EndAudio`).
    Finish = 0x16,
    /// Server -> client: one frame ([`FrameHead`] then the JPEG).
    Frame = 0x20,
    /// Server -> client: the session finished ([`Done`]).
    Done = 0x21,
    /// Server -> client: the next frame is the first of an utterance ([`SpeechStart`]).
    Speech = 0x22,
    /// Server -> client: an interrupt took effect ([`Interrupted`]).
    Interrupted = 0x23,
    /// Client -> server: ask for statistics (empty payload).
    StatsRequest = 0x30,
    /// Server -> client: statistics (JSON).
    Stats = 0x31,
    /// Client -> server: list avatars (empty payload).
    ListAvatars = 0x40,
    /// Client -> server: `{"name": "..."}` load an avatar.
    LoadAvatar = 0x41,
    /// Client -> server: `{"name": "..."}` unload an avatar (refused while in use).
    UnloadAvatar = 0x42,
    /// Server -> client: `{"avatars": [...]}`.
    Avatars = 0x43,
    /// Server -> client: a management request succeeded (JSON).
    Ok = 0x44,
    /// Server -> client: `{"code": "...", "message": "..."}`.
    Error = 0x7F,
}

impl Kind {
    /// The message type for a byte.
    pub fn from_u8(b: u8) -> Option<Self> {
        use Kind::*;
        Some(match b {
            0x01 => Hello,
            0x02 => Welcome,
            0x10 => Open,
            0x11 => Opened,
            0x12 => Audio,
            0x13 => EndAudio,
            0x14 => Close,
            0x15 => Interrupt,
            0x16 => Finish,
            0x20 => Frame,
            0x21 => Done,
            0x22 => Speech,
            0x23 => Interrupted,
            0x30 => StatsRequest,
            0x31 => Stats,
            0x40 => ListAvatars,
            0x41 => LoadAvatar,
            0x42 => UnloadAvatar,
            0x43 => Avatars,
            0x44 => Ok,
            0x7F => Error,
            _ => return None,
        })
    }
}

/// Framing errors.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection between messages.
    #[error("connection closed")]
    Closed,
    /// The stream ended inside a message.
    #[error("truncated message: the connection closed after {got} of {want} bytes")]
    Truncated {
        /// Bytes read.
        got: usize,
        /// Bytes expected.
        want: usize,
    },
    /// A length over the limit (or zero).
    #[error("message length {0} is not in 1..={MAX_MESSAGE}")]
    BadLength(usize),
    /// An unknown type byte.
    #[error("unknown message type 0x{0:02x}")]
    UnknownType(u8),
    /// Socket error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl WireError {
    /// The code of the error reply it gets.
    pub fn code(&self) -> ErrorCode {
        match self {
            WireError::Closed => ErrorCode::Closed,
            WireError::Truncated { .. } => ErrorCode::Truncated,
            WireError::BadLength(0) => ErrorCode::BadLength,
            WireError::BadLength(_) => ErrorCode::Oversize,
            WireError::UnknownType(_) => ErrorCode::UnknownType,
            WireError::Io(_) => ErrorCode::Io,
        }
    }
}

/// The machine-readable code of an `Error` message (docs/protocol.md lists which close the
/// connection).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Unsupported protocol version.
    Version,
    /// A malformed request (JSON, options out of range).
    BadRequest,
    /// No Hello, Hello twice, or another message first.
    Handshake,
    /// The connection closed (never sent).
    Closed,
    /// The stream ended inside a message.
    Truncated,
    /// A zero length.
    BadLength,
    /// A length over the maximum.
    Oversize,
    /// An unknown message type.
    UnknownType,
    /// A socket error.
    Io,
    /// No such avatar, or a name that is not a plain directory name.
    UnknownAvatar,
    /// Unload refused: sessions use the avatar.
    InUse,
    /// The avatar could not be loaded.
    AvatarLoad,
    /// Audio or EndAudio without a streaming session.
    NoSession,
    /// A server-to-client message sent by the client.
    Unexpected,
    /// Open while a session is streaming on the connection.
    SessionOpen,
    /// The daemon is draining.
    ShuttingDown,
    /// The session or connection limit is reached.
    Busy,
    /// The session failed (the message says why).
    Session,
    /// Audio that is not whole sample frames, or not finite.
    BadAudio,
    /// The connection idled too long, or a message did not arrive whole in time.
    Timeout,
    /// Interrupt sent for a session that is not live.
    NotRealtime,
    /// A code this build does not know (from a newer peer).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code as it travels.
    pub fn as_str(self) -> &'static str {
        use ErrorCode::*;
        match self {
            Version => "version",
            BadRequest => "bad_request",
            Handshake => "handshake",
            Closed => "closed",
            Truncated => "truncated",
            BadLength => "bad_length",
            Oversize => "oversize",
            UnknownType => "unknown_type",
            Io => "io",
            UnknownAvatar => "unknown_avatar",
            InUse => "in_use",
            AvatarLoad => "avatar_load",
            NoSession => "no_session",
            Unexpected => "unexpected",
            SessionOpen => "session_open",
            ShuttingDown => "shutting_down",
            Busy => "busy",
            Session => "session",
            BadAudio => "bad_audio",
            Timeout => "timeout",
            NotRealtime => "not_realtime",
            Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads up to `buf.len()` bytes; returns how many were read before EOF.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Reads one message into `payload` (reused); returns its type.
pub fn read_message<R: Read>(r: &mut R, payload: &mut Vec<u8>) -> Result<Kind, WireError> {
    let mut head = [0u8; 5];
    let got = read_full(r, &mut head[..4])?;
    if got == 0 {
        return Err(WireError::Closed);
    }
    if got < 4 {
        return Err(WireError::Truncated { got, want: 4 });
    }
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len == 0 || len > MAX_MESSAGE {
        return Err(WireError::BadLength(len));
    }
    if read_full(r, &mut head[4..5])? == 0 {
        return Err(WireError::Truncated { got: 4, want: 4 + len });
    }
    // Grows with the bytes that actually arrive: a header alone does not make us allocate
    // its announced length.
    payload.clear();
    let got = r.by_ref().take((len - 1) as u64).read_to_end(payload)?;
    if got < len - 1 {
        return Err(WireError::Truncated { got: 5 + got, want: 4 + len });
    }
    Kind::from_u8(head[4]).ok_or(WireError::UnknownType(head[4]))
}

/// Writes one message (header and payload in one write).
pub fn write_message(w: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    write_parts(w, kind, &[payload])
}

/// Most payload parts [`write_parts`] takes.
pub const MAX_PARTS: usize = 4;

/// Writes one message whose payload is the concatenation of `parts` (at most [`MAX_PARTS`]),
/// header and parts in one vectored write, without allocating.
pub fn write_parts(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> std::io::Result<()> {
    if parts.len() > MAX_PARTS {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "too many message parts"));
    }
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("message of {len} bytes is too large"),
        ));
    }
    let mut head = [0u8; 5];
    head[..4].copy_from_slice(&(len as u32).to_be_bytes());
    head[4] = kind as u8;
    let mut bufs = [std::io::IoSlice::new(&[]); MAX_PARTS + 1];
    bufs[0] = std::io::IoSlice::new(&head);
    for (slot, p) in bufs[1..].iter_mut().zip(parts) {
        *slot = std::io::IoSlice::new(p);
    }
    write_all_vectored(w, &mut bufs[..parts.len() + 1])?;
    w.flush()
}

fn write_all_vectored(w: &mut impl Write, mut bufs: &mut [std::io::IoSlice<'_>]) -> std::io::Result<()> {
    std::io::IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match w.write_vectored(bufs) {
            Ok(0) => return Err(std::io::Error::new(std::io::ErrorKind::WriteZero, "failed to write whole message")),
            Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes a JSON control message.
pub fn write_json(w: &mut impl Write, kind: Kind, value: &impl Serialize) -> std::io::Result<()> {
    let bytes = serde_json::to_vec(value).map_err(std::io::Error::other)?;
    write_message(w, kind, &bytes)
}

/// `Hello` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the client speaks.
    pub protocol: u32,
    /// Free-form client name.
    #[serde(default)]
    pub client: String,
}

/// Audio sample format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AudioFormat {
    /// Signed 16-bit little-endian.
    S16le,
    /// 32-bit float little-endian.
    F32le,
}

/// `Open` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenRequest {
    /// Avatar name (a directory under the daemon's `--avatars`).
    pub avatar: String,
    /// Sample rate of the audio that follows (resampled to 16 kHz as needed).
    pub sample_rate: u32,
    /// Sample format.
    pub format: AudioFormat,
    /// Interleaved channels (mixed down to mono).
    #[serde(default = "one")]
    pub channels: u16,
    /// JPEG quality (1..=100); default the avatar's.
    #[serde(default)]
    pub jpeg_quality: Option<u8>,
    /// Most frames of this session per UNet run; default the daemon's batch.
    #[serde(default)]
    pub batch: Option<usize>,
    /// Start offset into the template sequence; default the avatar's.
    #[serde(default)]
    pub start_frame: Option<usize>,
    /// Real-time mode: frames at the avatar's frame rate on the session's clock, idle frames
    /// when no speech, `Interrupt`; the session lasts until `Finish`.
    #[serde(default)]
    pub realtime: bool,
}

fn one() -> u16 {
    1
}

/// `Opened` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Opened {
    /// Session id.
    pub session: u64,
    /// Frames per second of the output.
    pub fps: f64,
    /// Frame size.
    pub width: usize,
    /// Frame size.
    pub height: usize,
    /// Whether the session is live.
    #[serde(default)]
    pub realtime: bool,
    /// Live sessions: how long after its presentation time on the session's clock each
    /// frame is sent, ms.
    #[serde(default)]
    pub delay_ms: f64,
}

/// `Done` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Done {
    /// Session id.
    pub session: u64,
    /// Frames sent.
    pub frames: u64,
    /// Of which idle frames.
    #[serde(default)]
    pub idle_frames: u64,
}

/// `Speech` payload: the next frame begins utterance `utterance`; its audio starts at that
/// frame's presentation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeechStart {
    /// The utterance (from 0 in each session).
    pub utterance: u32,
    /// The index of its first frame.
    pub frame: u32,
}

/// `Interrupted` payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interrupted {
    /// Session id.
    pub session: u64,
    /// The index the next frame takes: frames below it that are still on their way were sent
    /// before the interrupt took effect.
    pub next_frame: u64,
}

/// `Error` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorReply {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// `LoadAvatar` / `UnloadAvatar` payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AvatarName {
    /// Avatar name.
    pub name: String,
}

/// The head of a `Frame` payload: `u32 index | u32 pts_ms | u8 flags` (big-endian), then the
/// JPEG bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// Frame index (from 0 in each session).
    pub index: u32,
    /// Presentation time on the session's clock, `round(index * 1000 / fps)` ms.
    pub pts_ms: u32,
    /// An idle frame (the template frame, no speech).
    pub idle: bool,
}

/// Bytes of a [`FrameHead`].
pub const FRAME_HEAD: usize = 9;

/// Flag bit of an idle frame.
const FLAG_IDLE: u8 = 1;

impl FrameHead {
    /// The head as it travels.
    pub fn encode(&self) -> [u8; FRAME_HEAD] {
        let mut b = [0u8; FRAME_HEAD];
        b[0..4].copy_from_slice(&self.index.to_be_bytes());
        b[4..8].copy_from_slice(&self.pts_ms.to_be_bytes());
        b[8] = if self.idle { FLAG_IDLE } else { 0 };
        b
    }
}

/// Splits a `Frame` payload into its head and the JPEG.
pub fn parse_frame(payload: &[u8]) -> Option<(FrameHead, &[u8])> {
    if payload.len() < FRAME_HEAD {
        return None;
    }
    let index = u32::from_be_bytes(payload[0..4].try_into().ok()?);
    let pts_ms = u32::from_be_bytes(payload[4..8].try_into().ok()?);
    let idle = payload[8] & FLAG_IDLE != 0;
    Some((FrameHead { index, pts_ms, idle }, &payload[FRAME_HEAD..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors() {
        let mut buf = Vec::new();
        write_message(&mut buf, Kind::Audio, &[1, 2, 3]).unwrap();
        let head = FrameHead { index: 7, pts_ms: 280, idle: true };
        write_parts(&mut buf, Kind::Frame, &[&head.encode(), b"jpeg"]).unwrap();
        let mut r = &buf[..];
        let mut p = Vec::new();
        assert_eq!(read_message(&mut r, &mut p).unwrap(), Kind::Audio);
        assert_eq!(p, [1, 2, 3]);
        assert_eq!(read_message(&mut r, &mut p).unwrap(), Kind::Frame);
        assert_eq!(parse_frame(&p), Some((head, &b"jpeg"[..])));
        assert_eq!(parse_frame(&p[..8]), None, "a head is 9 bytes");
        assert!(matches!(read_message(&mut r, &mut p), Err(WireError::Closed)));

        let mut r = &buf[..6];
        assert!(matches!(read_message(&mut r, &mut p), Err(WireError::Truncated { got: 6, want: 8 })));
        let big = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
        assert!(matches!(read_message(&mut &big[..], &mut p), Err(WireError::BadLength(_))));
        let unknown = [0, 0, 0, 1, 0x99];
        assert!(matches!(read_message(&mut &unknown[..], &mut p), Err(WireError::UnknownType(0x99))));
    }

    #[test]
    fn error_codes_travel_as_their_names() {
        for code in [ErrorCode::BadRequest, ErrorCode::UnknownAvatar, ErrorCode::ShuttingDown, ErrorCode::Busy] {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
        assert_eq!(serde_json::from_str::<ErrorCode>("\"from_the_future\"").unwrap(), ErrorCode::Other);
    }
}
