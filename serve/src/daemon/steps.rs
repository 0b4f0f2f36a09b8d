//! What each client message does, given where the connection's session stands: the
//! connection's state machine as a pure function ([`step`]), so that its transitions are
//! tested without a socket.

use crate::protocol::{ErrorCode, Kind};

/// Where a connection's session stands, as its messages see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) enum SessionState {
    /// No session was opened on this connection.
    #[default]
    None,
    /// A session takes audio (a live one: utterances).
    Streaming {
        /// A live session (protocol 2's `"realtime": true`).
        live: bool,
        /// It has stopped early (failed or cancelled): its error reply is on its way, and what
        /// it is sent is dropped.
        stopped: bool,
    },
    /// The session has had all its audio (`EndAudio`, or `Finish` for a live one); its
    /// last frames may still be going out.
    Ended {
        /// A live session.
        live: bool,
    },
}

/// What a message does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Step {
    /// Open a session (the previous one, if any, has had its audio: let it finish first).
    Open,
    /// Feed the session's audio.
    Audio,
    /// End the live session's current utterance (it idles again).
    EndUtterance,
    /// End the session's audio (it finishes its frames, then `Done`).
    EndAudio,
    /// Interrupt the live session.
    Interrupt,
    /// Stop the session and close the connection.
    Close,
    /// Reply with the daemon's statistics.
    Stats,
    /// Reply with the avatars.
    ListAvatars,
    /// Load (`true`) or unload an avatar.
    Avatar {
        /// Load rather than unload.
        load: bool,
    },
    /// An error reply; the connection stays open.
    Refuse(ErrorCode, &'static str),
    /// An error reply, then the connection closes.
    Fatal(ErrorCode, String),
}

/// What `kind` does when the connection's session is in `state`.
pub(crate) fn step(state: SessionState, kind: Kind) -> Step {
    use SessionState::{Ended, Streaming};
    match kind {
        Kind::Open => match state {
            Streaming { stopped: false, .. } => Step::Refuse(
                ErrorCode::SessionOpen,
                "Open while a session is streaming on this connection (send EndAudio first, or Finish for a live session)",
            ),
            _ => Step::Open,
        },
        Kind::Audio => match state {
            Streaming { .. } => Step::Audio,
            Ended { .. } => Step::Fatal(ErrorCode::NoSession, "Audio after EndAudio".into()),
            SessionState::None => Step::Fatal(ErrorCode::NoSession, "Audio before Open".into()),
        },
        Kind::EndAudio | Kind::Finish => match state {
            Streaming { live: true, .. } if kind == Kind::EndAudio => Step::EndUtterance,
            Streaming { .. } => Step::EndAudio,
            Ended { .. } => Step::Fatal(ErrorCode::NoSession, format!("{kind:?} after the audio was already ended")),
            SessionState::None => Step::Fatal(ErrorCode::NoSession, format!("{kind:?} before Open")),
        },
        Kind::Interrupt => match state {
            Streaming { live: false, .. } | Ended { live: false } => Step::Refuse(
                ErrorCode::NotRealtime,
                "Interrupt needs a live session (Open with \"realtime\": true)",
            ),
            Streaming { live: true, .. } => Step::Interrupt,
            Ended { live: true } => Step::Fatal(ErrorCode::NoSession, "Interrupt after Finish".into()),
            SessionState::None => Step::Fatal(ErrorCode::NoSession, "Interrupt before Open".into()),
        },
        Kind::Close => Step::Close,
        Kind::StatsRequest => Step::Stats,
        Kind::ListAvatars => Step::ListAvatars,
        Kind::LoadAvatar => Step::Avatar { load: true },
        Kind::UnloadAvatar => Step::Avatar { load: false },
        Kind::Hello => Step::Fatal(ErrorCode::Handshake, "Hello sent twice".into()),
        other => Step::Fatal(ErrorCode::Unexpected, format!("{other:?} is a server-to-client message")),
    }
}

#[cfg(test)]
mod tests {
    use super::SessionState::{Ended, None as NoSession, Streaming};
    use super::*;

    const STATES: [SessionState; 7] = [
        NoSession,
        Streaming { live: false, stopped: false },
        Streaming { live: true, stopped: false },
        Streaming { live: false, stopped: true },
        Streaming { live: true, stopped: true },
        Ended { live: false },
        Ended { live: true },
    ];

