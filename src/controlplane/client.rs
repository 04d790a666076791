//! Fetching a bundle archive with a conditional GET: `If-None-Match` when
//! the server gave an `ETag`, `If-Modified-Since` when it gave only a
//! `Last-Modified` (a plain file server), and `Prefer: wait=N` so a control
//! plane that supports long polling can answer as soon as a new revision is
//! published (others ignore it and answer at once).

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Empty, Full, LengthLimitError, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// What the server said about the bundle we hold, to send back next time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Validators {
    pub etag: Option<String>,
    pub last_modified: Option<String>,
}

#[derive(Debug)]
pub enum Fetched {
    /// The bundle we hold is still current.
    NotModified,
    /// A different archive (not yet verified: that is the activator's job).
    New {
        bytes: Bytes,
        validators: Validators,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("bundle URL `{0}` is not a valid http:// URL")]
    BadUrl(String),
    #[error("cannot reach `{url}`: {message}")]
    Unreachable { url: String, message: String },
    #[error("`{url}` answered {status}")]
    Status { url: String, status: u16 },
    #[error("`{url}` did not answer within {secs} s")]
    Timeout { url: String, secs: u64 },
    #[error("`{url}` sent more than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("control plane refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("the sidecar token cannot be sent: it is not printable ASCII")]
    BadToken,
}

/// Fetches one bundle URL. Cheap to clone.
#[derive(Clone)]
pub struct BundleClient {
    http: Client<HttpsConnector<HttpConnector>, Empty<Bytes>>,
    url: Uri,
    timeout: Duration,
    max_bytes: usize,
    /// `Authorization: Bearer` for a control plane that requires it.
    token: Option<HeaderValue>,
}

impl BundleClient {
    /// `timeout` bounds a whole exchange, beyond any long-poll wait; `ca`
    /// is the certificate authority an `https` source must chain to.
    pub fn new(
        url: &str,
        timeout: Duration,
        max_bytes: usize,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, FetchError> {
        let (uri, connector) = connector(url, timeout, ca)?;
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            url: uri,
            timeout,
            max_bytes,
            token: None,
        })
    }

    /// Sends `token` as a bearer credential with each fetch.
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, FetchError> {
        self.token = token
            .map(|t| HeaderValue::from_str(&format!("Bearer {t}")))
            .transpose()
            .map_err(|_| FetchError::BadToken)?;
        Ok(self)
    }

    pub fn url(&self) -> String {
        self.url.to_string()
    }

    /// One conditional GET. `wait` asks a long-polling server to hold the
    /// answer up to that long.
    pub async fn fetch(
        &self,
        held: &Validators,
        wait: Option<Duration>,
    ) -> Result<Fetched, FetchError> {
        let url = self.url();
        let mut req = Request::get(self.url.clone());
        if let Some(etag) = held
            .etag
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            req = req.header(header::IF_NONE_MATCH, etag);
        } else if let Some(lm) = held
            .last_modified
            .as_deref()
            .and_then(|v| HeaderValue::from_str(v).ok())
        {
            req = req.header(header::IF_MODIFIED_SINCE, lm);
        }
        if let Some(w) = wait {
            req = req.header("prefer", format!("wait={}", w.as_secs()));
        }
        if let Some(token) = &self.token {
            req = req.header(header::AUTHORIZATION, token.clone());
        }
        let req = req
            .body(Empty::new())
            .map_err(|_| FetchError::BadUrl(url.clone()))?;
        let limit = self.timeout + wait.unwrap_or_default();
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(&url, &e))?;
            match resp.status() {
                StatusCode::NOT_MODIFIED => return Ok(Fetched::NotModified),
                StatusCode::OK => {}
                StatusCode::UNAUTHORIZED => {
                    return Err(FetchError::Refused {
                        status: 401,
                        message: match self.token {
                            Some(_) => format!(
                                "`{url}` refused the sidecar token: it is not the control plane's `--sidecar-token`"
                            ),
                            None => format!(
                                "`{url}` needs a credential; if it is an Arbiter control plane started with `--sidecar-token`, give the sidecar that token (`--sidecar-token`, ARBITER_SIDECAR_TOKEN or `[control_plane] sidecar_token`)"
                            ),
                        },
                    });
                }
                status => {
                    return Err(FetchError::Status {
                        url: url.clone(),
                        status: status.as_u16(),
                    });
                }
            }
            let header = |name| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let validators = Validators {
                etag: header(header::ETAG),
                last_modified: header(header::LAST_MODIFIED),
            };
            let body = Limited::new(resp.into_body(), self.max_bytes)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<LengthLimitError>() {
                        FetchError::TooLarge {
                            url: url.clone(),
                            limit: self.max_bytes,
                        }
                    } else {
                        FetchError::Unreachable {
                            url: url.clone(),
                            message: e.to_string(),
                        }
                    }
                })?;
            Ok(Fetched::New {
                bytes: body.to_bytes(),
                validators,
            })
        };
        tokio::time::timeout(limit, exchange)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.clone(),
                secs: limit.as_secs(),
            })?
    }
}

