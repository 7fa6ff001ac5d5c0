//! TLS for every connection walshift opens, configured the way libpq is.
//!
//! Settings come from the connection string (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`,
//! `sslsni`), else from `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`, `PGSSLSNI`, else
//! libpq's defaults (`prefer`; `~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key` when
//! they exist). As in libpq, a root certificate file that exists is used to verify the server
//! in every mode that uses TLS (`require` then behaves like `verify-ca`), and `sslrootcert=system`
//! uses the system's trusted CAs and demands `verify-full`. Settings walshift does not implement
//! (`sslcrl`, `sslpassword`, `sslnegotiation=direct`, …) are errors, never ignored.
//!
//! The stack is rustls (with the `ring` provider): pure Rust apart from `ring`'s small C/asm
//! core, no system OpenSSL to match at build or run time, and its verifier building blocks
//! (`verify_server_cert_signed_by_trust_anchor`, `verify_server_name`) map one-to-one onto
//! libpq's verify-ca and verify-full. The same [`MakeTls`] connects tokio-postgres sessions
//! and (through [`MakeTls::handshake`]) the replication connection, after its own SSLRequest.
//! SCRAM channel binding is not offered (`channel_binding=require` fails with an error).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use crate::conn::Env;
use crate::error::{Error, Result};

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain text only.
    Disable,
    /// Plain text first; TLS if the server refuses the plain-text connection.
    Allow,
    /// TLS if the server supports it, else plain text (the default).
    Prefer,
    /// TLS or fail; the certificate is checked only if a root certificate file is given.
    Require,
    /// TLS, server certificate signed by a CA in `sslrootcert`.
    VerifyCa,
    /// As `VerifyCa`, and the certificate names the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str, from: &str) -> Result<Self> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::Config(format!(
                    "{from}={other:?} is not an sslmode; use one of disable, allow, prefer, \
                     require, verify-ca, verify-full"
                )));
            }
        })
    }

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether a connection without TLS is acceptable.
    pub fn allows_plain(self) -> bool {
        matches!(self, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of CA certificates.
    File(PathBuf),
    /// The operating system's trusted CAs (`sslrootcert=system`).
    System,
}

/// The resolved TLS settings of one connection string. Cheap to clone.
#[derive(Clone)]
pub struct TlsSettings {
    mode: SslMode,
    root_cert: Option<RootCert>,
    client_cert: Option<(PathBuf, PathBuf)>,
    sni: bool,
    config: Arc<ClientConfig>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("mode", &self.mode)
            .field("root_cert", &self.root_cert)
            .field("client_cert", &self.client_cert)
            .finish()
    }
}

/// Connection-string keys this module owns (taken out before tokio-postgres parses the rest).
const TLS_KEYS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslsni",
    "sslnegotiation",
    "sslpassword",
    "sslcrl",
    "sslcrldir",
    "sslcompression",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "requiressl",
];

/// Environment variables that select libpq TLS features walshift does not implement.
const UNSUPPORTED_ENV: &[&str] = &[
    "PGSSLCRL",
    "PGSSLCRLDIR",
    "PGSSLCOMPRESSION",
    "PGSSLCERTMODE",
    "PGSSLMINPROTOCOLVERSION",
    "PGSSLMAXPROTOCOLVERSION",
    "PGSSLNEGOTIATION",
    "PGREQUIRESSL",
];

