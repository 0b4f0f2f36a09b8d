#!/usr/bin/env python3
"""Writes the fuzzers' seed corpus (fuzz/corpus/{protocol,audio,avatar}/) from real inputs.

* protocol and session: the client-to-server byte streams of real sessions, made with the Python client's
  own message builder (scripts/client.py) and the golden speech: s16le at 16 kHz, f32le stereo
  at 44.1 kHz, management requests.
* audio: the smallest committed audio fixtures of each container (WAV, FLAC, MP3, OGG, M4A).
* avatar: the golden avatar's avatar.toml and boxes.json.
"""

import json
import os
import shutil
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import client  # noqa: E402


class Capture:
    """A socket stand-in that keeps what the client sends."""

    def __init__(self):
        self.data = bytearray()

    def sendall(self, b):
        self.data += b


def session(pcm, rate, channels, fmt, pieces):
    c = Capture()
    client.send_json(c, client.HELLO, {"protocol": client.PROTOCOL_VERSION, "client": "corpus"})
    client.send_json(c, client.OPEN, {"avatar": "golden", "sample_rate": rate, "format": fmt, "channels": channels})
    for p in pieces:
        client.send(c, client.AUDIO, pcm[p[0]:p[1]])
    client.send(c, client.END_AUDIO)
    client.send_json(c, client.STATS_REQUEST, {})
    client.send(c, client.CLOSE)
    return bytes(c.data)


def main():
    out = os.path.join(ROOT, "fuzz", "corpus")
    shutil.rmtree(out, ignore_errors=True)
    for d in ("protocol", "audio", "avatar", "session"):
        os.makedirs(os.path.join(out, d))
    fix = os.path.join(ROOT, "tests", "fixtures")
    pcm, rate, channels = client.read_wav(os.path.join(fix, "golden", "speech_2s.wav"))
    speech = pcm[16000:17920]  # 60 ms of speech
    files = {
        "session_s16le_16k.bin": session(speech, rate, channels, "s16le", [(0, 640), (640, 1280), (1280, 1920)]),
    }
    samples = struct.unpack(f"<{len(speech) // 2}h", speech)
    stereo = b"".join(struct.pack("<ff", s / 32768.0, s / 32768.0) for s in samples[:200])
    files["session_f32le_44k_stereo.bin"] = session(stereo, 44100, 2, "f32le", [(0, 800), (800, 1600)])
    c = Capture()
    client.send_json(c, client.HELLO, {"protocol": client.PROTOCOL_VERSION})
    client.send_json(c, client.LIST_AVATARS, {})
    client.send_json(c, client.LOAD_AVATAR, {"name": "golden"})
    client.send_json(c, client.UNLOAD_AVATAR, {"name": "golden"})
    files["manage.bin"] = bytes(c.data)
    # A live session: an utterance, its end, another cut by an interrupt, then Finish.
    c = Capture()
    client.send_json(c, client.HELLO, {"protocol": client.PROTOCOL_VERSION})
    client.send_json(c, client.OPEN, {"avatar": "golden", "sample_rate": rate, "format": "s16le", "realtime": True})
    client.send(c, client.AUDIO, speech[:960])
    client.send(c, client.END_AUDIO)
    client.send(c, client.AUDIO, speech[960:])
    client.send(c, client.INTERRUPT)
    client.send(c, client.FINISH)
    files["session_realtime.bin"] = bytes(c.data)
    for name, data in files.items():
        for d in ("protocol", "session"):
            with open(os.path.join(out, d, name), "wb") as f:
                f.write(data)
    for name in ("clip.wav", "clip.flac", "clip.mp3", "clip.ogg", "clip.m4a", "short_0.1s.wav"):
        shutil.copy(os.path.join(fix, "audio", name), os.path.join(out, "audio", name))
    for name in ("avatar.toml", "boxes.json"):
        shutil.copy(os.path.join(fix, "golden", "avatar", name), os.path.join(out, "avatar", name))
    print(json.dumps({d: sorted(os.listdir(os.path.join(out, d))) for d in os.listdir(out)}))


if __name__ == "__main__":
    main()
