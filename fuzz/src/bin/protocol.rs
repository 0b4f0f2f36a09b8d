//! AFL++ target: `lipsync_serve::fuzzing::protocol` on every input.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        lipsync_serve::fuzzing::protocol(data);
    });
}
