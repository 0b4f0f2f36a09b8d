//! AFL++ target: `lipsync_serve::fuzzing::avatar` on every input.

fn main() {
    afl::fuzz!(|data: &[u8]| {
        lipsync_serve::fuzzing::avatar(data);
    });
}