/// Checks the URL and makes the connector both clients use. `https` needs
/// the certificate authority the server must chain to (`ca`): sidecars trust
/// their own control plane, not every public CA.
fn connector(
    url: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<(Uri, HttpsConnector<HttpConnector>), FetchError> {
    connector_for(url, timeout, ca, false)
}

/// The sidecar's credential at the control plane: adds `authorization:
/// Bearer <token>` to every gRPC call when a token is configured.
#[derive(Clone, Default)]
pub struct SidecarAuth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl SidecarAuth {
    pub fn new(token: Option<&str>) -> Result<Self, FetchError> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| FetchError::BadToken)
            })
            .transpose()
            .map(Self)
    }
}

impl tonic::service::Interceptor for SidecarAuth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A gRPC channel with the sidecar's credential.
pub type AuthedChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, SidecarAuth>;

/// A gRPC channel to the control plane (HTTP/2; TLS verified against `ca`
/// for https), for the decision-log stream.
pub fn grpc_channel(
    url: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
) -> Result<tonic::transport::Channel, FetchError> {
    let (uri, connector) = connector_for(url, timeout, ca, true)?;
    let endpoint = tonic::transport::Endpoint::from(uri)
        .connect_timeout(timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    Ok(endpoint.connect_with_connector_lazy(connector))
}

fn connector_for(
    url: &str,
    timeout: Duration,
    ca: Option<&std::path::Path>,
    http2: bool,
) -> Result<(Uri, HttpsConnector<HttpConnector>), FetchError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let uri: Uri = url
        .parse()
        .map_err(|_| FetchError::BadUrl(url.to_owned()))?;
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(FetchError::BadUrl(url.to_owned())),
    };
    if uri.host().is_none() {
        return Err(FetchError::BadUrl(url.to_owned()));
    }
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                FetchError::Tls(format!("cannot read CA `{}`: {e}", path.display()))
            })?;
            for cert in certs {
                let cert =
                    cert.map_err(|e| FetchError::Tls(format!("CA `{}`: {e}", path.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| FetchError::Tls(format!("CA `{}`: {e}", path.display())))?;
            }
        }
        None if https => {
            return Err(FetchError::Tls(format!(
                "`{url}` is https: give the certificate authority it must chain to (--control-plane-ca / --ca)"
            )));
        }
        None => {}
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| FetchError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(timeout));
    http.set_nodelay(true);
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http();
    let connector = if http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.enable_http1().wrap_connector(http)
    };
    Ok((uri, connector))
}

/// Operator calls to the control plane: publish, roll back, list revisions.
pub struct AdminClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    token: String,
    timeout: Duration,
}

impl AdminClient {
    pub fn new(
        base: &str,
        token: &str,
        timeout: Duration,
        ca: Option<&std::path::Path>,
    ) -> Result<Self, FetchError> {
        let (_, connector) = connector(base, timeout, ca)?;
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build(connector),
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            timeout,
        })
    }

    /// Publishes an archive as bundle `name`; returns the server's JSON answer.
    pub async fn push(&self, name: &str, archive: Bytes) -> Result<String, FetchError> {
        self.send(Method::PUT, &format!("/bundles/{name}"), archive)
            .await
    }

    pub async fn rollback(&self, name: &str, revision: &str) -> Result<String, FetchError> {
        let body = serde_json::json!({ "revision": revision }).to_string();
        self.send(
            Method::POST,
            &format!("/bundles/{name}/rollback"),
            Bytes::from(body),
        )
        .await
    }

    pub async fn revisions(&self, name: &str) -> Result<String, FetchError> {
        self.send(
            Method::GET,
            &format!("/bundles/{name}/revisions"),
            Bytes::new(),
        )
        .await
    }

    /// Any authenticated POST of a JSON body, e.g. `/signals`.
    pub async fn post(&self, path: &str, json: String) -> Result<String, FetchError> {
        self.send(Method::POST, path, Bytes::from(json)).await
    }

    /// Any authenticated GET, e.g. `/decisions?outcome=DENY`.
    pub async fn get(&self, path_and_query: &str) -> Result<String, FetchError> {
        self.send(Method::GET, path_and_query, Bytes::new()).await
    }

    async fn send(&self, method: Method, path: &str, body: Bytes) -> Result<String, FetchError> {
        let url = format!("{}{path}", self.base);
        let req = Request::builder()
            .method(method)
            .uri(&url)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(body))
            .map_err(|_| FetchError::BadUrl(url.clone()))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(&url, &e))?;
            let status = resp.status();
            let text = resp
                .into_body()
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).trim_end().to_owned())
                .unwrap_or_default();
            if status.is_success() {
                Ok(text)
            } else {
                Err(FetchError::Refused {
                    status: status.as_u16(),
                    message: text,
                })
            }
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.clone(),
                secs: self.timeout.as_secs(),
            })?
    }
}

