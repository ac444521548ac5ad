//! The wire codec: any bytes decode to a valid frame or a clean error, and whatever decodes (or
//! encodes) makes the round trip unchanged.

use arbitrary::Unstructured;
use shelfsync_shared::wire::{self, Frame, FRAME_MAX_BYTES};

use super::gen;

/// Decodes `data` as a length-prefixed stream and as a bare body; builds a frame from `data` and
/// round-trips it through the codec.
pub fn run(data: &[u8]) {
    // A stream of length-prefixed frames, as a QUIC stream delivers them.
    let mut rest = data;
    while let Ok(Some((frame, used))) = wire::decode(rest) {
        assert!((5..=rest.len()).contains(&used), "decode used {used} of {} bytes", rest.len());
        round_trip(&frame);
        rest = &rest[used..];
    }
    // A bare body, as `read_frame` hands it over after checking the length prefix.
    if let Ok(frame) = wire::decode_body(data) {
        let again = round_trip(&frame);
        assert!(again.len() - 4 <= data.len(), "the canonical encoding is never longer than an accepted one");
    }
    if let [a, b, c, d, ..] = *data {
        if let Ok(len) = wire::decode_len([a, b, c, d]) {
            assert!((1..=FRAME_MAX_BYTES).contains(&len));
        }
    }
    // A structured frame: what encode accepts, decode gives back unchanged.
    let mut u = Unstructured::new(data);
    if let Ok(frame) = gen::frame(&mut u) {
        match wire::encode(&frame) {
            Ok(bytes) => {
                let (back, used) = wire::decode(&bytes)
                    .unwrap_or_else(|e| panic!("decode refuses what encode made ({e}): {frame:?}"))
                    .expect("a whole frame");
                assert_eq!(used, bytes.len());
                assert_eq!(back, frame, "round trip changed the frame");
            }
            Err(_) => {
                assert!(frame.validate().is_err() || too_large(&frame), "encode refused a valid frame: {frame:?}")
            }
        }
    }
}

fn too_large(frame: &Frame) -> bool {
    postcard::to_stdvec(frame).is_ok_and(|b| b.len() > FRAME_MAX_BYTES)
}

/// Encodes a decoded frame, decodes it again and checks nothing changed; returns the encoding.
fn round_trip(frame: &Frame) -> Vec<u8> {
    frame.validate().unwrap_or_else(|e| panic!("decode returned an invalid frame ({e}): {frame:?}"));
    let bytes = wire::encode(frame).unwrap_or_else(|e| panic!("encode refuses a decoded frame ({e}): {frame:?}"));
    let (back, used) = wire::decode(&bytes).expect("re-decodes").expect("a whole frame");
    assert_eq!(used, bytes.len());
    assert_eq!(&back, frame, "round trip changed the frame");
    assert_eq!(wire::encode(&back).expect("re-encodes"), bytes, "encoding is deterministic");
    bytes
}
