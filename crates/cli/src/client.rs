//! What `tandem chat` and `tandem agent` share: where the services are, the caller's token, a
//! line-oriented console that scripts can drive, and readable errors.
//!
//! Both commands read commands from standard input one line at a time and write one line per
//! event to standard output, so they work the same in a terminal and in a pipe. A script
//! synchronises with the conversation through `/wait <text> [seconds]`, which blocks until a line
//! containing `<text>` has been printed since the previous `/wait` matched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tandem_platform::auth::{Role, TokenIssuer};
use tandem_proto::ids::TenantId;
use tokio::io::{AsyncBufReadExt as _, BufReader, Lines, Stdin};
use tokio::sync::Notify;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Status};

/// Where the services listen and who the caller is.
#[derive(clap::Args, Clone, Debug)]
pub struct Connection {
    /// The gRPC address of a standalone process, or of every service when they share one.
    #[arg(
        long,
        env = "TANDEM_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    pub endpoint: String,
    /// The dialog service's address, when services run separately.
    #[arg(long, env = "TANDEM_DIALOG_ENDPOINT")]
    pub dialog: Option<String>,
    /// The routing service's address, when services run separately.
    #[arg(long, env = "TANDEM_ROUTING_ENDPOINT")]
    pub routing: Option<String>,
    /// The feedback service's address, when services run separately.
    #[arg(long, env = "TANDEM_FEEDBACK_ENDPOINT")]
    pub feedback: Option<String>,
    /// A bearer token; without one, a development token is signed with the standalone data
    /// directory's secret.
    #[arg(long, env = "TANDEM_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// The tenant of the development token.
    #[arg(long, default_value = "demo")]
    pub tenant: String,
    /// The standalone data directory holding the development secret.
    #[arg(long, default_value = ".tandem")]
    pub data_dir: PathBuf,
    /// The standalone configuration whose `[auth]` section holds the signing key.
    #[arg(long)]
    pub config: Option<PathBuf>,
}

