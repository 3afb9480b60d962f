//! The guard on webhook URLs. A client chooses where falgate sends its webhooks, so falgate
//! must not become its way into what only falgate can reach. A URL must be https (http where
//! configuration allows), carry no credentials, and its host must resolve only to public
//! addresses or to networks configuration allows. The check runs when an endpoint is saved,
//! and again at every delivery in the client's own resolver ([`GuardedResolver`]), so the
//! connection goes to an address just checked: a name that resolved to a public address when
//! saved and to a private one later is refused then.

use crate::config::WebhookDelivery;
use crate::domain::address::{NotPublic, classify};
use reqwest::Url;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// How long a host name may take to resolve.
const LOOKUP_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Why a webhook URL is refused; its text is what the client is told (never the address a
/// name resolved to: that would map the network falgate sees for whoever asks).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("must be an https:// URL")]
    NotHttps,
    #[error("must be an http:// or https:// URL")]
    NotHttp,
    #[error("must not carry a user name or password")]
    Credentials,
    #[error("must name a host")]
    NoHost,
    #[error("`{host}` resolves to a {class} address, which webhooks may not reach")]
    NotPublic { host: String, class: &'static str },
    #[error("`{0}` does not resolve to any address")]
    Unresolvable(String),
    /// The lookup took too long: an outage of the resolver, not a fault of the URL's.
    #[error("`{0}` could not be looked up within 5 s")]
    LookupTimedOut(String),
}

impl Refusal {
    /// The class of address that was refused, if that was the reason.
    pub fn address_class(&self) -> Option<&'static str> {
        match self {
            Self::NotPublic { class, .. } => Some(class),
            _ => None,
        }
    }
}

/// What may be checked of a URL without resolving it.
pub fn check_shape(url: &Url, config: &WebhookDelivery) -> Result<(), Refusal> {
    match url.scheme() {
        "https" => {}
        "http" if config.allow_http => {}
        "http" => return Err(Refusal::NotHttps),
        _ if config.allow_http => return Err(Refusal::NotHttp),
        _ => return Err(Refusal::NotHttps),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Refusal::Credentials);
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Refusal::NoHost);
    }
    Ok(())
}

/// Checks a URL whole: its shape, then every address its host resolves to.
pub async fn check(url: &Url, config: &WebhookDelivery) -> Result<(), Refusal> {
    check_shape(url, config)?;
    let host = url.host_str().unwrap_or_default();
    resolve(host, 0, config).await.map(drop)
}

/// The addresses of `host`, every one of them allowed; a refusal when any is not. An IP
/// literal is its own address; a configured host name takes its fixed address; any other
/// name goes to the system's resolver.
pub async fn resolve(
    host: &str,
    port: u16,
    config: &WebhookDelivery,
) -> Result<Vec<SocketAddr>, Refusal> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = bare.to_ascii_lowercase();
    let addresses: Vec<IpAddr> = if let Ok(ip) = bare.parse::<IpAddr>() {
        vec![ip]
    } else if let Some((_, ip)) = config.hosts.iter().find(|(known, _)| *known == name) {
        vec![*ip]
    } else {
        tokio::time::timeout(LOOKUP_WITHIN, tokio::net::lookup_host((bare, port)))
            .await
            .map_err(|_| Refusal::LookupTimedOut(host.to_owned()))?
            .map_err(|_| Refusal::Unresolvable(host.to_owned()))?
            .map(|address| address.ip())
            .collect()
    };
    if addresses.is_empty() {
        return Err(Refusal::Unresolvable(host.to_owned()));
    }
    for ip in &addresses {
        allowed(*ip, config).map_err(|class| Refusal::NotPublic {
            host: host.to_owned(),
            class: class.as_str(),
        })?;
    }
    Ok(addresses
        .into_iter()
        .map(|ip| SocketAddr::new(ip, port))
        .collect())
}

fn allowed(ip: IpAddr, config: &WebhookDelivery) -> Result<(), NotPublic> {
    if config
        .allowed_networks
        .iter()
        .any(|network| network.contains(ip))
    {
        return Ok(());
    }
    classify(ip)
}

/// The resolver of the client that delivers webhooks: [`resolve`], so that every connection
/// goes to an address checked for it.
pub struct GuardedResolver {
    pub config: Arc<WebhookDelivery>,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let config = self.config.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addresses = resolve(&host, 0, &config).await?;
            let addresses: reqwest::dns::Addrs = Box::new(addresses.into_iter());
            Ok(addresses)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn config(allow_http: bool, hosts: &[(&str, &str)]) -> WebhookDelivery {
        WebhookDelivery {
            allow_http,
            allowed_networks: Vec::new(),
            hosts: hosts
                .iter()
                .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
                .collect(),
            retry_schedule: Vec::new(),
            timeout: Duration::from_secs(1),
        }
    }

    async fn refusal(url: &str, config: &WebhookDelivery) -> Option<Refusal> {
        check(&url.parse().unwrap(), config).await.err()
    }

    #[tokio::test]
    async fn urls_that_are_not_https_or_carry_credentials_are_refused() {
        let strict = config(false, &[("hooks.example", "8.8.8.8")]);
        assert_eq!(refusal("https://hooks.example/x", &strict).await, None);
        assert_eq!(
            refusal("http://hooks.example/x", &strict).await,
            Some(Refusal::NotHttps)
        );
        assert_eq!(
            refusal("ftp://hooks.example/x", &strict).await,
            Some(Refusal::NotHttps)
        );
        assert_eq!(
            refusal("https://me:pw@hooks.example/x", &strict).await,
            Some(Refusal::Credentials)
        );
        let lenient = config(true, &[("hooks.example", "8.8.8.8")]);
        assert_eq!(refusal("http://hooks.example/x", &lenient).await, None);
        assert_eq!(
            refusal("ftp://hooks.example/x", &lenient).await,
            Some(Refusal::NotHttp)
        );
    }

    #[tokio::test]
    async fn hosts_that_reach_what_is_not_public_are_refused_naming_why() {
        let table = [
            ("loopback.test", "127.0.0.1", "loopback"),
            ("private.test", "10.0.0.7", "private"),
            (
                "metadata.test",
                "169.254.169.254",
                "link-local (cloud metadata)",
            ),
            (
                "cgnat.test",
                "100.64.1.1",
                "shared address space (carrier-grade NAT)",
            ),
            ("multicast.test", "224.0.0.9", "multicast"),
            ("v6-loopback.test", "::1", "loopback"),
            ("v6-private.test", "fd00::1", "private"),
            ("mapped.test", "::ffff:10.0.0.1", "private"),
        ];
        let hosts: Vec<(&str, &str)> = table.iter().map(|(h, ip, _)| (*h, *ip)).collect();
        let config = config(false, &hosts);
        for (host, _, class) in table {
            let refused = refusal(&format!("https://{host}/hook"), &config)
                .await
                .unwrap_or_else(|| panic!("{host} passed"));
            assert_eq!(refused.address_class(), Some(class), "{host}: {refused}");
        }
        // IP literals are checked as they are.
        for literal in [
            "https://127.0.0.1/",
            "https://[::1]/",
            "https://169.254.169.254/",
        ] {
            assert!(refusal(literal, &config).await.is_some(), "{literal}");
        }
    }

    #[tokio::test]
    async fn a_network_configuration_allows_is_reached() {
        let mut config = config(false, &[("inside.test", "10.1.2.3")]);
        assert!(refusal("https://inside.test/", &config).await.is_some());
        config.allowed_networks = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(refusal("https://inside.test/", &config).await, None);
    }
}
