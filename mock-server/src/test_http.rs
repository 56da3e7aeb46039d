//! What the loopback scenarios of both APIs (`tests`, `org::tests`) share: a started mock and
//! a response read whole.

use reqwest::StatusCode;
use serde_json::Value;

use crate::{start, MockConfig, MockHandle};

/// A response read whole; each scenario module adds its own readers of the body.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
}

impl Reply {
    /// The body as JSON; panics with the body when it is not.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("{e}: {}", self.text))
    }
}

/// Sends `req` and reads the whole response.
pub(crate) async fn reply(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.unwrap();
    Reply {
        status: r.status(),
        headers: r.headers().clone(),
        text: r.text().await.unwrap(),
    }
}

/// A mock started with `config`.
pub(crate) async fn mock(config: MockConfig) -> MockHandle {
    start(config).await.unwrap()
}