/// A gRPC client stub with the caller's bearer token on every call.
pub type Authed = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer …` to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request
            .metadata_mut()
            .insert("authorization", self.0.clone());
        Ok(request)
    }
}

/// Connected channels to the services a console needs.
pub struct Clients {
    /// Dialog.
    pub dialog: Channel,
    /// Routing.
    pub routing: Channel,
    /// Feedback.
    pub feedback: Channel,
    /// The caller's token.
    pub bearer: Bearer,
}

impl Clients {
    /// Connects to every service (failing fast with the address that is down) and prepares the
    /// token for `subject` with `role`.
    pub async fn connect(
        connection: &Connection,
        subject: &str,
        role: Role,
        env: &HashMap<String, String>,
    ) -> anyhow::Result<Self> {
        let token = match &connection.token {
            Some(token) => token.clone(),
            None => development_token(connection, subject, role, env)?,
        };
        let bearer = Bearer(
            format!("Bearer {token}")
                .parse()
                .context("the token contains characters not allowed in a header")?,
        );
        let dialog = channel(connection.dialog.as_deref().unwrap_or(&connection.endpoint)).await?;
        let routing = channel(
            connection
                .routing
                .as_deref()
                .unwrap_or(&connection.endpoint),
        )
        .await?;
        let feedback = channel(
            connection
                .feedback
                .as_deref()
                .unwrap_or(&connection.endpoint),
        )
        .await?;
        Ok(Self {
            dialog,
            routing,
            feedback,
            bearer,
        })
    }

    /// A stub of `channel` that sends the token.
    pub fn authed(&self, channel: &Channel) -> Authed {
        InterceptedService::new(channel.clone(), self.bearer.clone())
    }
}

fn development_token(
    connection: &Connection,
    subject: &str,
    role: Role,
    env: &HashMap<String, String>,
) -> anyhow::Result<String> {
    let secret = connection.data_dir.join(crate::standalone::DEV_SECRET_FILE);
    if connection.config.is_none() && !secret.exists() {
        bail!(
            "no token: pass --token (or TANDEM_TOKEN), or point --data-dir at a standalone data \
             directory ({} has no development secret; start `tandem standalone` first)",
            connection.data_dir.display()
        );
    }
    let cfg =
        crate::standalone::load_config(connection.config.as_deref(), &connection.data_dir, env)?;
    let issuer = TokenIssuer::from_config(&cfg.auth).context("cannot sign a development token")?;
    let tenant = TenantId::new(connection.tenant.clone())?;
    Ok(issuer.issue(&tenant, subject, &[role], Duration::from_secs(12 * 3600))?)
}

async fn channel(address: &str) -> anyhow::Result<Channel> {
    let endpoint = Endpoint::from_shared(address.to_owned())
        .with_context(|| format!("{address} is not a valid address (expected http://host:port)"))?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    endpoint
        .connect()
        .await
        .map_err(|_| anyhow::anyhow!("cannot reach {address}: is Tandem running there?"))
}

/// A readable sentence for a failed call.
pub fn describe(what: &str, status: &Status) -> anyhow::Error {
    let message = status.message();
    let text = match status.code() {
        Code::Unauthenticated => format!("{what}: the server refused the token ({message})"),
        Code::PermissionDenied => format!("{what}: not allowed ({message})"),
        Code::NotFound => format!("{what}: not found ({message})"),
        Code::Unavailable => format!("{what}: the service is unavailable ({message})"),
        Code::DeadlineExceeded => format!("{what}: the service did not answer in time"),
        Code::InvalidArgument => format!("{what}: invalid input ({message})"),
        Code::FailedPrecondition => format!("{what}: not possible now ({message})"),
        code => format!("{what}: {message} ({code:?})"),
    };
    anyhow::anyhow!(text)
}

/// Output lines, kept so `/wait` can look for text printed by background tasks.
#[derive(Clone, Default)]
pub struct Console {
    inner: Arc<ConsoleInner>,
}

#[derive(Default)]
struct ConsoleInner {
    lines: Mutex<Vec<String>>,
    printed: Notify,
    /// Index of the first line the next `/wait` looks at.
    cursor: Mutex<usize>,
}

impl Console {
    /// Prints a line and records it.
    #[allow(clippy::print_stdout)]
    pub fn line(&self, text: impl Into<String>) {
        let text = text.into();
        {
            let mut lines = self
                .inner
                .lines
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Printed under the lock so concurrent writers never interleave within a line and the
            // record keeps the printed order.
            println!("{text}");
            lines.push(text);
        }
        self.inner.printed.notify_waiters();
    }

    /// Waits until a line containing `needle` is printed after the previous match.
    pub async fn wait_for(&self, needle: &str, limit: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.inner.printed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let lines = self
                    .inner
                    .lines
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut cursor = self
                    .inner
                    .cursor
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if let Some(found) = lines[*cursor..].iter().position(|l| l.contains(needle)) {
                    *cursor += found + 1;
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                bail!(
                    "waited {} s for a line containing {needle:?}",
                    limit.as_secs_f32()
                );
            }
        }
    }
}

/// Standard input as lines.
pub struct Input {
    lines: Lines<BufReader<Stdin>>,
}

impl Input {
    /// Reads standard input.
    pub fn stdin() -> Self {
        Self {
            lines: BufReader::new(tokio::io::stdin()).lines(),
        }
    }

    /// The next line, trimmed; `None` at the end of input.
    pub async fn next(&mut self) -> anyhow::Result<Option<String>> {
        Ok(self
            .lines
            .next_line()
            .await
            .context("cannot read standard input")?
            .map(|line| line.trim().to_owned()))
    }
}

/// `/wait <text> [seconds]`, parsed.
pub fn parse_wait(rest: &str) -> anyhow::Result<(String, Duration)> {
    let rest = rest.trim();
    if rest.is_empty() {
        bail!("usage: /wait <text> [seconds]");
    }
    // A trailing number is the limit; the text itself may contain spaces.
    if let Some((text, seconds)) = rest.rsplit_once(' ')
        && let Ok(seconds) = seconds.parse::<f64>()
        && seconds > 0.0
        && seconds <= 3600.0
    {
        return Ok((text.trim().to_owned(), Duration::from_secs_f64(seconds)));
    }
    Ok((rest.to_owned(), Duration::from_secs(30)))
}

/// A fresh idempotency key.
pub fn new_key(prefix: &str) -> String {
    use rand::distr::{Alphanumeric, SampleString as _};
    format!(
        "{prefix}-{}",
        Alphanumeric.sample_string(&mut rand::rng(), 16)
    )
}

/// Formats seconds as "45 s" or "3 min".
pub fn duration_words(seconds: i64) -> String {
    if seconds < 90 {
        format!("{seconds} s")
    } else {
        format!("{} min", (seconds + 30) / 60)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn wait_takes_an_optional_trailing_limit() {
        assert_eq!(
            parse_wait("agent li.na: hello 5").unwrap(),
            ("agent li.na: hello".to_owned(), Duration::from_secs(5))
        );
        assert_eq!(
            parse_wait("state QUEUED").unwrap(),
            ("state QUEUED".to_owned(), Duration::from_secs(30))
        );
        assert!(parse_wait("  ").is_err());
    }

    #[tokio::test]
    async fn wait_sees_each_line_once() {
        let console = Console::default();
        console.line("bot: hello");
        console
            .wait_for("hello", Duration::from_millis(50))
            .await
            .unwrap();
        assert!(
            console
                .wait_for("hello", Duration::from_millis(50))
                .await
                .is_err()
        );
        let later = console.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.line("agent: hello again");
        });
        console
            .wait_for("again", Duration::from_secs(2))
            .await
            .unwrap();
    }
}