impl TlsSettings {
    /// Resolves the TLS options taken from a connection string (`options`, as pairs) against
    /// the environment and libpq's default files, and loads the certificates and key.
    pub fn resolve(options: &[(String, String)], env: &dyn Env) -> Result<Self> {
        let opt = |k: &str| {
            options
                .iter()
                .rev()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        for (k, v) in options {
            match k.as_str() {
                "sslnegotiation" if v == "postgres" => {}
                "sslcompression" if v == "0" => {}
                "sslmode" | "sslrootcert" | "sslcert" | "sslkey" | "sslsni" | "sslnegotiation" => {}
                other => {
                    return Err(Error::Config(format!(
                        "connection option {other}={v:?} is not supported by walshift; remove \
                         it (walshift implements sslmode, sslrootcert, sslcert, sslkey, sslsni)"
                    )));
                }
            }
        }
        if let Some(v) = opt("sslnegotiation")
            && v != "postgres"
        {
            return Err(Error::Config(format!(
                "sslnegotiation={v:?} is not supported; walshift negotiates TLS with an \
                 SSLRequest (sslnegotiation=postgres)"
            )));
        }
        for var in UNSUPPORTED_ENV {
            if let Some(v) = env.var(var) {
                return Err(Error::Config(format!(
                    "{var}={v:?} is set, but walshift does not support that libpq TLS setting; \
                     unset it"
                )));
            }
        }
        let home_file = |name: &str| {
            env.var("HOME")
                .map(|h| Path::new(&h).join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        let (mode_value, mode_from) = match (opt("sslmode"), env.var("PGSSLMODE")) {
            (Some(v), _) => (Some(v), "sslmode"),
            (None, Some(v)) => (Some(v), "PGSSLMODE"),
            (None, None) => (None, "sslmode"),
        };
        let root_cert = opt("sslrootcert")
            .or_else(|| env.var("PGSSLROOTCERT"))
            .map(|v| {
                if v == "system" {
                    RootCert::System
                } else {
                    RootCert::File(PathBuf::from(v))
                }
            });
        let mode = match &mode_value {
            Some(v) => SslMode::parse(v, mode_from)?,
            // libpq 16: sslrootcert=system makes verify-full the default.
            None if root_cert == Some(RootCert::System) => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        let sni = match opt("sslsni").or_else(|| env.var("PGSSLSNI")).as_deref() {
            None | Some("1") => true,
            Some("0") => false,
            Some(v) => {
                return Err(Error::Config(format!("sslsni={v:?} must be 0 or 1")));
            }
        };
        if mode == SslMode::Disable {
            return Ok(TlsSettings {
                mode,
                root_cert: None,
                client_cert: None,
                sni,
                config: Arc::new(build_config(None, None, mode, sni)?),
            });
        }
        let root_cert = match root_cert {
            Some(r) => Some(r),
            None => home_file("root.crt").map(RootCert::File),
        };
        if root_cert == Some(RootCert::System) && mode != SslMode::VerifyFull {
            return Err(Error::Config(format!(
                "sslmode={} may not be used with sslrootcert=system: the system's CAs vouch \
                 only for host names, so use sslmode=verify-full",
                mode.as_str()
            )));
        }
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            return Err(Error::Config(format!(
                "sslmode={} needs the CA certificates to check the server against, and neither \
                 sslrootcert, PGSSLROOTCERT nor ~/.postgresql/root.crt gives them; set \
                 sslrootcert=/path/to/ca.pem (or sslrootcert=system for the system's trusted \
                 CAs), or use sslmode=require to skip server certificate verification",
                mode.as_str()
            )));
        }
        let cert = opt("sslcert")
            .or_else(|| env.var("PGSSLCERT"))
            .map(PathBuf::from);
        let key = opt("sslkey")
            .or_else(|| env.var("PGSSLKEY"))
            .map(PathBuf::from);
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (Some(c), None) => Some((c, default_key(env, home_file("postgresql.key"))?)),
            (None, Some(k)) => {
                return Err(Error::Config(format!(
                    "sslkey={} is set without sslcert; set sslcert to the client certificate \
                     that goes with the key",
                    k.display()
                )));
            }
            (None, None) => match home_file("postgresql.crt") {
                Some(c) => Some((c, default_key(env, home_file("postgresql.key"))?)),
                None => None,
            },
        };
        let config = build_config(root_cert.as_ref(), client_cert.as_ref(), mode, sni)?;
        Ok(TlsSettings {
            mode,
            root_cert,
            client_cert,
            sni,
            config: Arc::new(config),
        })
    }

    /// The effective `sslmode`.
    pub fn mode(&self) -> SslMode {
        self.mode
    }

    /// The CA source the server is checked against, if any.
    pub fn root_cert(&self) -> Option<&RootCert> {
        self.root_cert.as_ref()
    }

    /// The libpq environment that gives a `pg_dump`/`psql` child the same TLS settings.
    /// Paths only; never key material.
    pub fn child_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("PGSSLMODE", self.mode.as_str().to_owned())];
        if self.mode == SslMode::Disable {
            return env;
        }
        if let Some(r) = &self.root_cert {
            env.push((
                "PGSSLROOTCERT",
                match r {
                    RootCert::System => "system".to_owned(),
                    RootCert::File(p) => p.display().to_string(),
                },
            ));
        }
        if let Some((c, k)) = &self.client_cert {
            env.push(("PGSSLCERT", c.display().to_string()));
            env.push(("PGSSLKEY", k.display().to_string()));
        }
        env.push(("PGSSLSNI", if self.sni { "1" } else { "0" }.to_owned()));
        env
    }

