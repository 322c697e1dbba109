//! Property tests in place of fuzzing for the parsers of untrusted input: the config
//! document, the OIP codec (proxy and executor), gRPC messages, backends' HTTP/1.1
//! responses (`upstream::wire`), and variant assignment. The
//! corpora in `tests/corpus/` (inputs that once mattered) are replayed on every run;
//! file names say what each must produce: `ok-`, `bad-`, or `alone-` (forwarded
//! unbatched).

use std::path::Path;

use proptest::prelude::*;
use serde_json::{Value, json};

use braid::batch::codec::{self, Unqueued};

fn corpus(dir: &str) -> Vec<(String, Vec<u8>)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/corpus")
        .join(dir);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "empty corpus {dir}");
    out
}

#[test]
fn the_config_corpus_gives_the_expected_verdicts() {
    for (name, bytes) in corpus("config") {
        let text = String::from_utf8_lossy(&bytes);
        let result = braid::config::load(&text, &name);
        if name.starts_with("ok-") {
            assert!(result.is_ok(), "{name}: {:?}", result.err());
        } else {
            let errs = result
                .err()
                .unwrap_or_else(|| panic!("{name} was accepted"));
            assert!(!errs.is_empty());
            for e in errs {
                assert!(!e.path.is_empty() && !e.message.is_empty(), "{name}: {e}");
            }
        }
    }
}

#[test]
fn the_oip_corpus_gives_the_expected_verdicts() {
    for (name, bytes) in corpus("oip") {
        let got = codec::parse_v2(&bytes);
        match name.split('-').next().unwrap() {
            "ok" => {
                let item = got.unwrap_or_else(|e| panic!("{name}: {e:?}"));
                let merged = codec::merge(&[&item], None).body;
                let again = codec::parse_v2(&merged).unwrap();
                assert_eq!((again.rows, &again.key), (item.rows, &item.key), "{name}");
            }
            "bad" => assert!(matches!(got, Err(Unqueued::Bad(_))), "{name}: {got:?}"),
            "alone" => assert_eq!(got.unwrap_err(), Unqueued::Alone, "{name}"),
            other => panic!("corpus file {name}: unknown verdict {other:?}"),
        }
        // The executor's own decoder must not panic on any of them either.
        let _ = braid::executor::oip::decode(&bytes, None);
        let _ = braid::executor::oip::decode(&bytes, Some(bytes.len() / 2));
    }
}

