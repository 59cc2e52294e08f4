//! Caller identity from JWTs.
//!
//! Every business RPC carries `authorization: Bearer <jwt>`. The [`AuthInterceptor`] verifies it
//! (RS*/PS*/ES*/EdDSA keys from PEM files or a JWKS document; HS256 only when development mode
//! allows it) and attaches a [`Caller`] to the request. The tenant comes from the verified token
//! alone: a request that names another tenant in `x-tandem-tenant` is refused.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use tandem_proto::ids::TenantId;

use crate::config::AuthConfig;
use crate::error::{ErrorCode, ServiceError};

/// Metadata key a client may use to state the tenant it expects; it must match the token.
pub const TENANT_HEADER: &str = "x-tandem-tenant";

/// What a caller may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A channel integration posting customer messages.
    Channel,
    /// A human agent.
    Agent,
    /// A team lead: sees and manages agents and queues.
    Supervisor,
    /// A tenant administrator: scenarios, models, knowledge.
    Admin,
    /// Another Tandem service.
    Service,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Channel,
        Role::Agent,
        Role::Supervisor,
        Role::Admin,
        Role::Service,
    ];

    /// Returns the role's claim value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Channel => "channel",
            Role::Agent => "agent",
            Role::Supervisor => "supervisor",
            Role::Admin => "admin",
            Role::Service => "service",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = AuthError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or_else(|| AuthError::InvalidRole(s.to_owned()))
    }
}

/// The claims Tandem reads from a token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    /// Who the caller is (agent id, integration name, service name).
    pub sub: String,
    /// The tenant the caller acts for.
    pub tenant: String,
    /// What the caller may do.
    pub roles: Vec<Role>,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
    /// Issued at, seconds since the epoch.
    #[serde(default)]
    pub iat: u64,
    /// Issuer.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub iss: String,
    /// Audience. A token may name one or several (a JSON string or array); several are kept
    /// here separated by spaces. Verification checks the configured audience against each.
    #[serde(
        default,
        skip_serializing_if = "String::is_empty",
        deserialize_with = "one_or_several"
    )]
    pub aud: String,
}

/// Reads the `aud` claim, a string or an array of strings.
fn one_or_several<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Several(Vec<String>),
    }
    Ok(match Audience::deserialize(deserializer)? {
        Audience::One(one) => one,
        Audience::Several(several) => several.join(" "),
    })
}

/// A verified caller, attached to every authenticated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The tenant, from the verified token only.
    pub tenant: TenantId,
    /// The token's subject.
    pub subject: String,
    /// The caller's roles.
    pub roles: Vec<Role>,
}

impl Caller {
    /// Returns whether the caller has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// Succeeds when the caller has at least one of `roles`.
    pub fn require_any(&self, roles: &[Role]) -> Result<(), AuthError> {
        if roles.iter().any(|role| self.has(*role)) {
            Ok(())
        } else {
            Err(AuthError::MissingRole {
                needed: roles.to_vec(),
            })
        }
    }
}

/// Why a caller was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing bearer token")]
    MissingToken,
    /// The metadata is not `Bearer <token>`.
    #[error("authorization must be 'Bearer <token>'")]
    MalformedHeader,
    /// The token failed verification.
    #[error("invalid token: {0}")]
    InvalidToken(String),
    /// The token's tenant is not a valid tenant id.
    #[error("invalid token: {0}")]
    InvalidTenant(#[from] tandem_proto::ids::InvalidTenantId),
    /// An unknown role name.
    #[error("unknown role {0:?}")]
    InvalidRole(String),
    /// The request names a tenant other than the token's.
    #[error("the request's tenant does not match the token's tenant")]
    TenantMismatch,
    /// The caller lacks a role the call needs.
    #[error("this call needs one of the roles {}", needed.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", "))]
    MissingRole {
        /// The acceptable roles.
        needed: Vec<Role>,
    },
    /// The configured keys could not be loaded.
    #[error("cannot load key material from {path}: {reason}")]
    KeyMaterial {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// No key is configured to sign development tokens.
    #[error(
        "no signing key: set auth.signing_key_file, or auth.allow_hs256 with auth.hs256_secret"
    )]
    NoSigningKey,
}

