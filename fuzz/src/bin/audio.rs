//! AFL++ target: `lipsync_serve::fuzzing::audio` on every input.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        lipsync_serve::fuzzing::audio(data);
    });
}