/// Arbitrary JSON, a few levels deep.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z]{0,6}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec(
                (
                    prop_oneof![
                        Just("inputs".to_string()),
                        Just("name".to_string()),
                        Just("shape".to_string()),
                        Just("data".to_string()),
                        Just("datatype".to_string()),
                        Just("outputs".to_string()),
                        Just("parameters".to_string()),
                        "[a-z]{1,4}",
                    ],
                    inner
                ),
                0..5
            )
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A YAML document made of config-like keys and odd scalars.
fn yaml_doc() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("routes"),
        Just("executor"),
        Just("model"),
        Just("path_prefix"),
        Just("variants"),
        Just("name"),
        Just("weight"),
        Just("backend"),
        Just("batching"),
        Just("retry"),
        Just("shadow"),
        Just("outlier"),
        Just("fallback"),
        Just("tls"),
        Just("timeout"),
        Just("attempts"),
        Just("on_status"),
    ];
    let scalar = prop_oneof![
        Just("local".to_string()),
        Just("\"http://127.0.0.1:1\"".to_string()),
        Just("yes".to_string()),
        Just(".nan".to_string()),
        Just("-1".to_string()),
        Just("1e400".to_string()),
        Just("250ms".to_string()),
        Just("~".to_string()),
        Just("[]".to_string()),
        Just("{}".to_string()),
        "[a-z0-9]{0,5}",
    ];
    prop::collection::vec((0usize..4, key, scalar, any::<bool>()), 0..24).prop_map(|lines| {
        let mut out = String::new();
        for (depth, k, v, list) in lines {
            let indent = "  ".repeat(depth);
            let dash = if list { "- " } else { "" };
            out.push_str(&format!("{indent}{dash}{k}: {v}\n"));
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_loading_never_panics_and_every_error_has_a_path(doc in yaml_doc()) {
        if let Err(errs) = braid::config::load(&doc, "prop") {
            for e in errs {
                prop_assert!(!e.path.is_empty(), "{e}");
            }
        }
    }

    #[test]
    fn config_loading_survives_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = braid::config::load(&String::from_utf8_lossy(&bytes), "prop");
    }

    #[test]
    fn the_codecs_never_panic_on_arbitrary_json(v in json_value()) {
        let body = serde_json::to_vec(&v).unwrap();
        let _ = codec::parse_v2(&body);
        let _ = codec::parse_v1(&body);
        let _ = braid::executor::oip::decode(&body, None);
        let wrapped = serde_json::to_vec(&json!({"inputs": [v.clone()], "outputs": v})).unwrap();
        let _ = codec::parse_v2(&wrapped);
        let _ = braid::executor::oip::decode(&wrapped, None);
    }

    /// gRPC messages from anywhere: arbitrary bytes, and well-formed ModelInferRequests
    /// whose shapes, datatypes and raw contents disagree. Reading field 1, rewriting
    /// it, decoding, turning into the REST form and parsing that for a batch either
    /// answer or refuse, never panic; a rewrite changes field 1 only.
    #[test]
    fn grpc_messages_are_read_or_refused_never_panicking(
        bytes in prop::collection::vec(any::<u8>(), 0..64),
        dims in prop::collection::vec(prop_oneof![any::<i64>(), 0i64..4], 0..3),
        dt in prop_oneof![Just("FP32"), Just("BYTES"), Just("INT16"), Just("BF16"), Just("X")],
        raw in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..12), 0..3),
        typed in prop::collection::vec(any::<i32>(), 0..4),
    ) {
        use braid::grpc::{self, pb};
        use prost::Message;
        grpc::fields(&bytes).for_each(drop);
        let _ = grpc::string_field(&bytes, 1);
        if let Ok(out) = grpc::with_string_field(&bytes, 1, "target") {
            prop_assert_eq!(grpc::string_field(&out, 1).unwrap(), "target");
        }
        let _ = grpc::next_message(&bytes);
        if let Ok(req) = pb::ModelInferRequest::decode(&bytes[..]) {
            let _ = grpc::oip::rest_request(&req);
        }
        let _ = grpc::oip::grpc_response(&bytes, Some(bytes.len() / 2));
        let req = pb::ModelInferRequest {
            model_name: "m".into(),
            inputs: vec![pb::model_infer_request::InferInputTensor {
                name: "x".into(),
                datatype: dt.into(),
                shape: dims,
                contents: raw.is_empty().then(|| pb::InferTensorContents {
                    int_contents: typed,
                    ..Default::default()
                }),
                ..Default::default()
            }],
            raw_input_contents: raw.into_iter().map(Into::into).collect(),
            ..Default::default()
        };
        let encoded = req.encode_to_vec();
        prop_assert_eq!(grpc::string_field(&encoded, 1).unwrap(), "m");
        if let Ok((body, header_len)) = grpc::oip::rest_request(&req) {
            let _ = codec::parse_v2_with(&body, Some(header_len), Default::default());
            let _ = braid::executor::oip::decode(&body, Some(header_len));
        }
    }

    /// Well-formed requests whose sizes lie: any declared dim (up to u64::MAX), any
    /// `binary_data_size`, any header length, any BYTES length prefix. Neither decoder
    /// may panic, and neither may size anything from the claims (an oversized
    /// allocation aborts the test process, so surviving is the assertion).
    #[test]
    fn declared_sizes_never_size_an_allocation(
        dims in prop::collection::vec(prop_oneof![any::<u64>(), 0u64..4, Just(u64::MAX)], 1..3),
        data in prop::collection::vec("[a-z]{0,3}", 0..4),
        binary_size in prop_oneof![any::<u64>(), 0u64..64],
        prefix in any::<u32>(),
        header_cut in any::<usize>(),
    ) {
        let json_req = json!({"inputs": [{"name": "text", "datatype": "BYTES", "shape": dims, "data": data}]});
        let body = serde_json::to_vec(&json_req).unwrap();
        let _ = codec::parse_v2(&body);
        let _ = braid::executor::oip::decode(&body, None);
        let header = serde_json::to_vec(&json!({"inputs": [{"name": "text", "datatype": "BYTES",
            "shape": dims, "parameters": {"binary_data_size": binary_size}}]})).unwrap();
        let mut body = header.clone();
        body.extend_from_slice(&prefix.to_le_bytes());
        body.extend_from_slice(b"abc");
        let _ = braid::executor::oip::decode(&body, Some(header.len()));
        let _ = braid::executor::oip::decode(&body, Some(header_cut));
        // The proxy's binary-extension parser, on the same lies.
        let _ = codec::parse_v2_with(&body, Some(header.len()), Default::default());
        let _ = codec::parse_v2_with(&body, Some(header_cut), Default::default());
    }

    /// Any reply, JSON or with binary data of any size, to a batch of a JSON client and
    /// a binary one: split either answers both or refuses the reply, never panics.
    #[test]
    fn splitting_any_reply_never_panics(
        v in json_value(),
        rows in 0i64..4,
        dt in prop_oneof![Just("FP32"), Just("BYTES"), Just("INT8"), Just("BOOL"), Just("X")],
        raw in prop::collection::vec(any::<u8>(), 0..24),
        size in prop_oneof![any::<u64>(), 0u64..24],
    ) {
        let req = |params: Value| {
            let body = json!({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1],
                "data": [1.5]}], "parameters": params});
            codec::parse_v2(body.to_string().as_bytes()).unwrap()
        };
        let (a, b) = (req(json!({})), req(json!({"binary_data_output": true})));
        let items = [&a, &b];
        let json_replies = [
            json!({"outputs": [{"name": "y", "datatype": dt, "shape": [rows], "data": v}]}),
            json!({"outputs": [{"name": "y", "datatype": dt, "shape": [rows, 1], "data": [v, v]}]}),
            json!({"outputs": v}),
            v.clone(),
        ];
        for reply in json_replies {
            let _ = codec::split(&items, reply.to_string().as_bytes(), None);
        }
        let header = json!({"outputs": [{"name": "y", "datatype": dt, "shape": [rows],
            "parameters": {"binary_data_size": size}}]})
        .to_string();
        let mut body = header.clone().into_bytes();
        body.extend_from_slice(&raw);
        let reply = codec::Payload { body: body.into(), header_len: Some(header.len()) };
        let _ = codec::split_payload(&items, &reply, None);
    }

    /// Requests of random sizes merged into one batch: an executor that answers each
    /// row in order gives every request exactly its own rows back, and any reply of
    /// the wrong length is refused whole.
    #[test]
    fn merge_then_split_returns_each_request_its_own_rows(
        sizes in prop::collection::vec(1usize..5, 1..8),
        inner in 1usize..3,
        cut in any::<bool>(),
    ) {
        let items: Vec<codec::Item> = sizes
            .iter()
            .enumerate()
            .map(|(i, &rows)| {
                let data: Vec<Vec<f64>> = (0..rows)
                    .map(|r| (0..inner).map(|k| (i * 100 + r * 10 + k) as f64).collect())
                    .collect();
                let body = json!({"id": format!("req{i}"), "inputs": [
                    {"name": "x", "datatype": "FP64", "shape": [rows, inner], "data": data}
                ]});
                codec::parse_v2(body.to_string().as_bytes()).unwrap()
            })
            .collect();
        let refs: Vec<&codec::Item> = items.iter().collect();
        let merged: Value = serde_json::from_slice(&codec::merge(&refs, None).body).unwrap();
        let mut flat = merged["inputs"][0]["data"].as_array().unwrap().clone();
        let total: usize = sizes.iter().sum();
        if cut {
            flat.truncate(flat.len() - inner);
        }
        let rows = flat.len() / inner;
        let reply = json!({"outputs": [{"name": "y", "datatype": "FP64", "shape": [rows, inner], "data": flat}]});
        let split = codec::split(&refs, reply.to_string().as_bytes(), None);
        if cut {
            prop_assert!(split.is_err());
            return Ok(());
        }
        let bodies = split.unwrap();
        prop_assert_eq!(bodies.len(), sizes.len());
        prop_assert_eq!(rows, total);
        for (i, (b, &n)) in bodies.iter().zip(&sizes).enumerate() {
            let v: Value = serde_json::from_slice(b).unwrap();
            prop_assert_eq!(&v["id"], &json!(format!("req{i}")));
            prop_assert_eq!(&v["outputs"][0]["shape"], &json!([n, inner]));
            let data = v["outputs"][0]["data"].as_array().unwrap();
            for (j, d) in data.iter().enumerate() {
                let (r, k) = (j / inner, j % inner);
                prop_assert_eq!(d.as_f64().unwrap(), (i * 100 + r * 10 + k) as f64);
            }
        }
    }

    /// Sticky assignment over arbitrary keys is deterministic, and leaving a variant
    /// out moves only the keys that were on it.
    #[test]
    fn assignment_is_stable_and_exclusion_moves_only_the_excluded(
        weights in prop::collection::vec(0.0f64..10.0, 2..6),
        keys in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 1..64),
        out in 0usize..6,
    ) {
        prop_assume!(weights.iter().any(|w| *w > 0.0));
        let names: Vec<String> = (0..weights.len()).map(|i| format!("v{i}")).collect();
        let chooser = braid::route::Chooser::new(names.iter().map(String::as_str).zip(weights.iter().copied()));
        let out = out % weights.len();
        for key in &keys {
            let first = chooser.sticky(key);
            prop_assert_eq!(first, chooser.sticky(key));
            prop_assert!(weights[first] > 0.0);
            let without = chooser.sticky_among(key, |i| i != out);
            if first != out {
                prop_assert_eq!(without, Some(first));
            } else if let Some(w) = without {
                prop_assert!(w != out && weights[w] > 0.0);
            }
            if let Some(r) = chooser.random_among(|i| i != out) {
                prop_assert!(r != out && weights[r] > 0.0);
            }
        }
    }

    /// Backends' HTTP/1.1 responses, however the bytes arrive: a head with a length,
    /// chunks (with trailers) or a close-delimited body, cut at arbitrary points,
    /// reads back as the same status, headers, body and trailers. Arbitrary bytes are
    /// read or refused, never panicking, and never make a buffer grow past the head
    /// limit unnoticed.
    #[test]
    fn backend_responses_read_back_whole_however_they_are_cut(
        status in prop_oneof![Just(200u16), Just(201), Just(404), Just(500), Just(503)],
        headers in prop::collection::vec(("x-[a-z]{1,8}", "[ -~]{0,20}"), 0..6),
        body in prop::collection::vec(any::<u8>(), 0..3000),
        framing in 0u8..3,
        chunk in 1usize..700,
        trailer in proptest::option::of("[a-z0-9]{1,10}"),
        interim in any::<bool>(),
        // Small reads and large ones (a whole body in one read, as a fast backend gives).
        cuts in prop::collection::vec(prop_oneof![1usize..400, 400usize..5000], 1..40),
    ) {
        let mut wire = Vec::new();
        if interim {
            wire.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        wire.extend_from_slice(format!("HTTP/1.1 {status} Whatever\r\n").as_bytes());
        for (k, v) in &headers {
            wire.extend_from_slice(format!("{k}: {}\r\n", v.trim()).as_bytes());
        }
        match framing {
            0 => {
                wire.extend_from_slice(format!("content-length: {}\r\n\r\n", body.len()).as_bytes());
                wire.extend_from_slice(&body);
            }
            1 => {
                wire.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                for c in body.chunks(chunk) {
                    wire.extend_from_slice(format!("{:x};ext=1\r\n", c.len()).as_bytes());
                    wire.extend_from_slice(c);
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n");
                if let Some(t) = &trailer {
                    wire.extend_from_slice(format!("x-sum: {t}\r\n").as_bytes());
                }
                wire.extend_from_slice(b"\r\n");
            }
            _ => {
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(&body);
            }
        }
        let read = read_response(&wire, &cuts).expect("a well-formed response");
        prop_assert_eq!(read.status, status);
        for (k, v) in &headers {
            prop_assert!(read.headers.get_all(k.as_str()).iter().any(|x| x == v.trim()));
        }
        prop_assert_eq!(&read.body, &body);
        if framing == 1 {
            prop_assert_eq!(read.trailer.as_deref(), trailer.as_deref());
        }
        prop_assert_eq!(read.reusable, framing != 2);
    }

    #[test]
    fn arbitrary_backend_bytes_are_read_or_refused(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
        prefix in prop_oneof![
            Just(&b""[..]),
            Just(&b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"[..]),
            Just(&b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"[..]),
        ],
        cuts in prop::collection::vec(1usize..64, 1..20),
    ) {
        let mut wire = prefix.to_vec();
        wire.extend_from_slice(&bytes);
        let _ = read_response(&wire, &cuts);
    }
}

/// What `read_response` got.
struct ReadBack {
    status: u16,
    headers: http::HeaderMap,
    body: Vec<u8>,
    trailer: Option<String>,
    reusable: bool,
}

/// Reads a response as braid's upstream client does, the bytes arriving in pieces of
/// the sizes `cuts` gives (cycled): the head, then the body by its framing.
fn read_response(wire: &[u8], cuts: &[usize]) -> Result<ReadBack, String> {
    use braid::upstream::wire::{self, Chunked, Decoded, Framing, Parsed};
    let mut pieces = {
        let mut at = 0;
        let mut out = Vec::new();
        for c in cuts.iter().cycle() {
            if at >= wire.len() {
                break;
            }
            let end = (at + c).min(wire.len());
            out.push(&wire[at..end]);
            at = end;
        }
        out.into_iter()
    };
    let mut buf = bytes::BytesMut::new();
    let head = loop {
        match wire::parse_head(&mut buf, &http::Method::POST).map_err(|e| e.to_string())? {
            Parsed::Head(head) => break head,
            Parsed::Interim => continue,
            Parsed::Partial => {
                assert!(
                    buf.len() <= wire::MAX_HEAD + 400,
                    "head buffer grew unchecked"
                );
                let p = pieces.next().ok_or("ended inside the head")?;
                buf.extend_from_slice(p);
            }
        }
    };
    let mut body = Vec::new();
    let mut trailer = None;
    match head.framing {
        Framing::Empty => {}
        Framing::Length(n) => {
            while (buf.len() as u64) < n {
                buf.extend_from_slice(pieces.next().ok_or("ended inside the body")?);
            }
            body.extend_from_slice(&buf.split_to(n as usize));
        }
        Framing::Chunked => {
            let mut dec = Chunked::default();
            loop {
                match dec.decode(&mut buf).map_err(|e| e.to_string())? {
                    Decoded::Data(d) => body.extend_from_slice(&d),
                    Decoded::Trailers(t) => {
                        trailer = t.get("x-sum").map(|v| v.to_str().unwrap().to_string());
                        break;
                    }
                    Decoded::End => break,
                    Decoded::NeedMore => {
                        buf.extend_from_slice(pieces.next().ok_or("ended inside the chunks")?)
                    }
                }
            }
            assert!(dec.is_done());
        }
        Framing::Close => {
            body.extend_from_slice(&buf.split());
            for p in pieces.by_ref() {
                body.extend_from_slice(p);
            }
        }
    }
    Ok(ReadBack {
        status: head.status.as_u16(),
        headers: head.headers,
        body,
        trailer,
        reusable: head.keep_alive && !matches!(head.framing, Framing::Close),
    })
}