impl ServiceError for AuthError {
    fn code(&self) -> ErrorCode {
        match self {
            AuthError::MissingToken
            | AuthError::MalformedHeader
            | AuthError::InvalidToken(_)
            | AuthError::InvalidTenant(_) => ErrorCode::Unauthenticated,
            AuthError::TenantMismatch | AuthError::MissingRole { .. } => {
                ErrorCode::PermissionDenied
            }
            AuthError::InvalidRole(_) => ErrorCode::InvalidArgument,
            AuthError::KeyMaterial { .. } | AuthError::NoSigningKey => ErrorCode::Internal,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum KeyFamily {
    Rsa,
    Ec,
    Ed,
    Hmac,
}

impl KeyFamily {
    fn of(alg: Algorithm) -> Self {
        match alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => KeyFamily::Hmac,
            Algorithm::ES256 | Algorithm::ES384 => KeyFamily::Ec,
            Algorithm::EdDSA => KeyFamily::Ed,
            _ => KeyFamily::Rsa,
        }
    }
}

struct VerifyingKey {
    kid: Option<String>,
    family: KeyFamily,
    key: DecodingKey,
}

/// Verifies tokens against the configured keys.
pub struct Authenticator {
    keys: Vec<VerifyingKey>,
    issuer: String,
    audience: String,
    leeway: u64,
}

impl fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.len())
            .field("issuer", &self.issuer)
            .finish()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, AuthError> {
    std::fs::read(path).map_err(|e| AuthError::KeyMaterial {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn decoding_key_from_pem(path: &Path, pem: &[u8]) -> Result<(KeyFamily, DecodingKey), AuthError> {
    if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
        return Ok((KeyFamily::Rsa, key));
    }
    if let Ok(key) = DecodingKey::from_ec_pem(pem) {
        return Ok((KeyFamily::Ec, key));
    }
    if let Ok(key) = DecodingKey::from_ed_pem(pem) {
        return Ok((KeyFamily::Ed, key));
    }
    Err(AuthError::KeyMaterial {
        path: path.display().to_string(),
        reason: "not an RSA, EC or Ed25519 public key in PEM".into(),
    })
}

fn encoding_key_from_pem(path: &Path, pem: &[u8]) -> Result<(Algorithm, EncodingKey), AuthError> {
    if let Ok(key) = EncodingKey::from_rsa_pem(pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = EncodingKey::from_ec_pem(pem) {
        return Ok((Algorithm::ES256, key));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(pem) {
        return Ok((Algorithm::EdDSA, key));
    }
    Err(AuthError::KeyMaterial {
        path: path.display().to_string(),
        reason: "not an RSA, EC P-256 or Ed25519 private key in PEM".into(),
    })
}

impl Authenticator {
    /// Loads every configured key.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let mut keys = Vec::new();
        for path in &cfg.public_key_files {
            let (family, key) = decoding_key_from_pem(path, &read(path)?)?;
            keys.push(VerifyingKey {
                kid: None,
                family,
                key,
            });
        }
        if let Some(path) = &cfg.jwks_file {
            let set: JwkSet =
                serde_json::from_slice(&read(path)?).map_err(|e| AuthError::KeyMaterial {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
            for jwk in &set.keys {
                let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::KeyMaterial {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
                let family = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => KeyFamily::Ec,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => KeyFamily::Ed,
                    jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) => KeyFamily::Hmac,
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => KeyFamily::Rsa,
                    _ => continue,
                };
                if family == KeyFamily::Hmac {
                    continue; // symmetric keys in a JWKS would let anyone holding it mint tokens
                }
                keys.push(VerifyingKey {
                    kid: jwk.common.key_id.clone(),
                    family,
                    key,
                });
            }
        }
        if cfg.allow_hs256 && !cfg.hs256_secret.is_empty() {
            keys.push(VerifyingKey {
                kid: None,
                family: KeyFamily::Hmac,
                key: DecodingKey::from_secret(cfg.hs256_secret.expose().as_bytes()),
            });
        }
        Ok(Self {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway_secs,
        })
    }

    /// Verifies a token and returns its caller.
    pub fn verify(&self, token: &str) -> Result<Caller, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))?;
        let family = KeyFamily::of(header.alg);
        if family == KeyFamily::Hmac && header.alg != Algorithm::HS256 {
            return Err(AuthError::InvalidToken(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if self.issuer.is_empty() {
            validation.iss = None;
        } else {
            validation.set_issuer(&[&self.issuer]);
        }
        if self.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&self.audience]);
        }
        let candidates = self.keys.iter().filter(|k| k.family == family).filter(|k| {
            match (&header.kid, &k.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
        });
        let mut last_error = None;
        for key in candidates {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &validation) {
                Ok(data) => return caller_from(data.claims),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        Err(AuthError::InvalidToken(last_error.unwrap_or_else(|| {
            format!("no key accepts algorithm {:?}", header.alg)
        })))
    }
}

fn caller_from(claims: Claims) -> Result<Caller, AuthError> {
    let tenant = TenantId::new(claims.tenant)?;
    if claims.sub.is_empty() {
        return Err(AuthError::InvalidToken("empty subject".into()));
    }
    if claims.roles.is_empty() {
        return Err(AuthError::InvalidToken("no roles".into()));
    }
    let mut seen = HashSet::new();
    let roles = claims
        .roles
        .into_iter()
        .filter(|r| seen.insert(*r))
        .collect();
    Ok(Caller {
        tenant,
        subject: claims.sub,
        roles,
    })
}

/// Signs development tokens, for `tandem token` and tests.
pub struct TokenIssuer {
    algorithm: Algorithm,
    key: EncodingKey,
    issuer: String,
    audience: String,
}

impl TokenIssuer {
    /// Uses `auth.signing_key_file` if set, else the HS256 development secret.
    pub fn from_config(cfg: &AuthConfig) -> Result<Self, AuthError> {
        let (algorithm, key) = if let Some(path) = &cfg.signing_key_file {
            encoding_key_from_pem(path, &read(path)?)?
        } else if cfg.allow_hs256 && !cfg.hs256_secret.is_empty() {
            (
                Algorithm::HS256,
                EncodingKey::from_secret(cfg.hs256_secret.expose().as_bytes()),
            )
        } else {
            return Err(AuthError::NoSigningKey);
        };
        Ok(Self {
            algorithm,
            key,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
        })
    }

    /// Issues a token for `subject` of `tenant` with `roles`, valid for `ttl`.
    pub fn issue(
        &self,
        tenant: &TenantId,
        subject: &str,
        roles: &[Role],
        ttl: Duration,
    ) -> Result<String, AuthError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let claims = Claims {
            sub: subject.to_owned(),
            tenant: tenant.to_string(),
            roles: roles.to_vec(),
            exp: now + ttl.as_secs(),
            iat: now,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.key)
            .map_err(|e| AuthError::InvalidToken(e.to_string()))
    }
}

/// A tonic interceptor that authenticates every request it sees.
#[derive(Clone)]
pub struct AuthInterceptor {
    authenticator: Arc<Authenticator>,
}

impl AuthInterceptor {
    /// Wraps an authenticator.
    pub fn new(authenticator: Arc<Authenticator>) -> Self {
        Self { authenticator }
    }

    fn authenticate(&self, metadata: &tonic::metadata::MetadataMap) -> Result<Caller, AuthError> {
        let value = metadata
            .get("authorization")
            .ok_or(AuthError::MissingToken)?;
        let value = value.to_str().map_err(|_| AuthError::MalformedHeader)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::MalformedHeader)?;
        let caller = self.authenticator.verify(token)?;
        if let Some(claimed) = metadata.get(TENANT_HEADER)
            && claimed.to_str().ok() != Some(caller.tenant.as_str())
        {
            return Err(AuthError::TenantMismatch);
        }
        Ok(caller)
    }
}

impl tonic::service::Interceptor for AuthInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        match self.authenticate(request.metadata()) {
            Ok(caller) => {
                request.extensions_mut().insert(caller);
                Ok(request)
            }
            Err(error) => {
                metrics::counter!(crate::metrics::AUTH_FAILURES_TOTAL, "code" => error.code().to_string()).increment(1);
                Err(crate::error::status_from(&error))
            }
        }
    }
}