    /// The connector for TLS connections (unused with `sslmode=disable`).
    pub fn connector(&self) -> MakeTls {
        MakeTls {
            config: self.config.clone(),
            roots: self.root_cert.clone(),
        }
    }
}

fn default_key(env: &dyn Env, found: Option<PathBuf>) -> Result<PathBuf> {
    found.ok_or_else(|| {
        let where_ = env
            .var("HOME")
            .map(|h| format!("{h}/.postgresql/postgresql.key"))
            .unwrap_or_else(|| "~/.postgresql/postgresql.key".into());
        Error::Config(format!(
            "a client certificate is set but its private key is not: {where_} does not exist; \
             set sslkey (or PGSSLKEY) to the key file"
        ))
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn build_config(
    root_cert: Option<&RootCert>,
    client_cert: Option<&(PathBuf, PathBuf)>,
    mode: SslMode,
    sni: bool,
) -> Result<ClientConfig> {
    let provider = provider();
    let roots = match root_cert {
        None => None,
        Some(RootCert::File(path)) => {
            let mut store = RootCertStore::empty();
            for cert in read_certs(path, "sslrootcert")? {
                store.add(cert).map_err(|e| {
                    Error::Config(format!(
                        "sslrootcert {}: a certificate in it is not a usable CA ({e})",
                        path.display()
                    ))
                })?;
            }
            Some(Arc::new(store))
        }
        Some(RootCert::System) => {
            let found = rustls_native_certs::load_native_certs();
            let mut store = RootCertStore::empty();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(Error::Config(format!(
                    "sslrootcert=system: no trusted CA certificates found on this system ({}); \
                     install the ca-certificates package or set SSL_CERT_FILE",
                    found
                        .errors
                        .first()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "empty store".into())
                )));
            }
            Some(Arc::new(store))
        }
    };
    let verifier = Arc::new(Verifier {
        roots,
        check_name: mode == SslMode::VerifyFull,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS setup: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match client_cert {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = read_certs(cert, "sslcert")?;
            check_key_permissions(key)?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                Error::Config(format!(
                    "sslkey {}: no usable private key ({e}); it must be an unencrypted PEM key \
                     (PKCS#8, PKCS#1 or SEC1)",
                    key.display()
                ))
            })?;
            builder.with_client_auth_cert(chain, key_der).map_err(|e| {
                Error::Config(format!(
                    "sslcert {} and sslkey {} do not make a usable client identity ({e})",
                    cert.display(),
                    key.display()
                ))
            })?
        }
    };
    config.enable_sni = sni;
    Ok(config)
}

fn read_certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let err = |detail: String| {
        Error::Config(format!(
            "{what} {}: {detail}; it must be a PEM file of certificates",
            path.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("no certificate in it".into()));
    }
    Ok(certs)
}

/// As libpq: the key must not be readable by group or others, except a root-owned key may be
/// group-readable (0640).
fn check_key_permissions(path: &Path) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| Error::Config(format!("sslkey {}: cannot read it ({e})", path.display())))?;
    let mode = meta.mode() & 0o777;
    let ok = if meta.uid() == 0 {
        mode & 0o037 == 0
    } else {
        mode & 0o077 == 0
    };
    if !ok {
        return Err(Error::Config(format!(
            "sslkey {} has permissions {mode:o}; it must be u=rw (0600) or less if owned by \
             the current user, or u=rw,g=r (0640) or less if owned by root",
            path.display()
        )));
    }
    Ok(())
}

