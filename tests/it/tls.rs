//! TLS through real sockets: inbound with ALPN and certificate rotation, hostile
//! handshakes, and `https://` backends with a private CA, SNI and client certificates.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::*;
use braid::run::TlsFiles;
use braid::upstream::tls::{UpstreamTls, client_config};

/// A private CA that signs leaf certificates into PEM files.
struct Pki {
    dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "braid test CA");
        let key = KeyPair::generate().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = params.self_signed(&key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), cert.pem()).unwrap();
        Pki {
            dir,
            issuer: Issuer::new(params, key),
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// Writes `<name>.pem` and `<name>.key` for a leaf valid for localhost and 127.0.0.1.
    fn leaf(&self, name: &str, cn: &str) -> (PathBuf, PathBuf) {
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.path().join(format!("{name}.pem")),
            self.dir.path().join(format!("{name}.key")),
        );
        write_atomically(&c, &cert.pem());
        write_atomically(&k, &key.serialize_pem());
        (c, k)
    }
}

fn trust(ca: &Path) -> rustls::ClientConfig {
    client_config(&UpstreamTls {
        ca_file: ca.to_path_buf(),
        cert_file: None,
        key_file: None,
        server_name: None,
    })
    .unwrap()
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>;

fn https_client(ca: &Path, h2: bool) -> HttpsClient {
    let b = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(trust(ca))
        .https_only();
    let connector = if h2 {
        b.enable_http2().build()
    } else {
        b.enable_http1().build()
    };
    Client::builder(TokioExecutor::new()).build(connector)
}

/// The certificate the server at `addr` presents in a fresh handshake.
async fn presented(addr: SocketAddr, ca: &Path) -> Result<CertificateDer<'static>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(trust(ca)));
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    Ok(tls.get_ref().1.peer_certificates().unwrap()[0].clone())
}