/// Returns the verified caller of a request that went through [`AuthInterceptor`].
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Caller, tonic::Status> {
    request
        .extensions()
        .get::<Caller>()
        .ok_or_else(|| crate::error::status_from(&AuthError::MissingToken))
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor as _;

    use super::*;
    use crate::config::Secret;

    fn dev_config() -> AuthConfig {
        AuthConfig {
            allow_hs256: true,
            hs256_secret: Secret::new("s".repeat(32)),
            ..AuthConfig::default()
        }
    }

    fn request_with(token: Option<&str>, tenant_header: Option<&str>) -> tonic::Request<()> {
        let mut request = tonic::Request::new(());
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        if let Some(tenant) = tenant_header {
            request
                .metadata_mut()
                .insert(TENANT_HEADER, tenant.parse().unwrap());
        }
        request
    }

    #[test]
    fn issued_token_verifies_and_carries_the_tenant() {
        let cfg = dev_config();
        let token = TokenIssuer::from_config(&cfg)
            .unwrap()
            .issue(
                &TenantId::new("acme").unwrap(),
                "agent-7",
                &[Role::Agent],
                Duration::from_secs(60),
            )
            .unwrap();
        let mut interceptor =
            AuthInterceptor::new(Arc::new(Authenticator::from_config(&cfg).unwrap()));
        let request = interceptor
            .call(request_with(Some(&token), Some("acme")))
            .unwrap();
        let caller = caller(&request).unwrap();
        assert_eq!(caller.tenant.as_str(), "acme");
        assert_eq!(caller.subject, "agent-7");
        assert!(caller.require_any(&[Role::Agent, Role::Supervisor]).is_ok());
        assert!(caller.require_any(&[Role::Admin]).is_err());
    }

    #[test]
    fn refuses_missing_malformed_foreign_and_mismatched_tokens() {
        let cfg = dev_config();
        let mut interceptor =
            AuthInterceptor::new(Arc::new(Authenticator::from_config(&cfg).unwrap()));
        let code = |r: Result<tonic::Request<()>, tonic::Status>| r.unwrap_err().code();
        assert_eq!(
            code(interceptor.call(request_with(None, None))),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            code(interceptor.call(request_with(Some("not-a-jwt"), None))),
            tonic::Code::Unauthenticated
        );

        let other = AuthConfig {
            hs256_secret: Secret::new("o".repeat(32)),
            ..dev_config()
        };
        let foreign = TokenIssuer::from_config(&other)
            .unwrap()
            .issue(
                &TenantId::new("acme").unwrap(),
                "x",
                &[Role::Admin],
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            code(interceptor.call(request_with(Some(&foreign), None))),
            tonic::Code::Unauthenticated
        );

        let token = TokenIssuer::from_config(&cfg)
            .unwrap()
            .issue(
                &TenantId::new("acme").unwrap(),
                "x",
                &[Role::Admin],
                Duration::from_secs(60),
            )
            .unwrap();
        assert_eq!(
            code(interceptor.call(request_with(Some(&token), Some("globex")))),
            tonic::Code::PermissionDenied
        );
    }

    #[test]
    fn refuses_expired_tokens() {
        let cfg = AuthConfig {
            leeway_secs: 0,
            ..dev_config()
        };
        let key = EncodingKey::from_secret(cfg.hs256_secret.expose().as_bytes());
        let claims = Claims {
            sub: "x".into(),
            tenant: "acme".into(),
            roles: vec![Role::Agent],
            exp: 1,
            iat: 0,
            iss: "tandem".into(),
            aud: "tandem".into(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        let err = Authenticator::from_config(&cfg)
            .unwrap()
            .verify(&token)
            .unwrap_err();
        assert!(err.to_string().contains("Expired"), "{err}");
    }

    #[test]
    fn tokens_naming_several_audiences_verify() {
        #[derive(Serialize)]
        struct ManyAudiences {
            sub: &'static str,
            tenant: &'static str,
            roles: Vec<Role>,
            exp: u64,
            iss: String,
            aud: Vec<String>,
        }
        let cfg = dev_config();
        let key = EncodingKey::from_secret(cfg.hs256_secret.expose().as_bytes());
        let claims = ManyAudiences {
            sub: "x",
            tenant: "acme",
            roles: vec![Role::Agent],
            exp: u64::try_from(chrono::Utc::now().timestamp()).unwrap() + 600,
            iss: cfg.issuer.clone(),
            aud: vec!["billing".into(), cfg.audience.clone()],
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &key).unwrap();
        let caller = Authenticator::from_config(&cfg)
            .unwrap()
            .verify(&token)
            .unwrap();
        assert_eq!(caller.tenant.as_str(), "acme");

        let elsewhere = ManyAudiences {
            aud: vec!["billing".into(), "crm".into()],
            ..claims
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &elsewhere, &key).unwrap();
        assert!(
            Authenticator::from_config(&cfg)
                .unwrap()
                .verify(&token)
                .is_err()
        );
    }

    #[test]
    fn hs256_is_refused_unless_allowed() {
        let dev = dev_config();
        let token = TokenIssuer::from_config(&dev)
            .unwrap()
            .issue(
                &TenantId::new("acme").unwrap(),
                "x",
                &[Role::Agent],
                Duration::from_secs(60),
            )
            .unwrap();
        let strict = AuthConfig {
            allow_hs256: false,
            ..dev
        };
        assert!(
            Authenticator::from_config(&strict)
                .unwrap()
                .verify(&token)
                .is_err()
        );
    }
}
