//! AFL++ target: `lipsync_serve::fuzzing::avatar` on every input (a panic that escapes it is a
//! crash; one the product catches and reports as an error is not).

fn main() {
    afl::fuzz_nohook!(|data: &[u8]| {
        lipsync_serve::fuzzing::avatar(data);
    });
}
