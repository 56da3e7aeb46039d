//! The HTTP client setup shared by the Apple client and the webhook sink.
//!
//! Every client in the process uses one TLS configuration. Building one parses the
//! system's root certificates, which takes OpenSSL 3 tens of milliseconds (the larger part
//! of a no-op sync's CPU, BENCHMARKS.md); a service provider's run over many tokens, or a
//! daemon's runs, would otherwise pay that for every token and every run.

use std::sync::OnceLock;

/// A `reqwest` client builder that uses the process-wide TLS configuration (system roots,
/// HTTP/2 or HTTP/1.1 by ALPN, as reqwest's own default would). If that configuration
/// cannot be built, the builder is returned as is and reqwest reports the error when the
/// client is built.
pub fn builder() -> reqwest::ClientBuilder {
    match shared_tls() {
        Some(tls) => reqwest::Client::builder().tls_backend_preconfigured(tls.clone()),
        None => reqwest::Client::builder(),
    }
}

fn shared_tls() -> &'static Option<native_tls::TlsConnector> {
    static TLS: OnceLock<Option<native_tls::TlsConnector>> = OnceLock::new();
    TLS.get_or_init(|| {
        native_tls::TlsConnector::builder()
            .request_alpns(&["h2", "http/1.1"])
            .build()
            .ok()
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn clients_build_with_the_shared_tls_configuration() {
        // The first call builds the configuration from the system's roots, later calls
        // reuse it; both give working clients.
        assert!(super::builder().build().is_ok());
        assert!(super::builder().build().is_ok());
        assert!(
            super::shared_tls().is_some(),
            "the system TLS configuration failed to build"
        );
    }
}