    const STREAMING: SessionState = Streaming { live: false, stopped: false };
    const LIVE: SessionState = Streaming { live: true, stopped: false };

    fn fatal_code(s: Step) -> Option<ErrorCode> {
        match s {
            Step::Fatal(code, _) => Some(code),
            _ => None,
        }
    }

    #[test]
    fn open_is_refused_only_while_a_session_streams_and_has_not_stopped() {
        for state in STATES {
            let want = matches!(state, Streaming { stopped: false, .. });
            assert_eq!(matches!(step(state, Kind::Open), Step::Refuse(ErrorCode::SessionOpen, _)), want, "{state:?}");
        }
    }

    #[test]
    fn audio_goes_only_to_a_streaming_session_and_closes_the_connection_otherwise() {
        for state in STATES.into_iter().filter(|s| matches!(s, Streaming { .. })) {
            assert_eq!(step(state, Kind::Audio), Step::Audio, "{state:?}: a stopped session drops it");
        }
        assert_eq!(step(NoSession, Kind::Audio), Step::Fatal(ErrorCode::NoSession, "Audio before Open".into()));
        assert_eq!(
            step(Ended { live: true }, Kind::Audio),
            Step::Fatal(ErrorCode::NoSession, "Audio after EndAudio".into())
        );
    }

    #[test]
    fn end_audio_ends_an_utterance_of_a_real_time_session_and_finish_ends_the_session() {
        assert_eq!(step(LIVE, Kind::EndAudio), Step::EndUtterance);
        assert_eq!(step(LIVE, Kind::Finish), Step::EndAudio);
        assert_eq!(step(STREAMING, Kind::EndAudio), Step::EndAudio);
        assert_eq!(step(STREAMING, Kind::Finish), Step::EndAudio);
        for kind in [Kind::EndAudio, Kind::Finish] {
            assert_eq!(fatal_code(step(NoSession, kind)), Some(ErrorCode::NoSession));
            assert_eq!(fatal_code(step(Ended { live: false }, kind)), Some(ErrorCode::NoSession));
            assert_eq!(fatal_code(step(Ended { live: true }, kind)), Some(ErrorCode::NoSession));
        }
    }

    #[test]
    fn interrupt_needs_a_real_time_session_that_has_not_finished() {
        assert_eq!(step(LIVE, Kind::Interrupt), Step::Interrupt);
        assert_eq!(step(Streaming { live: true, stopped: true }, Kind::Interrupt), Step::Interrupt);
        for state in [STREAMING, Ended { live: false }] {
            assert!(matches!(step(state, Kind::Interrupt), Step::Refuse(ErrorCode::NotRealtime, _)), "{state:?}");
        }
        assert_eq!(
            step(Ended { live: true }, Kind::Interrupt),
            Step::Fatal(ErrorCode::NoSession, "Interrupt after Finish".into())
        );
        assert_eq!(step(NoSession, Kind::Interrupt), Step::Fatal(ErrorCode::NoSession, "Interrupt before Open".into()));
    }

    #[test]
    fn administration_works_in_every_state() {
        for state in STATES {
            assert_eq!(step(state, Kind::StatsRequest), Step::Stats);
            assert_eq!(step(state, Kind::ListAvatars), Step::ListAvatars);
            assert_eq!(step(state, Kind::LoadAvatar), Step::Avatar { load: true });
            assert_eq!(step(state, Kind::UnloadAvatar), Step::Avatar { load: false });
            assert_eq!(step(state, Kind::Close), Step::Close);
        }
    }

    #[test]
    fn a_second_hello_and_server_messages_close_the_connection() {
        for state in STATES {
            assert_eq!(fatal_code(step(state, Kind::Hello)), Some(ErrorCode::Handshake));
            for kind in [
                Kind::Welcome,
                Kind::Opened,
                Kind::Frame,
                Kind::Done,
                Kind::Speech,
                Kind::Interrupted,
                Kind::Stats,
                Kind::Avatars,
                Kind::Ok,
                Kind::Error,
            ] {
                assert_eq!(fatal_code(step(state, kind)), Some(ErrorCode::Unexpected), "{kind:?}");
            }
        }
    }
}