fn unreachable(url: &str, e: &dyn std::error::Error) -> FetchError {
    FetchError::Unreachable {
        url: url.to_owned(),
        message: error_chain(e),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-connection-at-a-time server answering every request with `response`
    /// (or never, when `None`). Returns its URL and the requests it saw.
    async fn server(
        response: Option<&'static [u8]>,
    ) -> (String, tokio::sync::mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/bundles/b", listener.local_addr().expect("addr"));
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0; 4096];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
                match response {
                    Some(r) => {
                        let _ = sock.write_all(r).await;
                    }
                    None => tokio::time::sleep(Duration::from_secs(30)).await,
                }
            }
        });
        (url, rx)
    }

    /// Patient enough for a loaded CI machine; the hanging server's test
    /// makes its own impatient one.
    fn client(url: &str) -> BundleClient {
        BundleClient::new(url, Duration::from_secs(10), 1024, None).expect("client")
    }

    #[tokio::test]
    async fn conditional_get_sends_validators_and_reads_new_ones() {
        let (url, mut seen) = server(Some(b"HTTP/1.1 200 OK\r\nETag: \"v2\"\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")).await;
        let held = Validators {
            etag: Some("\"v1\"".into()),
            last_modified: None,
        };
        let got = client(&url)
            .fetch(&held, Some(Duration::from_secs(1)))
            .await
            .expect("fetches");
        let Fetched::New { bytes, validators } = got else {
            panic!("expected a new bundle")
        };
        assert_eq!(&bytes[..], b"hello");
        assert_eq!(validators.etag.as_deref(), Some("\"v2\""));
        let req = seen.recv().await.expect("request").to_lowercase();
        assert!(
            req.contains("if-none-match: \"v1\"") && req.contains("prefer: wait=1"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn not_modified_errors_and_limits() {
        let (url, _) = server(Some(
            b"HTTP/1.1 304 Not Modified\r\nConnection: close\r\n\r\n",
        ))
        .await;
        assert!(matches!(
            client(&url).fetch(&Validators::default(), None).await,
            Ok(Fetched::NotModified)
        ));

        let (url, _) = server(Some(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ))
        .await;
        assert!(matches!(
            client(&url).fetch(&Validators::default(), None).await,
            Err(FetchError::Status { status: 500, .. })
        ));

        let (url, _) = server(None).await;
        let start = std::time::Instant::now();
        assert!(matches!(
            BundleClient::new(&url, Duration::from_millis(500), 1024, None)
                .expect("client")
                .fetch(&Validators::default(), None)
                .await,
            Err(FetchError::Timeout { .. })
        ));
        assert!(start.elapsed() < Duration::from_secs(5));

        let big: &'static [u8] = Box::leak(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Length: 4096\r\nConnection: close\r\n\r\n{}",
                "x".repeat(4096)
            )
            .into_bytes()
            .into_boxed_slice(),
        );
        let (url, _) = server(Some(big)).await;
        assert!(matches!(
            client(&url).fetch(&Validators::default(), None).await,
            Err(FetchError::TooLarge { .. })
        ));

        let closed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/x", closed.local_addr().expect("addr"));
        drop(closed);
        assert!(matches!(
            client(&url).fetch(&Validators::default(), None).await,
            Err(FetchError::Unreachable { .. })
        ));

        assert!(matches!(
            BundleClient::new("ftp://x/y", Duration::from_secs(1), 1, None),
            Err(FetchError::BadUrl(_))
        ));
        assert!(matches!(
            BundleClient::new("https://x/y", Duration::from_secs(1), 1, None),
            Err(FetchError::Tls(_))
        ));
    }
}