/// libpq's checks: none without a root certificate; chain with one; chain and name with
/// verify-full. Handshake signatures are always verified.
#[derive(Debug)]
struct Verifier {
    roots: Option<Arc<RootCertStore>>,
    check_name: bool,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let Some(roots) = &self.roots else {
            return Ok(ServerCertVerified::assertion());
        };
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        if self.check_name {
            rustls::client::verify_server_name(&cert, server_name)?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A failed TLS handshake, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The host name cannot be used to check a certificate.
    #[error("{host:?} is not a host name or IP address usable for TLS")]
    ServerName { host: String },
    /// The handshake failed.
    #[error("TLS handshake with {host} failed: {reason}{hint}")]
    Handshake {
        host: String,
        reason: String,
        hint: String,
    },
}

impl TlsError {
    fn handshake(host: &str, roots: Option<&RootCert>, e: io::Error) -> Self {
        use rustls::{AlertDescription as A, CertificateError as C, Error as R};
        let ca = match roots {
            Some(RootCert::File(p)) => format!("sslrootcert={}", p.display()),
            Some(RootCert::System) => "the system's trusted CAs (sslrootcert=system)".into(),
            None => "sslrootcert".into(),
        };
        let hint = match e.get_ref().and_then(|i| i.downcast_ref::<R>()) {
            Some(R::InvalidCertificate(C::UnknownIssuer | C::BadSignature)) => format!(
                "; the server's certificate is not signed by a CA in {ca}: point sslrootcert \
                 at the CA that issued the server certificate"
            ),
            Some(R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. })) => {
                format!(
                    "; the server's certificate does not name {host}: connect with a host name \
                     listed in its subject alternative names, or use sslmode=verify-ca to check \
                     only the CA"
                )
            }
            Some(R::InvalidCertificate(C::Expired | C::ExpiredContext { .. })) => {
                "; the server's certificate has expired: renew it on the server".into()
            }
            Some(R::AlertReceived(A::CertificateRequired | A::HandshakeFailure)) => {
                "; the server may require a client certificate: set sslcert and sslkey".into()
            }
            Some(R::AlertReceived(A::UnknownCA | A::BadCertificate)) => {
                "; the server rejected the client certificate (sslcert): use one signed by a \
                 CA in the server's ssl_ca_file"
                    .into()
            }
            _ => String::new(),
        };
        TlsError::Handshake {
            host: host.to_owned(),
            reason: e.to_string(),
            hint,
        }
    }
}

/// A TLS connector for tokio-postgres sessions and the replication connection.
#[derive(Clone)]
pub struct MakeTls {
    config: Arc<ClientConfig>,
    roots: Option<RootCert>,
}

impl MakeTls {
    /// Runs the TLS handshake on `stream` (after the server accepted an SSLRequest).
    pub async fn handshake<S>(
        &self,
        host: &str,
        stream: S,
    ) -> std::result::Result<TlsStream<S>, TlsError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut make = self.clone();
        let connect = MakeTlsConnect::<S>::make_tls_connect(&mut make, host)?;
        connect.connect(stream).await
    }
}

impl<S> MakeTlsConnect<S> for MakeTls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type TlsConnect = Connector;
    type Error = TlsError;

    /// tokio-postgres asks for a connector for every host before it looks at `sslmode`,
    /// Unix sockets (host `""`) included: an unusable name is an error only if a handshake is
    /// actually attempted.
    fn make_tls_connect(&mut self, domain: &str) -> std::result::Result<Connector, TlsError> {
        let name = ServerName::try_from(domain.to_owned()).ok();
        Ok(Connector {
            config: self.config.clone(),
            roots: self.roots.clone(),
            host: domain.to_owned(),
            name,
        })
    }
}

/// One pending handshake.
pub struct Connector {
    config: Arc<ClientConfig>,
    roots: Option<RootCert>,
    host: String,
    /// `None` when the host is no usable TLS name (refused at the handshake).
    name: Option<ServerName<'static>>,
}

impl<S> TlsConnect<S> for Connector
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = TlsStream<S>;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = std::result::Result<TlsStream<S>, TlsError>> + Send>>;

    fn connect(self, stream: S) -> Self::Future {
        Box::pin(async move {
            let name = self.name.ok_or_else(|| TlsError::ServerName {
                host: self.host.clone(),
            })?;
            tokio_rustls::TlsConnector::from(self.config)
                .connect(name, stream)
                .await
                .map(|s| TlsStream(Box::new(s)))
                .map_err(|e| TlsError::handshake(&self.host, self.roots.as_ref(), e))
        })
    }
}