async fn tls_proxy(pki: &Pki, backend: &str) -> (TestProxy, PathBuf, PathBuf) {
    let (cert, key) = pki.leaf("server", "first");
    let dir = pki.dir.path().join("cfg");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("braid.yaml");
    std::fs::write(&path, single_route(backend)).unwrap();
    let mut opts = options(&path);
    opts.limits.header_read_timeout = Duration::from_millis(500);
    opts.tls = Some(TlsFiles {
        cert: cert.clone(),
        key: key.clone(),
        reload_every: Duration::from_millis(50),
    });
    (TestProxy::start_at(&path, opts).await, cert, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_tls_speaks_h2_and_http1_by_alpn() {
    let b = Backend::start("b").await;
    let pki = Pki::new();
    let (proxy, _, _) = tls_proxy(&pki, &b.url()).await;
    let url = format!("https://localhost:{}/v2/models/m/ready", proxy.addr.port());
    for (h2, version) in [
        (true, http::Version::HTTP_2),
        (false, http::Version::HTTP_11),
    ] {
        let resp = https_client(&pki.ca(), h2)
            .get(url.parse().unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), version);
        assert_eq!(resp.headers()["x-braid-variant"], "only");
    }
    assert_eq!(b.hits(), 2);
    proxy.stop().await;
}

/// gRPC over inbound TLS (ALPN h2), to an h2c backend: the call, its answer and its
/// trailers pass as they do in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_over_tls_reaches_an_h2c_backend_with_its_trailers() {
    use crate::support::grpc::{GrpcBackend, frame};
    let backend = GrpcBackend::start("g").await;
    let pki = Pki::new();
    let (proxy, _, _) = tls_proxy(&pki, &format!("h2c://{}", backend.addr)).await;
    let mut cfg = trust(&pki.ca());
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut client = client.ready().await.unwrap();
    let req = Request::post(format!(
        "https://localhost:{}/echo.Echo/Say",
        proxy.addr.port()
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .unwrap();
    let (answer, mut send) = client.send_request(req, false).unwrap();
    send.send_data(frame(b"hello"), true).unwrap();
    let resp = answer.await.unwrap();
    assert_eq!(resp.headers()["x-braid-variant"], "only");
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, frame(b"hello"));
    let trailers = body.trailers().await.unwrap().expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_broken_handshakes_are_closed_and_serving_goes_on() {
    let b = Backend::start("b").await;
    let pki = Pki::new();
    let (proxy, _, _) = tls_proxy(&pki, &b.url()).await;
    // Plaintext HTTP on the TLS port: closed, nothing forwarded.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /v2/models/m/ready HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("plaintext connection closed");
    assert!(!String::from_utf8_lossy(&buf).contains("200"));
    // A handshake that stops halfway: closed at the handshake timeout.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc])
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("half handshake closed")
        .ok();
    // A client that hangs up mid-handshake, many times over.
    for _ in 0..50 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01]).await;
    }
    assert_eq!(b.hits(), 0);
    let url = format!("https://localhost:{}/v2/models/m/ready", proxy.addr.port());
    let resp = https_client(&pki.ca(), true)
        .get(url.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_used_for_new_handshakes_without_a_restart() {
    let b = Backend::start("b").await;
    let pki = Pki::new();
    let (proxy, cert, key) = tls_proxy(&pki, &b.url()).await;
    let first = presented(proxy.addr, &pki.ca()).await.unwrap();
    // A half-written rotation (new certificate, old key) is not taken.
    let (new_cert, new_key) = pki.leaf("rotated", "second");
    std::fs::copy(&new_cert, &cert).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(presented(proxy.addr, &pki.ca()).await.unwrap(), first);
    std::fs::copy(&new_key, &key).unwrap();
    let mut rotated = false;
    for _ in 0..200 {
        if presented(proxy.addr, &pki.ca()).await.unwrap() != first {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(rotated, "new handshakes still get the old certificate");
    assert_eq!(
        presented(proxy.addr, &pki.ca()).await.unwrap().as_ref(),
        std::fs::read(&new_cert)
            .map(|pem| {
                use rustls::pki_types::pem::PemObject;
                CertificateDer::from_pem_slice(&pem)
                    .unwrap()
                    .as_ref()
                    .to_vec()
            })
            .unwrap()
    );
    proxy.stop().await;
}

/// A TLS backend that requires a client certificate from the CA when `mtls` is set,
/// and answers with the SNI it saw and whether a client certificate came.
async fn tls_backend(pki: &Pki, mtls: bool) -> SocketAddr {
    let (cert, key) = pki.leaf("backend", "backend");
    let chain = vec![CertificateDer::from_pem_file(&cert).unwrap()];
    use rustls::pki_types::pem::PemObject;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if mtls {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_file(pki.ca()).unwrap())
            .unwrap();
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut cfg = builder.with_single_cert(chain, key).unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = tls.get_ref();
                let sni = conn.server_name().map(str::to_string);
                let client_cert = conn.peer_certificates().is_some();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let sni = sni.clone();
                    async move {
                        let body = serde_json::json!({
                            "sni": sni, "client_cert": client_cert,
                            "version": format!("{:?}", req.version()),
                        });
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            body.to_string(),
                        ))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn https_route(addr: SocketAddr, tls: &str) -> String {
    format!(
        "routes:\n  - model: m\n    variants:\n      - name: remote\n        backend: https://127.0.0.1:{}\n        tls: {tls}\n",
        addr.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_backends_use_the_ca_bundle_sni_and_client_certificates() {
    let pki = Pki::new();
    let backend = tls_backend(&pki, true).await;
    let (client_cert, client_key) = pki.leaf("client", "braid");
    let ca = pki.ca().display().to_string();
    let with_cert = format!(
        "{{ ca_file: \"{ca}\", cert_file: \"{}\", key_file: \"{}\", server_name: localhost }}",
        client_cert.display(),
        client_key.display()
    );
    let proxy = TestProxy::start(&https_route(backend, &with_cert)).await;
    let c = client();
    let r = post(&c, &proxy.url("/v2/models/m/infer"), &[], "{}").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["sni"], "localhost");
    assert_eq!(r.json()["client_cert"], true);
    assert_eq!(r.json()["version"], "HTTP/2.0", "h2 chosen by ALPN");

    // Without the client certificate the backend refuses the handshake. With TLS 1.3
    // the client learns it only after its first write, as an alert (503) or, if the
    // server has already hung up, a broken pipe (502): an error either way.
    let without = format!("{{ ca_file: \"{ca}\", server_name: localhost }}");
    proxy.reload(&https_route(backend, &without)).await;
    let r = post(&c, &proxy.url("/v2/models/m/infer"), &[], "{}").await;
    assert!(matches!(r.status.as_u16(), 502 | 503), "{}", r.text());
    assert!(r.json()["error"].is_string());

    // A CA that did not sign the backend's certificate: refused too.
    let other = Pki::new();
    let wrong = format!(
        "{{ ca_file: \"{}\", cert_file: \"{}\", key_file: \"{}\", server_name: localhost }}",
        other.ca().display(),
        client_cert.display(),
        client_key.display()
    );
    proxy.reload(&https_route(backend, &wrong)).await;
    let r = post(&c, &proxy.url("/v2/models/m/infer"), &[], "{}").await;
    assert_eq!(r.status, 503, "{}", r.text());
    proxy.stop().await;
}

#[test]
fn tls_settings_are_checked_with_their_field_path() {
    let pki = Pki::new();
    let check = |yaml: &str| match braid::config::load(yaml, "test") {
        Ok(_) => String::new(),
        Err(errs) => errs
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n"),
    };
    let addr: SocketAddr = "127.0.0.1:9443".parse().unwrap();
    let missing = check(&https_route(addr, "null"));
    assert!(
        missing.contains("routes[0].variants[0].tls: an https:// backend needs"),
        "{missing}"
    );
    let bad_file = check(&https_route(addr, "{ ca_file: /nonexistent/ca.pem }"));
    assert!(
        bad_file.contains("routes[0].variants[0].tls: /nonexistent/ca.pem"),
        "{bad_file}"
    );
    let half = check(&https_route(
        addr,
        &format!(
            "{{ ca_file: \"{}\", cert_file: \"{}\" }}",
            pki.ca().display(),
            pki.ca().display()
        ),
    ));
    assert!(half.contains("go together"), "{half}");
    let ok = check(&https_route(
        addr,
        &format!("{{ ca_file: \"{}\" }}", pki.ca().display()),
    ));
    assert_eq!(ok, "");
    let plain = check(
        "routes:\n  - model: m\n    variants:\n      - { name: a, backend: \"http://127.0.0.1:1\", tls: { ca_file: x } }\n",
    );
    assert!(plain.contains("only https:// backends"), "{plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_serves_tls_from_its_flags_and_refuses_a_bad_pair() {
    let b = Backend::start("b").await;
    let pki = Pki::new();
    let (cert, key) = pki.leaf("server", "flags");
    let config = pki.dir.path().join("braid.yaml");
    std::fs::write(&config, single_route(&b.url())).unwrap();
    let braid = BraidProcess::start(
        &config,
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://localhost:{}/v2/models/m/ready", braid.addr.port());
    let resp = https_client(&pki.ca(), true)
        .get(url.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    drop(braid);

    // A key that does not belong to the certificate: braid says so and does not start.
    let (_, other_key) = pki.leaf("other", "other");
    let out = crate::support::braid(
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            other_key.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("does not match its key"), "{err}");
}