/// An established TLS stream.
pub struct TlsStream<S>(Box<tokio_rustls::client::TlsStream<S>>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for TlsStream<S> {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// Takes the TLS options out of a connection string: the rest (for tokio-postgres) and the
/// options in order. Handles both forms; a string it cannot tokenize is returned whole, for
/// tokio-postgres to report.
pub(crate) fn split_options(s: &str) -> (String, Vec<(String, String)>) {
    split_options_named(s, TLS_KEYS)
}

/// As [`split_options`], for the options named in `keys` (conn.rs takes the TCP options out
/// the same way).
pub(crate) fn split_options_named(s: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    if s.starts_with("postgresql://") || s.starts_with("postgres://") {
        split_url(s, keys)
    } else {
        split_keyword_value(s, keys).unwrap_or_else(|| (s.to_owned(), Vec::new()))
    }
}

fn split_url(s: &str, keys: &[&str]) -> (String, Vec<(String, String)>) {
    let Some((base, query)) = s.split_once('?') else {
        return (s.to_owned(), Vec::new());
    };
    let mut kept = Vec::new();
    let mut taken = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = percent_decode(k);
        if keys.contains(&key.as_str()) {
            taken.push((key, percent_decode(v)));
        } else {
            kept.push(pair);
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, taken)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn split_keyword_value(s: &str, keys: &[&str]) -> Option<(String, Vec<(String, String)>)> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let at = |i: usize| chars.get(i).map(|c| c.1);
    let mut i = 0;
    let mut rest = String::new();
    let mut last = 0;
    let mut taken = Vec::new();
    loop {
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let Some(start) = chars.get(i).map(|c| c.0) else {
            break;
        };
        let mut key = String::new();
        while let Some(c) = at(i) {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            i += 1;
        }
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        if at(i) != Some('=') {
            return None;
        }
        i += 1;
        while at(i).is_some_and(char::is_whitespace) {
            i += 1;
        }
        let mut value = String::new();
        if at(i) == Some('\'') {
            i += 1;
            loop {
                match at(i)? {
                    '\'' => {
                        i += 1;
                        break;
                    }
                    '\\' => {
                        value.push(at(i + 1)?);
                        i += 2;
                    }
                    c => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while let Some(c) = at(i) {
                if c.is_whitespace() {
                    break;
                }
                if c == '\\' {
                    value.push(at(i + 1)?);
                    i += 2;
                } else {
                    value.push(c);
                    i += 1;
                }
            }
        }
        let end = chars.get(i).map(|c| c.0).unwrap_or(s.len());
        if keys.contains(&key.as_str()) {
            rest.push_str(&s[last..start]);
            last = end;
            taken.push((key, value));
        }
    }
    rest.push_str(&s[last..]);
    Some((rest, taken))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_taken_out_of_both_forms() {
        let (rest, opts) = split_options(
            "host=db1 sslmode = verify-full sslrootcert='/a b/ca.pem' user=app sslkey=k\\ x",
        );
        assert_eq!(
            rest.split_whitespace().collect::<Vec<_>>(),
            ["host=db1", "user=app"]
        );
        assert_eq!(
            opts,
            [
                ("sslmode".into(), "verify-full".into()),
                ("sslrootcert".into(), "/a b/ca.pem".into()),
                ("sslkey".into(), "k x".into()),
            ]
        );
        let (rest, opts) = split_options(
            "postgresql://app@db1/shop?sslmode=require&application_name=x&sslrootcert=%2Ftmp%2Fca.pem",
        );
        assert_eq!(rest, "postgresql://app@db1/shop?application_name=x");
        assert_eq!(
            opts,
            [
                ("sslmode".into(), "require".into()),
                ("sslrootcert".into(), "/tmp/ca.pem".into()),
            ]
        );
        let (rest, opts) = split_options("postgresql://db1/shop?sslmode=disable");
        assert_eq!((rest.as_str(), opts.len()), ("postgresql://db1/shop", 1));
    }
}
